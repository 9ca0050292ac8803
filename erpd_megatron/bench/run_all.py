"""`make bench`: every CPU benchmark, one after the other, then the plots.

Each benchmark runs in its own process (`python -m erpd_megatron.bench.<name> --out DIR`), so
megatron's global parallel state never leaks between them and each JSON records the exact command
that produced it. A failing benchmark is reported and the others still run (exit code 1 then).
Budget: <= 20 minutes on 2 CPU cores (the ERPD comparison takes most of it).
Writes DIR/<name>.json, DIR/run_all.json (what ran, wall time, status) and DIR/*.png.

    python -m erpd_megatron.bench.run_all [--out docs/benchmarks] [--only train_throughput,weight_sync]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from erpd_megatron.bench.common import DEFAULT_OUT, Recorder

# JSON name -> (module, extra CLI args); order: cheap first, so a broken environment fails fast
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "train_throughput": ("train_throughput", []),
    "logprob_throughput": ("logprob_throughput", []),
    "train_throughput_demo": ("train_throughput", ["--model", "demo"]),
    "logprob_throughput_demo": ("logprob_throughput", ["--model", "demo"]),
    "weight_sync": ("weight_sync", []),
    "code_sandbox": ("code_sandbox", []),
    "sglang_vs_local": ("sglang_vs_local", []),
    "erpd_vs_onpolicy": ("erpd_vs_onpolicy", []),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(BENCHMARKS))
    a = ap.parse_args(argv)
    names = list(BENCHMARKS) if not a.only else [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")
    rec = Recorder("run_all", {"benchmarks": names, "out": a.out})
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    status = {}
    for n in names:
        module, extra = BENCHMARKS[n]
        cmd = [sys.executable, "-m", f"erpd_megatron.bench.{module}", "--out", a.out, *extra]
        print(f"== {n}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        rc = subprocess.call(cmd, env=env)
        status[n] = {"returncode": rc, "wall_s": round(time.perf_counter() - t, 1)}
        print(f"== {n}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {status[n]['wall_s']} s", flush=True)
    try:
        from erpd_megatron.bench.plots import all_plots

        plots = [str(p) for p in all_plots(a.out)]
    except Exception as e:  # a plotting problem must not hide the numbers
        plots = [f"plotting failed: {type(e).__name__}: {e}"]
    print("plots:", *plots, sep="\n  ")
    rec.write({"status": status, "plots": plots}, a.out)
    return 0 if all(s["returncode"] == 0 for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
