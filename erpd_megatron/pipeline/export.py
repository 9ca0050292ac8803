"""`erpd export RUN_DIR`: the run's final policy (summary.json "final", report.final_policy) as a self-contained
Hugging Face directory: weights in the base's dtypes, config.json, tokenizer, chat template, generation config
and the base's pass-through tensors (vision tower, MTP head), all taken from the run's imported base
(<run>/base/iter_0000000/hf, checkpoints_conv.convert.find_hf_template). Default output: <run>/final."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from erpd_megatron.utils.cli import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="erpd export", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("run_dir", help="a run directory (holds config.yaml, base/ and ckpt/)")
    ap.add_argument("--out", default=None, help="output HF directory (default: RUN_DIR/final)")
    ap.add_argument("--method", default=None, help="export this method's latest checkpoint instead of the final "
                    "policy (e.g. a teacher: ce)")
    ap.add_argument("--dtype", default=None, help="cast every tensor (default: the base's own dtypes)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    a = ap.parse_args(argv)
    run = Path(a.run_dir)
    try:
        path = _checkpoint(run, a.method)
        out = Path(a.out) if a.out else run / "final"
        from checkpoints_conv.convert import export_mcore, find_hf_template

        if find_hf_template(path) is None:
            raise FileNotFoundError(f"{run}: no imported base (base/iter_0000000/hf) to take the tokenizer from")
        from erpd_megatron.pipeline.context import setup_logging

        setup_logging()
        export_mcore(str(path), str(out), dtype=a.dtype, overwrite=a.overwrite)
    except (FileNotFoundError, ValueError) as e:  # ConversionError, ConfigError are ValueErrors
        print(f"erpd export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {path} -> {out}")
    return 0


def _checkpoint(run: Path, method: str | None) -> Path:
    from erpd_megatron.pipeline.report import _load_run_config, final_policy

    cfg = _load_run_config(run)
    if method:
        latest = run / "ckpt" / method / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{run}: method {method!r} has no checkpoint (no {latest})")
        return latest.parent / latest.read_text().strip()
    final = final_policy(run, cfg)
    if final is None:
        raise FileNotFoundError(f"{run}: no final policy yet (its student has no checkpoint; finish the run, or "
                                "give --method NAME)")
    return Path(final["checkpoint"])
