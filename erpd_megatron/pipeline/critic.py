"""PPO with a critic (paper Sec. 4.1, VC-PPO / VAPO style): value pre-training and GAE advantages.

Pure helpers over a `megatron.value.ValueEngine` and a fixed batch (the brief's token layout plus
`rewards [B]`); no pipeline state. The stage code builds the critic from the base checkpoint, calls
`pretrain_critic`, then `ppo_advantages`, and trains the policy with `grpo_loss(..., name="ppo")` on the
per-token advantages.

- Value pre-training: lambda_critic = 1.0 and gamma = 1, so the GAE return of every response token is the
  outcome reward R (it does not depend on the values: sum of deltas telescopes), computed once with
  `decoupled_gae`. Loss: `ppo_value_loss` (plain 0.5 (V - R)^2 by default; `value_clip` clips around the
  values at the start of each pass over the batch).
- Policy advantages: `decoupled_gae` with the length-adaptive lambda_policy = 1 - 1/(alpha * len)
  (alpha = 0.05), on the pre-trained critic's values. Then whitened over all response tokens of the batch
  (verl's PPO does the same; `whiten_advantages=False` keeps the raw GAE).
- Differs from VC-PPO / VAPO: those keep training the critic alongside the policy on fresh rollouts; here
  the batch is fixed (paper Sec. 4.1: "value network training phase" then policy training), so the critic
  is trained once and the advantages are computed once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from erpd_megatron.algorithms import (
    decoupled_gae,
    explained_variance,
    length_adaptive_lambda,
    outcome_token_rewards,
    ppo_value_loss,
    whiten,
)
from erpd_megatron.pipeline.rundir import minibatch_indices
from erpd_megatron.pipeline.train import slice_batch


def _checked(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    for key in ("input_ids", "response_mask", "rewards"):
        if key not in batch:
            raise ValueError(f"critic: the batch has no {key!r} column (needs input_ids, response_mask, rewards)")
    mask, rewards = batch["response_mask"], batch["rewards"].float()
    if rewards.shape != (mask.shape[0],):
        raise ValueError(f"critic: rewards must be [B]={mask.shape[0]}, got shape {tuple(rewards.shape)}")
    return mask, rewards


def critic_returns(batch: dict) -> torch.Tensor:
    """Value targets [B, T]: GAE returns with gamma = lambda_critic = 1, i.e. R on every response token."""
    mask, rewards = _checked(batch)
    token_rewards = outcome_token_rewards(rewards, mask)
    _, returns = decoupled_gae(token_rewards, torch.zeros_like(token_rewards), mask, lam_critic=1.0)
    return returns.float()


def value_loss_fn(value_clip: float | None = None, agg: str = "token-mean"):
    """Engine loss closure: `ppo_value_loss(values, mb["old_values"], mb["returns"], mb["response_mask"])`."""

    def loss_fn(values, mb, _entropy=None):
        old = mb.get("old_values")
        return ppo_value_loss(values, values.detach() if old is None else old, mb["returns"], mb["response_mask"],
                              clip_range=value_clip, agg=agg)

    return loss_fn


def pretrain_critic(value_engine, batch: dict, steps: int, mini_batch_size: int, seed: int, *,
                    value_clip: float | None = None, agg: str = "token-mean", start: int | None = None,
                    on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Fit the critic to the Monte-Carlo returns of the fixed batch; returns one metrics dict per step.

    Mini-batch `step` = `minibatch_indices(B, mini_batch_size, step, seed)`, so a critic reloaded from a
    checkpoint continues with the same batches: `start` defaults to `value_engine.step`. `on_step(step, m)`
    runs after each update (step counts from 1), e.g. to log or checkpoint.
    `value_clip`: clip around the values at the start of each pass over the batch (None: plain MSE, the
    default: clipping around the zero-initialised head would stop the critic from reaching R). A run resumed
    mid-pass recomputes them at the resumed weights (not bit-identical to an uninterrupted clipped run).
    """
    batch = {**batch, "returns": critic_returns(batch)}
    n = batch["input_ids"].shape[0]
    per_epoch = n // min(mini_batch_size, n)  # minibatch_indices' epoch length
    loss_fn = value_loss_fn(value_clip, agg)
    out = []
    first = value_engine.step if start is None else start
    for step in range(first, steps):
        if value_clip is not None and (step == first or step % per_epoch == 0):
            # PPO's old values, refreshed once per pass over the batch (a per-step refresh would never bind)
            batch["old_values"] = value_engine.forward_values(batch)
        mb = slice_batch(batch, minibatch_indices(n, mini_batch_size, step, seed))
        metrics = value_engine.train_step(mb, loss_fn)
        metrics["critic/step"] = float(step + 1)
        out.append(metrics)
        if on_step is not None:
            on_step(step + 1, metrics)
    return out


@torch.no_grad()
def ppo_advantages(value_engine, batch: dict, alpha: float = 0.05, *, lam_policy: float | None = None,
                   whiten_advantages: bool = True) -> tuple[torch.Tensor, dict]:
    """(advantages [B, T], metrics): decoupled GAE on the critic's values; 0 off the response.

    lambda_policy = 1 - 1/(alpha * response length) per sequence unless `lam_policy` is given.
    Metrics: `critic/explained_var` (values vs. lambda=1 returns over response tokens), `critic/value_mean`,
    `critic/return_mean`, `critic/lambda_mean`, `critic/adv_mean`, `critic/adv_std` (before whitening).
    """
    mask, rewards = _checked(batch)
    values = value_engine.forward_values(batch).to(mask.device)
    token_rewards = outcome_token_rewards(rewards, mask)
    adv, returns = decoupled_gae(token_rewards, values, mask, lam_critic=1.0, lam_policy=lam_policy, alpha=alpha)
    m = mask.bool()
    lam = length_adaptive_lambda(mask.sum(-1), alpha) if lam_policy is None else torch.full((m.shape[0],), lam_policy)
    raw = adv[m]
    metrics = {
        "critic/explained_var": explained_variance(values, returns, mask),
        "critic/value_mean": float(values[m].mean()) if m.any() else 0.0,
        "critic/return_mean": float(returns[m].mean()) if m.any() else 0.0,
        "critic/lambda_mean": float(lam.float().mean()),
        "critic/adv_mean": float(raw.mean()) if m.any() else 0.0,
        "critic/adv_std": float(raw.std()) if raw.numel() > 1 else 0.0,
    }
    if whiten_advantages:
        adv = whiten(adv, mask)
    return adv.float(), metrics
