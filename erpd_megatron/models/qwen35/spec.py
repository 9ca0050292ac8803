"""Block spec of the Qwen3.5 hybrid text model for megatron-core's GPTModel (local portable modules, or
Transformer Engine attention / MLP with `base_layer_spec=_te_base_layer_spec()`).

`qwen35_block_spec(transformer_config, model_cfg, vp_stage=None)` returns a TransformerBlockSubmodules whose
`layer_specs` are the layers of THIS pipeline stage (following `layer_types`) and whose `layer_norm` is the
zero-centred final norm. Full-attention layers are megatron's SelfAttention with the output gate
(`transformer_config.attention_output_gate=True`, qkv rows per query group [q, gate, k, v]), zero-centred
q/k norms; partial rotary (0.25) comes from GPTModel's `rotary_percent`. Linear layers are gdn.GatedDeltaNet.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .gdn import GatedDeltaNet
from .norms import ZeroCenteredRMSNorm


@dataclass(frozen=True)
class Qwen35Dims:
    layer_types: tuple[str, ...]
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    rms_norm_eps: float

    @classmethod
    def from_any(cls, cfg) -> Qwen35Dims:
        """From an HF config dict (top level or `text_config`), or an object carrying those fields or `.hf`."""
        if not isinstance(cfg, dict):
            hybrid = getattr(cfg, "hybrid", None)  # erpd_megatron.megatron.model.ModelConfig
            if hybrid is not None:
                d = {k: getattr(hybrid, k) for k in dir(hybrid) if k.startswith(("linear_", "layer_types"))}
                return cls.from_any({**d, "num_hidden_layers": cfg.num_layers, "rms_norm_eps": cfg.rms_norm_eps})
            if hasattr(cfg, "to_hf"):
                return cls.from_any(cfg.to_hf())
            cfg = {k: getattr(cfg, k) for k in dir(cfg) if not k.startswith("_")}
        if isinstance(cfg.get("text_config"), dict):
            cfg = cfg["text_config"]
        n = cfg.get("num_hidden_layers", cfg.get("num_layers"))
        types = cfg.get("layer_types")
        if types is None:
            interval = cfg.get("full_attention_interval", 4)
            types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
        return cls(
            layer_types=tuple(types),
            linear_num_key_heads=cfg.get("linear_num_key_heads", 16),
            linear_num_value_heads=cfg.get("linear_num_value_heads", 32),
            linear_key_head_dim=cfg.get("linear_key_head_dim", 128),
            linear_value_head_dim=cfg.get("linear_value_head_dim", 128),
            linear_conv_kernel_dim=cfg.get("linear_conv_kernel_dim", 4),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        )


def _base_layer_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from erpd_megatron.megatron.attention import SDPACoreAttention

    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def _te_base_layer_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)


def has_fused_norms(layer_spec) -> bool:
    """True for a Transformer Engine layer spec: the pre-norms live inside linear_qkv / linear_fc1
    (TELayerNormColumnParallelLinear), so the layer's own input_layernorm / pre_mlp_layernorm are IdentityOps."""
    from megatron.core.transformer.identity_op import IdentityOp

    return layer_spec.submodules.input_layernorm is IdentityOp


def qwen35_layer_specs(dims: Qwen35Dims, base_layer_spec=None) -> list:
    """One ModuleSpec per layer of the whole model (all stages).

    Local base spec: every norm is a ZeroCenteredRMSNorm. Transformer Engine base spec (fused pre-norms): the
    fused norms stay in TE's linears (zero-centred through `layernorm_zero_centered_gamma`, which
    qwen35_block_spec sets), so attention and MLP GEMMs are TE's (FP8-capable); q/k norms stay ZeroCenteredRMSNorm;
    a GDN layer has no fused linear_qkv, so its input norm is a ZeroCenteredRMSNorm checkpointed under the key
    the local spec uses (`self_attention.linear_qkv.layer_norm_weight`): checkpoints load across both specs.
    The GDN projections are megatron's local linears in both (bf16 under FP8: see build_model's log line)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    base = base_layer_spec if base_layer_spec is not None else _base_layer_spec()
    fused = has_fused_norms(base)
    specs = []
    for kind in dims.layer_types:
        spec = copy.deepcopy(base)
        sub = spec.submodules
        if not fused:
            sub.input_layernorm = ZeroCenteredRMSNorm
            sub.pre_mlp_layernorm = ZeroCenteredRMSNorm
        if kind == "full_attention":
            sub.self_attention.submodules.q_layernorm = ZeroCenteredRMSNorm
            sub.self_attention.submodules.k_layernorm = ZeroCenteredRMSNorm
        elif kind == "linear_attention":
            if fused:
                sub.input_layernorm = ZeroCenteredRMSNorm
                sub.sharded_state_dict_keys_map = {**sub.sharded_state_dict_keys_map,
                                                   "input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
            sub.self_attention = ModuleSpec(
                module=GatedDeltaNet,
                params=dict(
                    num_key_heads=dims.linear_num_key_heads,
                    num_value_heads=dims.linear_num_value_heads,
                    key_head_dim=dims.linear_key_head_dim,
                    value_head_dim=dims.linear_value_head_dim,
                    conv_kernel=dims.linear_conv_kernel_dim,
                    eps=dims.rms_norm_eps,
                ),
            )
        else:
            raise ValueError(f"Qwen3.5: unknown layer type {kind!r} in layer_types")
        specs.append(spec)
    return specs


def qwen35_block_spec(transformer_config, model_cfg, vp_stage: int | None = None, base_layer_spec=None):
    """TransformerBlockSubmodules for the local layers of this PP (and virtual PP) stage."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    dims = Qwen35Dims.from_any(model_cfg)
    if len(dims.layer_types) != transformer_config.num_layers:
        raise ValueError(
            f"Qwen3.5: layer_types has {len(dims.layer_types)} entries, num_layers={transformer_config.num_layers}"
        )
    # Qwen3.5 full attention always has the output gate (q_proj rows [query, gate] per head). The flag is
    # read by megatron's SelfAttention when the layers are built, i.e. after this function returns.
    gate = getattr(getattr(model_cfg, "hybrid", None), "attn_output_gate", True)
    if not gate:
        raise ValueError("Qwen3.5 without the attention output gate is not supported")
    transformer_config.attention_output_gate = True
    base = base_layer_spec if base_layer_spec is not None else _base_layer_spec()
    if has_fused_norms(base):  # TE's fused pre-norms: (1 + w), as HF Qwen3.5 (read when TE builds its linears)
        transformer_config.layernorm_zero_centered_gamma = True
    # Hybrid layers have different parameter sets: dist-checkpoint keys per layer ("decoder.layers.{i}.")
    # instead of one tensor stacked over all layers (which the GDN-only / attention-only keys cannot fill).
    transformer_config.hetereogenous_dist_checkpoint = True
    all_specs = qwen35_layer_specs(dims, base)
    n_local = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(transformer_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=all_specs[offset : offset + n_local], layer_norm=ZeroCenteredRMSNorm)
