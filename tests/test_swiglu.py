"""SwiGLU without the chunk->cat copy (erpd_megatron/megatron/swiglu.py): same values and gradients as autograd."""

import torch
import torch.nn.functional as F

from erpd_megatron.megatron.swiglu import SwiGLU, SwiGLUMLP, swiglu


def _reference(y):
    gate, up = torch.chunk(y, 2, dim=-1)
    return F.silu(gate) * up


def test_swiglu_matches_autograd_float64():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(7, 3, 2 * 12, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(7, 3, 12, dtype=torch.float64, generator=g)
    a, b = _reference(y), swiglu(y)
    (ga,) = torch.autograd.grad(a, y, grad)
    (gb,) = torch.autograd.grad(b, y, grad)
    assert torch.equal(a, b)
    assert torch.equal(ga, gb)  # same ops in the same order: bit-identical, not only close
    assert gb.is_contiguous()


def test_swiglu_gradcheck():
    y = torch.randn(4, 2, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (y,))


def test_local_spec_uses_swiglu_mlp():
    from erpd_megatron.megatron.model import ModelConfig, layer_spec

    cfg = ModelConfig(family="qwen3", vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                      head_dim=8, ffn_hidden_size=32, qk_norm=True)
    mlp = layer_spec(cfg, None, "local").submodules.mlp
    assert getattr(mlp, "func", None) is not None or getattr(mlp, "module", None) is SwiGLUMLP
    if getattr(mlp, "func", None) is not None:  # megatron-core 0.19: partial(cls.as_mlp_submodule, ...)
        assert mlp.func.__self__ is SwiGLUMLP


def test_built_engine_uses_swiglu_mlp():
    """The model the engine actually builds holds SwiGLUMLP and takes its fast path (not megatron's glu)."""
    from erpd_megatron.bench.models import BenchModel, policy_engine

    m = BenchModel(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8, ffn_hidden_size=32,
                   vocab_size=32)
    eng = policy_engine(m, micro_batch_size=2)
    mlps = [x for x in eng.modules[0].modules() if isinstance(x, SwiGLUMLP)]
    assert len(mlps) == 1 and mlps[0]._plain_swiglu()


def test_project_config_takes_the_fast_path():
    """The CPU local-spec config the engine builds must hit SwiGLU, not megatron's fallback forward."""
    import types

    from erpd_megatron.megatron.model import BuildOptions, ModelConfig, make_transformer_config
    from erpd_megatron.megatron.parallel import ParallelConfig

    cfg = ModelConfig(family="qwen3", vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                      head_dim=8, ffn_hidden_size=32, qk_norm=True)
    tcfg = make_transformer_config(cfg, ParallelConfig(), BuildOptions(spec="local", dtype=torch.float32))
    assert SwiGLUMLP._plain_swiglu(types.SimpleNamespace(config=tcfg, activation_func=tcfg.activation_func))
