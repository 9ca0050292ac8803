"""GPU fast paths decided on CPU: fusion flags from kernel availability, the Qwen3.5 Transformer Engine spec's
structure, FP8 refusal, the GDN kernel package in the gpu extra. (The kernels themselves need a GPU.)"""

import tomllib
from pathlib import Path

import pytest
import torch

from erpd_megatron.megatron.model import fast_path_flags

ROOT = Path(__file__).resolve().parents[1]
ALL = {"wgrad_accum": True, "fused_rope": True, "fused_softmax": True}


def test_fast_paths_on_where_available_off_with_reason():
    flags, off = fast_path_flags(True, ALL)
    assert flags == {"gradient_accumulation_fusion": True, "apply_rope_fusion": True, "masked_softmax_fusion": True}
    assert off == {}
    flags, off = fast_path_flags(False, ALL)
    assert not any(flags.values()) and set(off.values()) == {"no CUDA"}
    flags, off = fast_path_flags(True, {**ALL, "wgrad_accum": False, "fused_rope": False})
    assert flags == {"gradient_accumulation_fusion": False, "apply_rope_fusion": False, "masked_softmax_fusion": True}
    assert "fused_weight_gradient_mlp_cuda" in off["gradient_accumulation_fusion"]
    assert "Transformer Engine" in off["apply_rope_fusion"]


def test_kernel_availability_probes_run_anywhere():
    from erpd_megatron.megatron.model import kernel_availability

    avail = kernel_availability()  # megatron-core's own probes; no kernel needs to exist for this to answer
    assert set(avail) == set(ALL) and all(isinstance(v, bool) for v in avail.values())


@pytest.fixture
def world_of_one():
    from erpd_megatron.megatron.parallel import ParallelConfig, destroy_parallel, init_parallel

    init_parallel(ParallelConfig())
    yield
    destroy_parallel()


def _qwen35():
    from erpd_megatron.megatron.model import HybridConfig, ModelConfig

    hybrid = HybridConfig(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                          linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
    return ModelConfig("qwen3_5", vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, ffn_hidden_size=64, hybrid=hybrid)


def _te_shaped_base():
    """The local spec rearranged like get_gpt_layer_with_transformer_engine_spec (TE is not installable here):
    pre-norms are IdentityOps because the following linears carry them."""
    from megatron.core.transformer.identity_op import IdentityOp

    from erpd_megatron.models.qwen35.spec import _base_layer_spec

    base = _base_layer_spec()
    base.submodules.input_layernorm = IdentityOp
    base.submodules.pre_mlp_layernorm = IdentityOp
    return base


def test_qwen35_te_spec_keeps_fused_norms_and_zero_centres_them(world_of_one):
    from megatron.core.transformer.identity_op import IdentityOp

    from erpd_megatron.megatron.model import make_transformer_config
    from erpd_megatron.megatron.parallel import ParallelConfig
    from erpd_megatron.models.qwen35.gdn import GatedDeltaNet
    from erpd_megatron.models.qwen35.norms import ZeroCenteredRMSNorm
    from erpd_megatron.models.qwen35.spec import qwen35_block_spec

    cfg = _qwen35()
    tcfg = make_transformer_config(cfg, ParallelConfig())
    gdn, attn = qwen35_block_spec(tcfg, cfg, base_layer_spec=_te_shaped_base()).layer_specs
    assert tcfg.layernorm_zero_centered_gamma  # TE's fused norms compute (1 + w), as HF Qwen3.5
    assert attn.submodules.input_layernorm is IdentityOp and attn.submodules.pre_mlp_layernorm is IdentityOp
    assert attn.submodules.self_attention.submodules.q_layernorm is ZeroCenteredRMSNorm
    assert gdn.submodules.self_attention.module is GatedDeltaNet
    assert gdn.submodules.input_layernorm is ZeroCenteredRMSNorm and gdn.submodules.pre_mlp_layernorm is IdentityOp
    # the GDN input norm is checkpointed under the local spec's key: checkpoints load across both specs
    assert gdn.submodules.sharded_state_dict_keys_map["input_layernorm."] == "self_attention.linear_qkv.layer_norm_"

    tcfg = make_transformer_config(cfg, ParallelConfig())
    gdn, attn = qwen35_block_spec(tcfg, cfg).layer_specs  # local spec: every norm is ours, flag untouched
    assert not tcfg.layernorm_zero_centered_gamma
    assert attn.submodules.input_layernorm is ZeroCenteredRMSNorm and gdn.submodules.pre_mlp_layernorm is \
        ZeroCenteredRMSNorm


def test_fp8_refused_without_transformer_engine():
    from erpd_megatron.megatron.model import BuildOptions, make_transformer_config
    from erpd_megatron.megatron.parallel import ParallelConfig

    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    with pytest.raises(RuntimeError, match="FP8 needs the Transformer Engine spec"):
        make_transformer_config(_qwen35(), ParallelConfig(), BuildOptions(fp8="hybrid"))


def test_gdn_kernels_in_gpu_extra():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert any(dep.startswith("fla-core") for dep in extra)  # fla.ops.gated_delta_rule (gated_delta_rule.py)


@pytest.mark.parametrize("fp8", [True, False])
def test_model_fp8_reaches_the_model_build(world_of_one, monkeypatch, fp8):
    """config model.fp8 -> Context.new_policy -> PolicyEngine -> build_model: the build options carry FP8 (the build
    itself is intercepted: FP8 needs TE), and the engine pads for FP8 from them."""
    from erpd_megatron.config import load_config
    from erpd_megatron.megatron import engine as engine_mod
    from erpd_megatron.megatron.model import ModelConfig
    from erpd_megatron.megatron.parallel import ParallelConfig
    from erpd_megatron.pipeline.context import Context

    seen = []

    class Built(Exception):
        pass

    def build_model(cfg, par, opts):
        seen.append((opts.fp8, opts.fp8_recipe))
        raise Built

    monkeypatch.setattr(engine_mod, "build_model", build_model)
    cfg = load_config(None, [f"model.fp8={str(fp8).lower()}"])
    mcfg = ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, ffn_hidden_size=64)
    ctx = Context(cfg=cfg, run=None, base_hf=None, tokenizer=None, model_cfg=mcfg, _par=ParallelConfig())
    with pytest.raises(Built):
        ctx.new_policy(init=Path("unused"))
    assert seen == [("hybrid" if fp8 else None, "delayed")]
    assert ctx.build_opts().fp8 == ("hybrid" if fp8 else None)


def test_model_fp8_refused_on_cpu_before_anything_starts(tmp_path, capsys):
    from erpd_megatron.megatron.model import have_te
    from erpd_megatron.pipeline import run

    if torch.cuda.is_available() and have_te():
        pytest.skip("CPU behaviour")
    rc = run.main_collect(["model.fp8=true", f"run_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("erpd collect: error: model.fp8=true needs ") and "set model.fp8=false" in err
    assert not (tmp_path / "r").exists()  # refused before the run directory was written
