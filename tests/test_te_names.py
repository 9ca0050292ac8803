"""Transformer Engine spec parameter names on CPU (TE itself is not installable here).

The TE spec's names are derived from megatron-core's own map between the two specs (the local spec's
`sharded_state_dict_keys_map`), applied to the local model's parameter names; a local model whose pre-norm
weights are re-registered under those names (what TELayerNormColumnParallelLinear holds) then goes through
weight sync. The `_extra_state` case is reproduced with a core attention that carries extra state, as
TEDotProductAttention does and the local attention does not.
"""

import pytest
import torch

from checkpoints_conv import maps
from erpd_megatron.megatron.model import ModelConfig

CFG = dict(family="qwen3", vocab_size=200, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
           ffn_hidden_size=64, tie_embeddings=False)


def _te_keys_map() -> dict[str, str]:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm").submodules.sharded_state_dict_keys_map


def _to_te(name: str, keys_map: dict[str, str]) -> str:
    """Local-spec parameter name -> TE spec name by megatron-core's key map (prefix replacement per layer)."""
    m = maps._LAYER_RE.match(name)
    if not m:
        return name
    for local, te in keys_map.items():
        if m.group(2).startswith(local):
            return f"decoder.layers.{m.group(1)}.{te}{m.group(2)[len(local):]}"
    return name


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_te_spelling_maps_like_local(family):
    cfg = ModelConfig(**{**CFG, "family": family, "qk_norm": family == "qwen3"})
    keys_map = _te_keys_map()
    names = maps.mcore_names(cfg)
    te = [_to_te(n, keys_map) for n in names]
    fused = {n for n in te if n.endswith("layer_norm_weight")}
    assert len(fused) == 2 * cfg.num_layers  # the two pre-norms of every layer are spelt differently
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in fused
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in fused
    for n, t in zip(names, te):
        assert maps.canonical_name(t) == n
        assert maps.entry(cfg, t) == maps.entry(cfg, n)
        assert maps.tp_kind(cfg, t) == maps.tp_kind(cfg, n)
        assert maps.expected_shape(cfg, t) == maps.expected_shape(cfg, n)
        full = torch.randn(maps.expected_shape(cfg, n))
        assert [h for h, _ in maps.mcore_to_hf(cfg, t, full)] == [h for h, _ in maps.mcore_to_hf(cfg, n, full)]
    with pytest.raises(Exception, match="unknown Megatron tensor"):
        maps.entry(cfg, "decoder.layers.0.self_attention.linear_proj.layer_norm_weight")


@pytest.fixture
def world_of_one():
    torch.set_num_threads(1)
    yield
    from erpd_megatron.megatron.parallel import destroy_parallel

    destroy_parallel()


def _engine(**kw):
    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import BuildOptions
    from erpd_megatron.megatron.parallel import ParallelConfig

    return PolicyEngine(ModelConfig(**CFG), ParallelConfig(), OptimConfig(micro_batch_size=2),
                        BuildOptions(spec="local", dtype=torch.float32), seed=3, **kw)


def _fuse_norms_like_te(model) -> None:
    """Move each pre-norm weight into the linear after it, where TELayerNormColumnParallelLinear keeps it."""
    from megatron.core.transformer.identity_op import IdentityOp

    for layer in model.decoder.layers:
        layer.self_attention.linear_qkv.register_parameter("layer_norm_weight", layer.input_layernorm.weight)
        layer.mlp.linear_fc1.register_parameter("layer_norm_weight", layer.pre_mlp_layernorm.weight)
        layer.input_layernorm, layer.pre_mlp_layernorm = IdentityOp(), IdentityOp()


def test_weight_sync_from_te_named_model(world_of_one):
    from erpd_megatron.rollout.weight_sync import iter_hf_buckets

    eng = _engine(trainable=False)
    model = eng.modules[0]
    ref = [(h, t.clone()) for b in iter_hf_buckets([model], eng.model_cfg) for h, t in b]
    local_names = [n for n, _ in model.named_parameters()]
    _fuse_norms_like_te(model)
    keys_map = _te_keys_map()
    assert [n for n, _ in model.named_parameters()] != local_names
    assert sorted(n for n, _ in model.named_parameters()) == sorted(_to_te(n, keys_map) for n in local_names)
    got = [(h, t) for b in iter_hf_buckets([model], eng.model_cfg) for h, t in b]  # _Chunks adapter
    assert [h for h, _ in got] == [h for h, _ in ref]
    for (_, a), (_, b) in zip(got, ref):
        assert torch.equal(a, b)
    assert sorted(n for n, _ in eng.named_parameters_global()) == sorted(maps.mcore_names(eng.model_cfg))


def test_local_checkpoint_loads_into_model_with_extra_state(world_of_one, tmp_path, monkeypatch):
    """A checkpoint without `core_attention._extra_state` (local spec) loads into a model that has it (TE)."""
    from erpd_megatron.megatron import attention
    from erpd_megatron.megatron.checkpoint import load_model_weights

    src = _engine(trainable=False)
    src.save(str(tmp_path / "ck"))
    want = {n: p.detach().clone() for n, p in src.modules[0].named_parameters()}

    class ExtraStateAttention(attention.SDPACoreAttention):
        loaded = None

        def get_extra_state(self):
            return torch.tensor([7.0])

        def set_extra_state(self, state):
            ExtraStateAttention.loaded = state

    monkeypatch.setattr(attention, "SDPACoreAttention", ExtraStateAttention)
    dst = _engine(trainable=False)
    assert any(k.endswith("core_attention._extra_state") for k in dst.modules[0].state_dict())
    for p in dst.modules[0].parameters():
        p.data.zero_()
    dst.load(str(tmp_path / "ck"), model_only=True)
    for n, p in dst.modules[0].named_parameters():
        assert torch.equal(p, want[n]), n
    for p in dst.modules[0].parameters():
        p.data.zero_()
    load_model_weights(dst.modules, str(tmp_path / "ck"))
    for n, p in dst.modules[0].named_parameters():
        assert torch.equal(p, want[n]), n
