"""Shared pieces of the benchmarks: machine record, JSON writer, interleaved timing, gloo spawner.

Every benchmark JSON has the same top-level schema (checked by tests/test_bench.py):
    {"benchmark": str, "schema": 1, "command": str, "machine": {...}, "config": {...},
     "results": {...}, "started": iso time, "wall_s": float}
`machine` records what makes a number comparable: cores, CPU model, load average before and after,
torch / megatron-core / transformers versions, threads used, the git commit (and whether the tree
had uncommitted changes).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks"
REQUIRED_KEYS = ("benchmark", "schema", "command", "machine", "config", "results", "started", "wall_s")
MACHINE_KEYS = ("cpu_model", "logical_cores", "usable_cores", "torch_threads", "loadavg_start", "torch",
                "megatron_core", "transformers", "python", "git_commit", "git_dirty")


def _version(dist_name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """What the numbers were measured on (see module docstring)."""
    import torch

    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_start": list(os.getloadavg()),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "megatron_core": _version("megatron-core"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "hostname": socket.gethostname(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
    }


def command_line() -> str:
    """The exact command that produced a result (the process's argv, module form when run with -m)."""
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        argv = ["python", "-m", spec.name.removesuffix(".__main__"), *argv[1:]]
    else:
        argv = ["python", *argv]
    return env + " ".join(shlex.quote(a) for a in argv)


class Recorder:
    """Collects config + results of one benchmark and writes `<out_dir>/<name>.json`."""

    def __init__(self, name: str, config: dict, command: str | None = None):
        self.name = name
        self.config = config
        self.command = command or command_line()
        self.machine = machine_info()
        self.started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self._t0 = time.perf_counter()

    def write(self, results: dict, out_dir: str | Path | None = None) -> Path:
        out = Path(out_dir) if out_dir is not None else DEFAULT_OUT
        out.mkdir(parents=True, exist_ok=True)
        self.machine["loadavg_end"] = list(os.getloadavg())
        doc = {
            "benchmark": self.name,
            "schema": SCHEMA_VERSION,
            "command": self.command,
            "machine": self.machine,
            "config": self.config,
            "results": results,
            "started": self.started,
            "wall_s": round(time.perf_counter() - self._t0, 2),
        }
        path = out / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=False, default=_jsonable) + "\n")
        os.replace(tmp, path)
        return path


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def spread(values: list[float]) -> dict:
    """median / min / max / n of a list of measurements (the form every ratio is reported in)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def interleaved(candidates: dict[str, Callable[[], None]], *, warmup: int, repeats: int, steps: int,
                log: Callable[[str], None] | None = None,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each candidate, measured A, B, A, B, ... so that load changes hit both alike.

    Each candidate first runs `warmup` untimed calls (allocator, autograd graph, thread pools), then
    `repeats` rounds; in each round every candidate runs `steps` timed calls back to back (the mean
    is one sample). The candidate order alternates between rounds (A B, B A, ...) so that neither
    always runs right after the other. With `cpu` (a dict), the process CPU seconds per call of each
    sample go there too: on a shared machine wall time includes waiting for a core, CPU time does not.
    """
    names = list(candidates)
    for n in names:
        for _ in range(warmup):
            candidates[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    if cpu is not None:
        cpu.update({n: [] for n in names})
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            c, t = time.process_time(), time.perf_counter()
            for _ in range(steps):
                candidates[n]()
            times[n].append((time.perf_counter() - t) / steps)
            if cpu is not None:
                cpu[n].append((time.process_time() - c) / steps)
        if log:
            log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names))
    return times


def set_threads(n: int | None) -> int:
    """Pin torch's intra-op threads (None: leave torch's default). Returns the count in use."""
    import torch

    if n is not None:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


# ---------------------------------------------------------------------- multi-process (gloo)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_child(fn, rank, world, port, threads, args, q):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    try:
        import torch

        torch.set_num_threads(threads)
        q.put((rank, "ok", fn(rank, *args)))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        import traceback

        q.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        try:
            from erpd_megatron.megatron.parallel import destroy_parallel

            destroy_parallel()
        except Exception:
            pass


def spawn(fn, world_size: int, args: tuple = (), *, threads: int = 1, timeout: float = 600) -> list:
    """Run `fn(rank, *args)` on `world_size` spawned processes (env set for torch.distributed); return
    the per-rank results. `fn` must be a module-level function; an error in any rank is re-raised."""
    import queue

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_spawn_child, args=(fn, r, world_size, port, threads, args, q))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"spawned benchmark timed out after {timeout}s")
            try:
                rank, status, payload = q.get(timeout=5.0)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} died without reporting "
                                       f"(exit codes {[procs[i].exitcode for i in dead]})") from None
                continue
            (results if status == "ok" else errors)[rank] = payload
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 2)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        r = min(errors)
        raise RuntimeError(f"rank {r} failed:\n{errors[r]}")
    return [results[r] for r in range(world_size)]


def ratio_results(name: str, times: dict[str, list[float]], tokens: int, flops_per_token: float, unit: str,
                  rec, out_dir, log, cpu: dict[str, list[float]] | None = None, **extra) -> dict:
    """Results of a Megatron-vs-plain throughput benchmark (seconds per `unit` for each side, interleaved):
    tokens/s, GFLOP/s and the ratio Megatron / plain with its spread (wall time: the target; with `cpu`,
    also the ratio of process CPU seconds); written through `rec`, logged."""
    ratios = [p / m for m, p in zip(times["megatron"], times["plain"])]
    results = {
        **extra,
        f"tokens_per_{unit}": tokens,
        f"seconds_per_{unit}": dict(times),
        "tokens_per_s": {k: spread([tokens / t for t in v]) for k, v in times.items()},
        "gflops_per_s": {k: spread([flops_per_token * tokens / t / 1e9 for t in v]) for k, v in times.items()},
        "ratio_megatron_over_plain": spread(ratios),
        "target_ratio": 1.0,
    }
    if cpu:
        results[f"cpu_seconds_per_{unit}"] = dict(cpu)
        results["ratio_megatron_over_plain_cpu"] = spread([p / m for m, p in zip(cpu["megatron"], cpu["plain"])])
    if "plain_onednn" in times:  # the plain loop on the backend's CPU GEMM: what the kernels alone explain
        results["ratio_megatron_over_plain_onednn"] = spread(
            [p / m for m, p in zip(times["megatron"], times["plain_onednn"])])
    path = rec.write(results, out_dir)
    r = results["ratio_megatron_over_plain"]
    rc = results.get("ratio_megatron_over_plain_cpu")
    log(f"[{name}] tokens/s megatron {results['tokens_per_s']['megatron']['median']:.0f} plain "
        f"{results['tokens_per_s']['plain']['median']:.0f}; ratio median {r['median']:.3f} "
        f"[{r['min']:.3f}, {r['max']:.3f}]" + (f" (CPU time {rc['median']:.3f})" if rc else "")
        + (f"; vs plain+oneDNN {ro['median']:.3f} [{ro['min']:.3f}, {ro['max']:.3f}]"
           if (ro := results.get("ratio_megatron_over_plain_onednn")) else "") + f" -> {path}")
    return results


def throughput_main(run, doc: str, argv, steps: int) -> None:
    """Command line shared by the Megatron-vs-plain throughput benchmarks."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    from erpd_megatron.bench.models import MODELS

    ap.add_argument("--out", default=None)
    ap.add_argument("--model", choices=sorted(MODELS), default="bench",
                    help="bench: the 3.5 M-parameter Qwen3 (16 x 256 tokens); demo: the demo's toy base "
                         "(256 x 64 tokens, JSON name <benchmark>_demo.json)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the model's (see --model)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the model's (see --model)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    make, bs, seq, suffix = MODELS[a.model]
    run(a.out, model=make(), batch_size=a.batch_size or bs, seq_len=a.seq_len or seq, warmup=a.warmup,
        repeats=a.repeats, steps=a.steps, threads=a.threads, suffix=suffix)
