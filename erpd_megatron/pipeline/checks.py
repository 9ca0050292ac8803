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


def check_tokenizer(tokenizer, model_dir, prompts: list, where: str) -> None:
    """Refuse a model directory whose tokenizer is empty (a converter export without tokenizer files: transformers
    then loads a tokenizer that encodes nothing), or that has no chat template while the data is chat messages."""
    if len(tokenizer) == 0 or not tokenizer("1+1", add_special_tokens=False)["input_ids"]:
        raise ConfigError(f"{where}: {model_dir} has an empty tokenizer (no tokenizer.json / vocab files): copy the "
                          "base model's tokenizer files there (erpd export and checkpoints_conv export do)")
    chat = next((p for p in prompts if getattr(p, "messages", None) is not None), None)
    if chat is not None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where}: {model_dir} has no chat template, but prompt {chat.id!r} is a chat-message list "
                          "(add chat_template.jinja or tokenizer_config.json's chat_template to the model dir)")


def check_prompt_lengths(cfg: RunConfig, encode, train: list, evals: list, max_positions: int) -> tuple[list, list, int]:
    """Each prompt, as the engine will see it (`encode`: prompts -> token ids), must fit data.max_prompt_length
    (0: the model's positions minus rollout.max_new_tokens). data.overlong_prompts "refuse": the first too long
    prompt that a batch or the eval set uses stops the run; "filter": every too long prompt is dropped (one
    warning) and the sizes are checked again. Returns (train, evals, longest prompt's tokens), filtered or as given."""
    room = max_positions - cfg.rollout.max_new_tokens
    if room < 1:
        raise ConfigError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for a prompt in the "
                          f"model's {max_positions} positions (max_position_embeddings)")
    if cfg.data.instruction:  # once, alone: a long instruction is named before every prompt is tokenized with it
        n = len(encode(["?"])[0])
        if n > room:
            raise ConfigError(f"data.instruction takes {n} tokens with a one-character problem: with "
                              f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} it exceeds the model's "
                              f"{max_positions} positions")
    limit = cfg.data.max_prompt_length or room
    if limit > room:
        raise ConfigError(f"data.max_prompt_length={limit} + rollout.max_new_tokens={cfg.rollout.max_new_tokens} "
                          f"exceeds the model's {max_positions} positions")
    what = (f"data.max_prompt_length={limit}" if cfg.data.max_prompt_length else
            f"the model's {max_positions} positions minus rollout.max_new_tokens={cfg.rollout.max_new_tokens}")
    if cfg.data.overlong_prompts == "filter":
        kept, longest_kept = [], 0
        for name, prompts in (("train", train), ("eval", evals)):
            ids = encode(prompts)
            kept.append([p for p, x in zip(prompts, ids) if len(x) <= limit])
            longest_kept = max([longest_kept, *(len(x) for x in ids if len(x) <= limit)])
            if len(kept[-1]) < len(prompts):
                log.warning("data.%s: %d of %d prompts are longer than %d tokens (%s): filtered out",
                            name, len(prompts) - len(kept[-1]), len(prompts), limit, what)
        check_dataset_sizes(cfg, *kept)
        return kept[0], kept[1], longest_kept
    used = train[: cfg.data.prompts_per_batch * cfg.iterations] + evals
    ids = encode(used)
    longest = max(range(len(ids)), key=lambda i: len(ids[i]), default=None)
    if longest is not None and len(ids[longest]) > limit:
        p = used[longest]
        raise ConfigError(f"prompt {p.id!r} has {len(ids[longest])} tokens, more than {limit} ({what}): drop long "
                          "prompts with data.overlong_prompts=filter, or raise the limit")
    return train, evals, len(ids[longest]) if longest is not None else 0


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
