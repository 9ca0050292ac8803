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
    docs = [(n, _load(out, n)) for n in ("train_throughput", "logprob_throughput")]
    docs = [(n, d) for n, d in docs if d]
    if not docs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(docs), figsize=(4.5 * len(docs), 3.6), squeeze=False)
    for ax, (name, d) in zip(axes[0], docs):
        tps = d["results"]["tokens_per_s"]
        keys = ["megatron", "plain"]
        med = [tps[k]["median"] for k in keys]
        err = [[tps[k]["median"] - tps[k]["min"] for k in keys], [tps[k]["max"] - tps[k]["median"] for k in keys]]
        ax.bar(["Megatron\n(PolicyEngine)", "plain\ntransformers"], med, yerr=err, capsize=6,
               color=["#4c72b0", "#999999"])
        r = d["results"]["ratio_megatron_over_plain"]
        ax.set_title(f"{name.replace('_', ' ')}\nratio {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]",
                     fontsize=10)
        ax.set_ylabel("tokens / s (CPU, fp32)")
    fig.tight_layout()
    path = out / "throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def weight_sync(out: Path) -> Path | None:
    """GB/s vs bucket size, with the memcpy bandwidth and the 1/4-of-memcpy target."""
    d = _load(out, "weight_sync")
    if not d:
        return None
    plt = _plt()
    res = d["results"]
    rows = sorted(((float(k), v) for k, v in res["per_bucket_mib"].items() if not k.startswith("stream")),
                  key=lambda kv: kv[0])
    xs = [k for k, _ in rows]
    med = [v["gbps"]["median"] for _, v in rows]
    lo = [v["gbps"]["median"] - v["gbps"]["min"] for _, v in rows]
    hi = [v["gbps"]["max"] - v["gbps"]["median"] for _, v in rows]
    mem = res["memcpy_gbps"]["median"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=4, label="Megatron TP=2 -> LocalEngine")
    ax.axhline(mem, color="k", ls="--", lw=1, label=f"memcpy {mem:.1f} GB/s")
    ax.axhline(mem / 4, color="r", ls=":", lw=1, label="target: memcpy / 4")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bucket cap (MiB)")
    ax.set_ylabel("GB/s")
    ax.set_title("weight sync (CPU, gloo, fp32)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "weight_sync.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def erpd_vs_onpolicy(out: Path) -> Path | None:
    """Accuracy vs rollouts consumed and vs reverse KL, one line per method and seed."""
    d = _load(out, "erpd_vs_onpolicy")
    if not d or not d["results"].get("curves"):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {}
    for curve in d["results"]["curves"]:
        m = curve["method"]
        c = colors.setdefault(m, f"C{len(colors)}")
        pts = curve["points"]
        label = m if curve["seed"] == d["results"]["seeds"][0] else None
        axes[0].plot([p["rollouts"] for p in pts], [p["accuracy"] for p in pts], marker="o", ms=3, color=c,
                     alpha=0.8, label=label)
        kl = [(p["kl"], p["accuracy"]) for p in pts if p.get("kl") is not None]
        if kl:
            axes[1].plot([k for k, _ in kl], [a for _, a in kl], marker="o", ms=3, color=c, alpha=0.8, label=label)
    axes[0].set_xlabel("rollouts consumed")
    axes[1].set_xlabel("reverse KL to the base")
    for ax in axes:
        ax.set_ylabel("accuracy (AVG@K)")
        ax.legend(fontsize=8)
    fig.suptitle("ERPD vs on-policy, toy task (each line one seed)", fontsize=10)
    fig.tight_layout()
    path = out / "erpd_vs_onpolicy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def all_plots(out: str | Path) -> list[Path]:
    out = Path(out)
    return [p for p in (throughput(out), weight_sync(out), erpd_vs_onpolicy(out)) if p is not None]
