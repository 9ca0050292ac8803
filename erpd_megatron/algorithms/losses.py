"""Loss functions of ERPD: stage-1 teacher losses, the stage-2 distillation loss, and their pieces.

All tensors are [B, T] in the project's token layout (right-padded prompt + response, log-probs
aligned with tokens, `mask` = response mask). Advantages may be [B] (one per sequence, broadcast
over its tokens) or [B, T]. Every loss is a pure function returning `(loss, metrics)`: `loss` is a
0-dim tensor (exactly 0, with a gradient path, when the mask is empty) and `metrics` a dict of
floats with namespaced keys such as "grpo/clip_frac_high".

Sources (details and deviations in docs/algorithms.md):
  grpo_loss       PPO clipped surrogate (paper eq. 5; Schulman et al. 2017) with asymmetric clip
                  eps_low/eps_high = 0.2/0.28 (paper Sec. 4.1, "clip-higher" of DAPO) and optional
                  dual clip c (Ye et al. 2020). Also the policy loss of the PPO baseline.
  ppo_value_loss  clipped value loss of PPO (as in OpenAI baselines / VC-PPO critics).
  sapo_loss       SAPO soft gate (Gao et al. 2025, arXiv 2511.20347), tau_pos 1.0 / tau_neg 1.05 (Sec. 4.1).
  cispo_loss      CISPO (MiniMax-M1, Chen et al. 2025): REINFORCE with a clipped, stop-gradient IS weight.
  ce_loss         implicit PRM cross-entropy (paper eqs. 2-3; Yuan et al. 2025a).
  mse_loss        the paper's MSE "unlearning" loss (eq. 10).
  distill_loss    stage 2: PPO clip with the token signal as advantage (eq. 9) + optional KL / entropy terms.
  kl_penalty      k1/k2/k3 estimators (Schulman, "Approximating KL divergence", 2020); only k3 is clamped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import as_mask, check_tensor, item, masked_mean, per_token, upcast, zero_outside

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# Each policy loss's default aggregation (what agg="auto" in the config resolves to): SAPO's objective
# averages tokens within a response, then responses; GRPO / PPO / CISPO / distill use DAPO's token-mean.
DEFAULT_AGG = {"grpo": "token-mean", "ppo": "token-mean", "cispo": "token-mean", "distill": "token-mean",
               "sapo": "seq-mean-token-mean"}
KL_ESTIMATORS = ("k1", "k2", "k3")
# |log r| beyond this is pathological; clamping keeps exp() finite (the gradient is 0 there).
LOG_RATIO_CLAMP = 20.0

LossOut = tuple[Tensor, dict[str, float]]


# --------------------------------------------------------------------------------------------
# aggregation and input handling
# --------------------------------------------------------------------------------------------
def aggregate(x: Tensor, mask: Tensor, agg: str = "token-mean", norm_len: int | None = None) -> Tensor:
    """Reduce a per-token [B, T] tensor to a scalar over the masked tokens.

    token-mean:              sum_{b,t} m x / sum_{b,t} m              (DAPO-style, every token weighs the same)
    seq-mean-token-mean:     mean_b [ sum_t m x / sum_t m ]            (GRPO / SAPO paper form)
    seq-mean-token-sum:      mean_b [ sum_t m x ]
    seq-mean-token-sum-norm: mean_b [ sum_t m x ] / C                  (Dr. GRPO: a constant C, not |y_b|)
    C = `norm_len` (Dr. GRPO's MAX_TOKENS, the response length cap); None = mask.shape[-1], verl's default,
    which in this project's [prompt + response] layout is the padded width, NOT constant across batches: the
    pipeline passes the configured cap. The sequence means run over sequences with at least one masked token.
    An empty mask gives 0.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if norm_len is not None and norm_len <= 0:
        raise ValueError(f"norm_len must be > 0 (the constant divisor of seq-mean-token-sum-norm), got {norm_len}")
    m = mask.to(x.dtype)
    if agg == "token-mean":
        return zero_outside(x, m).sum() / m.sum().clamp(min=1)
    tokens = m.sum(-1)
    seq = zero_outside(x, m).sum(-1)
    if agg == "seq-mean-token-mean":
        seq = seq / tokens.clamp(min=1)
    elif agg == "seq-mean-token-sum-norm":
        seq = seq / float(norm_len if norm_len is not None else mask.shape[-1])
    nonempty = (tokens > 0).to(x.dtype)
    return (seq * nonempty).sum() / nonempty.sum().clamp(min=1)


def _policy_inputs(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor):
    """Validate and sanitise the four policy-loss inputs; positions outside the mask become 0.

    Sanitising *before* any arithmetic matters: a NaN pad that reaches exp() yields NaN gradients
    even when the forward pass masks it out afterwards.
    """
    check_tensor("logprobs", logprobs, finite=False)
    m = as_mask(mask, logprobs)
    check_tensor("logprobs", logprobs, mask=m)
    check_tensor("old_logprobs", old_logprobs, shape=logprobs.shape, mask=m)
    adv = per_token(advantages, logprobs)
    check_tensor("advantages", adv, mask=m)
    m = upcast(m)
    lp = zero_outside(upcast(logprobs), m)
    old = zero_outside(upcast(old_logprobs.detach()), m)
    adv = zero_outside(upcast(adv.detach()), m)
    return lp, old, adv, m


def _ratio(lp: Tensor, old: Tensor) -> tuple[Tensor, Tensor]:
    log_ratio = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_ratio, torch.exp(log_ratio)


def _masked_max(x: Tensor, m: Tensor) -> float:
    if not bool(m.any()):
        return 0.0
    return item(x.detach()[m.bool()].max())


def _ratio_metrics(prefix: str, log_ratio: Tensor, ratio: Tensor, m: Tensor) -> dict[str, float]:
    lr = log_ratio.detach()
    r = ratio.detach()
    return {
        f"{prefix}/ratio_mean": item(masked_mean(r, m)),
        f"{prefix}/ratio_max": _masked_max(r, m),
        # k3 estimate of KL(pi_old || pi_theta) on the stored (pi_old-sampled) tokens
        f"{prefix}/approx_kl": item(masked_mean(torch.expm1(lr) - lr, m)),
        f"{prefix}/tokens": item(m.sum()),
    }


def _ppo_clip(lp, old, adv, m, eps_low: float, eps_high: float, dual_clip: float | None, prefix: str):
    """Per-token PPO clipped loss max(-rA, -clip(r, 1-eps_low, 1+eps_high) A) (+ dual clip) and metrics."""
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    log_ratio, ratio = _ratio(lp, old)
    surr = -adv * ratio
    surr_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg = torch.maximum(surr, surr_clipped)
    r = ratio.detach()
    # Tokens whose gradient the clip removes: pushed down past 1-eps_low, or up past 1+eps_high.
    low = ((r < 1.0 - eps_low) & (adv < 0)).to(m.dtype)
    high = ((r > 1.0 + eps_high) & (adv > 0)).to(m.dtype)
    metrics = {
        f"{prefix}/clip_frac_low": item(masked_mean(low, m)),
        f"{prefix}/clip_frac_high": item(masked_mean(high, m)),
        f"{prefix}/clip_frac": item(masked_mean(low + high, m)),
    }
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020), got {dual_clip}")
        # For A < 0 the surrogate -rA grows without bound in r; cap it at -c A (gradient 0 beyond).
        capped = torch.minimum(pg, -adv * dual_clip)
        dual = ((adv < 0) & (pg.detach() > capped.detach())).to(m.dtype)
        pg = torch.where(adv < 0, capped, pg)
        metrics[f"{prefix}/dual_clip_frac"] = item(masked_mean(dual, m))
    metrics.update(_ratio_metrics(prefix, log_ratio, ratio, m))
    return pg, metrics


# --------------------------------------------------------------------------------------------
# stage-1 policy losses
# --------------------------------------------------------------------------------------------
def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    norm_len: int | None = None,
    name: str = "grpo",
) -> LossOut:
    """PPO/GRPO clipped surrogate: L = agg_t max(-r A, -clip(r, 1-eps_low, 1+eps_high) A), r = exp(lp - lp_old).

    dual_clip=c (> 1) additionally caps the loss of negative-advantage tokens at -c A.
    `name` only sets the metric prefix (the registry's "ppo" entry uses name="ppo").
    """
    lp, old, adv, m = _policy_inputs(logprobs, old_logprobs, advantages, mask)
    pg, metrics = _ppo_clip(lp, old, adv, m, eps_low, eps_high, dual_clip, name)
    loss = aggregate(pg, m, agg, norm_len)
    metrics[f"{name}/loss"] = item(loss)
    return loss, metrics


def sapo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    agg: str = "seq-mean-token-mean",
    norm_len: int | None = None,
) -> LossOut:
    """SAPO: L = -agg_t f(r) A with the soft gate f(r) = sigmoid(tau (r - 1)) * 4 / tau.

    tau = tau_pos where A > 0, tau_neg otherwise. df/dr = 4 p (1 - p), p = sigmoid(tau (r - 1)), which is
    1 at r = 1 (the on-policy gradient) and decays smoothly away from it instead of a hard cut-off.
    """
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"tau_pos and tau_neg must be > 0, got {tau_pos}, {tau_neg}")
    lp, old, adv, m = _policy_inputs(logprobs, old_logprobs, advantages, mask)
    log_ratio, ratio = _ratio(lp, old)
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    p = torch.sigmoid(tau * (ratio - 1.0))
    gate = p * 4.0 / tau
    loss = aggregate(-gate * adv, m, agg, norm_len)
    pd = p.detach()
    metrics = {
        "sapo/loss": item(loss),
        # the factor SAPO puts on the on-policy token gradient (1 at r = 1)
        "sapo/grad_weight_mean": item(masked_mean(4.0 * pd * (1.0 - pd), m)),
    }
    metrics.update(_ratio_metrics("sapo", log_ratio, ratio, m))
    return loss, metrics


def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float | None = None,
    eps_high: float = 0.28,
    agg: str = "token-mean",
    norm_len: int | None = None,
) -> LossOut:
    """CISPO: L = -agg_t sg(clip(r, 1-eps_low, 1+eps_high)) A lp.

    Unlike PPO no token loses its gradient: only the importance weight is clipped (and detached).
    eps_low=None means no lower bound (MiniMax-M1 sets eps_low "large").
    The loss value itself is not meaningful (it scales with lp); its gradient is.
    """
    lp, old, adv, m = _policy_inputs(logprobs, old_logprobs, advantages, mask)
    log_ratio, ratio = _ratio(lp, old)
    lo = None if eps_low is None else 1.0 - eps_low
    weight = ratio.detach().clamp(min=lo, max=1.0 + eps_high)
    loss = aggregate(-weight * adv * lp, m, agg, norm_len)
    r = ratio.detach()
    metrics = {
        "cispo/loss": item(loss),
        "cispo/clip_frac_high": item(masked_mean((r > 1.0 + eps_high).to(m.dtype), m)),
        "cispo/clip_frac_low": 0.0 if lo is None else item(masked_mean((r < lo).to(m.dtype), m)),
        "cispo/is_weight_mean": item(masked_mean(weight, m)),
    }
    metrics.update(_ratio_metrics("cispo", log_ratio, ratio, m))
    return loss, metrics


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float | None = 0.2,
    agg: str = "token-mean",
) -> LossOut:
    """Clipped value loss 0.5 * agg_t max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).

    clip_range=None gives the plain 0.5 * (V - R)^2.
    """
    check_tensor("values", values, finite=False)
    m = as_mask(mask, values)
    check_tensor("values", values, mask=m)
    check_tensor("old_values", old_values, shape=values.shape, mask=m)
    check_tensor("returns", returns, shape=values.shape, mask=m)
    m = upcast(m)
    v = zero_outside(upcast(values), m)
    v_old = zero_outside(upcast(old_values.detach()), m)
    ret = zero_outside(upcast(returns.detach()), m)
    err = (v - ret) ** 2
    if clip_range is None:
        per, clipped = err, torch.zeros_like(err)
    else:
        v_clip = v_old + (v - v_old).clamp(-clip_range, clip_range)
        err_clip = (v_clip - ret) ** 2
        per = torch.maximum(err, err_clip)
        clipped = (err_clip.detach() > err.detach()).to(m.dtype)
    loss = 0.5 * aggregate(per, m, agg)
    resid_var = masked_mean((ret - v.detach() - masked_mean(ret - v.detach(), m)) ** 2, m)
    ret_var = masked_mean((ret - masked_mean(ret, m)) ** 2, m)
    metrics = {
        "value/loss": item(loss),
        "value/clip_frac": item(masked_mean(clipped, m)),
        "value/mean": item(masked_mean(v.detach(), m)),
        "value/explained_var": item(1.0 - resid_var / ret_var) if item(ret_var) > 0 else 0.0,
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# stage-1 sequence-score losses (implicit reward through the policy head)
# --------------------------------------------------------------------------------------------
def sequence_score(
    logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, beta: float, agg: str = "sum", ref_len: float | None = None
) -> Tensor:
    """s(y) = beta * AGG_t (lp - lp_ref) over response tokens, AGG in {"sum", "mean"}; shape [B].

    ref_len (with agg="sum"): length-aware beta, s(y) = beta * (ref_len / |y|) * sum_t (lp - lp_ref), i.e.
    beta means what it means for responses of ref_len tokens (deviation from eq. 3, which has no length
    factor: the paper's beta is for ~20k-token answers and regularises ~1000x less per token on 25 tokens).
    """
    if agg not in ("sum", "mean"):
        raise ValueError(f"agg must be 'sum' or 'mean' (how the log-ratio is reduced over a response), got {agg!r}")
    if ref_len is not None and ref_len <= 0:
        raise ValueError(f"ref_len must be > 0 (or None for the plain sum of eq. 3), got {ref_len}")
    check_tensor("logprobs", logprobs, finite=False)
    m = as_mask(mask, logprobs)
    check_tensor("logprobs", logprobs, mask=m)
    check_tensor("ref_logprobs", ref_logprobs, shape=logprobs.shape, mask=m)
    m = upcast(m)
    diff = zero_outside(upcast(logprobs), m) - zero_outside(upcast(ref_logprobs.detach()), m)
    s = zero_outside(diff, m).sum(-1)
    if agg == "mean":
        s = s / m.sum(-1).clamp(min=1)
    elif ref_len is not None:
        s = s * (ref_len / m.sum(-1).clamp(min=1))
    return beta * s


def _check_rewards(rewards: Tensor, batch: int) -> None:
    if not isinstance(rewards, Tensor):
        raise ValueError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if tuple(rewards.shape) != (batch,):
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}, expected ({batch},): one reward per sequence")
    check_tensor("rewards", rewards.float())


def _seq_mean(x: Tensor, m: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean over sequences with at least one response token (0 if none), of `weights * x` when given.

    The divisor stays the number of sequences (not the sum of weights): a weight w on a sequence scales
    its gradient by exactly w and leaves every other sequence's gradient unchanged.
    """
    nonempty = (m.sum(-1) > 0).to(x.dtype)
    if weights is not None:
        check_tensor("weights", weights, shape=(x.shape[0],))
        if bool((weights < 0).any()):
            raise ValueError("weights must be >= 0 (a per-sequence loss weight)")
        x = x * upcast(weights.detach()).to(x.dtype)
    return (x * nonempty).sum() / nonempty.sum().clamp(min=1)


def ce_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    rewards: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.05,
    agg: str = "sum",
    weights: Tensor | None = None,
    ref_len: float | None = None,
) -> LossOut:
    """Implicit-PRM cross-entropy: L = mean_y w(y) BCE(sigmoid(s(y)), l(y)), s(y) = beta * AGG_t (lp - lp_ref).

    `rewards` [B] are the binary correctness labels l (values in [0, 1]). `weights` [B] (>= 0, default 1)
    are per-sequence loss weights (e.g. `negative_weight` on negatives, paper Tab. 9); the mean still
    divides by the number of sequences. `ref_len`: length-aware beta (see `sequence_score`).
    """
    score = sequence_score(logprobs, ref_logprobs, mask, beta, agg, ref_len)
    _check_rewards(rewards, score.shape[0])
    labels = rewards.to(score.dtype).detach()
    if bool(((labels < 0) | (labels > 1)).any()):
        raise ValueError("rewards for ce_loss must be binary labels in [0, 1]; map your reward to {0, 1} first")
    m = upcast(as_mask(mask, logprobs))
    per_seq = F.binary_cross_entropy_with_logits(score, labels, reduction="none")
    loss = _seq_mean(per_seq, m, weights)
    valid = m.sum(-1) > 0
    s = score.detach()
    pos, neg = valid & (labels > 0.5), valid & (labels <= 0.5)
    metrics = {
        "ce/loss": item(loss),
        "ce/acc": item(((s > 0) == (labels > 0.5))[valid].float().mean()) if bool(valid.any()) else 0.0,
        "ce/score_pos_mean": item(s[pos].mean()) if bool(pos.any()) else 0.0,
        "ce/score_neg_mean": item(s[neg].mean()) if bool(neg.any()) else 0.0,
    }
    return loss, metrics


def mse_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    rewards: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.05,
    agg: str = "sum",
    weights: Tensor | None = None,
    ref_len: float | None = None,
) -> LossOut:
    """Paper eq. 10: L = mean_y w(y) (beta * sum_t (lp - lp_ref) - R(y))^2, R = the regression target [B].

    `weights` [B], `ref_len`: as in `ce_loss`. Which target encodes a wrong answer matters:
    the score starts at 0, so targets {0, 1} give negatives no gradient at step 0 (see docs/algorithms.md).
    """
    score = sequence_score(logprobs, ref_logprobs, mask, beta, agg, ref_len)
    _check_rewards(rewards, score.shape[0])
    target = rewards.to(score.dtype).detach()
    m = upcast(as_mask(mask, logprobs))
    loss = _seq_mean((score - target) ** 2, m, weights)
    valid = m.sum(-1) > 0
    s, t = score.detach()[valid], target[valid]
    var_t = t.var(unbiased=False) if t.numel() else torch.zeros(())
    ev = 1.0 - (t - s).var(unbiased=False) / var_t if t.numel() and item(var_t) > 0 else torch.zeros(())
    metrics = {
        "mse/loss": item(loss),
        "mse/explained_var": item(ev),
        "mse/score_mean": item(s.mean()) if s.numel() else 0.0,
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# stage 2: distillation
# --------------------------------------------------------------------------------------------
def kl_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    estimator: str = "k3",
    clamp: float | None = 10.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) on tokens sampled from pi_theta (or close to it).

    With d = lp - lp_ref:  k1 = d,  k2 = d^2 / 2,  k3 = exp(-d) + d - 1  (>= 0, low variance).
    Only k3 is clamped to [-clamp, clamp] (its exp explodes on outlier tokens), as verl's `low_var_kl` and
    slime's `low_var_kl` do; k1 and k2 are never clamped: a clamp would zero their gradient exactly where the
    policy is farthest from the reference (k2's gradient d would vanish for |d| > sqrt(2 clamp)).
    With `mask`, positions outside it are 0 and only masked positions are validated.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    check_tensor("logprobs", logprobs, finite=False)
    m = None if mask is None else as_mask(mask, logprobs)
    check_tensor("logprobs", logprobs, mask=m)
    check_tensor("ref_logprobs", ref_logprobs, shape=logprobs.shape, mask=m)
    lp, ref = upcast(logprobs), upcast(ref_logprobs.detach())
    if m is not None:
        lp, ref = zero_outside(lp, m), zero_outside(ref, m)
    d = lp - ref
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d**2
    else:
        nd = (-d).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.expm1(nd) - nd
        if clamp is not None:
            kl = kl.clamp(-clamp, clamp)
    return kl if m is None else zero_outside(kl, m)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) over the last dim: logsumexp(z) - sum softmax(z) z."""
    check_tensor("logits", logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = upcast(logits) / temperature
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)


def distill_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    agg: str = "token-mean",
    norm_len: int | None = None,
) -> LossOut:
    """Stage-2 loss (paper eq. 9): PPO clip with the whitened token signal as per-token advantage,
    ratio against pi_old, + kl_coef * KL(pi_theta || pi_ref) - entropy_coef * H.

    `advantages` is the [B, T] signal (see signals.py). `ref_logprobs` defaults to `old_logprobs`
    (the paper's trust region is around pi_old). `entropy` [B, T] is required when entropy_coef != 0.
    """
    lp, old, adv, m = _policy_inputs(logprobs, old_logprobs, advantages, mask)
    pg, metrics = _ppo_clip(lp, old, adv, m, eps_low, eps_high, dual_clip, "distill")
    pg_loss = aggregate(pg, m, agg, norm_len)
    loss = pg_loss
    metrics["distill/pg_loss"] = item(pg_loss)
    if kl_coef != 0.0:
        ref = old_logprobs if ref_logprobs is None else ref_logprobs
        kl = aggregate(kl_penalty(logprobs, ref, kl_estimator, mask=mask), m, agg, norm_len)
        loss = loss + kl_coef * kl
        metrics["distill/kl_loss"] = item(kl)
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs the per-token entropy tensor (entropy=...)")
    if entropy is not None:
        check_tensor("entropy", entropy, shape=logprobs.shape, mask=m)
        ent = aggregate(zero_outside(upcast(entropy), m), m, agg, norm_len)
        loss = loss - entropy_coef * ent
        metrics["distill/entropy"] = item(ent)
    metrics["distill/loss"] = item(loss)
    return loss, metrics


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
LOSSES: dict[str, Callable[..., LossOut]] = {
    "grpo": grpo_loss,
    "ppo": functools.partial(grpo_loss, name="ppo"),  # PPO's policy loss; advantages come from GAE
    "sapo": sapo_loss,
    "cispo": cispo_loss,
    "ce": ce_loss,
    "mse": mse_loss,
    "distill": distill_loss,
}
# These take (logprobs, ref_logprobs, rewards[B], mask); all others (logprobs, old_logprobs, advantages, mask).
SEQUENCE_REWARD_LOSSES = frozenset({"ce", "mse"})


def get_loss(name: str) -> Callable[..., LossOut]:
    """Look a loss up by name; unknown names raise ValueError listing the valid ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}") from None
