"""`erpd` console script. Subcommands import their (heavy) modules lazily so `erpd --help` stays fast.

    erpd demo                      tiny ERPD pipeline on CPU (what `make demo` runs)
    erpd run --config X.yaml k=v   collect -> teachers -> signals -> students -> on-policy -> eval -> report
    erpd collect|teacher|signals|distill|onpolicy|iterate --config X.yaml k=v   one stage (resumable)
    erpd eval ...                  AVG@K / pass@K of a checkpoint on a JSONL benchmark
    erpd reward --data D --responses R   score responses (math-verify or sandboxed code), one JSON line each
    erpd plan ...                  memory / layout planner
    erpd report RUN_DIR            rebuild summary.json, report.md, accuracy_vs_kl.png from a run dir
    erpd compare RUN_A RUN_B ...   one table and one plot over several runs (compare/compare.md)
    erpd export RUN_DIR            the run's final policy as a HF directory (RUN_DIR/final)
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
COMMANDS = {
    "demo": ("erpd_megatron.pipeline.demo", "main", "run the tiny ERPD pipeline on CPU and write runs/demo/report.md"),
    "run": ("erpd_megatron.pipeline.run", "main_run", "all stages of one config (resumable)"),
    "collect": ("erpd_megatron.pipeline.run", "main_collect", "stage 0: sample the fixed rollout batch"),
    "teacher": ("erpd_megatron.pipeline.run", "main_teacher", "stage 1: train the configured teachers"),
    "signals": ("erpd_megatron.pipeline.run", "main_signals", "precompute teacher / unlearned / weak log-probs"),
    "distill": ("erpd_megatron.pipeline.run", "main_distill", "stage 2: distill into the base policy"),
    "onpolicy": ("erpd_megatron.pipeline.run", "main_onpolicy", "on-policy baseline with the same rollout budget"),
    "iterate": ("erpd_megatron.pipeline.run", "main_iterate", "batch after batch, student -> next base"),
    "eval": ("erpd_megatron.rollout.eval", "main", "AVG@K / pass@K on a local JSONL benchmark"),
    "reward": ("erpd_megatron.rewards.score_cli", "main", "score responses against a data set (math or sandboxed code)"),
    "plan": ("erpd_megatron.planner", "main", "per-GPU memory and step-time plan for a model + layout"),
    "report": ("erpd_megatron.pipeline.report", "main_report", "rebuild report.md and the plots of a run dir"),
    "compare": ("erpd_megatron.pipeline.report", "main_compare", "several runs' summaries in one table and plot"),
    "export": ("erpd_megatron.pipeline.export", "main", "a run's final policy as a self-contained HF directory"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="erpd",
        description="Extreme Region Policy Distillation on megatron-core.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join([*(f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()), "",
                           "examples:", "  erpd demo",
                           "  erpd run --config micro run_dir=runs/try teachers.ce.lr=3e-4 --print-config",
                           "erpd run --help lists the presets, the config sections and their keys."]),
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="command")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the command (see erpd COMMAND --help)")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    ns = parser.parse_args(argv[:1])
    module, func, _ = COMMANDS[ns.command]
    rc = getattr(importlib.import_module(module), func)(argv[1:])
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
