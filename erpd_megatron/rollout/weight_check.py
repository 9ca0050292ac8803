"""The weights-arrived guard: after a weight sync, the rollout engine scores a few stored token sequences and its
log-probs are compared with the trainer's own on the same tokens (slime checks its weight updates the same way).

A transport that drops, reorders, mis-shards or garbles a tensor changes the engine's model and moves these log-probs
far beyond the rounding noise between two implementations of the same model; `check_sync` then raises
`WeightSyncMismatch` naming the sync, the weight version and the largest difference, on every rank, before any sample
of that version is drawn (`Context.push_weights` calls it right after the update).

Tolerance (per scored token, |engine - trainer| log-prob): dtype-aware, from the lower precision of the two sides;
both the mean and the largest difference must be within `TOLERANCE`. What it cannot see: a change smaller than that,
e.g. in bf16 an update that never arrived when the two versions are a few small RL steps apart (their log-probs
differ by about bf16's noise); in fp32 such a stale update shows.

Temperature 1 on both sides: sglang 0.5.23 computes prompt log-probs from untempered logits
(srt/layers/logprob_processor.py), and the weights are what is checked, not the sampling.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

#: (mean, max) |log-prob difference| per scored token allowed, by the lower precision of the two sides. fp32: the
#: CPU engines agree with megatron within 1e-4 (tests/test_weight_sync.py). bf16 / fp16: bf16 against fp32 on a
#: small random Qwen3 measured mean 0.008, max 0.034 (bench/gpu_smoke.py); two bf16 implementations of a trained
#: model on real text have longer tails (rare tokens), hence the loose max; a wrong tensor moves the mean by O(1).
TOLERANCE = {torch.float32: (1e-3, 2e-2), torch.bfloat16: (0.05, 1.0), torch.float16: (0.05, 1.0)}
UNKNOWN_DTYPE = torch.bfloat16  # an engine that does not say (an SGLang server) is taken as bf16


class WeightSyncMismatch(RuntimeError):
    """The rollout engine's model after a weight sync is not the trainer's (or could not be checked)."""


@dataclass(frozen=True)
class Probe:
    """The stored tokens: `sequences[k]` is scored from position `prompt_lens[k]` on (>= 1)."""

    sequences: list[list[int]]
    prompt_lens: list[int]

    @property
    def tokens(self) -> int:
        return sum(len(s) - p for s, p in zip(self.sequences, self.prompt_lens))


def make_probe(token_lists, n: int, max_len: int = 64) -> Probe:
    """The first `n` token lists of at least 2 tokens, cut to `max_len`, each scored from position 1 on."""
    seqs = [list(map(int, t[:max_len])) for t in token_lists if len(t) >= 2][:n]
    if not seqs:
        raise ValueError("weight check: no token sequence of 2 tokens or more to score")
    return Probe(seqs, [1] * len(seqs))


def tolerance(*dtypes, mean_override: float = 0.0) -> tuple[float, float, str]:
    """(mean, max, dtype name) for the lowest precision among `dtypes` (None = unknown -> bf16). `mean_override` > 0
    replaces the mean tolerance and scales the max one alike."""
    known = [UNKNOWN_DTYPE if d is None else d for d in dtypes]
    worst = max(known, key=lambda d: TOLERANCE.get(d, TOLERANCE[UNKNOWN_DTYPE])[0])
    mean, mx = TOLERANCE.get(worst, TOLERANCE[UNKNOWN_DTYPE])
    if mean_override > 0:
        mean, mx = mean_override, mx * mean_override / mean
    return mean, mx, str(worst).replace("torch.", "")


def trainer_logprobs(policy, probe: Probe) -> list[list[float]]:
    """The trainer's log-probs of the probe's scored tokens at temperature 1 (a collective: every rank calls it)."""
    width = max(len(s) for s in probe.sequences)
    ids = torch.zeros(len(probe.sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(probe.sequences):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    lp = policy.forward_logprobs({"input_ids": ids, "attention_mask": mask}, temperature=1.0)
    return [lp[r, p:len(s)].tolist() for r, (s, p) in enumerate(zip(probe.sequences, probe.prompt_lens))]


def compare(trainer: list[list[float]], engine: list[list[float]]) -> dict:
    """Mean and largest |difference| over all scored tokens and where the largest is (sequence, position)."""
    if len(engine) != len(trainer) or any(len(a) != len(b) for a, b in zip(trainer, engine)):
        raise WeightSyncMismatch(f"the rollout engine scored {[len(x) for x in engine]} tokens per sequence, the "
                                 f"trainer {[len(x) for x in trainer]}")
    diffs = [(abs(a - b), k, j) for k, (ta, tb) in enumerate(zip(trainer, engine)) for j, (a, b) in enumerate(zip(ta, tb))]
    if any(d != d for d, _, _ in diffs):  # NaN: garbage arrived
        return {"mean": float("nan"), "max": float("nan"), "where": None, "tokens": len(diffs)}
    worst = max(diffs)
    return {"mean": sum(d for d, _, _ in diffs) / len(diffs), "max": worst[0], "where": worst[1:], "tokens": len(diffs)}


def check_sync(policy, engine, probe: Probe, *, sync: int, version, engine_dtype=None, mean_tol: float = 0.0,
               is_main: bool = True) -> dict:
    """Compare the engine's log-probs on `probe` with the trainer's; raise WeightSyncMismatch on every rank when they
    differ beyond the tolerance. Every rank calls it (the trainer's forward is a collective); only the main rank
    (the one holding the engine) asks the engine. Returns the comparison (mean, max, tokens, tolerances, seconds)."""
    t0 = time.perf_counter()
    mine = trainer_logprobs(policy, probe)
    result: dict
    if is_main:  # the engine's dtype is known here only: the tolerance travels with the result
        mean_ok, max_ok, dtype = tolerance(getattr(policy.tcfg, "params_dtype", None), engine_dtype,
                                           mean_override=mean_tol)
        try:
            theirs = engine.score_logprobs(probe.sequences, probe.prompt_lens, 1.0)
            result = dict(compare(mine, theirs), tol_mean=mean_ok, tol_max=max_ok, dtype=dtype)
        except WeightSyncMismatch as e:
            result = {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - reported on every rank below, not swallowed
            result = {"error": f"the rollout engine could not score the check sequences: {type(e).__name__}: {e}"}
    else:
        result = {}
    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank stops together, none waits in a collective
        box = [result]
        dist.broadcast_object_list(box, src=0, device=policy.device if policy.device.type == "cuda" else None)
        result = box[0]
    result["seconds"] = time.perf_counter() - t0
    what = f"weight sync #{sync} (version {version!r})"
    if "error" in result:
        raise WeightSyncMismatch(f"{what}: {result['error']}; stopping before any rollout of this version "
                                 "(rollout.verify_weights=false skips this check)")
    mean_ok, max_ok, dtype = result["tol_mean"], result["tol_max"], result["dtype"]
    bad = not (result["mean"] <= mean_ok and result["max"] <= max_ok)  # NaN fails both
    if bad:
        k, j = result["where"] or (None, None)
        at = f" (sequence {k}, token {probe.prompt_lens[k] + j})" if k is not None else ""
        raise WeightSyncMismatch(
            f"{what} did not arrive intact: the rollout engine's log-probs on {len(probe.sequences)} stored sequences "
            f"({result['tokens']} tokens) differ from the trainer's by up to {result['max']:.4g}{at}, mean "
            f"{result['mean']:.4g} ({dtype} tolerance: mean {mean_ok:g}, max {max_ok:g}); stopping before any rollout "
            "of this version is used (rollout.verify_weights=false skips this check)")
    log.debug("%s verified: max |diff| %.3g, mean %.3g over %d tokens (%.2f s)", what, result["max"], result["mean"],
              result["tokens"], result["seconds"])
    return result
