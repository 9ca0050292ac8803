"""Advantage estimators for the stage-1 baselines: GRPO group normalisation and (decoupled) GAE.

grpo_advantages   A_i = (R_i - mean_g R) / (std_g R + eps)  (GRPO, Shao et al. 2024), or R_i - mean_g R
                  with norm_std=False (Dr. GRPO, Liu et al. 2025). A group whose rewards are all equal
                  gets exactly 0 (never NaN), also a group of one.
gae               Generalised Advantage Estimation (Schulman et al. 2016) over the response tokens of a
                  right-padded [B, T] batch. Prompts differ in length, so responses start at different
                  offsets: the recursion runs over masked positions only and skips everything else.
decoupled_gae     VC-PPO (Yuan et al. 2025b): critic targets with lambda_critic = 1.0, policy advantages
                  with lambda_policy; VAPO (Yue et al. 2025) length-adaptive
                  lambda_policy = 1 - 1/(alpha * len), alpha = 0.05 (paper Sec. 4.1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import as_mask, check_tensor, upcast, zero_outside


def grpo_advantages(
    rewards: Tensor,
    group_ids: Tensor | None = None,
    *,
    group_size: int | None = None,
    norm_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Group-normalised per-sequence advantages, shape [N] like `rewards`.

    Groups come from `group_ids` [N] (any integer labels, any order) or from `group_size` (consecutive
    blocks of that size). std is the Bessel-corrected group standard deviation (torch.std's default).
    """
    if isinstance(rewards, Tensor) and not rewards.is_floating_point():
        rewards = rewards.float()  # integer / bool rewards: advantages are fractional
    check_tensor("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if (group_ids is None) == (group_size is None):
        raise ValueError("pass exactly one of group_ids or group_size")
    if group_size is not None:
        if group_size < 1 or n % group_size:
            raise ValueError(f"group_size={group_size} does not divide the {n} rewards")
        inverse = torch.arange(n, device=rewards.device) // group_size
    else:
        if not isinstance(group_ids, Tensor) or tuple(group_ids.shape) != (n,):
            shape = tuple(group_ids.shape) if isinstance(group_ids, Tensor) else type(group_ids).__name__
            raise ValueError(f"group_ids has shape {shape}, expected ({n},)")
        _, inverse = torch.unique(group_ids, return_inverse=True)
    if n == 0:
        return rewards.clone()
    g = int(inverse.max().item()) + 1
    r = rewards.double()
    count = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, inverse, r) / count
    centred = r - mean[inverse]
    gmax = torch.full((g,), -torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, inverse, r, "amax")
    gmin = torch.full((g,), torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, inverse, r, "amin")
    constant = (gmax == gmin)[inverse]
    if norm_std:
        ss = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, inverse, centred**2)
        std = (ss / (count - 1).clamp(min=1)).sqrt()
        centred = centred / (std[inverse] + eps)
    # The mean of equal floats need not equal them exactly, so constant groups are zeroed explicitly.
    out = torch.where(constant, torch.zeros_like(centred), centred)
    return out.to(rewards.dtype)


def outcome_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """Place each sequence's outcome reward [B] on its last response token -> [B, T]."""
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be a [B, T] tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    m = as_mask(mask, mask.float()).bool()
    if not isinstance(rewards, Tensor) or tuple(rewards.shape) != (m.shape[0],):
        raise ValueError(f"rewards must have shape ({m.shape[0]},), got {getattr(rewards, 'shape', rewards)}")
    check_tensor("rewards", rewards.float())
    t = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, t, torch.full_like(t, -1)).max(-1).values  # -1: no response tokens
    out = torch.zeros(m.shape, dtype=rewards.float().dtype, device=m.device)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    out[rows, last[rows]] = rewards.float()[rows]
    return out


def length_adaptive_lambda(lengths: Tensor, alpha: float = 0.05) -> Tensor:
    """VAPO's lambda = 1 - 1/(alpha * len), clamped to [0, 1] (len < 1/alpha would give lambda < 0)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    length = lengths.double()
    lam = torch.where(length > 0, 1.0 - 1.0 / (alpha * length.clamp(min=1e-12)), torch.zeros_like(length))
    return lam.clamp(0.0, 1.0)


def gae(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor]:
    """GAE over response tokens: returns (advantages [B, T], returns = advantages + values), 0 off-mask.

    delta_t = r_t + gamma V_{t'} - V_t and A_t = delta_t + gamma lam A_{t'}, where t' is the next
    *response* position of the same row (V and A are 0 after the last one). `lam` is a float or a
    per-sequence [B] tensor (length-adaptive lambda). The loop runs over T on the tensors' device.
    """
    check_tensor("values", values, finite=False)
    m = as_mask(mask, values).bool()
    check_tensor("values", values, mask=m)
    check_tensor("token_rewards", token_rewards, shape=values.shape, mask=m)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    v = zero_outside(upcast(values.detach()), m)
    rew = zero_outside(upcast(token_rewards.detach()), m)
    b, t_len = v.shape
    lam_t = torch.as_tensor(lam, dtype=v.dtype, device=v.device)
    lam_t = lam_t.expand(b) if lam_t.dim() == 0 else lam_t
    if tuple(lam_t.shape) != (b,):
        raise ValueError(f"lam must be a float or a [B]={b} tensor, got shape {tuple(lam_t.shape)}")
    if bool(((lam_t < 0) | (lam_t > 1)).any()):
        raise ValueError("lam must lie in [0, 1]")
    adv = torch.zeros_like(v)
    next_value = torch.zeros(b, dtype=v.dtype, device=v.device)
    next_adv = torch.zeros_like(next_value)
    for t in range(t_len - 1, -1, -1):
        on = m[:, t]
        delta = rew[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam_t * next_adv
        adv[:, t] = torch.where(on, a, torch.zeros_like(a))
        next_value = torch.where(on, v[:, t], next_value)
        next_adv = torch.where(on, a, next_adv)
    returns = zero_outside(adv + v, m)
    return adv, returns


def decoupled_gae(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    lam_critic: float = 1.0,
    lam_policy: float | None = None,
    alpha: float = 0.05,
) -> tuple[Tensor, Tensor]:
    """(policy advantages, critic returns): GAE with lam_policy for the policy (None = length-adaptive
    1 - 1/(alpha * response length)) and lam_critic (default 1.0, Monte-Carlo) for the value targets."""
    m = as_mask(mask, values)
    lam_p = length_adaptive_lambda(m.sum(-1), alpha) if lam_policy is None else lam_policy
    adv, _ = gae(token_rewards, values, mask, gamma=gamma, lam=lam_p)
    _, returns = gae(token_rewards, values, mask, gamma=gamma, lam=lam_critic)
    return adv, returns
