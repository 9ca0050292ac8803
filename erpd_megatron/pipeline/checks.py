"""Checks of the data against the config and the model, run by `build_context` before any training.

The config alone is validated in `config.validate`; these need the loaded prompt files, the tokenizer and the
base model's positions. Each raises `ConfigError` naming the config field (and the prompt) at fault.
"""

from __future__ import annotations

import logging

from erpd_megatron.config import ConfigError, RunConfig

log = logging.getLogger("erpd")


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


def load_tokenizer(model_dir, where: str):
    """AutoTokenizer of a local model dir; a directory transformers cannot read one from is a ConfigError (one
    line naming `where`), not a traceback."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{where}: {model_dir}: no usable tokenizer ({first})") from None


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


def check_prompt_lengths(cfg: RunConfig, encode, train: list, evals: list, max_positions: int) -> tuple[list, list]:
    """Each prompt, as the engine will see it (`encode`: prompts -> token ids), must fit data.max_prompt_length
    (0: the model's positions minus rollout.max_new_tokens). data.overlong_prompts "refuse": the first too long
    prompt that a batch or the eval set uses stops the run; "filter": every too long prompt is dropped (one
    warning) and the sizes are checked again. Returns (train, evals), filtered or as given."""
    room = max_positions - cfg.rollout.max_new_tokens
    if room < 1:
        raise ConfigError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for a prompt in the "
                          f"model's {max_positions} positions (max_position_embeddings)")
    limit = cfg.data.max_prompt_length or room
    if limit > room:
        raise ConfigError(f"data.max_prompt_length={limit} + rollout.max_new_tokens={cfg.rollout.max_new_tokens} "
                          f"exceeds the model's {max_positions} positions")
    what = (f"data.max_prompt_length={limit}" if cfg.data.max_prompt_length else
            f"the model's {max_positions} positions minus rollout.max_new_tokens={cfg.rollout.max_new_tokens}")
    if cfg.data.overlong_prompts == "filter":
        kept = []
        for name, prompts in (("train", train), ("eval", evals)):
            ids = encode(prompts)
            kept.append([p for p, x in zip(prompts, ids) if len(x) <= limit])
            if len(kept[-1]) < len(prompts):
                log.warning("data.%s: %d of %d prompts are longer than %d tokens (%s): filtered out",
                            name, len(prompts) - len(kept[-1]), len(prompts), limit, what)
        check_dataset_sizes(cfg, *kept)
        return kept[0], kept[1]
    used = train[: cfg.data.prompts_per_batch * cfg.iterations] + evals
    ids = encode(used)
    longest = max(range(len(ids)), key=lambda i: len(ids[i]), default=None)
    if longest is not None and len(ids[longest]) > limit:
        p = used[longest]
        raise ConfigError(f"prompt {p.id!r} has {len(ids[longest])} tokens, more than {limit} ({what}): drop long "
                          "prompts with data.overlong_prompts=filter, or raise the limit")
    return train, evals
