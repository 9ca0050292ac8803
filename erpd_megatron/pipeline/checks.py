"""Checks of the config against the machine and the data, run before any training.

The config alone is validated in `config.validate`; `check_environment` needs this machine (the CLI runs it right
after parsing), the others the loaded prompt files, the tokenizer and the base model's positions (`build_context`).
Each raises `ConfigError` naming the config field (and the prompt) at fault.
"""

from __future__ import annotations

import logging
from pathlib import Path

from erpd_megatron.config import ConfigError, RunConfig

log = logging.getLogger("erpd")


def check_environment(cfg: RunConfig) -> None:
    """What the config asks of this machine: `model.fp8` needs a CUDA device and Transformer Engine (refused on CPU,
    as its help says; without this the model build would fail after the data and the base were prepared)."""
    if cfg.model.fp8:
        import torch

        from erpd_megatron.megatron.model import have_te

        missing = [what for what, ok in (("a CUDA device", torch.cuda.is_available()),
                                         ("Transformer Engine (transformer_engine.pytorch)", have_te())) if not ok]
        if missing:
            raise ConfigError(f"model.fp8=true needs {' and '.join(missing)}, which this machine lacks (FP8 runs on "
                              "GPUs with Transformer Engine only); set model.fp8=false")


def check_dataset_sizes(cfg: RunConfig, train: list, evals: list) -> None:
    """Every fixed batch takes fresh prompts: refuse a training set that would make a batch repeat prompts.
    A short eval file only warns (all of it is used)."""
    need = cfg.data.prompts_per_batch * cfg.iterations
    if len(train) < need:
        raise ConfigError(
            f"data.train: {cfg.data.train} has {len(train)} prompts, fewer than data.prompts_per_batch * iterations "
            f"= {cfg.data.prompts_per_batch} * {cfg.iterations} = {need} (batches would repeat prompts); "
            f"lower data.prompts_per_batch or iterations")
    if not evals:
        raise ConfigError(f"data.eval: {cfg.data.eval} has no problems")
    if len(evals) < cfg.data.eval_prompts:
        log.warning("data.eval: %s has %d problems, fewer than data.eval_prompts=%d: evaluating on all %d",
                    cfg.data.eval, len(evals), cfg.data.eval_prompts, len(evals))


def check_prompt_lengths(cfg: RunConfig, tokenizer, prompts: list, max_positions: int) -> int:
    """Each prompt, as the engine will see it, plus `rollout.max_new_tokens` must fit the model's positions.
    Returns the longest prompt's length in tokens."""
    from erpd_megatron.data.prompts import encode_prompts

    room = max_positions - cfg.rollout.max_new_tokens
    if room < 1:
        raise ConfigError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for a prompt in the "
                          f"model's {max_positions} positions (max_position_embeddings)")
    if cfg.data.instruction:  # once, alone: a long instruction is named before every prompt is tokenized with it
        n = len(encode_prompts(tokenizer, ["?"], instruction=cfg.data.instruction)[0])
        if n > room:
            raise ConfigError(f"data.instruction takes {n} tokens with a one-character problem: with "
                              f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} it exceeds the model's "
                              f"{max_positions} positions")
    ids = encode_prompts(tokenizer, prompts, instruction=cfg.data.instruction or None)
    longest = max(range(len(ids)), key=lambda i: len(ids[i]), default=None)
    if longest is not None and len(ids[longest]) > room:
        p = prompts[longest]
        raise ConfigError(
            f"prompt {p.id!r} has {len(ids[longest])} tokens: with rollout.max_new_tokens="
            f"{cfg.rollout.max_new_tokens} it exceeds the model's {max_positions} positions "
            f"(drop long prompts from the data or lower rollout.max_new_tokens)")
    return len(ids[longest]) if longest is not None else 0


# Host memory held per token position of a batch row while a stage works on it, a lower estimate: the samples'
# Python lists (token ids and log-probs, ~70 bytes a token), the rollout store's Arrow columns, the padded [B, T]
# tensors the trainer loads (ids and masks in int64, behaviour / old / teacher / reference log-probs, signals and
# advantages in float32: ~50 bytes).
BYTES_PER_TOKEN = 128


def available_memory() -> int:
    """Bytes this process can still allocate: psutil's available memory, or less under a cgroup (v2) limit."""
    import psutil

    avail = psutil.virtual_memory().available
    try:
        limit = int(Path("/sys/fs/cgroup/memory.max").read_text())  # "max" (no limit) is a ValueError
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        avail = min(avail, max(limit - used, 0))
    except (OSError, ValueError):
        pass
    return avail


def check_memory(cfg: RunConfig, seq_len: int, eval_problems: int, available: int | None = None) -> None:
    """The rows a stage holds at once (the fixed batch, one evaluation) x `seq_len` tokens must fit in the
    memory available now, before any compute: refused naming the field that sets the row count."""
    available = available_memory() if available is None else available
    d, r = cfg.data, cfg.rollout
    batches = [("rollout.n_samples", r.n_samples, d.prompts_per_batch * r.n_samples,
                f"data.prompts_per_batch x rollout.n_samples = {d.prompts_per_batch} x {r.n_samples}"),
               ("eval.k", cfg.eval.k, eval_problems * cfg.eval.k,
                f"eval problems x eval.k = {eval_problems} x {cfg.eval.k}")]
    for name, value, rows, how in batches:
        need = rows * seq_len * BYTES_PER_TOKEN
        if need > available:
            raise ConfigError(f"{name}={value}: a batch of {how} = {rows} sequences of up to {seq_len} tokens needs "
                              f"at least ~{need / 2**30:.1f} GiB of memory, {available / 2**30:.1f} GiB is "
                              f"available; lower {name}")
