"""Metrics against hand values, loop references and a Monte-Carlo check of the reverse-KL estimator."""

import math

import pytest
import torch

from erpd_megatron.algorithms import losses as L
from erpd_megatron.algorithms import metrics as M

torch.set_num_threads(1)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_reverse_kl_monte_carlo_matches_exact(estimator):
    """Samples y ~ p (the new policy): the estimate converges to KL(p || q) = sum p log p/q."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1], dtype=torch.float64)
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    y = torch.multinomial(p, 200_000, replacement=True, generator=g).view(400, 500)
    est = M.reverse_kl(p.log()[y], q.log()[y], torch.ones(400, 500), estimator=estimator)
    assert est == pytest.approx(exact, abs=3e-3)


def test_reverse_kl_token_and_sequence_hand_values():
    lp = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -2.5, 0.0], [0.0, -1.5, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
    assert M.reverse_kl(lp, ref, mask) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert M.reverse_kl(lp, ref, mask, per="sequence") == pytest.approx((1.0 + 1.0) / 2)
    assert M.reverse_kl(lp, ref, torch.zeros(2, 4)) == 0.0
    with pytest.raises(ValueError, match="ref_logprobs has shape"):
        M.reverse_kl(lp, ref[:1], mask)


def test_entropy_and_length():
    ent = torch.tensor([[9.0, 1.0, 2.0], [9.0, 3.0, 9.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    assert M.entropy_mean(ent, mask) == pytest.approx(2.0)
    assert M.entropy_mean(ent, torch.zeros(2, 3)) == 0.0
    assert M.response_length_mean(mask) == pytest.approx(1.5)


def test_clip_fractions_hand_and_agree_with_loss():
    r = torch.tensor([[1.5, 1.1, 0.5, 0.5, 0.9]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    lp, old, mask = torch.log(r), torch.zeros_like(r), torch.ones_like(r)
    cf = M.clip_fractions(lp, old, adv, mask)
    assert cf == pytest.approx({"low": 0.2, "high": 0.2, "total": 0.4})
    g = torch.Generator().manual_seed(1)
    lp2 = torch.randn(3, 8, generator=g) * 0.4
    adv2 = torch.randn(3, generator=g)
    m2 = torch.ones(3, 8)
    _, met = L.grpo_loss(lp2, torch.zeros_like(lp2), adv2, m2)
    cf2 = M.clip_fractions(lp2, torch.zeros_like(lp2), adv2, m2)
    assert (cf2["low"], cf2["high"]) == (met["grpo/clip_frac_low"], met["grpo/clip_frac_high"])


def test_explained_variance():
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert M.explained_variance(target.clone(), target) == pytest.approx(1.0)
    assert M.explained_variance(torch.full((4,), 2.5), target) == pytest.approx(0.0)
    pred = torch.tensor([1.0, 2.0, 3.0, 5.0])
    # Var(t) = 1.25, residual (0,0,0,-1): Var = 0.1875 -> 1 - 0.15
    assert M.explained_variance(pred, target) == pytest.approx(0.85)
    mask = torch.tensor([1, 1, 1, 0])
    assert M.explained_variance(pred, target, mask) == pytest.approx(1.0)
    assert M.explained_variance(torch.ones(3), torch.ones(3)) == 1.0
    # constant target: EV ignores a constant offset (as scikit-learn), anything else scores 0
    assert M.explained_variance(torch.zeros(3), torch.ones(3)) == 1.0
    assert M.explained_variance(torch.tensor([0.0, 1.0, 0.0]), torch.ones(3)) == 0.0


def test_logprob_by_outcome():
    lp = torch.tensor([[0.0, -1.0, -3.0], [0.0, -2.0, 0.0], [0.0, -4.0, -6.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1]])
    out = M.logprob_by_outcome(lp, mask, torch.tensor([1.0, 1.0, 0.0]))
    assert out["pos_logprob"] == pytest.approx(-2.0) and out["neg_logprob"] == pytest.approx(-5.0)
    assert (out["num_pos"], out["num_neg"]) == (2.0, 1.0)
    none_neg = M.logprob_by_outcome(lp, mask, torch.ones(3))
    assert math.isnan(none_neg["neg_logprob"]) and none_neg["num_neg"] == 0.0
    with pytest.raises(ValueError, match="logprobs contains NaN"):
        M.logprob_by_outcome(torch.full((3, 3), math.nan), mask, torch.ones(3))
