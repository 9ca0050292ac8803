"""summary.json, report.md and the accuracy-vs-KL plot of a run, built only from files in the run dir.

Each method's path (accuracy and KL at every evaluated step) is reported, not one end point: at toy
scale curves rise and fall within 10-30 steps, so "final" alone would mislead. `accuracy` / `kl` in the
summary are the values at the last evaluated step; `best` is the best evaluated step, reported beside
its KL (choosing it uses the eval set, so it is optimistic -- the report says so).
"""

from __future__ import annotations

import json
from pathlib import Path

from erpd_megatron.pipeline.rundir import RunDir
from erpd_megatron.utils.io import atomic_write_json, atomic_write_text


def build_summary(run: RunDir, methods: dict[str, dict]) -> dict:
    """methods: name -> {"kind", "rollouts", "wall_s"} (bookkeeping the stages wrote)."""
    base_eval = run.eval_results("base").get(0, {})
    summary = {"base": {"accuracy": base_eval.get("avg_at_k"), "pass_at_k": base_eval.get("pass_at_k"), "kl": 0.0,
                        "mean_length": base_eval.get("mean_length")},
               "methods": {}}
    from erpd_megatron.utils.timing import summarize

    # wall seconds per stage over every invocation (exclusive: nested stages are not counted twice); None for a
    # run dir from before it was recorded
    summary["stage_times"] = summarize(run.root)
    for name, info in methods.items():
        curve = [
            {"step": s, "accuracy": r["avg_at_k"], "kl": r.get("kl"), "pass_at_k": r.get("pass_at_k"),
             "mean_length": r.get("mean_length")}
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
            "steps": last["step"],
            "rollouts": info.get("rollouts"),
            "wall_s": info.get("wall_s"),
            "best": {"step": best["step"], "accuracy": best["accuracy"], "kl": best["kl"]},
            "curve": curve,
        }
    return summary


def write_report(run: RunDir, summary: dict, title: str = "ERPD run") -> Path:
    atomic_write_json(run.root / "summary.json", summary)
    plot = run.root / "accuracy_vs_kl.png"
    _plot(summary, plot)
    b = summary["base"]
    lines = [
        f"# {title}",
        "",
        f"Base policy: AVG@K {_pct(b['accuracy'])}, pass@K {_pct(b.get('pass_at_k'))}.",
        "",
        "| method | kind | rollouts | steps | AVG@K (last) | KL (last) | best AVG@K (step, KL) | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["methods"].items():
        bst = m["best"]
        lines.append(
            f"| {name} | {m['kind']} | {m['rollouts']} | {m['steps']} | {_pct(m['accuracy'])} | {_f(m['kl'])} | "
            f"{_pct(bst['accuracy'])} ({bst['step']}, {_f(bst['kl'])}) | {_f(m['wall_s'], 1)} |"
        )
    lines += ["", "Accuracy along each method's path (step: AVG@K / KL to base):", ""]
    for name, m in summary["methods"].items():
        pts = ", ".join(f"{c['step']}: {_pct(c['accuracy'])} / {_f(c['kl'])}" for c in m["curve"])
        lines.append(f"- **{name}**: {pts}")
    lines += [
        "",
        f"![accuracy vs KL]({plot.name})",
        "",
        "KL is the reverse KL E_{y~pi}[log pi(y) - log pi_base(y)] (summed over response tokens), estimated on "
        "the eval samples of the policy itself. 'best' picks a step on the eval set and is therefore optimistic.",
    ]
    if summary.get("stage_times"):
        from erpd_megatron.utils.timing import format_line

        lines += ["", f"Wall time by stage (exclusive): {format_line(summary['stage_times'])}."]
    path = run.root / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _f(x, nd: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.axhline(summary["base"]["accuracy"] or 0, color="grey", ls="--", lw=1, label="base")
    for name, m in summary["methods"].items():
        xs = [c["kl"] or 0.0 for c in m["curve"]]
        ys = [c["accuracy"] for c in m["curve"]]
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set_xlabel("reverse KL to base (per response)")
    ax.set_ylabel("AVG@K")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_summary(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
