"""Wall time per pipeline stage (model build, checkpoint load / save, collect, train, signals, eval, weight
sync, the weight check after it), for the run summary.

Sections nest (a teacher's "train" contains its checkpoint saves and evaluations, an evaluation its weight
push), and each second is charged to the innermost open section only: the stage times are exclusive, so they
add up to the timed part of the run and "other" (imports, data, report) is the rest of the wall time.

Beside wall seconds the clock keeps the process's CPU seconds per stage (all its threads; not child
processes such as the base import): on a shared machine wall time is inflated by waiting for a core, CPU
time is not, so the two together tell contention from work.

One clock per process (`CLOCK`; `stage(name)` times a section on it). Rank 0 writes the clock of every
invocation to <run>/metrics/stage_times/<start>_<pid>.json (rewritten as the invocation goes, so a crash
keeps what was timed up to the last write); the summary adds up every invocation's file (a resumed run
reports the total time spent).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

#: the stages the summary lists, in this order (others a caller names are listed after them)
STAGES = ("model_build", "checkpoint_load", "checkpoint_save", "collect", "train", "signals", "eval", "weight_sync",
          "weight_verify")


class StageClock:
    """Exclusive wall seconds per section name, nested sections charged to the innermost one."""

    def __init__(self) -> None:
        self.started = time.time()
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._stack: list[list] = []  # [name, start, cpu start, wall in children, cpu in children]

    @contextmanager
    def stage(self, name: str):
        frame = [name, time.perf_counter(), time.process_time(), 0.0, 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            spent, cpu = time.perf_counter() - frame[1], time.process_time() - frame[2]
            self.seconds[name] = self.seconds.get(name, 0.0) + max(spent - frame[3], 0.0)
            self.cpu[name] = self.cpu.get(name, 0.0) + max(cpu - frame[4], 0.0)
            self.counts[name] = self.counts.get(name, 0) + 1
            if self._stack:
                self._stack[-1][3] += spent
                self._stack[-1][4] += cpu

    def wall(self) -> float:
        return time.perf_counter() - self.t0

    def record(self) -> dict:
        """This clock as JSON: {"started", "wall_s", "cpu_s", "stages": {name: wall s}, "cpu": {name: CPU s},
        "counts"} (open sections are not yet counted)."""
        return {"started": self.started, "wall_s": self.wall(), "cpu_s": time.process_time() - self.cpu0,
                "stages": dict(self.seconds), "cpu": dict(self.cpu), "counts": dict(self.counts)}


CLOCK = StageClock()


def stage(name: str):
    """`with stage("collect"): ...` times a section on the process clock."""
    return CLOCK.stage(name)


def reset() -> StageClock:
    """A fresh process clock (each pipeline invocation starts one)."""
    global CLOCK
    CLOCK = StageClock()
    return CLOCK


def times_dir(run_root: str | os.PathLike) -> Path:
    return Path(run_root) / "metrics" / "stage_times"


def save(run_root: str | os.PathLike, clock: StageClock | None = None) -> Path:
    """Write (or rewrite) this invocation's record into the run dir."""
    from erpd_megatron.utils.io import atomic_write_json

    clock = clock or CLOCK
    path = times_dir(run_root) / f"{int(clock.started * 1000)}_{os.getpid()}.json"
    atomic_write_json(path, clock.record())
    return path


def summarize(run_root: str | os.PathLike) -> dict | None:
    """Every invocation of a run added up: {"wall_s", "cpu_s", "stages": {name: wall s} (STAGES first, then
    "other" = wall - timed), "cpu": {name: CPU s} (same keys), "counts": {name: sections timed}, "invocations"};
    None when the run dir has no record (a run from before this field existed)."""
    records = []
    for p in sorted(times_dir(run_root).glob("*.json")):
        try:
            records.append(json.loads(p.read_text()))
        except (OSError, ValueError):  # a torn record cannot happen (atomic writes); an unreadable one is skipped
            continue
    if not records:
        return None
    total: dict[str, float] = {}
    cpu: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in records:
        for k, v in r.get("stages", {}).items():
            total[k] = total.get(k, 0.0) + float(v)
        for k, v in r.get("cpu", {}).items():
            cpu[k] = cpu.get(k, 0.0) + float(v)
        for k, v in r.get("counts", {}).items():
            counts[k] = counts.get(k, 0) + int(v)
    wall = sum(float(r.get("wall_s", 0.0)) for r in records)
    ordered = {k: total.get(k, 0.0) for k in STAGES}
    ordered.update({k: v for k, v in sorted(total.items()) if k not in ordered})
    ordered["other"] = max(wall - sum(total.values()), 0.0)
    cpu_s = sum(float(r.get("cpu_s", 0.0)) for r in records)
    cpu_ordered = {k: cpu.get(k, 0.0) for k in ordered if k != "other"}
    cpu_ordered["other"] = max(cpu_s - sum(cpu.values()), 0.0)
    return {"wall_s": wall, "cpu_s": cpu_s, "stages": ordered, "cpu": cpu_ordered,
            "counts": {k: counts.get(k, 0) for k in ordered if k != "other"}, "invocations": len(records)}


def format_line(summary: dict | None) -> str:
    """One line for report.md: "model build 1.2 s (3 %), ..." (wall) in STAGES order, zero stages left out."""
    if not summary:
        return ""
    wall = summary["wall_s"] or 1e-9
    parts = [f"{k.replace('_', ' ')} {v:.1f} s ({100 * v / wall:.0f} %)" for k, v in summary["stages"].items() if v > 0]
    cpu = f" ({summary['cpu_s']:.1f} s CPU of this process)" if summary.get("cpu_s") is not None else ""
    return f"{', '.join(parts)}; total {summary['wall_s']:.1f} s wall{cpu} over {summary['invocations']} invocation(s)"
