"""Run-directory layout, metric logs and the deterministic mini-batch schedule.

    <run_dir>/config.yaml                  resolved config (written once; a rerun must match it)
    <run_dir>/rollouts/                    rollout store (Parquet per batch + manifest + per-token columns)
    <run_dir>/base/                        base policy as a Megatron checkpoint (imported once from HF)
    <run_dir>/ckpt/<method>/iter_XXXXXXX   Megatron distributed checkpoints (latest marked atomically)
    <run_dir>/metrics/<method>.jsonl       one JSON line per optimizer step
    <run_dir>/tb/<method>/                 TensorBoard events (same numbers)
    <run_dir>/eval/<method>/step_XXXXXX.json  AVG@K, pass@K, KL to base, length at that step
    <run_dir>/summary.json, report.md, accuracy_vs_kl.png

Resumption rule: a unit of work is done when its output exists (written atomically). Metrics lines past
the step a method resumes from are dropped, so a resumed log has no duplicated or missing steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from erpd_megatron.utils.io import atomic_write_json, atomic_write_text


@dataclass
class RunDir:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    @property
    def rollouts(self) -> Path:
        return self.root / "rollouts"

    @property
    def base(self) -> Path:
        return self.root / "base"

    def ckpt(self, method: str) -> Path:
        return self.root / "ckpt" / method

    def metrics(self, method: str) -> Path:
        return self.root / "metrics" / f"{method}.jsonl"

    def eval_file(self, method: str, step: int) -> Path:
        return self.root / "eval" / method / f"step_{step:06d}.json"

    def eval_results(self, method: str) -> dict[int, dict]:
        out = {}
        for p in sorted((self.root / "eval" / method).glob("step_*.json")):
            out[int(p.stem.split("_")[1])] = json.loads(p.read_text())
        return out

    def write_eval(self, method: str, step: int, result: dict) -> None:
        atomic_write_json(self.eval_file(method, step), result)


class MetricLog:
    """Append-only JSONL (+ TensorBoard when available, + extra sinks such as W&B) that can be rewound to a
    resume step. Every destination gets the same metric names; `sinks` have `log(step, metrics)` / `close()`."""

    def __init__(self, path: Path, resume_step: int, tb_dir: Path | None = None, sinks: list | None = None):
        self.sinks = list(sinks or [])
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # torn last line of a killed run
                continue
            if rec.get("step", 0) <= resume_step:
                kept.append(line)
        if kept != lines:  # rewound: replaced atomically, so a crash now leaves the old log or the new one
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._f = open(self.path, "a")  # noqa: SIM115 - closed in close()
        self._tb = None
        if tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(tb_dir), purge_step=resume_step + 1)
            except Exception:  # tensorboard missing: JSONL is the source of truth
                self._tb = None

    def log(self, step: int, metrics: dict) -> None:
        rec = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.log_trackers(step, metrics)

    def log_trackers(self, step: int, metrics: dict) -> None:
        """TensorBoard and sinks only (e.g. eval results, whose source of truth is eval/<method>/step_*.json)."""
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), step)
        for sink in self.sinks:
            sink.log(step, metrics)

    def log_text(self, tag: str, text: str) -> None:
        """Provenance (resolved config, git commit) as TensorBoard text; W&B gets it as the run config."""
        if self._tb is not None:
            self._tb.add_text(tag, text)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        for sink in self.sinks:
            sink.close()


def minibatch_indices(num_rows: int, mini_batch_size: int, step: int, seed: int) -> list[int]:
    """Rows of mini-batch `step` (0-based): epochs are seeded permutations, consumed in order.

    A pure function of (num_rows, size, step, seed) so a resumed run sees exactly the same batches without
    saving any sampler state. A mini-batch larger than the batch is the whole batch.
    """
    size = min(mini_batch_size, num_rows)
    per_epoch = num_rows // size
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_rows, generator=g)
    return perm[k * size : (k + 1) * size].tolist()
