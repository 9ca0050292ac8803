"""Sampling and scoring for the toy model, in plain transformers + torch (no engine, no server).

Used by the warm-up to measure accuracy at temperature 1.0 and greedily. A tiny KV-cached loop instead
of ``model.generate`` so that the random stream is an explicit ``torch.Generator`` (reproducible
without touching the global seed). Prompts are grouped by length, so no padding is ever fed to the model.
Scoring is the project's math_verify reward (``erpd_megatron.rewards.math``, strict mode), in this
process; its timeout needs the main thread (``signal``).
"""

from __future__ import annotations

from collections import defaultdict

import torch


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, eos_id: int, temperature: float, max_new_tokens: int,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Sample one response per prompt (token ids, ending at and including eos when produced).

    ``temperature == 0`` means greedy. Prompts of different lengths are run in separate batches.
    """
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for _, idx in sorted(by_len.items()):
        ids = torch.tensor([prompts[i] for i in idx], dtype=torch.long)
        res = _generate_same_length(model, ids, eos_id, temperature, max_new_tokens, generator)
        for i, r in zip(idx, res):
            out[i] = r
    return out


def _generate_same_length(model, ids, eos_id, temperature, max_new_tokens, generator):
    b = ids.shape[0]
    done = torch.zeros(b, dtype=torch.bool)
    tokens = []
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    logits = out.logits[:, -1, :].float()
    for _ in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        tokens.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()):
            break
        out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
    seqs = torch.stack(tokens, dim=1).tolist()
    res = []
    for s in seqs:
        if eos_id in s:
            s = s[: s.index(eos_id) + 1]
        res.append(s)
    return res


def score(response: str, answer: str) -> float:
    """1.0 if the response's last ``\\boxed{}`` equals ``answer`` by math_verify, else 0.0.

    The project's reward in "strict" mode (a response without a boxed answer scores 0), so the
    warm-up's accuracy means the same as the pipeline's.
    """
    from erpd_megatron.rewards.math import score as reward_score

    return reward_score(response, answer, mode="strict")


def quiet_math_verify() -> None:
    """math_verify logs whole inputs at WARNING on timeouts; the toy does not need that."""
    import logging

    for name in ("math_verify", "math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)
