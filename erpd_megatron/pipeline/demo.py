"""`erpd demo` (what `make demo` runs): the full ERPD pipeline on the tiny toy model on CPU, no downloads.

Same code path as a real run (`erpd run --config erpd_megatron/presets/demo.yaml`): warm-up of the toy base
(3 layers / hidden 128, cached in ~/.cache/erpd), collect 256 prompts x 8, CE + SAPO + MSE teachers, strategy-1
students over CE and SAPO, a strategy-2 student over MSE, on-policy GRPO (3,840 rollouts), evaluation along every
path on 512 held-out test problems (`data.eval=toy_val`: the validation split, for tuning), report (docs/demo.md).
Rerunning resumes; `erpd demo run_dir=runs/demo2` starts elsewhere; any key of the preset
can be overridden (`erpd demo teachers.ce.lr=1e-5`); `erpd demo --print-config` prints the resolved config.
`erpd demo --config long` runs the long-reasoning task instead (presets/long.yaml, docs/toy_task.md).
"""

from __future__ import annotations

from pathlib import Path

PRESET = Path(__file__).resolve().parent.parent / "presets" / "demo.yaml"


def main(argv: list[str]) -> int:
    from erpd_megatron.pipeline.run import build_parser, main_run

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        build_parser("erpd demo", config="demo").print_help()  # the same flags, overrides, presets and sections as `erpd run`
        return 0
    # `erpd demo --config long`: another preset (the long-reasoning task); the last --config wins
    preset = [] if any(a == "--config" or a.startswith("--config=") for a in argv) else ["--config", str(PRESET)]
    rc = main_run([*preset, *argv])
    if rc or "--print-config" in argv:
        return rc
    from erpd_megatron.pipeline.run import parse

    run_dir = parse([*preset, *argv], "erpd demo")[0].run_dir
    print(f"\nERPD demo finished: report at {Path(run_dir) / 'report.md'} "
          f"(summary.json and accuracy_vs_kl.png beside it)")
    return rc
