"""Losses against float64 re-implementations written as explicit per-token Python loops, hand-derived
values and closed-form gradients (PPO clip, SAPO gate 4p(1-p), CE/MSE)."""

import math

import pytest
import torch

from erpd_megatron.algorithms import losses as L

torch.set_num_threads(1)
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]  # and seq-mean-token-sum-norm: own tests


def make_batch(seed=0, B=5, T=12, spread=0.5, nan_pad=True):
    """Right-padded batch whose responses start at different offsets; NaN in the padding on purpose."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T)
    starts, lens = [1, 3, 2, 5, 4][:B], [6, 9, 3, 7, 0][:B]  # last row: empty response
    for b in range(B):
        mask[b, starts[b] : starts[b] + lens[b]] = 1
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lp = old + (torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1) * spread
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    if nan_pad:
        lp = torch.where(mask.bool(), lp, torch.nan)
        old = torch.where(mask.bool(), old, torch.inf)
    return lp.requires_grad_(), old, adv, mask


def rows(mask):
    """[(b, [t, ...])] response positions per row, as plain Python."""
    return [(b, [t for t in range(mask.shape[1]) if mask[b, t] > 0]) for b in range(mask.shape[0])]


def ref_aggregate(per_tok, mask, agg):
    """per_tok: dict (b, t) -> float."""
    rs = [(b, ts) for b, ts in rows(mask) if ts]
    if not rs:
        return 0.0
    if agg == "token-mean":
        vals = [per_tok[b, t] for b, ts in rs for t in ts]
        return sum(vals) / len(vals)
    seqs = [sum(per_tok[b, t] for t in ts) / (len(ts) if agg == "seq-mean-token-mean" else 1) for b, ts in rs]
    return sum(seqs) / len(seqs)


def ref_ppo(lp, old, adv, mask, el, eh, agg, dual=None):
    per = {}
    for b, ts in rows(mask):
        for t in ts:
            r = math.exp(float(lp[b, t].detach()) - float(old[b, t]))
            a = float(adv[b, t])
            val = max(-r * a, -min(max(r, 1 - el), 1 + eh) * a)
            if dual is not None and a < 0:
                val = min(val, -dual * a)
            per[b, t] = val
    return ref_aggregate(per, mask, agg)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual", [None, 1.5])
def test_grpo_matches_loop_reference(agg, dual):
    lp, old, adv, mask = make_batch(spread=0.6)
    loss, met = L.grpo_loss(lp, old, adv, mask, agg=agg, dual_clip=dual)
    assert loss.item() == pytest.approx(ref_ppo(lp.detach(), old, adv, mask, 0.2, 0.28, agg, dual), abs=1e-12)
    # the data really exercises both clip sides (otherwise this test could not fail on them)
    assert met["grpo/clip_frac_low"] > 0 and met["grpo/clip_frac_high"] > 0
    assert met["grpo/clip_frac"] == pytest.approx(met["grpo/clip_frac_low"] + met["grpo/clip_frac_high"])
    assert all(isinstance(v, float) and k.startswith("grpo/") for k, v in met.items())
    loss.backward()
    assert torch.isfinite(lp.grad).all() and (lp.grad[mask == 0] == 0).all()


def test_grpo_advantage_per_sequence_broadcast():
    lp, old, _, mask = make_batch()
    adv_seq = torch.tensor([1.0, -0.5, 2.0, -1.0, 0.3], dtype=torch.float64)
    a, _ = L.grpo_loss(lp, old, adv_seq, mask)
    b, _ = L.grpo_loss(lp, old, adv_seq[:, None].expand(-1, mask.shape[1]), mask)
    assert a.item() == b.item()


def test_ppo_clip_gradient_closed_form():
    """Gradient w.r.t. lp is -A r / N inside the region (or on the pessimistic side) and exactly 0 when clipped."""
    el, eh = 0.2, 0.28
    # (ratio, advantage, clipped?)
    cases = [
        (1.5, 1.0, True),
        (1.1, 1.0, False),
        (0.5, 1.0, False),
        (0.5, -1.0, True),
        (0.9, -2.0, False),
        (1.6, -1.0, False),
    ]
    r = torch.tensor([[c[0] for c in cases]], dtype=torch.float64)
    adv = torch.tensor([[c[1] for c in cases]], dtype=torch.float64)
    old = torch.full_like(r, -1.0)
    lp = (old + torch.log(r)).requires_grad_()
    mask = torch.ones_like(r)
    loss, met = L.grpo_loss(lp, old, adv, mask, eps_low=el, eps_high=eh)
    loss.backward()
    n = len(cases)
    for i, (ri, ai, clipped) in enumerate(cases):
        expect = 0.0 if clipped else -ai * ri / n
        assert lp.grad[0, i].item() == pytest.approx(expect, abs=1e-12), cases[i]
    assert met["grpo/clip_frac_high"] == pytest.approx(1 / n)
    assert met["grpo/clip_frac_low"] == pytest.approx(1 / n)


def test_dual_clip_caps_negative_advantage():
    r = torch.tensor([[5.0, 2.0]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    old = torch.zeros_like(r)
    lp = torch.log(r).requires_grad_()
    loss, met = L.grpo_loss(lp, old, adv, torch.ones_like(r), dual_clip=3.0)
    loss.backward()
    # token 0: max(5, 1.28) = 5 capped to 3 (grad 0); token 1: max(2, 1.28) = 2 < 3, grad -A r / 2 = 1
    assert loss.item() == pytest.approx((3.0 + 2.0) / 2)
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[0, 1].item() == pytest.approx(1.0)
    assert met["grpo/dual_clip_frac"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="dual_clip"):
        L.grpo_loss(lp, old, adv, torch.ones_like(r), dual_clip=0.9)


def ref_sapo(lp, old, adv, mask, tp, tn, agg):
    per = {}
    for b, ts in rows(mask):
        for t in ts:
            r = math.exp(float(lp[b, t].detach()) - float(old[b, t]))
            a = float(adv[b, t])
            tau = tp if a > 0 else tn
            per[b, t] = -(1 / (1 + math.exp(-tau * (r - 1)))) * 4 / tau * a
    return ref_aggregate(per, mask, agg)


@pytest.mark.parametrize("agg", AGGS)
def test_sapo_matches_loop_reference(agg):
    lp, old, adv, mask = make_batch(seed=1, spread=1.0)
    loss, met = L.sapo_loss(lp, old, adv, mask, agg=agg)
    assert loss.item() == pytest.approx(ref_sapo(lp.detach(), old, adv, mask, 1.0, 1.05, agg), abs=1e-12)
    assert 0 < met["sapo/grad_weight_mean"] < 1


def test_sapo_default_agg_is_seq_mean_token_mean():
    lp, old, adv, mask = make_batch(seed=2)
    assert L.sapo_loss(lp, old, adv, mask)[0].item() == pytest.approx(
        ref_sapo(lp.detach(), old, adv, mask, 1.0, 1.05, "seq-mean-token-mean"), abs=1e-12
    )


def test_sapo_gate_gradient_is_4p_1_minus_p():
    """d f / d r = 4 p (1 - p), p = sigmoid(tau (r - 1)), with tau_pos for A > 0 and tau_neg for A < 0."""
    r = torch.tensor([[0.3], [0.9], [1.0], [1.2], [2.5], [0.7], [1.0], [3.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    tp, tn = 1.0, 1.05
    loss, _ = L.sapo_loss(torch.log(r), torch.zeros_like(r), adv, torch.ones_like(r), tau_pos=tp, tau_neg=tn)
    loss.backward()
    n = r.shape[0]
    for i in range(n):
        tau = tp if adv[i] > 0 else tn
        p = 1 / (1 + math.exp(-tau * (r[i, 0].item() - 1)))
        # loss = -(1/n) sum f(r_i) A_i  =>  dloss/dr_i = -A_i f'(r_i) / n
        assert r.grad[i, 0].item() == pytest.approx(-adv[i].item() * 4 * p * (1 - p) / n, rel=1e-12)
    # at r = 1 the gate's slope is exactly 1: SAPO equals the on-policy gradient there
    assert r.grad[2, 0].item() == pytest.approx(-1.0 / n)


def ref_cispo_grad(lp, old, adv, mask, eh):
    """dL/dlp for token-mean CISPO: -min(r, 1+eh) A / N."""
    n = int(mask.sum())
    g = torch.zeros_like(lp)
    for b, ts in rows(mask):
        for t in ts:
            r = math.exp(float(lp[b, t].detach()) - float(old[b, t]))
            g[b, t] = -min(r, 1 + eh) * float(adv[b, t]) / n
    return g


def test_cispo_keeps_gradient_on_clipped_tokens():
    lp, old, adv, mask = make_batch(seed=3, spread=0.8)
    loss, met = L.cispo_loss(lp, old, adv, mask)
    loss.backward()
    assert torch.allclose(lp.grad, ref_cispo_grad(lp.detach(), old, adv, mask, 0.28), atol=1e-12)
    assert met["cispo/clip_frac_high"] > 0
    high = (torch.exp(lp.detach() - old) > 1.28) & mask.bool()
    assert (lp.grad[high] != 0).all()  # PPO would zero these for A > 0


def test_ppo_value_loss_reference_and_gradient():
    values = torch.tensor([[0.0, 0.5, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    old_v = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    ret = torch.tensor([[1.0, 1.0, -1.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    loss, met = L.ppo_value_loss(values, old_v, ret, mask, clip_range=0.2)
    # by hand: token0 max(1, 1)=1; token1 max(.25, .64)=.64 (clipped, grad 0); token2 max(4, 1.44)=4;
    # token3 max(1, 7.84)=7.84 (clipped, grad 0)
    assert loss.item() == pytest.approx(0.5 * (1 + 0.64 + 4 + 7.84) / 4)
    loss.backward()
    expect = [0.5 * 2 * (0 - 1) / 4, 0.0, 0.5 * 2 * (1 - (-1)) / 4, 0.0]
    assert values.grad[0].tolist() == pytest.approx(expect)
    assert met["value/clip_frac"] == pytest.approx(0.5)


def ref_ce_mse(lp, ref, rewards, mask, beta, agg, kind):
    out = []
    for b, ts in rows(mask):
        if not ts:
            continue
        s = sum(float(lp[b, t].detach()) - float(ref[b, t]) for t in ts)
        s = beta * (s / len(ts) if agg == "mean" else s)
        y = float(rewards[b])
        if kind == "ce":
            sig = 1 / (1 + math.exp(-s))
            out.append(-(y * math.log(sig) + (1 - y) * math.log(1 - sig)))
        else:
            out.append((s - y) ** 2)
    return sum(out) / len(out)


@pytest.mark.parametrize("agg", ["sum", "mean"])
@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_ce_mse_match_reference_and_gradient(agg, kind):
    lp, ref, _, mask = make_batch(seed=4, spread=2.0)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    beta = 0.3
    fn = L.ce_loss if kind == "ce" else L.mse_loss
    loss, met = fn(lp, ref, rewards, mask, beta=beta, agg=agg)
    assert loss.item() == pytest.approx(ref_ce_mse(lp.detach(), ref, rewards, mask, beta, agg, kind), abs=1e-12)
    loss.backward()
    # closed form: dL/dlp_t = c * (dL/ds) * ds/dlp_t, with 4 non-empty sequences
    for b, ts in rows(mask):
        if not ts:
            continue
        diff = sum(float(lp[b, t].detach()) - float(ref[b, t]) for t in ts)
        k = beta / len(ts) if agg == "mean" else beta
        s = k * diff
        dl_ds = (1 / (1 + math.exp(-s)) - rewards[b].item()) if kind == "ce" else 2 * (s - rewards[b].item())
        for t in ts:
            assert lp.grad[b, t].item() == pytest.approx(dl_ds * k / 4, abs=1e-12)
    assert f"{kind}/loss" in met


def test_ce_defaults_and_label_check():
    lp, ref, _, mask = make_batch(seed=5)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    loss, _ = L.ce_loss(lp, ref, rewards, mask)  # defaults beta 0.05, sum
    assert loss.item() == pytest.approx(ref_ce_mse(lp.detach(), ref, rewards, mask, 0.05, "sum", "ce"), abs=1e-12)
    with pytest.raises(ValueError, match="binary labels"):
        L.ce_loss(lp, ref, rewards * 2 - 1, mask)
    with pytest.raises(ValueError, match="rewards has shape"):
        L.ce_loss(lp, ref, rewards[:3], mask)
    with pytest.raises(ValueError, match="'sum' or 'mean'"):
        L.mse_loss(lp, ref, rewards, mask, agg="token-mean")


def test_kl_penalty_hand_values():
    lp = torch.tensor([[math.log(0.5), math.log(0.2), 0.0]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25), math.log(0.2), -40.0]], dtype=torch.float64)
    d = math.log(2.0)
    k1 = L.kl_penalty(lp, ref, "k1", clamp=None)
    k2 = L.kl_penalty(lp, ref, "k2", clamp=None)
    k3 = L.kl_penalty(lp, ref, "k3", clamp=None)
    assert k1[0, :2].tolist() == pytest.approx([d, 0.0])
    assert k2[0, :2].tolist() == pytest.approx([d * d / 2, 0.0])
    assert k3[0, :2].tolist() == pytest.approx([0.5 + d - 1, 0.0])  # exp(-d) + d - 1
    assert L.kl_penalty(lp, ref, "k1")[0, 2].item() == 40.0  # k1 is never clamped (verl / slime clamp only k3)
    assert L.kl_penalty(lp, ref, "k2")[0, 2].item() == 800.0  # nor is k2: 40^2 / 2
    assert L.kl_penalty(lp, ref, "k3")[0, 2].item() == 10.0  # k3 = 39 + e^-40 clamped to 10
    assert L.kl_penalty(lp, ref, "k3", clamp=5.0)[0, 2].item() == 5.0
    assert L.kl_penalty(ref, lp, "k3", clamp=None)[0, 2].item() == pytest.approx(math.expm1(20) - 20)  # exp arg clamped
    with pytest.raises(ValueError, match="estimator"):
        L.kl_penalty(lp, ref, "k4")


@pytest.mark.parametrize("d", [5.0, 8.0, 12.0, -5.0, -8.0, -12.0])
def test_kl_penalty_gradient_far_from_ref(d):
    """d/dlp of each estimator at |d| = 5, 8, 12 (d = lp - lp_ref), hand-derived: k1 -> 1, k2 -> d (it pulls
    hardest where the policy is farthest: a clamp at 10 used to make it exactly 0 for |d| > 4.47), k3 -> 1 - e^-d
    while k3 = e^-d + d - 1 <= 10, and exactly 0 where the clamp at 10 binds (d = 12: k3 = 11.00001; every d <= -5:
    k3 = e^5 - 6 = 142.4 and up)."""
    lp0, ref = -3.0, -3.0 - d
    k3_value = math.exp(-d) + d - 1
    expected = {"k1": 1.0, "k2": d, "k3": 0.0 if k3_value > 10 else 1.0 - math.exp(-d)}
    for est, want in expected.items():
        lp = torch.tensor([[lp0]], dtype=torch.float64, requires_grad=True)
        L.kl_penalty(lp, torch.tensor([[ref]], dtype=torch.float64), est).sum().backward()
        assert lp.grad.item() == pytest.approx(want, rel=1e-12, abs=1e-15), est
    assert (k3_value > 10) == (d in (12.0, -5.0, -8.0, -12.0))  # the cases above cover both sides of the clamp


def test_entropy_from_logits_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 3
    for temp in (1.0, 0.6):
        h = L.entropy_from_logits(logits, temperature=temp)
        for i in range(2):
            for j in range(3):
                z = [x / temp for x in logits[i, j].tolist()]
                zmax = max(z)
                e = [math.exp(x - zmax) for x in z]
                p = [x / sum(e) for x in e]
                assert h[i, j].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-12)
    assert L.entropy_from_logits(torch.zeros(1, 1, 512)).item() == pytest.approx(math.log(512), rel=1e-6)
    # large logits stay finite (no exp overflow)
    assert torch.isfinite(L.entropy_from_logits(torch.tensor([[1e4, 0.0, -1e4]]))).all()


def test_distill_loss_terms():
    lp, old, adv, mask = make_batch(seed=6, spread=0.6)
    ref = old - 0.1
    ent = torch.rand(mask.shape, dtype=torch.float64)
    loss, met = L.distill_loss(
        lp, old, adv, mask, kl_coef=0.1, kl_estimator="k2", ref_logprobs=ref, entropy=ent, entropy_coef=0.5
    )
    pg = ref_ppo(lp.detach(), old, adv, mask, 0.2, 0.28, "token-mean")
    toks = [(b, t) for b, ts in rows(mask) for t in ts]
    kl = sum(0.5 * (float(lp[b, t].detach()) - float(ref[b, t])) ** 2 for b, t in toks) / len(toks)
    h = sum(float(ent[b, t]) for b, t in toks) / len(toks)
    assert loss.item() == pytest.approx(pg + 0.1 * kl - 0.5 * h, abs=1e-12)
    assert met["distill/pg_loss"] == pytest.approx(pg) and met["distill/entropy"] == pytest.approx(h)
    # without extras it is exactly the clipped surrogate, KL defaults to the trust region around pi_old
    plain, _ = L.distill_loss(lp, old, adv, mask)
    assert plain.item() == pytest.approx(pg, abs=1e-12)
    kl_old, m2 = L.distill_loss(lp, old, adv, mask, kl_coef=1.0)
    k3 = sum(math.expm1(float(old[b, t] - lp[b, t].detach())) - float(old[b, t] - lp[b, t].detach()) for b, t in toks) / len(toks)
    assert m2["distill/kl_loss"] == pytest.approx(k3, abs=1e-12)
    with pytest.raises(ValueError, match="entropy"):
        L.distill_loss(lp, old, adv, mask, entropy_coef=0.1)


POLICY = ["grpo", "ppo", "sapo", "cispo", "distill"]


@pytest.mark.parametrize("name", POLICY + ["ce", "mse"])
@pytest.mark.parametrize("agg", AGGS)
def test_empty_mask_gives_zero_loss_with_grad(name, agg):
    lp, old, adv, mask = make_batch()
    mask = torch.zeros_like(mask)
    fn = L.get_loss(name)
    if name in L.SEQUENCE_REWARD_LOSSES:
        loss, met = fn(lp, old, torch.ones(5, dtype=torch.float64), mask)
    else:
        loss, met = fn(lp, old, adv, mask, agg=agg)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (lp.grad == 0).all()
    assert all(math.isfinite(v) for v in met.values())


def test_masked_out_nan_does_not_leak():
    """NaN/inf outside the response mask must affect neither the loss nor its gradient."""
    lp, old, adv, mask = make_batch(nan_pad=True)
    lp2 = torch.where(mask.bool(), lp.detach(), 0.0).requires_grad_()
    old2 = torch.where(mask.bool(), old, 0.0)
    for name in POLICY:
        a, _ = L.get_loss(name)(lp, old, adv, mask)
        b, _ = L.get_loss(name)(lp2, old2, adv, mask)
        assert a.item() == pytest.approx(b.item(), abs=1e-12)
    a.backward()
    assert torch.isfinite(lp.grad).all()


def test_bad_inputs_name_the_argument():
    lp, old, adv, mask = make_batch(nan_pad=False)
    bad = lp.detach().clone()
    idx = mask.nonzero()[:3]
    bad[idx[:, 0], idx[:, 1]] = torch.nan
    with pytest.raises(ValueError, match="logprobs contains NaN at 3 response positions"):
        L.grpo_loss(bad, old, adv, mask)
    bad_old = old.clone()
    bad_old[idx[0, 0], idx[0, 1]] = -torch.inf
    with pytest.raises(ValueError, match="old_logprobs contains inf at 1"):
        L.sapo_loss(lp, bad_old, adv, mask)
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(5, 11\)"):
        L.grpo_loss(lp, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="advantages has shape"):
        L.grpo_loss(lp, old, adv[:, :3], mask)
    with pytest.raises(ValueError, match="mask has shape"):
        L.cispo_loss(lp, old, adv, mask[:4])
    with pytest.raises(ValueError, match="0/1"):
        L.grpo_loss(lp, old, adv, mask * 0.5)
    bad_adv = adv.clone()
    bad_adv[idx[0, 0], idx[0, 1]] = torch.nan
    with pytest.raises(ValueError, match="advantages contains NaN"):
        L.distill_loss(lp, old, bad_adv, mask)
    with pytest.raises(ValueError, match="agg must be one of"):
        L.grpo_loss(lp, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="ref_logprobs contains NaN"):
        L.ce_loss(lp, torch.where(mask.bool(), torch.nan, old), torch.ones(5), mask)


def test_registry():
    assert set(L.LOSSES) == {"grpo", "ppo", "sapo", "cispo", "ce", "mse", "distill"}
    with pytest.raises(ValueError, match="valid names: ce, cispo, distill, grpo, mse, ppo, sapo"):
        L.get_loss("dpo")
    lp, old, adv, mask = make_batch()
    _, met = L.get_loss("ppo")(lp, old, adv, mask)
    assert "ppo/clip_frac" in met


def test_aggregate_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert L.aggregate(x, m, "token-mean").item() == pytest.approx(10 / 4)
    assert L.aggregate(x, m, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert L.aggregate(x, m, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    # Dr. GRPO / verl's seq-mean-token-sum-norm: token sums over a constant C (not each length), mean over the
    # sequences with a response: ((1 + 2 + 3) / 8 + 4 / 8) / 2 = 0.625 with C = 8; C defaults to the width, 4
    assert L.aggregate(x, m, "seq-mean-token-sum-norm", norm_len=8).item() == pytest.approx(0.625)
    assert L.aggregate(x, m, "seq-mean-token-sum-norm").item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="norm_len"):
        L.aggregate(x, m, "seq-mean-token-sum-norm", norm_len=0)


def test_token_sum_norm_gradient_is_length_independent():
    """Under seq-mean-token-sum-norm every token of every response gets the same gradient weight 1 / (n_seq C),
    whatever its response's length (Dr. GRPO's point: no 1/|y| length bias); seq-mean-token-mean gives 1/|y|."""
    lp = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]])
    adv = -torch.ones(2, 6, dtype=torch.float64)  # loss -r A = r, d/dlp = r = 1 at lp = old
    loss, _ = L.grpo_loss(lp, torch.zeros(2, 6, dtype=torch.float64), adv, m, agg="seq-mean-token-sum-norm",
                          norm_len=10)
    loss.backward()
    assert lp.grad[m.bool()].tolist() == pytest.approx([1 / 20] * 7)
    assert lp.grad[~m.bool()].abs().sum().item() == 0.0


def test_bf16_inputs_compute_in_float32():
    lp, old, adv, mask = make_batch(nan_pad=False)
    loss, _ = L.grpo_loss(lp.detach().bfloat16(), old.bfloat16(), adv.bfloat16(), mask)
    assert loss.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# issue 11: per-sequence weights (negative_weight), MSE target encoding, length-aware beta, agg defaults
# --------------------------------------------------------------------------------------------
def _hand_score_grad(lp, ref, mask, rewards, beta, kind, weights):
    """Closed form per token: dL/dlp_t = w_b * dL_b/ds_b * beta / n_seq (sum over tokens, mean over sequences)."""
    nseq = sum(1 for _, ts in rows(mask) if ts)
    out = {}
    for b, ts in rows(mask):
        s = beta * sum(float(lp[b, t].detach()) - float(ref[b, t]) for t in ts)
        y = float(rewards[b])
        dl_ds = (1 / (1 + math.exp(-s)) - y) if kind == "ce" else 2 * (s - y)
        for t in ts:
            out[(b, t)] = float(weights[b]) * dl_ds * beta / nseq
    return out


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_sequence_weights_scale_negative_gradients_exactly(kind):
    lp, ref, _, mask = make_batch(seed=11, spread=1.0)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    w = torch.tensor([1.0, 3.0, 1.0, 3.0, 1.0], dtype=torch.float64)  # negative_weight 3
    fn = L.ce_loss if kind == "ce" else L.mse_loss
    fn(lp, ref, rewards, mask, beta=0.2, weights=w)[0].backward()
    g_w = lp.grad.clone()
    lp.grad = None
    fn(lp, ref, rewards, mask, beta=0.2)[0].backward()
    hand = _hand_score_grad(lp, ref, mask, rewards, 0.2, kind, w)
    for (b, t), g in hand.items():
        assert g_w[b, t].item() == pytest.approx(g, abs=1e-12)
        # negatives: exactly 3x the unweighted gradient; positives: unchanged
        assert g_w[b, t].item() == pytest.approx(float(w[b]) * lp.grad[b, t].item(), rel=1e-12, abs=1e-15)
    assert lp.grad[1].abs().sum() > 0  # the factor is tested on a non-zero gradient
    with pytest.raises(ValueError, match=">= 0"):
        fn(lp, ref, rewards, mask, weights=-w)


def _teacher_mb(seed=12):
    lp, old, _, mask = make_batch(seed=seed, spread=1.0, nan_pad=False)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    from erpd_megatron.algorithms.advantages import grpo_advantages

    adv = grpo_advantages(rewards.double(), group_size=5).double()
    return lp, {"response_mask": mask, "old_logprobs": old, "rewards": rewards, "advantages": adv}


@pytest.mark.parametrize("loss", ["ce", "mse", "grpo", "sapo", "cispo"])
def test_teacher_negative_weight_scales_negatives_only(loss):
    """teachers.*.negative_weight reaches the loss as a per-sequence weight (it used to raise "mask must
    contain only 0/1 values", or be dropped with input checks off)."""
    from erpd_megatron.config import TeacherConfig
    from erpd_megatron.pipeline.objectives import teacher_objective

    lp, mb = _teacher_mb()
    grads = {}
    for nw in (1.0, 2.5):
        x = lp.detach().clone().requires_grad_()
        teacher_objective(TeacherConfig(loss=loss, negative_weight=nw))(x, mb)[0].backward()
        grads[nw] = x.grad
    neg = mb["rewards"] <= 0.5
    m = mb["response_mask"].bool()
    assert torch.allclose(grads[2.5][neg], 2.5 * grads[1.0][neg], rtol=1e-10, atol=1e-14)
    assert torch.equal(grads[2.5][~neg], grads[1.0][~neg])
    assert grads[1.0][neg][m[neg]].abs().sum() > 0


@pytest.mark.parametrize("targets, neg_moves", [(None, True), ([0.0, 1.0], False), ([-1.0, 1.0], True)])
def test_mse_teacher_targets_give_negatives_gradient_at_step_zero(targets, neg_moves):
    """At step 0 the policy is the base (lp == lp_old), so s = 0 and dL/dlp_t = 2 (0 - R) beta_eff / n_seq
    (beta_eff = beta * beta_ref_len / |y|): with the default targets [-1, 1] the negatives push down,
    with {0, 1} they get exactly 0."""
    from erpd_megatron.config import TeacherConfig
    from erpd_megatron.pipeline.objectives import teacher_objective

    _, mb = _teacher_mb()
    mask = mb["response_mask"]
    lp = mb["old_logprobs"].clone().requires_grad_()
    t = TeacherConfig(loss="mse", beta=0.1) if targets is None else TeacherConfig(loss="mse", beta=0.1, mse_targets=targets)
    teacher_objective(t)(lp, mb)[0].backward()
    nseq = 4  # row 4 of make_batch is empty
    wrong, correct = t.mse_targets
    for b, ts in rows(mask):
        R = correct if mb["rewards"][b] > 0.5 else wrong
        for tok in ts:
            beta_eff = 0.1 * t.beta_ref_len / len(ts)
            assert lp.grad[b, tok].item() == pytest.approx(2 * (0 - R) * beta_eff / nseq, abs=1e-9)
    neg = (mb["rewards"] <= 0.5)[:, None] & mask.bool()
    assert bool((lp.grad[neg] != 0).all()) == neg_moves and bool((lp.grad[neg] == 0).all()) == (not neg_moves)
    assert TeacherConfig().mse_targets == [-1.0, 1.0]


def test_mse_targets_validated():
    from erpd_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="mse_targets"):
        load_config(overrides=["teachers.ce.mse_targets=[1, 0]"])
    with pytest.raises(ConfigError, match="mse_targets"):
        load_config(overrides=["teachers.ce.mse_targets=[1]"])


@pytest.mark.parametrize("loss, expected", [("grpo", "token-mean"), ("ppo", "token-mean"), ("cispo", "token-mean"),
                                            ("sapo", "seq-mean-token-mean")])
def test_teacher_agg_default_resolves_per_loss(loss, expected):
    """teachers.*.agg defaults to "auto": the teacher loss equals the function called with that loss's own
    aggregation, and differs from the other two (the batch has unequal lengths, so the three differ)."""
    from erpd_megatron.config import TeacherConfig
    from erpd_megatron.pipeline.objectives import resolve_agg, teacher_objective

    assert TeacherConfig().agg == "auto" and resolve_agg(loss, "auto") == expected
    lp, mb = _teacher_mb(seed=13)
    got = teacher_objective(TeacherConfig(loss=loss))(lp, mb)[0].item()
    kw = {} if loss in ("sapo", "cispo") else {"eps_low": 0.2, "eps_high": 0.28}
    by_agg = {a: L.get_loss(loss)(lp, mb["old_logprobs"], mb["advantages"], mb["response_mask"], agg=a, **kw)[0].item()
              for a in AGGS}
    assert got == pytest.approx(by_agg[expected], abs=1e-12)
    assert all(abs(got - v) > 1e-6 for a, v in by_agg.items() if a != expected)
    # an explicit setting still wins
    explicit = teacher_objective(TeacherConfig(loss=loss, agg="seq-mean-token-sum"))(lp, mb)[0].item()
    assert explicit == pytest.approx(by_agg["seq-mean-token-sum"], abs=1e-12)


def test_teacher_token_sum_norm_uses_the_response_cap():
    """agg: seq-mean-token-sum-norm divides by teachers.*.agg_norm_len, or by the rollout's max_new_tokens when that
    is 0: the objective equals seq-mean-token-sum / C for exactly that C."""
    from erpd_megatron.config import TeacherConfig
    from erpd_megatron.pipeline.objectives import teacher_objective

    lp, mb = _teacher_mb(seed=13)
    plain = L.grpo_loss(lp, mb["old_logprobs"], mb["advantages"], mb["response_mask"], agg="seq-mean-token-sum")[0]
    t = TeacherConfig(loss="grpo", agg="seq-mean-token-sum-norm")
    assert teacher_objective(t, max_new_tokens=40)(lp, mb)[0].item() == pytest.approx(plain.item() / 40, abs=1e-12)
    t.agg_norm_len = 7
    assert teacher_objective(t, max_new_tokens=40)(lp, mb)[0].item() == pytest.approx(plain.item() / 7, abs=1e-12)


def test_cispo_teacher_keeps_no_lower_clip():
    """CISPO's IS weight is not clipped from below (eps_low=None): a token with r = 0.5 keeps weight 0.5
    even though the teachers' PPO eps_low is 0.2."""
    from erpd_megatron.config import TeacherConfig
    from erpd_megatron.pipeline.objectives import teacher_objective

    old = torch.zeros(1, 3, dtype=torch.float64)
    lp = torch.tensor([[0.0, math.log(0.5), 0.0]], dtype=torch.float64, requires_grad=True)
    mb = {"response_mask": torch.tensor([[0.0, 1.0, 1.0]]), "old_logprobs": old, "rewards": torch.tensor([1.0]),
          "advantages": torch.tensor([1.0], dtype=torch.float64)}
    teacher_objective(TeacherConfig(loss="cispo"))(lp, mb)[0].backward()
    assert lp.grad[0, 1].item() == pytest.approx(-0.5 / 2, abs=1e-12)  # -w A / n_tokens, w = r = 0.5
    assert lp.grad[0, 2].item() == pytest.approx(-1.0 / 2, abs=1e-12)


def test_length_aware_beta_hand_numbers():
    """s = beta * ref_len / |y| * sum_t (lp - lp_ref). Row 0: 2 tokens, log-ratios 0.3 and -0.1 -> sum 0.2;
    row 1: 4 tokens, each 0.05 -> sum 0.2. beta 0.01, ref_len 100: s0 = 0.01 * 50 * 0.2 = 0.1,
    s1 = 0.01 * 25 * 0.2 = 0.05 (the plain sum gives 0.002 for both)."""
    ref = torch.zeros(2, 5, dtype=torch.float64)
    lp = torch.tensor([[0.0, 0.3, -0.1, 0.0, 0.0], [0.0, 0.05, 0.05, 0.05, 0.05]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.float64)
    s = L.sequence_score(lp, ref, mask, beta=0.01, ref_len=100)
    assert s.tolist() == pytest.approx([0.1, 0.05], abs=1e-12)
    assert L.sequence_score(lp, ref, mask, beta=0.01).tolist() == pytest.approx([0.002, 0.002], abs=1e-12)
    # MSE loss and gradient at these numbers, targets -1 (row 0) and +1 (row 1):
    lp.requires_grad_()
    loss, _ = L.mse_loss(lp, ref, torch.tensor([-1.0, 1.0], dtype=torch.float64), mask, beta=0.01, ref_len=100)
    assert loss.item() == pytest.approx(((0.1 + 1) ** 2 + (0.05 - 1) ** 2) / 2, abs=1e-12)
    loss.backward()
    # dL/dlp_t = 2 (s - R) * beta * ref_len / |y| / n_seq
    assert lp.grad[0, 1].item() == pytest.approx(2 * 1.1 * 0.01 * 50 / 2, abs=1e-12)
    assert lp.grad[1, 1].item() == pytest.approx(2 * -0.95 * 0.01 * 25 / 2, abs=1e-12)
    with pytest.raises(ValueError, match="ref_len"):
        L.sequence_score(lp, ref, mask, beta=0.01, ref_len=0)


def test_teacher_beta_ref_len_default_and_off():
    """The teacher objective passes beta_ref_len (default 20000); 0 restores the literal eq. 3 sum."""
    from erpd_megatron.config import TeacherConfig
    from erpd_megatron.pipeline.objectives import teacher_objective

    lp, mb = _teacher_mb(seed=14)
    lp = lp.detach()
    labels = (mb["rewards"] > 0.5).double()
    assert TeacherConfig().beta_ref_len == 20000.0
    for ref_len in (20000.0, 7.0, 0.0):
        got = teacher_objective(TeacherConfig(loss="ce", beta=0.001, beta_ref_len=ref_len))(lp, mb)[0].item()
        exp = L.ce_loss(lp, mb["old_logprobs"], labels, mb["response_mask"], beta=0.001,
                        ref_len=ref_len or None)[0].item()
        assert got == pytest.approx(exp, abs=1e-12)
    sums = teacher_objective(TeacherConfig(loss="ce", beta=0.001, beta_ref_len=0.0))(lp, mb)[0].item()
    assert sums == pytest.approx(ref_ce_mse(lp, mb["old_logprobs"], labels, mb["response_mask"], 0.001, "sum", "ce"))


def test_behaviour_kl_exact_on_a_frequency_matched_batch():
    """pi_b = [1/2, 1/4, 1/4], pi = [1/4, 1/4, 1/2]. A batch of 4 tokens sampled from pi_b in exact
    proportion (0, 0, 1, 2) makes both estimators equal the exact KL(pi_b || pi) = 1/2 log 2 - 1/4 log 2
    = 1/4 log 2: k1 = mean(-log r) directly; k3 = mean(r - 1 - log r) = (sum_x pi(x) - 1) + KL."""
    from erpd_megatron.algorithms import metrics as M

    pb, p = torch.tensor([0.5, 0.25, 0.25]).double(), torch.tensor([0.25, 0.25, 0.5]).double()
    y = torch.tensor([[0, 0, 1, 2]])
    mask = torch.ones(1, 4)
    exact = 0.25 * math.log(2)
    assert M.behaviour_kl(p.log()[y], pb.log()[y], mask, estimator="k1") == pytest.approx(exact, abs=1e-12)
    assert M.behaviour_kl(p.log()[y], pb.log()[y], mask, estimator="k3") == pytest.approx(exact, abs=1e-12)
    # per sequence: the sum over the 4 tokens
    assert M.behaviour_kl(p.log()[y], pb.log()[y], mask, per="sequence", estimator="k1") == pytest.approx(4 * exact)
    # the old metric (reverse-form log-ratio on pi_b samples) had the opposite sign in expectation
    assert M.reverse_kl(p.log()[y], pb.log()[y], mask, estimator="k1") == pytest.approx(-exact, abs=1e-12)


def test_policy_metrics_name_estimator_and_samples():
    from erpd_megatron.config import TeacherConfig
    from erpd_megatron.pipeline.objectives import KL_SEQ_METRIC, KL_TOKEN_METRIC, teacher_objective

    lp, mb = _teacher_mb(seed=15)
    _, met = teacher_objective(TeacherConfig(loss="grpo", kl_coef=0.1))(lp, mb)
    assert KL_TOKEN_METRIC == "policy/kl_fwd_k3_tok_batch" and KL_SEQ_METRIC == "policy/kl_fwd_k1_seq_batch"
    assert met[KL_TOKEN_METRIC] > 0 and "kl_loss/k3_tok_batch" in met
    assert not any("kl_to_old" in k for k in met)
