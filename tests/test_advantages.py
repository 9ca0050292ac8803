"""GRPO advantages against a statistics-module loop, GAE against a classic per-sequence recursion on
the compacted responses, hand values for lambda in {0, 1} and the length-adaptive lambda."""

import math
import statistics

import pytest
import torch

from erpd_megatron.algorithms import advantages as A

torch.set_num_threads(1)


def ref_grpo(rewards, groups, norm_std, eps=1e-6):
    out = []
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        if max(members) == min(members):
            out.append(0.0)
            continue
        mu = statistics.fmean(members)
        out.append((r - mu) / (statistics.stdev(members) + eps) if norm_std else r - mu)
    return out


@pytest.mark.parametrize("norm_std", [True, False])
def test_grpo_matches_reference_with_shuffled_group_ids(norm_std):
    rewards = [1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.2, 0.2, 0.7, 3.0]
    groups = [7, 3, 7, 3, 7, 3, 9, 2, 2, 2, 5]  # group 2 mixed, group 5 has one member
    got = A.grpo_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups), norm_std=norm_std)
    assert got.tolist() == pytest.approx(ref_grpo(rewards, groups, norm_std), abs=1e-12)


def test_grpo_hand_values_group_size():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    a = A.grpo_advantages(r, group_size=4)
    # mean 0.25, unbiased std sqrt(0.25) = 0.5 -> (0.75/0.5, -0.25/0.5)
    assert a.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert A.grpo_advantages(r, group_size=4, norm_std=False).tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grpo_all_equal_group_is_exactly_zero(dtype):
    # 0.1 three times: in float64 the mean is 0.10000000000000002, yet the advantage must be exactly 0
    r = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=dtype)
    assert dtype == torch.float32 or r[:3].mean().item() != 0.1  # the trap is real
    for norm_std in (True, False):
        a = A.grpo_advantages(r, group_size=3, norm_std=norm_std)
        assert torch.isfinite(a).all()
        assert (a[:6] == 0).all()
        assert (a[6:] != 0).all()


def test_grpo_integer_rewards_give_float_advantages():
    a = A.grpo_advantages(torch.tensor([1, 0, 0, 0]), group_size=4)
    assert a.dtype == torch.float32 and a.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)


def test_grpo_bad_input():
    r = torch.ones(6)
    with pytest.raises(ValueError, match="does not divide"):
        A.grpo_advantages(r, group_size=4)
    with pytest.raises(ValueError, match="exactly one"):
        A.grpo_advantages(r)
    with pytest.raises(ValueError, match="exactly one"):
        A.grpo_advantages(r, torch.zeros(6), group_size=3)
    with pytest.raises(ValueError, match="group_ids has shape"):
        A.grpo_advantages(r, torch.zeros(5))
    with pytest.raises(ValueError, match="rewards contains NaN"):
        A.grpo_advantages(torch.tensor([1.0, math.nan]), group_size=2)


def ref_gae_row(rewards, values, gamma, lam):
    """Classic backward GAE on one compacted response (lists)."""
    n = len(rewards)
    adv = [0.0] * n
    last = 0.0
    for i in reversed(range(n)):
        nv = values[i + 1] if i + 1 < n else 0.0
        delta = rewards[i] + gamma * nv - values[i]
        last = delta + gamma * lam * last
        adv[i] = last
    return adv


def offset_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 14
    mask = torch.zeros(B, T)
    for b, (s, n) in enumerate([(2, 9), (5, 7), (1, 13), (3, 0)]):
        mask[b, s : s + n] = 1
    mask[2, 6:8] = 0  # a hole (e.g. tool output in a multi-turn response): GAE skips it
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64) * (torch.rand(B, T, generator=g) < 0.3)
    values = torch.where(mask.bool(), values, torch.nan)  # padding must never be read
    return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.5), (0.99, 0.0)])
def test_gae_matches_compacted_reference(gamma, lam):
    rewards, values, mask = offset_batch()
    adv, ret = A.gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    for b in range(mask.shape[0]):
        ts = [t for t in range(mask.shape[1]) if mask[b, t]]
        ref = ref_gae_row([rewards[b, t].item() for t in ts], [values[b, t].item() for t in ts], gamma, lam)
        assert [adv[b, t].item() for t in ts] == pytest.approx(ref, abs=1e-12)
        assert [ret[b, t].item() for t in ts] == pytest.approx([a + values[b, t].item() for a, t in zip(ref, ts)])
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_hand_values_outcome_reward():
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    values = torch.tensor([[0.0, 0.2, 0.5, 0.9, 0.0]])
    r = A.outcome_token_rewards(torch.tensor([1.0]), mask)
    assert r.tolist() == [[0, 0, 0, 1, 0]]
    # lambda = 1, gamma = 1: A_t = R - V_t (Monte Carlo); returns = R
    adv, ret = A.gae(r, values, mask, lam=1.0)
    assert adv[0, 1:4].tolist() == pytest.approx([0.8, 0.5, 0.1])
    assert ret[0, 1:4].tolist() == pytest.approx([1.0, 1.0, 1.0])
    # lambda = 0: A_t = delta_t = r_t + V_{t+1} - V_t
    adv0, _ = A.gae(r, values, mask, lam=0.0)
    assert adv0[0, 1:4].tolist() == pytest.approx([0.3, 0.4, 0.1])


def test_length_adaptive_lambda():
    lam = A.length_adaptive_lambda(torch.tensor([100, 1000, 20, 10, 0]), alpha=0.05)
    assert lam.tolist() == pytest.approx([0.8, 0.98, 0.0, 0.0, 0.0])


def test_decoupled_gae_uses_per_sequence_lambda():
    rewards, values, mask = offset_batch(seed=1)
    adv, ret = A.decoupled_gae(rewards, values, mask, gamma=1.0)
    for b in range(mask.shape[0]):
        ts = [t for t in range(mask.shape[1]) if mask[b, t]]
        lam_p = max(0.0, 1 - 1 / (0.05 * len(ts))) if ts else 0.0
        rs, vs = [rewards[b, t].item() for t in ts], [values[b, t].item() for t in ts]
        assert [adv[b, t].item() for t in ts] == pytest.approx(ref_gae_row(rs, vs, 1.0, lam_p), abs=1e-12)
        # critic: lambda 1 -> returns are the reward-to-go
        assert [ret[b, t].item() for t in ts] == pytest.approx([sum(rs[i:]) for i in range(len(ts))], abs=1e-12)
    adv_fixed, _ = A.decoupled_gae(rewards, values, mask, lam_policy=0.5)
    ref, _ = A.gae(rewards, values, mask, lam=0.5)
    assert torch.equal(adv_fixed, ref)


def test_gae_bad_input():
    rewards, values, mask = offset_batch()
    with pytest.raises(ValueError, match="token_rewards has shape"):
        A.gae(rewards[:, :3], values, mask)
    with pytest.raises(ValueError, match="lam must"):
        A.gae(rewards, values, mask, lam=1.5)
    with pytest.raises(ValueError, match="lam must be a float or a"):
        A.gae(rewards, values, mask, lam=torch.ones(3))
    bad = values.clone()
    bad[0, 3] = math.inf
    with pytest.raises(ValueError, match="values contains inf at 1"):
        A.gae(rewards, bad, mask)
