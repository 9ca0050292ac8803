"""Sequence padding for FP8 / sequence parallelism (PolicyEngine.seq_multiple), on CPU.

FP8 and SP need GPUs; the padding itself is device-independent, so the engine's multiple is forced here.
Padded positions must change nothing: the same log-probs and the same gradients as without padding."""

import pytest
import torch

from erpd_megatron.megatron.engine import seq_multiple
from erpd_megatron.megatron.parallel import ParallelConfig

CFG = dict(family="qwen3", vocab_size=200, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
           ffn_hidden_size=64, tie_embeddings=False)


def test_seq_multiple_rules():
    assert seq_multiple(ParallelConfig(), fp8=False) == 1
    assert seq_multiple(ParallelConfig(tp=4, sp=True), fp8=False) == 4
    assert seq_multiple(ParallelConfig(), fp8=True) == 16
    assert seq_multiple(ParallelConfig(tp=8, sp=True), fp8=True) == 64
    assert seq_multiple(ParallelConfig(tp=6, sp=True), fp8=True) == 48
    assert seq_multiple(ParallelConfig(tp=4, sp=False), fp8=False) == 1


def _te_fp8_ok(rows: int) -> bool:
    """Transformer Engine's `assert_dim_for_fp8_exec` on a GEMM input's leading dims (the last, hidden, is the
    model's): their product divisible by 8."""
    return rows % 8 == 0


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("t", [1, 3, 17, 33, 47, 101, 1001, 4097])
def test_sp_fp8_padding_gives_te_whole_local_rows(tp, t):
    """SP + FP8, micro-batch of 1, odd lengths: every TP rank's local rows (s / tp) * b before the all-gather and the
    gathered rows s * b pass TE's FP8 check, s splits evenly over the ranks, and s is the shortest such length."""
    from erpd_megatron.megatron.engine import padded_length

    par = ParallelConfig(tp=tp, sp=True)
    s = padded_length(t, seq_multiple(par, fp8=True))
    assert s >= t and s % tp == 0
    for b in (1, 2, 3):
        assert _te_fp8_ok(s // tp * b) and _te_fp8_ok(s * b)
    assert not any(u % tp == 0 and _te_fp8_ok(u // tp) for u in range(t, s))  # b = 1: nothing shorter works


@pytest.fixture
def engine():
    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import BuildOptions, ModelConfig
    from erpd_megatron.megatron.parallel import destroy_parallel

    torch.set_num_threads(1)
    eng = PolicyEngine(ModelConfig(**CFG), ParallelConfig(), OptimConfig(micro_batch_size=2),
                       BuildOptions(spec="local", dtype=torch.float32), seed=5)
    yield eng
    destroy_parallel()


def test_padded_positions_change_nothing(engine):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (4, 11), generator=g)
    am = torch.ones_like(ids)
    am[1, 7:] = 0
    am[3, 9:] = 0
    resp = am.clone()
    resp[:, :3] = 0
    batch = dict(input_ids=ids, attention_mask=am, response_mask=resp, adv=torch.randn(4, 11, generator=g))
    seen = []

    def loss_fn(lp, mb, ent):
        seen.append((lp.shape[1], mb["response_mask"].shape[1], lp.detach().clone(), mb["attention_mask"].clone()))
        m = mb["response_mask"].float()
        return -(lp * m * mb["adv"]).sum() / m.sum().clamp(min=1), {}

    def grads():
        return [p.main_grad.detach().clone() for p in engine.modules[0].parameters()]

    engine.seq_multiple = 1
    lp1, ent1 = engine.forward_logprobs(batch, with_entropy=True)
    m1 = engine.forward_backward(batch, loss_fn, need_entropy=True)
    g1 = grads()
    engine.seq_multiple = 16  # as FP8 would: 11 tokens -> 16, past the batch's own T
    lp16, ent16 = engine.forward_logprobs(batch, with_entropy=True)
    m16 = engine.forward_backward(batch, loss_fn, need_entropy=True)
    g16 = grads()

    assert [s[0] for s in seen] == [11, 11, 16, 16] and [s[1] for s in seen] == [11, 11, 16, 16]
    for _, _, lp, mask in seen[2:]:  # padded positions: mask 0, log-prob 0
        assert mask[:, 11:].eq(0).all() and lp[:, 11:].eq(0).all()
    assert lp16.shape == lp1.shape == (4, 11)
    torch.testing.assert_close(lp16, lp1, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent16, ent1, atol=1e-5, rtol=0)
    assert abs(m16["loss"] - m1["loss"]) < 1e-5
    assert max(float(a.abs().max()) for a in g1) > 0
    for a, b in zip(g16, g1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
