"""Token-level distillation signals for ERPD stage 2 (paper Secs. 3.3-3.4, 4.4-4.5).

All signals are log-ratios of two policies' log-probs of the *stored* rollout tokens, so they are
computed once from per-token columns of the rollout store (no teacher is loaded in stage 2):

  strategy 1  s_t = log pi_T(y_t)   - log pi_old(y_t)        strong teacher over the base (Sec. 3.3)
  strategy 2  s_t = log pi_T(y_t)   - log pi_U(y_t)          MSE teacher over its early "unlearned"
                                                             checkpoint (Sec. 3.4)
  strategy 3  s_t = log pi_cur(y_t) - log pi_weak(y_t)       away from a weaker earlier policy (Sec. 4.4)

Processing (make_signal): optional sign mask on positive samples (Tab. 12) -> optional clip of the raw
log-ratio -> masked whitening over all response tokens of the batch (Sec. 3.3) -> optional clip in
std units. Ensembles: sum of whitened signals, or a sequential schedule (Sec. 4.5, Tab. 8).

Denominator: the paper fixes pi_old (it does not move while distilling); `evolving_signal` gives the
alternative with the current, evolving pi_theta (detached), recomputed every step (Sec. 3.3 / Fig. 7).
Whitening must see the whole batch: call it on the full rollout batch, not per micro-batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .common import as_mask, check_tensor, masked_mean, masked_var, upcast, zero_outside

# strategy -> (numerator column, denominator column); names of the rollout store's per-token columns
STRATEGIES: dict[int, tuple[str, str]] = {
    1: ("teacher", "old"),
    2: ("teacher", "unlearned"),
    3: ("current", "weak"),
}
SIGN_KEEP = ("both", "positive", "negative")


def log_ratio_signal(
    numerator: Tensor, denominator: Tensor, mask: Tensor, names=("numerator", "denominator")
) -> Tensor:
    """s_t = numerator_t - denominator_t on response tokens, 0 elsewhere (no gradient)."""
    check_tensor(names[0], numerator, finite=False)
    m = as_mask(mask, numerator)
    check_tensor(names[0], numerator, mask=m)
    check_tensor(names[1], denominator, shape=numerator.shape, mask=m)
    num = zero_outside(upcast(numerator.detach()), m)
    den = zero_outside(upcast(denominator.detach()), m)
    return num - den


def strategy_signal(strategy: int, logprobs: Mapping[str, Tensor], mask: Tensor) -> Tensor:
    """Signal of strategy 1, 2 or 3 from a dict of per-token log-probs keyed as in STRATEGIES."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    num, den = STRATEGIES[strategy]
    missing = [k for k in (num, den) if k not in logprobs]
    if missing:
        raise ValueError(f"strategy {strategy} needs log-probs {num!r} and {den!r}; missing {missing}")
    return log_ratio_signal(logprobs[num], logprobs[den], mask, names=(f"{num} log-probs", f"{den} log-probs"))


def evolving_signal(teacher_logprobs: Tensor, current_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Alternative denominator: s_t = log pi_T - log pi_theta with the current policy (detached).
    Shrinks as pi_theta approaches pi_T (more KL-friendly); the paper's default is the fixed pi_old."""
    return log_ratio_signal(teacher_logprobs, current_logprobs, mask, names=("teacher log-probs", "current log-probs"))


def whiten(signal: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(s - mean) / std over all masked tokens of the batch (Bessel-corrected std); 0 off-mask.
    A constant signal (std 0), an empty mask or a single token give exactly 0, never NaN."""
    check_tensor("signal", signal, finite=False)
    m = as_mask(mask, signal)
    check_tensor("signal", signal, mask=m)
    s = zero_outside(upcast(signal), m)
    on = m.bool()
    # The mean of equal floats can be off by an ulp, so a "constant" test on the variance is not
    # enough (tiny / (tiny + eps) is O(1) garbage): test max == min over the masked tokens instead.
    hi = torch.where(on, s, torch.full_like(s, -torch.inf)).max()
    lo = torch.where(on, s, torch.full_like(s, torch.inf)).min()
    var = masked_var(s, m)
    out = (s - masked_mean(s, m)) / (var.sqrt() + eps)
    out = torch.where((hi > lo) & (var > 0), out, torch.zeros_like(out))
    return zero_outside(out, m)


def clip_signal(signal: Tensor, mask: Tensor, low: float | None = None, high: float | None = None) -> Tensor:
    """Element-wise clamp to [low, high] on response tokens (None = unbounded), 0 off-mask."""
    if low is not None and high is not None and low > high:
        raise ValueError(f"clip bounds reversed: low={low} > high={high}")
    m = as_mask(mask, signal)
    check_tensor("signal", signal, mask=m)
    return zero_outside(zero_outside(signal, m).clamp(min=low, max=high), m)


def sign_mask(signal: Tensor, mask: Tensor, positive_samples: Tensor, keep: str = "both") -> Tensor:
    """Paper Tab. 12: on positive samples keep only s_t > 0 ("positive") or s_t < 0 ("negative");
    the other tokens of those samples are set to 0 (they stay in the mask, so whitening still counts
    them, as in the paper). Negative samples are untouched. `positive_samples` is [B] bool (e.g. reward > 0)."""
    if keep not in SIGN_KEEP:
        raise ValueError(f"keep must be one of {SIGN_KEEP}, got {keep!r}")
    m = as_mask(mask, signal)
    check_tensor("signal", signal, mask=m)
    if not isinstance(positive_samples, Tensor) or tuple(positive_samples.shape) != (signal.shape[0],):
        raise ValueError(f"positive_samples must be a [B]={signal.shape[0]} tensor")
    s = zero_outside(signal, m)
    if keep == "both":
        return s
    clipped = s.clamp(min=0) if keep == "positive" else s.clamp(max=0)
    return torch.where(positive_samples.bool()[:, None], clipped, s)


def make_signal(
    raw: Tensor,
    mask: Tensor,
    *,
    positive_samples: Tensor | None = None,
    keep: str = "both",
    clip_raw: float | None = None,
    normalize: bool = True,
    clip_whitened: float | None = None,
) -> Tensor:
    """Full stage-2 advantage from a raw log-ratio: sign mask -> |raw| clip -> whiten -> clip in std units."""
    s = raw
    if keep != "both":
        if positive_samples is None:
            raise ValueError(f"keep={keep!r} needs positive_samples ([B] bool, e.g. reward > 0)")
        s = sign_mask(s, mask, positive_samples, keep)
    if clip_raw is not None:
        s = clip_signal(s, mask, -clip_raw, clip_raw)
    if normalize:
        s = whiten(s, mask)
    if clip_whitened is not None:
        s = clip_signal(s, mask, -clip_whitened, clip_whitened)
    return zero_outside(s, as_mask(mask, s))


def ensemble(signals: Sequence[Tensor], mask: Tensor, weights: Sequence[float] | None = None) -> Tensor:
    """Sum of whitened signals (Sec. 4.5 "both teacher signals provided simultaneously"), optionally weighted.
    The sum is not re-whitened; pass it through whiten() if a unit scale is wanted."""
    if not signals:
        raise ValueError("ensemble needs at least one signal")
    weights = [1.0] * len(signals) if weights is None else list(weights)
    if len(weights) != len(signals):
        raise ValueError(f"{len(weights)} weights for {len(signals)} signals")
    return sum(w * whiten(s, mask) for w, s in zip(weights, signals))


def sequential_index(step: int, steps_per_signal: Sequence[int], cycle: bool = False) -> int:
    """Which signal a sequential ensemble uses at (0-based) `step`: the first for steps_per_signal[0]
    steps, then the second, ... (Sec. 4.5: "first several steps with Teacher 1's reward, then Teacher 2's").
    After the last block: stay on the last signal, or start over with cycle=True."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not steps_per_signal or any(k <= 0 for k in steps_per_signal):
        raise ValueError(f"steps_per_signal must be positive integers, got {list(steps_per_signal)}")
    total = sum(steps_per_signal)
    if step >= total:
        if not cycle:
            return len(steps_per_signal) - 1
        step %= total
    for i, k in enumerate(steps_per_signal):
        if step < k:
            return i
        step -= k
    raise AssertionError("unreachable")
