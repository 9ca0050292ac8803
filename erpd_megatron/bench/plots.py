"""PNG plots of the benchmark JSONs (matplotlib, Agg backend). Each function returns the path written."""

from __future__ import annotations

import json
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _load(out: Path, name: str) -> dict | None:
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def throughput(out: Path) -> Path | None:
    """Bars: tokens/s (median, min-max whiskers) of Megatron vs plain, train step and log-prob pass."""
    docs = [(n, _load(out, n)) for n in ("train_throughput", "logprob_throughput", "train_throughput_demo",
                                         "logprob_throughput_demo")]
    docs = [(n, d) for n, d in docs if d]
    if not docs:
        return None
    plt = _plt()
    cols = min(len(docs), 2)
    rows = (len(docs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat[len(docs):]:
        ax.set_visible(False)
    for ax, (name, d) in zip(axes.flat, docs):
        tps = d["results"]["tokens_per_s"]
        labels = {"megatron": "Megatron\n(PolicyEngine)", "plain": "plain\ntransformers",
                  "plain_onednn": "plain +\noneDNN GEMM"}
        keys = [k for k in labels if k in tps]
        med = [tps[k]["median"] for k in keys]
        err = [[tps[k]["median"] - tps[k]["min"] for k in keys], [tps[k]["max"] - tps[k]["median"] for k in keys]]
        ax.bar([labels[k] for k in keys], med, yerr=err, capsize=6, color=["#4c72b0", "#999999", "#c8c8c8"][:len(keys)])
        r = d["results"]["ratio_megatron_over_plain"]
        title = f"{name.replace('_', ' ')}\nMegatron / plain {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"
        if (ro := d["results"].get("ratio_megatron_over_plain_onednn")):
            title += f"\nMegatron / (plain + oneDNN) {ro['median']:.2f} [{ro['min']:.2f}, {ro['max']:.2f}]"
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("tokens / s (CPU, fp32): median, min-max")
    fig.tight_layout()
    path = out / "throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def weight_sync(out: Path) -> Path | None:
    """GB/s vs bucket size, with the memcpy bandwidth and the 1/4-of-memcpy target (legend beside the axes)."""
    d = _load(out, "weight_sync")
    if not d:
        return None
    plt = _plt()
    res = d["results"]
    mem = res["memcpy_gbps"]["median"]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    # keys "<MiB>": shared-memory transport; "p2p_<MiB>": gloo point-to-point (older JSONs: only "<MiB>")
    for prefix, label in (("", "Megatron TP=2 -> LocalEngine,\nshared memory"), ("p2p_", "same, gloo point-to-point")):
        rows = sorted(((float(k[len(prefix):]), v) for k, v in res["per_bucket_mib"].items()
                       if not k.startswith("stream") and (k.startswith("p2p_") == bool(prefix))), key=lambda kv: kv[0])
        if not rows:
            continue
        med = [v["gbps"]["median"] for _, v in rows]
        lo = [v["gbps"]["median"] - v["gbps"]["min"] for _, v in rows]
        hi = [v["gbps"]["max"] - v["gbps"]["median"] for _, v in rows]
        ax.errorbar([k for k, _ in rows], med, yerr=[lo, hi], marker="o", capsize=4,
                    label=label + "\n(median, min-max)")
    ax.axhline(mem, color="k", ls="--", lw=1, label=f"memcpy {mem:.1f} GB/s")
    ax.axhline(mem / 4, color="r", ls=":", lw=1, label="target: memcpy / 4")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not 2^k / 10^k
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("bucket cap (MiB)")
    ax.set_ylabel("GB/s")
    ax.set_title("weight sync (CPU, gloo, fp32)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    path = out / "weight_sync.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


SEED_STYLES = ((":", "o"), ("--", "s"), ("-.", "^"), ((0, (1, 3)), "D"), ((0, (5, 5)), "v"))


def _median_spread(curves: list[list[dict]], x: str) -> dict[str, list]:
    """Per eval step that every seed evaluated: median / min / max of `x` and of the accuracy over seeds."""
    import statistics

    steps = sorted(set.intersection(*({p["step"] for p in c if p.get(x) is not None} for c in curves)))
    out = {k: [] for k in ("x", "x_lo", "x_hi", "y", "y_lo", "y_hi")}
    for s in steps:
        pts = [next(p for p in c if p["step"] == s) for c in curves]
        for key, vals in (("x", [p[x] for p in pts]), ("y", [p["accuracy"] for p in pts])):
            med = statistics.median(vals)
            out[key].append(med)
            out[key + "_lo"].append(med - min(vals))
            out[key + "_hi"].append(max(vals) - med)
    return out


# benchmark JSON name -> the task named in the plot's title (`--preset bench_long` writes its own JSON)
ERPD_VS_ONPOLICY = {"erpd_vs_onpolicy": "toy task", "erpd_vs_onpolicy_bench_long": "long-reasoning task"}


def erpd_vs_onpolicy(out: Path, name: str = "erpd_vs_onpolicy") -> Path | None:
    """Accuracy vs rollouts consumed, vs compute seconds (wall-clock without evaluation; the paper's Table 4 view)
    and vs reverse KL: per method the median over seeds (bold, with the min-max band over seeds), each seed a thin
    line of its own style (labelled), the base marked. Writes `<name>.png` from `<name>.json`."""
    d = _load(out, name)
    if not d or not d["results"].get("curves"):
        return None
    from matplotlib.lines import Line2D
    from matplotlib.ticker import PercentFormatter

    plt = _plt()
    res = d["results"]
    seeds = res["seeds"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4), sharey=True)
    by_method: dict[str, list] = {}
    for curve in res["curves"]:
        by_method.setdefault(curve["method"], []).append(curve)
    # methods whose points all sit at one rollout count (offline: the fixed batch) are dodged sideways
    top = max(p["rollouts"] for cu in res["curves"] for p in cu["points"])
    fixed = [m for m, cs in by_method.items() if len({p["rollouts"] for cu in cs for p in cu["points"]}) == 1]
    dodge = {m: 0.03 * top * (i - (len(fixed) - 1) / 2) for i, m in enumerate(fixed)}
    handles = []
    for mi, (m, curves) in enumerate(by_method.items()):
        c = f"C{mi}"
        handles.append(Line2D([], [], color=c, lw=2.5, marker="o", label=f"{m} ({curves[0].get('kind', '')}): median"))
        for ax, x in zip(axes, ("rollouts", "compute_s", "kl")):
            shift = dodge.get(m, 0.0) if x == "rollouts" else 0.0
            for curve in curves:
                ls, mk = SEED_STYLES[seeds.index(curve["seed"]) % len(SEED_STYLES)]
                pts = [p for p in curve["points"] if p.get(x) is not None]
                ax.plot([p[x] + shift for p in pts], [p["accuracy"] for p in pts], color=c, ls=ls, lw=0.8, marker=mk,
                        ms=3, mfc="none", alpha=0.5)
            ms = _median_spread([cu["points"] for cu in curves], x)
            xs = [v + shift for v in ms["x"]]
            ax.errorbar(xs, ms["y"], yerr=[ms["y_lo"], ms["y_hi"]],
                        xerr=[ms["x_lo"], ms["x_hi"]] if x != "rollouts" else None,
                        color=c, lw=2.5, elinewidth=1, capsize=3, marker="o", ms=5, zorder=4)
    base = res.get("base_accuracy") or {}
    if base.get("median") is not None:
        for ax in axes:
            ax.errorbar([0], [base["median"]], yerr=[[base["median"] - base["min"]], [base["max"] - base["median"]]],
                        marker="*", ms=14, color="k", capsize=4, ls="none", zorder=5)
            ax.axhline(base["median"], color="grey", ls=":", lw=0.8)
        handles.append(Line2D([], [], color="k", marker="*", ms=12, ls="none", label="base policy (median, min-max)"))
    handles.append(Line2D([], [], color="grey", lw=1, marker="|", ms=10, label="bars: min-max over seeds"))
    for s in seeds:
        ls, mk = SEED_STYLES[seeds.index(s) % len(SEED_STYLES)]
        handles.append(Line2D([], [], color="grey", ls=ls, marker=mk, mfc="none", ms=4, lw=0.8, label=f"seed {s}"))
    axes[0].set_xlabel("rollouts consumed")
    axes[1].set_xlabel("compute seconds (evaluation excluded)")
    axes[2].set_xlabel("reverse KL to the base, per response (k1; < 0 is noise)")
    axes[0].set_ylabel("accuracy (AVG@K, held-out)")
    for ax in axes:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
    axes[2].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                   frameon=False)
    fig.suptitle(f"ERPD vs on-policy, {ERPD_VS_ONPOLICY.get(name, name)}: median of {len(seeds)} seeds (bold), each seed (thin)", fontsize=11)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def all_plots(out: str | Path) -> list[Path]:
    out = Path(out)
    return [p for p in (throughput(out), weight_sync(out), *(erpd_vs_onpolicy(out, n) for n in ERPD_VS_ONPOLICY))
            if p is not None]
