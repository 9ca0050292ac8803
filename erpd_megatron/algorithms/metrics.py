"""Diagnostics logged by the trainer (paper Sec. 4.1 "KL", Fig. 4-5, Fig. 9; DESIGN.md Sec. 3).

All functions take [B, T] tensors with a response mask and return plain floats (or dicts of floats),
never tensors, and never raise on an empty mask (they return 0.0 there, except where noted).

reverse_kl             KL(pi_theta || pi_ref) = E_{y ~ pi_theta}[log pi_theta(y) - log pi_ref(y)], estimated
                       on samples from the *new* policy (the paper's reported KL). per="token" gives the
                       mean per-token log-ratio, per="sequence" the mean over sequences of the summed log-ratio.
behaviour_kl           KL(pi_b || pi_theta) on samples from the behaviour policy pi_b (a stored batch): the
                       training-time KL of teachers / students, per token (k3) or per sequence (k1).
entropy_mean           masked mean of per-token entropies.
clip_fractions         fraction of response tokens whose PPO gradient is removed by the clip (low / high).
explained_variance     1 - Var(target - pred) / Var(target) (the paper's MSE fit diagnostic, Sec. 3.4).
logprob_by_outcome     mean token log-prob of positive vs negative samples (unlearn-and-recover, Fig. 5).
response_length_mean   mean number of response tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import as_mask, check_tensor, item, masked_mean, per_token, upcast, zero_outside


def _inputs(name: str, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    check_tensor(name, x, finite=False)
    m = upcast(as_mask(mask, x))
    check_tensor(name, x, mask=m)
    return zero_outside(upcast(x.detach()), m), m


def reverse_kl(
    logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, per: str = "token", estimator: str = "k1"
) -> float:
    """Reverse KL estimate from new-policy samples. estimator "k1" (unbiased, log-ratio) or "k3"
    (exp(-d) + d - 1, non-negative, lower variance); both estimate the same KL."""
    lp, m = _inputs("logprobs", logprobs, mask)
    check_tensor("ref_logprobs", ref_logprobs, shape=logprobs.shape, mask=m)
    return _kl_from_samples(lp - zero_outside(upcast(ref_logprobs.detach()), m), m, per, estimator)


def _kl_from_samples(d: Tensor, m: Tensor, per: str, estimator: str) -> float:
    """KL(p || q) from d = log p - log q on tokens sampled from p: k1 = d, k3 = exp(-d) - 1 + d."""
    if per not in ("token", "sequence"):
        raise ValueError(f"per must be 'token' or 'sequence', got {per!r}")
    if estimator not in ("k1", "k3"):
        raise ValueError(f"estimator must be 'k1' or 'k3', got {estimator!r}")
    kl = d if estimator == "k1" else torch.expm1(-d) + d
    if per == "token":
        return item(masked_mean(kl, m))
    seq = zero_outside(kl, m).sum(-1)
    nonempty = m.sum(-1) > 0
    return item(seq[nonempty].mean()) if bool(nonempty.any()) else 0.0


def behaviour_kl(
    logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, per: str = "token", estimator: str = "k3"
) -> float:
    """KL(pi_b || pi_theta) estimated on tokens sampled from the behaviour policy pi_b (a stored batch).

    This is the direction those samples estimate without importance weights (the training-time KL on a
    fixed batch; the paper's reported reverse KL needs the new policy's own samples: `reverse_kl` at eval).
    With r = pi_theta / pi_b: k1 = -log r (unbiased, can be < 0), k3 = r - 1 - log r (unbiased, >= 0).
    per="token": mean over response tokens; per="sequence": mean over sequences of the per-token sum."""
    lp, m = _inputs("logprobs", logprobs, mask)
    check_tensor("behaviour_logprobs", behaviour_logprobs, shape=logprobs.shape, mask=m)
    log_r = (lp - zero_outside(upcast(behaviour_logprobs.detach()), m)).clamp(-20.0, 20.0)
    return _kl_from_samples(-log_r, m, per, estimator)  # samples from pi_b: d = log pi_b - log pi_theta


def entropy_mean(entropy: Tensor, mask: Tensor) -> float:
    ent, m = _inputs("entropy", entropy, mask)
    return item(masked_mean(ent, m))


def clip_fractions(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> dict[str, float]:
    """{"low", "high", "total"}: fractions of response tokens with r < 1-eps_low and A < 0 (low), or
    r > 1+eps_high and A > 0 (high) -- exactly the tokens whose gradient PPO's clip sets to zero."""
    lp, m = _inputs("logprobs", logprobs, mask)
    check_tensor("old_logprobs", old_logprobs, shape=logprobs.shape, mask=m)
    adv = zero_outside(upcast(per_token(advantages, logprobs).detach()), m)
    ratio = torch.exp(lp - zero_outside(upcast(old_logprobs.detach()), m))
    low = ((ratio < 1 - eps_low) & (adv < 0)).to(m.dtype)
    high = ((ratio > 1 + eps_high) & (adv > 0)).to(m.dtype)
    return {
        "low": item(masked_mean(low, m)),
        "high": item(masked_mean(high, m)),
        "total": item(masked_mean(low + high, m)),
    }


def explained_variance(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> float:
    """1 - Var(target - pred) / Var(target) over masked entries (population variances).
    If Var(target) is 0: 1.0 when Var(target - pred) is 0 too, else 0.0 (scikit-learn's force_finite)."""
    if mask is None:
        mask = torch.ones_like(pred, dtype=torch.bool)
    p, m = _inputs("pred", pred, mask)
    check_tensor("target", target, shape=pred.shape, mask=m)
    t = zero_outside(upcast(target.detach()), m)

    def var(x: Tensor) -> Tensor:
        return masked_mean((x - masked_mean(x, m)) ** 2, m)

    var_t, var_r = var(t), var(t - p)
    if item(var_t) == 0.0:
        return 1.0 if item(var_r) == 0.0 else 0.0
    return item(1.0 - var_r / var_t)


def logprob_by_outcome(logprobs: Tensor, mask: Tensor, rewards: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Mean token log-prob of positive (reward > threshold) and negative samples, and their counts
    (sequences with at least one response token). Keys "pos_logprob", "neg_logprob", "num_pos",
    "num_neg"; a mean is NaN when its group is empty (nothing to report, not zero)."""
    lp, m = _inputs("logprobs", logprobs, mask)
    if not isinstance(rewards, Tensor) or tuple(rewards.shape) != (lp.shape[0],):
        raise ValueError(f"rewards must be a [B]={lp.shape[0]} tensor")
    has_tokens = m.sum(-1) > 0
    is_pos = rewards.to(lp.device) > threshold
    out: dict[str, float] = {}
    for key, rows in (("pos", is_pos & has_tokens), ("neg", ~is_pos & has_tokens)):
        sel = rows[:, None].to(m.dtype) * m
        n_tok = item(sel.sum())
        out[f"{key}_logprob"] = item(zero_outside(lp, sel).sum() / n_tok) if n_tok > 0 else float("nan")
        out[f"num_{key}"] = item(rows.sum())
    return out


def response_length_mean(mask: Tensor) -> float:
    """Mean number of response tokens per sequence (all sequences, empty ones count as 0)."""
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError("mask must be a [B, T] tensor")
    return item(mask.float().sum(-1).mean()) if mask.shape[0] else 0.0
