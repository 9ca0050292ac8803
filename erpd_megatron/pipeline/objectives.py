"""Config -> per-micro-batch loss closures for the Megatron engine (`train_step(batch, loss_fn)`).

The maths lives in `erpd_megatron/algorithms` (pure functions); this file only picks the function and its
hyper-parameters and says which batch columns feed it. Every closure has the engine's signature
`loss_fn(logprobs [b,T], micro_batch: dict, entropy [b,T] | None) -> (loss, metrics)`.

Batch columns used: `response_mask`, `old_logprobs` (the base policy's log-probs recomputed by Megatron at
collect time, so ratios start at exactly 1), `rewards` [B], `advantages` ([B] or [B,T]), `signal` [B,T].
"""

from __future__ import annotations

import torch

from erpd_megatron.algorithms import losses as L
from erpd_megatron.algorithms import metrics as M
from erpd_megatron.config import DistillConfig, OnPolicyConfig, TeacherConfig


def _with_kl(loss_fn, kl_coef: float, estimator: str = "k3"):
    """Adds kl_coef * KL(pi || pi_old) (token mean of the k-estimator) to a stage-1 loss."""
    if not kl_coef:
        return loss_fn

    def fn(lp, mb, entropy=None):
        loss, metrics = loss_fn(lp, mb, entropy)
        mask = mb["response_mask"]
        kl = L.aggregate(L.kl_penalty(lp, mb["old_logprobs"], estimator, mask=mask), mask, "token-mean")
        # the penalty's value: k3 form of KL(pi || pi_old), token mean, on the batch's (pi_old-sampled) tokens
        return loss + kl_coef * kl, {**metrics, f"kl_loss/{estimator}_tok_batch": float(kl)}

    return fn


# Training-time KL metric names: estimator and samples in the name. pi_old = the policy that sampled the batch
# (teachers / students: the base; on-policy: the policy before its update). The batch's tokens come from
# pi_old, so they estimate KL(pi_old || pi) ("fwd") without importance weights; the paper's reported reverse KL
# KL(pi || pi_base) needs the policy's own samples and is measured at eval (pipeline/evaluate.py).
KL_TOKEN_METRIC = "policy/kl_fwd_k3_tok_batch"  # KL(pi_old || pi) per token, k3 = r - 1 - log r (>= 0)
KL_SEQ_METRIC = "policy/kl_fwd_k1_seq_batch"  # the same KL per sequence, k1 = sum_t -log r (unbiased, can be < 0)


def with_policy_metrics(loss_fn):
    """Adds the per-step diagnostics every stage logs: KL(pi_old || pi) on the batch's own samples, k3 per
    token and k1 per sequence (KL_TOKEN_METRIC, KL_SEQ_METRIC; see the comment above), entropy, and the mean
    token log-prob of positive vs negative samples (the unlearn-and-recover curve of paper Fig. 5). Metrics
    only: the loss is unchanged."""

    def fn(lp, mb, entropy=None):
        loss, metrics = loss_fn(lp, mb, entropy)
        mask, old = mb["response_mask"], mb["old_logprobs"]
        metrics[KL_TOKEN_METRIC] = M.behaviour_kl(lp, old, mask, per="token", estimator="k3")
        metrics[KL_SEQ_METRIC] = M.behaviour_kl(lp, old, mask, per="sequence", estimator="k1")
        if entropy is not None:
            metrics["policy/entropy"] = M.entropy_mean(entropy, mask)
        if "rewards" in mb:
            by = M.logprob_by_outcome(lp, mask, mb["rewards"])
            metrics["policy/logprob_pos"], metrics["policy/logprob_neg"] = by["pos_logprob"], by["neg_logprob"]
        return loss, metrics

    return fn


def sample_weights(rewards, negative_weight: float):
    """Per-sequence loss weight [B]: negative samples (reward <= 0.5) get `negative_weight`, positives 1
    (paper Tab. 9: a larger weight on negatives means stronger unlearning)."""
    return 1.0 + (negative_weight - 1.0) * (rewards <= 0.5).float()


def mse_target(rewards, targets):
    """R(y) of paper eq. 10 for the MSE teacher: targets[1] on correct samples (reward > 0.5), targets[0] on
    wrong ones (default [-1, 1]; see TeacherConfig.mse_targets for why not [0, 1])."""
    wrong, correct = targets
    return torch.where(rewards > 0.5, torch.full_like(rewards.float(), correct),
                       torch.full_like(rewards.float(), wrong))


def _weighted_advantages(adv, w):
    """Scales each sequence's advantages by its weight. The GRPO / PPO / SAPO / CISPO per-token losses are
    linear in A for a fixed sign of A (SAPO's tau and PPO's clip side depend only on the sign), so for w >= 0
    this is exactly a per-sequence loss weight."""
    w = w.to(adv.dtype)
    return adv * (w if adv.dim() == 1 else w[:, None])


def resolve_agg(loss: str, agg: str) -> str:
    """The aggregation a policy loss uses: `agg`, or the loss's own default (losses.DEFAULT_AGG) for "auto"."""
    return L.DEFAULT_AGG[loss] if agg == "auto" else agg


def teacher_objective(t: TeacherConfig, max_new_tokens: int | None = None):
    """Stage-1 loss of a teacher run. `max_new_tokens` (the rollout's response cap) is the constant divisor of
    seq-mean-token-sum-norm unless `t.agg_norm_len` sets one."""
    name = t.loss
    norm_len = t.agg_norm_len or max_new_tokens

    if name in ("ce", "mse"):
        fn = L.ce_loss if name == "ce" else L.mse_loss

        def loss_fn(lp, mb, entropy=None):
            w = sample_weights(mb["rewards"], t.negative_weight) if t.negative_weight != 1.0 else None
            target = mse_target(mb["rewards"], t.mse_targets) if name == "mse" else (mb["rewards"] > 0.5).float()
            return fn(lp, mb["old_logprobs"], target, mb["response_mask"], beta=t.beta, agg=t.ce_reduce, weights=w,
                      ref_len=t.beta_ref_len or None)

    elif name == "sft":  # SFT on positive samples only (paper Tab. 9 recovery from an unlearned policy)

        def loss_fn(lp, mb, entropy=None):
            pos = (mb["rewards"] > 0.5).float()[:, None] * mb["response_mask"]
            nll = L.aggregate(-lp, pos, "token-mean")
            return nll, {"sft/nll": float(nll), "sft/positive_tokens": float(pos.sum())}

    elif name in ("grpo", "ppo", "sapo", "cispo"):  # ppo: per-token GAE advantages from the critic
        agg = resolve_agg(name, t.agg)
        # CISPO keeps its own lower clip (none: eps_low=None, MiniMax-M1's "large" eps_low); eps_low is PPO's
        hp = {"grpo": dict(eps_low=t.eps_low, eps_high=t.eps_high, agg=agg),
              "ppo": dict(eps_low=t.eps_low, eps_high=t.eps_high, agg=agg),
              "sapo": dict(tau_pos=t.tau_pos, tau_neg=t.tau_neg, agg=agg),
              "cispo": dict(eps_high=t.eps_high, agg=agg)}[name]
        hp["norm_len"] = norm_len
        fn = L.get_loss(name)

        def loss_fn(lp, mb, entropy=None):
            adv = mb["advantages"]
            if t.negative_weight != 1.0:
                adv = _weighted_advantages(adv, sample_weights(mb["rewards"], t.negative_weight))
            return fn(lp, mb["old_logprobs"], adv, mb["response_mask"], **hp)

    else:
        raise ValueError(f"teacher loss {name!r} is not available (valid: ce, mse, sft, grpo, ppo, sapo, cispo)")
    return with_policy_metrics(_with_kl(loss_fn, t.kl_coef))


def distill_objective(s: DistillConfig):
    """Stage-2 loss (paper eq. 9): PPO clip with the precomputed whitened signal as advantage."""

    def loss_fn(lp, mb, entropy=None):
        return L.distill_loss(lp, mb["old_logprobs"], mb["signal"], mb["response_mask"], eps_low=s.eps_low,
                              eps_high=s.eps_high, kl_coef=s.kl_coef, kl_estimator=s.kl_estimator,
                              entropy=entropy, entropy_coef=s.entropy_coef)

    return with_policy_metrics(loss_fn)


def onpolicy_objective(o: OnPolicyConfig, t: TeacherConfig | None = None, max_new_tokens: int | None = None):
    """On-policy baseline: one update per fresh batch, so r = 1 and the clip never binds (kept for parity)."""
    t = t or TeacherConfig(loss=o.loss)  # agg "auto": the loss's own default
    return teacher_objective(t, max_new_tokens)
