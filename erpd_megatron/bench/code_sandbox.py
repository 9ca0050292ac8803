"""Benchmark 6: sandboxed programs per second on 2 cores, and the sandbox's overhead against a plain subprocess.

The same batch of responses is scored twice per round by `CodeReward(num_workers=2)`: once in the bubblewrap
sandbox (reward.sandbox=bwrap) and once with the identical harness in a plain subprocess (sandbox=none: no
namespaces, no uid switch, no mounts; rlimits and the harness are the same), in A, B, B, A, ... order. The batch
mixes the three test modes: stdin/stdout programs (APPS-style, 4 tests each), call-based functions (LiveCodeBench
functional, 4 tests) and HumanEval-style assert tests (1 check with 3 asserts), half right and half wrong, so
every test process really runs. Reported: samples/s and test programs/s per arm, and the ratio of seconds per
sample bwrap / plain (the sandbox's overhead); plus the bare start-up cost of one sandbox (`python -c pass` in
bwrap vs in a plain subprocess, ms). Rewards of the two arms must agree item for item (a fast but wrong
sandbox cannot pass).

    python -m erpd_megatron.bench.code_sandbox [--samples 48] [--repeats 3] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import time

from erpd_megatron.bench.common import Recorder, spread

NAME = "code_sandbox"

STDIO_TASK = {"input_output": {"inputs": ["1 2\n", "5 7\n", "100 -1\n", "0 0\n"], "outputs": ["3\n", "12\n", "99\n", "0\n"]}}
CALL_TASK = {"input_output": {"inputs": [[[3, 1, 2]], [[5]], [[]], [[2, 2, 1]]], "outputs": [[1, 2, 3], [5], [], [1, 2, 2]],
                              "fn_name": "sort_list"}}
ASSERT_TASK = {"entry_point": "fib", "test": ("def check(candidate):\n    assert candidate(0) == 0\n"
                                              "    assert candidate(10) == 55\n    assert candidate(20) == 6765\n")}
RESPONSES = {
    "stdio": ["```python\na, b = map(int, input().split())\nprint(a + b)\n```",
              "```python\na, b = map(int, input().split())\nprint(a * b)\n```"],
    "call": ["```python\ndef sort_list(xs):\n    return sorted(xs)\n```",
             "```python\ndef sort_list(xs):\n    return xs\n```"],
    "assert": ["```python\ndef fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n```",
               "```python\ndef fib(n):\n    return n\n```"],
}


def batch(samples: int):
    from erpd_megatron.rewards.code_tests import parse_tests

    tasks = {"stdio": parse_tests(STDIO_TASK), "call": parse_tests(CALL_TASK), "assert": parse_tests(ASSERT_TASK)}
    kinds = ["stdio", "call", "assert"]
    responses, out_tasks = [], []
    for i in range(samples):
        kind = kinds[i % 3]
        responses.append(RESPONSES[kind][(i // 3) % 2])
        out_tasks.append(tasks[kind])
    # test processes: stdio one per test, call/assert one serve process per sample (+ the harness itself)
    processes = sum(len(t) if t.mode == "stdio" else 1 for t in out_tasks)
    return responses, out_tasks, processes


def startup_ms(repeats: int) -> dict:
    """One `python -c pass` in bwrap (our argv) vs in a plain subprocess, interleaved."""
    import os
    import tempfile

    from erpd_megatron.rewards.sandbox import bwrap_argv

    box = tempfile.mkdtemp(prefix="erpd-bench-box-")
    os.chmod(box, 0o755)
    with open(os.path.join(box, "child.py"), "w") as f:
        f.write("pass\n")
    os.chmod(os.path.join(box, "child.py"), 0o644)
    argv = bwrap_argv(shutil.which("bwrap"), "/usr/bin/python3", box, 16)
    bw, plain = [], []
    try:
        for r in range(repeats):
            for arm in (("bwrap", "plain") if r % 2 == 0 else ("plain", "bwrap")):
                cmd = argv if arm == "bwrap" else ["/usr/bin/python3", "-I", "-B", os.path.join(box, "child.py")]
                t = time.perf_counter()
                subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, capture_output=True)
                (bw if arm == "bwrap" else plain).append((time.perf_counter() - t) * 1e3)
    finally:
        shutil.rmtree(box, ignore_errors=True)
    return {"bwrap_ms": spread(bw), "plain_ms": spread(plain),
            "ratio": spread([b / p for b, p in zip(bw, plain)])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--startup-repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from erpd_megatron.rewards.code import CodeReward

    logging.getLogger("erpd_megatron.rewards.code").setLevel(logging.ERROR)  # the "none" arm warns every batch
    responses, tasks, processes = batch(a.samples)
    rec = Recorder(NAME, {"samples": a.samples, "repeats": a.repeats, "workers": a.workers,
                          "startup_repeats": a.startup_repeats,
                          "test_processes_per_batch": processes, "modes": ["stdio x4", "call x4", "assert"]})
    arms = {"bwrap": CodeReward(num_workers=a.workers, sandbox="bwrap").start(),
            "plain": CodeReward(num_workers=a.workers, sandbox="none").start()}
    times: dict[str, list[float]] = {n: [] for n in arms}
    rewards: dict[str, list[float]] = {}
    for reward in arms.values():  # warm-up: page cache, first bwrap
        reward.score_batch(responses[:3], tasks[:3])
    for r in range(a.repeats):
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            t = time.perf_counter()
            rewards[name] = arms[name].score_batch(responses, tasks)
            times[name].append(time.perf_counter() - t)
            print(f"  round {r + 1}/{a.repeats}: {name} {a.samples / times[name][-1]:.1f} samples/s", flush=True)
    for reward in arms.values():
        reward.close()
    if rewards["bwrap"] != rewards["plain"]:
        raise SystemExit(f"the arms disagree: bwrap {rewards['bwrap']} vs plain {rewards['plain']}")
    results = {name: {"samples_per_s": spread([a.samples / t for t in ts]),
                      "test_programs_per_s": spread([processes / t for t in ts]),
                      "s_per_batch": spread(ts)} for name, ts in times.items()}
    results["overhead_ratio_bwrap_over_plain"] = spread([b / p for b, p in zip(times["bwrap"], times["plain"])])
    results["mean_reward"] = sum(rewards["bwrap"]) / len(rewards["bwrap"])
    results["startup"] = startup_ms(a.startup_repeats)
    path = rec.write(results, a.out)
    b, p = results["bwrap"]["samples_per_s"]["median"], results["plain"]["samples_per_s"]["median"]
    print(f"code_sandbox: bwrap {b:.1f} samples/s ({results['bwrap']['test_programs_per_s']['median']:.1f} test "
          f"programs/s), plain subprocess {p:.1f} samples/s; overhead x{results['overhead_ratio_bwrap_over_plain']['median']:.2f}; "
          f"start-up {results['startup']['bwrap_ms']['median']:.0f} ms vs {results['startup']['plain_ms']['median']:.0f} ms -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
