"""summary.json, report.md and the plots of a run, built only from files in the run dir; `erpd report RUN_DIR`
rebuilds them, `erpd compare RUN_A RUN_B ...` puts several runs side by side.

Each method's path (accuracy and KL at every evaluated step) is reported, not one end point: at toy
scale curves rise and fall within 10-30 steps, so "final" alone would mislead. `accuracy` / `kl` in the
summary are the values at the last evaluated step; `best` is the best evaluated step, reported beside
its KL (choosing it uses the eval set, so it is optimistic -- the report says so).

KL is the reverse KL to the base on the policy's own eval samples (pipeline/evaluate.py), k1: summed over
the response (`kl`, per sequence) and divided by the mean response length (`kl_token`, per token: comparable
across response lengths, the default axis). k1 is unbiased but can be slightly negative near 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from erpd_megatron.utils.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # rundir imports torch: `erpd report --help` should not
    from erpd_megatron.pipeline.rundir import RunDir

PLOT = "accuracy_vs_kl.png"
KL_LABEL = {"token": "reverse KL to the base, per token", "sequence": "reverse KL to the base, per response"}


def kl_token(r: dict) -> float | None:
    """Per-token KL of one eval result: its own `kl_token`, else kl / mean_length (the same ratio: both are
    means over the same samples)."""
    if r.get("kl_token") is not None:
        return r["kl_token"]
    if r.get("kl") is None or not r.get("mean_length"):
        return None
    return r["kl"] / r["mean_length"]


# ----------------------------------------------------------------------------- what a run holds


def methods_from_run(run: RunDir, cfg) -> dict[str, dict]:
    """name -> {"kind", "rollouts", "rollouts_per_step", "wall_s"} of every method `cfg` trains, from the config
    and the run dir alone (promotions, wall-clock files), so a report can be rebuilt at any time.

    Rollouts: an offline method (teacher, student) consumes the fixed batches of its iteration up front, so every
    point of its path sits at the same count (`rollouts_per_step` 0); an on-policy method samples per step."""
    from erpd_megatron.pipeline.stages import method_name

    n = cfg.rollout.n_samples
    batch = cfg.data.prompts_per_batch * n
    out: dict[str, dict] = {}
    for it in range(cfg.iterations):
        for name, t in cfg.teachers.items():
            out[method_name(name, it)] = {"kind": f"teacher ({t.loss})", "rollouts": batch * (it + 1)}
        for name, s in cfg.students.items():
            strat = "+".join(str(k) for k in s.strategies)
            out[method_name(name, it)] = {"kind": f"student (strategy {strat}, {s.teacher})",
                                          "rollouts": batch * (it + 1)}
        promoted = run.root / f"iter_{it}" / "promoted.json"
        online = json.loads(promoted.read_text()).get("online") if promoted.exists() else None
        if online and cfg.onpolicy is not None:
            per = cfg.onpolicy.prompts_per_step * n
            out[online] = {"kind": f"online phase ({cfg.onpolicy.loss})", "rollouts": cfg.iterate.online_steps * per,
                           "rollouts_per_step": per}
    if cfg.onpolicy is not None:
        o = cfg.onpolicy
        steps = o.steps or -(-cfg.data.prompts_per_batch // o.prompts_per_step)
        out[f"onpolicy_{o.loss}"] = {"kind": f"on-policy {o.loss}", "rollouts": steps * o.prompts_per_step * n,
                                     "rollouts_per_step": o.prompts_per_step * n}
    for m in out.values():
        m.setdefault("rollouts_per_step", 0)
    for p in sorted((run.root / "metrics").glob("*.wall.json")):
        name = p.name[: -len(".wall.json")]
        if name in out:
            out[name]["wall_s"] = json.loads(p.read_text())["wall_s"]
    return out


def strategy2_summary(run: RunDir, cfg) -> dict | None:
    """Strategy-2 students (both ends of their ratio, the unlearned run's lr and negative weight, their last
    accuracy), the sweep's choice, and the positives' / negatives' mean log-prob per checkpoint of every run at
    either end (iter_<i>/logprobs_<run>.json, written by stages.logprob_curve; paper Fig. 9). The choice is the
    student with the best last-step accuracy on this run's eval split: a selection only when that split is a
    validation split (data.eval ends in "_val"), and the report says which split it was."""
    from erpd_megatron.config import checkpoint_ref
    from erpd_megatron.pipeline.stages import method_name

    students = {}
    for it in range(cfg.iterations):
        for name, s in cfg.students.items():
            if 2 not in s.strategies:
                continue
            m = method_name(name, it)
            res = run.eval_results(m)
            rec_path = run.root / f"iter_{it}" / f"unlearned_{method_name(s.teacher, it)}.json"
            if s.unlearned:
                u, ustep = checkpoint_ref(s.unlearned)
                ut = cfg.teachers[u]
                ustep = ustep if ustep > 0 else ut.steps
            else:
                u, ut = s.teacher, cfg.teachers[s.teacher]
                ustep = s.unlearned_step if s.unlearned_step > 0 else \
                    (json.loads(rec_path.read_text())["step"] if rec_path.exists() else None)
            students[m] = {"teacher": f"{s.teacher}@{s.teacher_step if s.teacher_step > 0 else cfg.teachers[s.teacher].steps}",
                           "unlearned": f"{u}@{ustep}", "unlearned_lr": ut.lr,
                           "unlearned_negative_weight": ut.negative_weight,
                           "accuracy": res[max(res)]["avg_at_k"] if res else None}
    if not students:
        return None
    curves = {p.name[len("logprobs_"):-len(".json")]: json.loads(p.read_text())
              for p in sorted(run.root.glob("iter_*/logprobs_*.json"))}
    scored = {k: v["accuracy"] for k, v in students.items() if v["accuracy"] is not None}
    return {"eval_split": cfg.data.eval, "is_validation": cfg.data.eval.endswith("_val"),
            "chosen": max(scored, key=scored.get) if scored else None, "students": students,
            "logprob_curves": curves}


def run_setup(cfg) -> dict:
    """What a run's numbers are about: the model, the training set, the eval set (and how it was sampled)."""
    return {"model": cfg.model.base, "train": cfg.data.train, "eval": cfg.data.eval, "eval_k": cfg.eval.k,
            "eval_prompts": cfg.data.eval_prompts}


def final_policy(run_root: Path, cfg) -> dict | None:
    """The run's final policy: the student of the last iteration that `iterate.promote` names (default: the first
    configured), at its latest checkpoint, the one a next iteration would start from (iter_<i>/promoted.json of
    earlier iterations records the same choice). None while it has no checkpoint (or the config has no student)."""
    from erpd_megatron.pipeline.stages import method_name

    name = cfg.iterate.promote or next(iter(cfg.students), None)
    if name is None:
        return None
    method = method_name(name, cfg.iterations - 1)
    latest = run_root / "ckpt" / method / "latest"
    if not latest.is_file():
        return None
    it = latest.read_text().strip()
    return {"method": method, "step": int(it.rsplit("_", 1)[-1]), "checkpoint": str(run_root / "ckpt" / method / it)}


def build_summary(run: RunDir, methods: dict[str, dict], cfg=None) -> dict:
    """methods: name -> {"kind", "rollouts", "rollouts_per_step", "wall_s"} (see `methods_from_run`); `cfg`: the
    run's config, for its setup (model, train / eval sets), final policy and the strategy-2 section
    (`strategy2_summary`)."""
    base_eval = run.eval_results("base").get(0, {})
    summary = {"base": {"accuracy": base_eval.get("avg_at_k"), "pass_at_k": base_eval.get("pass_at_k"), "kl": 0.0,
                        "kl_token": 0.0, "mean_length": base_eval.get("mean_length")},
               "methods": {}}
    if cfg is not None:
        summary["setup"] = run_setup(cfg)
        summary["final"] = final_policy(run.root, cfg)
    from erpd_megatron.utils.timing import summarize

    # wall seconds per stage over every invocation (exclusive: nested stages are not counted twice); None for a
    # run dir from before it was recorded
    summary["stage_times"] = summarize(run.root)
    for name, info in methods.items():
        per_step = info.get("rollouts_per_step") or 0
        curve = [
            {"step": s, "accuracy": r["avg_at_k"], "kl": r.get("kl"), "kl_token": kl_token(r),
             "pass_at_k": r.get("pass_at_k"), "mean_length": r.get("mean_length"),
             "rollouts": s * per_step if per_step else info.get("rollouts")}
            for s, r in sorted(run.eval_results(name).items())
        ]
        if not curve:
            continue
        last = curve[-1]
        best = max(curve, key=lambda c: c["accuracy"])
        summary["methods"][name] = {
            "kind": info.get("kind"),
            "accuracy": last["accuracy"],
            "kl": last["kl"],
            "kl_token": last["kl_token"],
            "steps": last["step"],
            "rollouts": info.get("rollouts"),
            "wall_s": info.get("wall_s"),
            "best": {"step": best["step"], "accuracy": best["accuracy"], "kl": best["kl"], "kl_token": best["kl_token"]},
            "curve": curve,
        }
    if cfg is not None and (s2 := strategy2_summary(run, cfg)) is not None:
        summary["strategy2"] = s2
    return summary


# ----------------------------------------------------------------------------- report.md


def write_report(run: RunDir, summary: dict, title: str = "ERPD run", kl: str = "token") -> Path:
    atomic_write_json(run.root / "summary.json", summary)
    plot = run.root / PLOT
    plot_summaries({title: summary}, plot, kl=kl, title=title)
    b = summary["base"]
    lines = [f"# {title}", ""]
    if summary.get("setup"):
        lines += [f"{setup_line(summary['setup'])}.", ""]
    lines += [
        f"Base policy: AVG@K {_pct(b['accuracy'])}, pass@K {_pct(b.get('pass_at_k'))}.",
        "",
        "| method | kind | rollouts | steps | AVG@K (last) | KL/token (last) | KL/seq (last) | best AVG@K (step, KL/token) "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["methods"].items():
        bst = m["best"]
        lines.append(
            f"| {name} | {m['kind']} | {m['rollouts']} | {m['steps']} | {_pct(m['accuracy'])} | "
            f"{_f(m.get('kl_token'), 5)} | {_f(m['kl'])} | {_pct(bst['accuracy'])} ({bst['step']}, "
            f"{_f(bst.get('kl_token'), 5)}) | {_f(m['wall_s'], 1)} |"
        )
    lines += ["", "Accuracy along each method's path (step: AVG@K / KL per token):", ""]
    for name, m in summary["methods"].items():
        pts = ", ".join(f"{c['step']}: {_pct(c['accuracy'])} / {_f(c.get('kl_token'), 5)}" for c in m["curve"])
        lines.append(f"- **{name}**: {pts}")
    lines += [
        "",
        f"![accuracy vs rollouts and vs KL]({plot.name})",
        "",
        "KL is the reverse KL E_{y~pi}[log pi(y) - log pi_base(y)] estimated (k1) on the eval samples of the policy "
        "itself: KL/seq sums it over the response, KL/token divides by the mean response length. "
        "'best' picks a step on the eval set and is therefore optimistic.",
    ]
    if _has_negative_kl(summary):
        lines += ["", "Some KL values are negative: the k1 estimator is unbiased but not >= 0, so a policy close to "
                      "the base can show a small negative estimate (sampling noise around 0, not a real KL < 0)."]
    if summary.get("strategy2"):
        lines += strategy2_lines(summary["strategy2"])
    if summary.get("final"):
        f = summary["final"]
        lines += ["", f"Final policy: {f['method']} at step {f['step']} (`{f['checkpoint']}`); `erpd export "
                      f"{run.root}` writes it as a Hugging Face directory (tokenizer and chat template included)."]
    if summary.get("stage_times"):
        from erpd_megatron.utils.timing import format_line

        lines += ["", f"Wall time by stage (exclusive): {format_line(summary['stage_times'])}."]
    path = run.root / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def strategy2_lines(s2: dict) -> list[str]:
    split = f"`{s2['eval_split']}`" + ("" if s2["is_validation"] else
                                       " (NOT a validation split: this is a report, not a selection)")
    lines = ["", "## Strategy 2: pi_T / pi_U", "",
             f"Signal log pi_T - log pi_U per student; accuracy = AVG@K at the last step on {split}.", "",
             "| student | pi_T | pi_U | pi_U's lr | pi_U's negative weight | AVG@K (last) |", "|---|---|---|---|---|---|"]
    for name, st in s2["students"].items():
        mark = " (chosen)" if name == s2["chosen"] else ""
        lines.append(f"| {name}{mark} | {st['teacher']} | {st['unlearned']} | {st['unlearned_lr']:g} | "
                     f"{st['unlearned_negative_weight']:g} | {_pct(st['accuracy'])} |")
    if s2["logprob_curves"]:
        lines += ["", "Mean token log-prob of the fixed batch's positive / negative samples per checkpoint (paper "
                      "Fig. 9; step 0 = the base):", ""]
        for run, c in s2["logprob_curves"].items():
            pts = ", ".join(f"{k}: {_f(v['pos'])} / {_f(v['neg'])}"  # by step: the JSON's keys are strings
                            for k, v in sorted(c["curve"].items(), key=lambda kv: int(kv[0])))
            lines.append(f"- **{run}** ({c['loss']}, lr {c['lr']:g}, negative weight {c['negative_weight']:g}): {pts}")
    return lines


def setup_line(setup: dict) -> str:
    return (f"Model `{setup.get('model')}`, trained on `{setup.get('train')}`, evaluated on `{setup.get('eval')}` "
            f"(first {setup.get('eval_prompts')} problems, K = {setup.get('eval_k')})")


def _has_negative_kl(summary: dict) -> bool:
    return any((c.get("kl") or 0) < 0 for m in summary["methods"].values() for c in m["curve"])


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _f(x, nd: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


# ----------------------------------------------------------------------------- plots


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
BASE_MARKERS = ("*", "p", "H", "8", "d")  # one shape per distinct base; filled grey: the colours are the methods'
BASE_FILLS = ("k", "0.45", "0.7", "w")
LINESTYLES = ("-", "--", ":", "-.")
MIN_Y_SPAN = 0.10  # a flat plot shows 10 points of accuracy, not 0.1 % ticks around one value


def series_styles(summaries: dict[str, dict]) -> dict[tuple[str, str], tuple[str, str]]:
    """(run, method) -> (colour, marker), distinct for every series of the plot (up to 100): colour cycles through
    matplotlib's ten, the marker moves on by one more each time the colours come round."""
    out, k = {}, 0
    for run_name, summary in summaries.items():
        for name in summary["methods"]:
            out[(run_name, name)] = (f"C{k % 10}", MARKERS[(k + k // 10) % len(MARKERS)])
            k += 1
    return out


def base_groups(summaries: dict[str, dict]) -> list[tuple[str, float, list[str]]]:
    """One entry per distinct base (model and eval set from the summaries' setup, and its accuracy), in order:
    (label, accuracy, runs sharing it). Runs of the same base on the same eval set get one marker, not a stack."""
    groups: dict[tuple, tuple[str, float, list[str]]] = {}
    for run_name, summary in summaries.items():
        acc = summary["base"]["accuracy"]
        if acc is None:
            continue
        st = summary.get("setup") or {}
        key = (st.get("model"), st.get("eval"), round(acc, 6)) if st else (run_name,)
        label = f"base {st['model']}" if st else f"base ({run_name})"
        groups.setdefault(key, (label, acc, []))[2].append(run_name)
    return list(groups.values())


def y_limits(values: list[float], min_span: float = MIN_Y_SPAN) -> tuple[float, float] | None:
    """Accuracy axis limits that show at least `min_span` (inside [0, 1] where possible), None when the data
    spans more already (matplotlib's own limits are then kept)."""
    vals = [v for v in values if v is not None]
    if not vals or max(vals) - min(vals) >= min_span:
        return None
    mid = (max(vals) + min(vals)) / 2
    lo = min(max(0.0, mid - min_span / 2), 1.0 - min_span)
    return lo - 0.01 * min_span, lo + min_span + 0.01 * min_span


def plot_summaries(summaries: dict[str, dict], path: Path, kl: str = "token", title: str = "") -> Path:
    """Two panels: AVG@K vs rollouts consumed, AVG@K vs KL to the base; one summary (a run's report) or several
    (`erpd compare`: one line style per run, a distinct colour x marker per series, one base marker per distinct
    base). Accuracy in %, at least MIN_Y_SPAN shown; hollow markers so points at the same place stay visible,
    legend beside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    several = len(summaries) > 1
    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    styles = series_styles(summaries)
    ys_all: list[float] = []
    for gi, (label, base, runs) in enumerate(base_groups(summaries)):
        if not several:
            label = "base policy"
        elif len(runs) > 1:
            label += f" ({', '.join(runs)})"
        for ax in (ax_r, ax_k):
            ax.plot([0], [base], marker=BASE_MARKERS[gi % len(BASE_MARKERS)], ms=15 if gi == 0 else 12,
                    color=BASE_FILLS[gi % len(BASE_FILLS)], mec="k", ls="none", zorder=5,
                    label=label if ax is ax_k else None)
            ax.axhline(base, color="grey", ls=":", lw=0.8, zorder=1)
        ys_all.append(base)
    for ri, (run_name, summary) in enumerate(summaries.items()):
        ls = LINESTYLES[ri % len(LINESTYLES)] if several else "-"
        methods = summary["methods"]
        dodge = _dodge(methods)
        for name, m in methods.items():
            color, marker = styles[(run_name, name)]
            label = f"{run_name}: {name}" if several else name
            style = dict(color=color, marker=marker, ms=6, mfc="none", mew=1.4, ls=ls, lw=1.2, alpha=0.9, zorder=3)
            ys = [c["accuracy"] for c in m["curve"]]
            ys_all += ys
            xr = [_rollouts(c, m) + dodge.get(name, 0.0) for c in m["curve"]]
            ax_r.plot(xr, ys, **style)
            ax_r.plot(xr[-1:], ys[-1:], marker=marker, ms=8, color=color, ls="none", zorder=4)  # last step
            pts = [(x, c["accuracy"]) for c in m["curve"] if (x := _kl(c, kl)) is not None]
            if pts:
                ax_k.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
                ax_k.plot([pts[-1][0]], [pts[-1][1]], marker=marker, ms=8, color=color, ls="none", zorder=4)  # last
    limits = y_limits(ys_all)
    if limits is not None:
        ax_r.set_ylim(*limits)  # shared with ax_k
    ax_r.set_xlabel("rollouts consumed (offline methods: their fixed batch, dodged sideways)")
    ax_k.set_xlabel(KL_LABEL[kl] + " (k1; < 0 is noise)")
    ax_r.set_ylabel("AVG@K (held-out)")
    for ax in (ax_r, ax_k):
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
    ax_r.set_title("accuracy vs rollouts (filled: last step)", fontsize=10)
    ax_k.set_title("accuracy vs KL to the base (filled: last step)", fontsize=10)
    ax_k.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    fig.suptitle(title or "AVG@K vs rollouts and vs KL to the base", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _rollouts(point: dict, method: dict) -> int:
    """Rollouts of a curve point; summaries written before per-point counts: the method's total."""
    r = point.get("rollouts")
    return r if r is not None else (method.get("rollouts") or 0)


def _kl(point: dict, kl: str) -> float | None:
    return kl_token(point) if kl == "token" else point.get("kl")


def _dodge(methods: dict) -> dict[str, float]:
    """Sideways offset (in rollouts) for methods whose whole path sits at one rollout count, so several offline
    methods at the same count do not hide each other: spread over +-2% of the largest count."""
    fixed = [n for n, m in methods.items() if len({_rollouts(c, m) for c in m["curve"]}) == 1]
    top = max((_rollouts(c, m) for m in methods.values() for c in m["curve"]), default=0)
    if len(fixed) < 2 or not top:
        return {}
    width = 0.04 * top
    return {n: width * (i / (len(fixed) - 1) - 0.5) for i, n in enumerate(fixed)}


# ----------------------------------------------------------------------------- erpd report / erpd compare


def load_summary(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _load_run_config(run_dir: Path):
    from erpd_megatron.config import load_config

    path = run_dir / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    return load_config(str(path))


def write_run_report(run_dir: str | Path, kl: str | None = None) -> tuple[Path, dict]:
    """Rebuild summary.json, report.md and the plot of a run dir from its files; returns (report path, summary)."""
    from erpd_megatron.pipeline.rundir import RunDir

    run_dir = Path(run_dir)
    cfg = _load_run_config(run_dir)
    run = RunDir(run_dir)
    summary = build_summary(run, methods_from_run(run, cfg), cfg)
    path = write_report(run, summary, title=f"ERPD run `{cfg.run_dir}`", kl=kl or cfg.logging.report_kl)
    return path, summary


def compare_table(summaries: dict[str, dict]) -> str:
    """Two markdown tables: what each run is (model, train set, eval set), then every method of every run with
    its gain over its run's base."""
    lines = ["| run | model | train set | eval set |", "|---|---|---|---|"]
    for run_name, s in summaries.items():
        st = s.get("setup") or {}
        lines.append(f"| {run_name} | {st.get('model', 'n/a')} | {st.get('train', 'n/a')} | "
                     f"{st.get('eval', 'n/a')} (K = {st.get('eval_k', 'n/a')}) |")
    lines += ["", "| run | method | kind | rollouts | steps | AVG@K (last) | vs base | KL/token (last) | best AVG@K (step) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run_name, s in summaries.items():
        base = s["base"]["accuracy"]
        lines.append(f"| {run_name} | base | base policy | 0 | 0 | {_pct(base)} | | 0 | |")
        for name, m in s["methods"].items():
            gain = "n/a" if base is None else f"{100 * (m['accuracy'] - base):+.1f} pt"
            lines.append(f"| {run_name} | {name} | {m['kind']} | {m['rollouts']} | {m['steps']} | {_pct(m['accuracy'])} "
                         f"| {gain} | {_f(m.get('kl_token'), 5)} | {_pct(m['best']['accuracy'])} ({m['best']['step']}) |")
    return "\n".join(lines)


def _run_names(dirs: list[Path]) -> list[str]:
    """Short unique labels: the dir names, or the full paths when two runs share a name."""
    names = [d.name for d in dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in dirs]


def main_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="erpd report", description="Rebuild report.md, summary.json and accuracy_vs_kl.png "
                                "of a run directory from its files (eval results, config, promotions).")
    p.add_argument("run_dir", help="a run directory (holds config.yaml and eval/)")
    p.add_argument("--kl", choices=("token", "sequence"), default=None,
                   help="KL axis of the plot (default: the run's logging.report_kl, normally token)")
    ns = p.parse_args(argv)
    try:
        path, summary = write_run_report(ns.run_dir, ns.kl)
    except (FileNotFoundError, ValueError) as e:
        print(f"erpd report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path} ({len(summary['methods'])} methods; plot {path.parent / PLOT})")
    return 0


def main_compare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="erpd compare", description="Several runs' summaries in one table and one plot "
                                "(each run's summary.json, rebuilt from its files when missing).")
    p.add_argument("run_dirs", nargs="+", help="run directories")
    p.add_argument("--out", default="compare", help="directory for compare.md and compare.png (default: ./compare)")
    p.add_argument("--kl", choices=("token", "sequence"), default="token", help="KL axis (default: token)")
    ns = p.parse_args(argv)
    dirs = [Path(d) for d in ns.run_dirs]
    try:
        summaries = {}
        for name, d in zip(_run_names(dirs), dirs):
            f = d / "summary.json"
            summaries[name] = load_summary(f) if f.exists() else write_run_report(d)[1]
            if "setup" not in summaries[name]:  # a summary written before it was recorded
                summaries[name]["setup"] = run_setup(_load_run_config(d))
    except (FileNotFoundError, ValueError) as e:
        print(f"erpd compare: error: {e}", file=sys.stderr)
        return 2
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    table = compare_table(summaries)
    plot = plot_summaries(summaries, out / "compare.png", kl=ns.kl, title=f"{len(summaries)} runs compared")
    atomic_write_text(out / "compare.md", f"# Runs compared\n\n{table}\n\n![runs]({plot.name})\n")
    print(table)
    print(f"\nwritten: {out / 'compare.md'}, {plot}")
    return 0
