"""CLI: python -m checkpoints_conv {import,export,verify} ...

  import --hf DIR --out DIR --tp N --pp M [--dtype bf16|fp16|fp32] [--overwrite]
  export --mcore DIR --out DIR [--dtype ...] [--hf-template DIR] [--max-shard-gb 5] [--drop-mtp] [--overwrite]
  verify --hf DIR --mcore DIR [--tp N --pp M] [--batch 2 --seq-len 96]   -> one JSON line
Errors (bad input) exit with status 2 and one line on stderr naming the file / tensor / field.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time

VERIFY_SEQ_LEN = 96  # = verify.VERIFY_SEQ_LEN (not imported here: verify pulls in torch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m checkpoints_conv", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("import", help="HF directory -> erpd Megatron checkpoint")
    p.add_argument("--hf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1, help="TP the trainer will use (vocabulary padding, head checks)")
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", default=None, help="cast weights (default: keep each tensor's dtype)")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("export", help="erpd Megatron checkpoint -> HF directory")
    p.add_argument("--mcore", required=True, help="checkpoint root (follows `latest`) or iter_N directory")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None, help="default: the imported source dtypes, else the stored dtype")
    p.add_argument("--hf-template", default=None, help="HF dir for config/tokenizer/passthrough (default: the "
                   "checkpoint's own hf/ if imported)")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--drop-mtp", action="store_true", help="leave out the mtp.* draft head (never trained: after "
                   "training it drafts for the original trunk) and write mtp_num_hidden_layers=0 in config.json")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("verify", help="compare HF and Megatron logits on the same random tokens")
    p.add_argument("--hf", required=True)
    p.add_argument("--mcore", required=True)
    p.add_argument("--tp", type=int, default=None)
    p.add_argument("--pp", type=int, default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=VERIFY_SEQ_LEN, help="longer than the GDN chunk (64): the chunked form's "
                   "carry-over between chunks is compared too")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from erpd_megatron.utils.console import configure, quiet_third_party

    configure()  # progress bars only on a terminal
    quiet_third_party()  # the known Apex / torch.distributed / megatron notes of a CPU conversion (utils/console.py)

    from .config import ConversionError

    t0 = time.time()
    try:
        if a.cmd == "import":
            from .convert import import_hf

            import_hf(a.hf, a.out, tp=a.tp, pp=a.pp, dtype=a.dtype, overwrite=a.overwrite)
        elif a.cmd == "export":
            from .convert import export_mcore

            export_mcore(a.mcore, a.out, dtype=a.dtype, hf_template=a.hf_template, overwrite=a.overwrite,
                         max_shard_bytes=int(a.max_shard_gb * 2**30), drop_mtp=a.drop_mtp)
        else:
            from .verify import verify

            print(json.dumps(verify(a.hf, a.mcore, a.tp, a.pp, a.batch, a.seq_len)), flush=True)
            return 0
    except Exception as e:  # bad input, a damaged checkpoint, a full disk: one line (erpd_megatron/utils/cli.py)
        from erpd_megatron.utils.cli import is_user_error, one_line

        if not (isinstance(e, ConversionError) or is_user_error(e)):
            raise
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    logging.getLogger("checkpoints_conv").info("%s done in %.1f s, peak RSS %.2f GiB", a.cmd, time.time() - t0, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
