"""The one training loop every stage uses: teacher (stage 1), distillation (stage 2) and on-policy steps.

    for step in range(resume_step, steps):
        mini-batch = pure function of (seed, step)  ->  engine.train_step(mini-batch, loss_fn)
        log metrics; every `save_every` steps: checkpoint (atomic), then evaluate if it is an eval step

A killed run restarts from the newest complete checkpoint; the mini-batch schedule and the engine's saved
optimizer / RNG state make the continuation identical to an uninterrupted run. An evaluation missing for
the resume step (killed between checkpoint and eval) is redone first.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import torch

from erpd_megatron.pipeline.rundir import MetricLog, minibatch_indices
from erpd_megatron.utils import console
from erpd_megatron.utils.io import atomic_write_json, atomic_write_text
from erpd_megatron.utils.timing import stage

log = logging.getLogger("erpd.train")


def slice_batch(batch: dict, rows: list[int]) -> dict:
    idx = torch.as_tensor(rows, dtype=torch.long)
    return {k: v.index_select(0, idx) if torch.is_tensor(v) and v.dim() >= 1 else v for k, v in batch.items()}


def train_loop(ctx, method: str, *, batch: dict | None, loss_fn, steps: int, mini_batch_size: int, lr: float,
               save_every: int, init, warmup_steps: int = 0, next_batch=None, eval_fn=None, step_metrics=None,
               eval_every: int | None = None, early_stop_patience: int = 0, keep_steps=frozenset()):
    """Train `method` for `steps` optimizer steps; returns the policy (holding the final weights), or None when
    an earlier invocation finished it (its completion marker: nothing is built).

    `batch`: the fixed batch (all rows) for off-policy stages; or None with `next_batch(step, policy)` giving a
    fresh batch per step (on-policy). `eval_fn(policy, step)` runs at save points that are eval steps.
    `keep_steps`: checkpoint steps `checkpoint.keep_last` must not delete (None: keep every checkpoint).
    """
    ckdir = ctx.run.ckpt(method)
    if finished(ckdir, steps):  # finished (or early-stopped) in an earlier invocation: nothing left to do
        log.info("%s: finished in an earlier invocation (%s), skipped", method, ckdir)
        return None
    policy = ctx.new_policy(lr=lr, total_steps=steps, warmup_steps=warmup_steps, init=init)
    start = 0
    if (ckdir / "latest").exists():  # megatron/checkpoint.py marks the newest complete save
        from erpd_megatron.megatron.checkpoint import load_latest_intact

        with stage("checkpoint_load"):
            load_latest_intact(policy, str(ckdir))  # a damaged newest one: the previous intact one (logged)
        start = policy.step
    if start:
        log.info("%s: resuming from step %d (%s)", method, start, ckdir)
    metrics_log = open_metric_log(ctx, method, start)
    evaluated = set(ctx.run.eval_results(method)) if eval_fn else set()
    every = ctx.cfg.eval.every if eval_every is None else eval_every
    if eval_fn and _is_eval_step(start, steps, save_every, every) and start not in evaluated:
        eval_fn(policy, start)
        _log_eval(ctx, metrics_log, method, start)
    bar = console.progress(total=steps, desc=method, unit="step")
    bar.update(start)
    t_start = time.perf_counter()
    for step in range(start, steps):
        t0 = time.perf_counter()
        if batch is not None:
            n = batch["input_ids"].shape[0]
            mb = slice_batch(batch, minibatch_indices(n, mini_batch_size, step, ctx.cfg.seed))
        else:
            mb = next_batch(step, policy)
        metrics = policy.train_step(mb, loss_fn, need_entropy=True)  # entropy is logged by every stage
        tokens = float(mb["attention_mask"].sum())
        metrics["perf/tokens_per_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
        metrics["perf/response_length"] = float(mb["response_mask"].sum() / mb["response_mask"].shape[0])
        if step_metrics is not None:
            metrics.update(step_metrics(policy, mb))
        done = step + 1
        if ctx.is_main:
            metrics_log.log(done, metrics)
            eta = (time.perf_counter() - t_start) / (done - start) * (steps - done)
            console.print_step(method, done, steps, metrics, eta_s=eta)
        bar.update(1)
        _test_kill_point(ctx, method, done)
        if done % save_every == 0 or done == steps:
            with stage("checkpoint_save"):
                policy.save(str(ckdir))
            if ctx.cfg.checkpoint.keep_last and keep_steps is not None:
                from erpd_megatron.megatron.checkpoint import prune_checkpoints

                prune_checkpoints(str(ckdir), ctx.cfg.checkpoint.keep_last, keep_steps)
            if eval_fn and _is_eval_step(done, steps, save_every, every):
                eval_fn(policy, done)
                _log_eval(ctx, metrics_log, method, done)
                if early_stop_patience and _no_progress(ctx.run.eval_results(method), early_stop_patience):
                    if ctx.is_main:
                        atomic_write_text(ckdir / STOPPED, f"{done}\n")
                    log.info("%s: early stop at step %d (no eval gain in %d evaluations)", method, done,
                             early_stop_patience)
                    break
    bar.close()
    metrics_log.close()
    if ctx.is_main and not (ckdir / STOPPED).exists():
        atomic_write_json(ckdir / FINISHED, {"steps": steps})  # after the last save and eval
    ctx.barrier()
    return policy


def open_metric_log(ctx, method: str, start: int) -> MetricLog:
    """JSONL + TensorBoard (+ W&B when `logging.wandb.mode` is set) for `method`, rewound to `start`; the
    trackers get the resolved config and the git commit (utils/tracking.py). Non-main ranks: JSONL path only."""
    if not ctx.is_main:
        return MetricLog(ctx.run.metrics(method), start)
    from erpd_megatron.utils.tracking import make_sinks, run_info

    info = run_info(ctx.cfg)
    mlog = MetricLog(ctx.run.metrics(method), start, tb_dir=ctx.run.root / "tb" / method,
                     sinks=make_sinks(ctx.cfg, method, info))
    import yaml

    mlog.log_text("config", "```\n" + yaml.safe_dump(info["config"], sort_keys=False) + "```")
    mlog.log_text("git_commit", str(info["git_commit"]))
    return mlog


EVAL_KEYS = ("avg_at_k", "pass_at_k", "kl", "kl_token", "mean_length")


def _log_eval(ctx, metrics_log: MetricLog, method: str, step: int) -> None:
    """Eval results to TensorBoard / W&B as `eval/<key>` (their JSON file, eval/<method>/step_*.json, holds
    the same keys without the prefix; the JSONL keeps one line per optimizer step)."""
    if not ctx.is_main:
        return
    r = ctx.run.eval_results(method).get(step)
    if r:
        metrics_log.log_trackers(step, {f"eval/{k}": r[k] for k in EVAL_KEYS if r.get(k) is not None})


STOPPED = "early_stopped"
FINISHED = "finished.json"


def finished(ckdir, steps: int) -> bool:
    """A method is done when it early-stopped, or its completion marker is for these `steps` (a resume that
    grows `steps` continues from the last checkpoint)."""
    if (ckdir / STOPPED).exists():
        return True
    try:
        return json.loads((ckdir / FINISHED).read_text()).get("steps") == steps
    except (OSError, ValueError):
        return False


def final_step(ckdir, steps: int) -> int:
    """Last step a method trained to: `steps`, or the step it early-stopped at."""
    marker = ckdir / STOPPED
    return int(marker.read_text()) if marker.exists() else steps


def _no_progress(results: dict[int, dict], patience: int) -> bool:
    """True when the best eval accuracy is more than `patience` evaluations old."""
    accs = [r["avg_at_k"] for _, r in sorted(results.items())]
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))
    return len(accs) - 1 - best >= patience


def _test_kill_point(ctx, method: str, step: int) -> None:
    """Resume tests: ERPD_TEST_KILL_AT="ce:3,s1:2" SIGKILLs this process once after that step's update
    (before its checkpoint), as a crash would. A marker file makes each point fire only once per run dir."""
    spec = os.environ.get("ERPD_TEST_KILL_AT")
    if not spec or f"{method}:{step}" not in spec.split(","):
        return
    marker = ctx.run.root / f".killed_{method}_{step}"
    if not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)


def _is_eval_step(step: int, steps: int, save_every: int, every: int) -> bool:
    if step == steps or step == 0:
        return True
    return bool(every) and step % every == 0 and step % save_every == 0
