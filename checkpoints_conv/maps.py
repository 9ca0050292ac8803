"""HF <-> Megatron tensor maps (one literal table per family: qwen3.py, llama.py, qwen35.py) and TP kinds.

Public API (used by the converters and by rollout weight sync):
  mcore_names(cfg) -> list[str]                       Megatron parameter names in model order
  hf_to_mcore(cfg, get) -> Iterator[(name, full)]     get(hf_name) -> tensor, called lazily per tensor
  mcore_to_hf(cfg, name, full) -> [(hf_name, tensor)] full = TP-gathered (see unshard_param)
  tp_kind(cfg, name) -> (kind, sections)              how a full tensor is split over TP ranks
  shard_param / unshard_param                         TP shard <-> full for any Megatron parameter
  canonical_name(name) -> str                         Transformer Engine spelling -> local-spec spelling
`mcore_names` lists the local-spec spelling; every function that takes a Megatron name also accepts the
Transformer Engine spec's spelling of the same tensor (see TE_LAYER_KEYS).
`cfg` may be a ConvConfig, an HF config dict, or any object with an `hf` / `hf_config` dict attribute.
Full tensors include the vocabulary padding; mcore_to_hf removes it (padding rows are dropped).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from . import layouts, llama, qwen3, qwen35
from .config import ConvConfig, ConversionError

FAMILIES = {"qwen3": qwen3, "llama": llama, "qwen3_5": qwen35}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Per-layer parameter: Transformer Engine spec name -> local spec name. The TE spec fuses each pre-norm into the
# linear that follows it (TELayerNormColumnParallelLinear: input_layernorm is an IdentityOp and the weight lives in
# linear_qkv.layer_norm_weight; pre_mlp_layernorm likewise in linear_fc1). Reference: megatron-core 0.19.2's own
# map between the two specs, get_gpt_layer_local_submodules(...).sharded_state_dict_keys_map in
# models/gpt/gpt_layer_specs.py ("input_layernorm." -> "self_attention.linear_qkv.layer_norm_", "pre_mlp_layernorm."
# -> "mlp.linear_fc1.layer_norm_"; RMSNorm has no bias), which is also why dist checkpoints of both specs share keys.
TE_LAYER_KEYS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

# Megatron parameter (without "decoder.layers.{i}.") -> TP kind; "sections" kinds get sizes from _sections
TP_KIND = {
    "embedding.word_embeddings.weight": "vocab",
    "output_layer.weight": "vocab",
    "decoder.final_layernorm.weight": "replicated",
    "input_layernorm.weight": "replicated",
    "pre_mlp_layernorm.weight": "replicated",
    "self_attention.linear_qkv.weight": "column",
    "self_attention.q_layernorm.weight": "replicated",
    "self_attention.k_layernorm.weight": "replicated",
    "self_attention.linear_proj.weight": "row",
    "mlp.linear_fc1.weight": "sections",
    "mlp.linear_fc2.weight": "row",
    "self_attention.in_proj.weight": "sections",
    "self_attention.conv1d.weight": "sections",
    "self_attention.A_log": "column",
    "self_attention.dt_bias": "column",
    "self_attention.out_norm.weight": "replicated",
    "self_attention.out_proj.weight": "row",
}


def as_conv_config(cfg) -> ConvConfig:
    if isinstance(cfg, ConvConfig):
        return cfg
    if isinstance(cfg, dict):
        return ConvConfig.from_hf(cfg)
    for attr in ("conv_config", "hf", "hf_config"):
        value = getattr(cfg, attr, None)
        if isinstance(value, ConvConfig):
            return value
        if isinstance(value, dict):
            pad = getattr(cfg, "padded_vocab_size", None)
            return ConvConfig.from_hf(value, padded_vocab_size=pad)
    if hasattr(cfg, "to_hf"):  # erpd_megatron.megatron.model.ModelConfig (text-only HF names, prefix "model.")
        return ConvConfig.from_hf(cfg.to_hf())
    raise TypeError(f"cannot read a conversion config from {type(cfg).__name__}")


def canonical_name(name: str) -> str:
    """The local-spec name of a Megatron parameter given in either spelling (other names unchanged)."""
    m = _LAYER_RE.match(name)
    if m and m.group(2) in TE_LAYER_KEYS:
        return f"decoder.layers.{m.group(1)}.{TE_LAYER_KEYS[m.group(2)]}"
    return name


def _table(cfg: ConvConfig):
    return FAMILIES[cfg.family]


def mcore_names(cfg) -> list[str]:
    cfg = as_conv_config(cfg)
    t = _table(cfg)
    names = ["embedding.word_embeddings.weight"]
    for i in range(cfg.num_layers):
        names += [f"decoder.layers.{i}.{k}" for k in t.layer_table(cfg, i)]
    names.append("decoder.final_layernorm.weight")
    if not cfg.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def entry(cfg, name: str) -> tuple[str, list[str]]:
    """(conversion, HF names) of one Megatron parameter."""
    cfg = as_conv_config(cfg)
    t = _table(cfg)
    name = canonical_name(name)
    m = _LAYER_RE.match(name)
    if m:
        i, key = int(m.group(1)), m.group(2)
        table = t.layer_table(cfg, i) if i < cfg.num_layers else {}
        if key not in table:
            raise ConversionError(f"unknown Megatron tensor {name!r} for {cfg.architecture}")
        conv, hf = table[key]
        return conv, [f"{cfg.prefix}layers.{i}.{h}" for h in hf]
    if name not in t.GLOBAL or (name == "output_layer.weight" and cfg.tie_word_embeddings):
        raise ConversionError(f"unknown Megatron tensor {name!r} for {cfg.architecture}")
    conv, hf = t.GLOBAL[name]
    return conv, [h.format(p=cfg.prefix) for h in hf]


def hf_names(cfg) -> list[str]:
    """Every HF tensor of the text model the tables consume (in Megatron order)."""
    return [h for n in mcore_names(cfg) for h in entry(cfg, n)[1]]


def _gdn_sizes(cfg: ConvConfig) -> tuple[int, int, int]:
    kd = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    vd = cfg.linear_num_value_heads * cfg.linear_value_head_dim
    return kd, vd, cfg.linear_num_value_heads


def to_mcore(cfg: ConvConfig, name: str, conv: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    if conv == "copy":
        return tensors[0]
    if conv == "vocab":
        if tensors[0].shape[0] != cfg.vocab_size:
            raise ConversionError(f"{name}: {tensors[0].shape[0]} rows, config vocab_size={cfg.vocab_size}")
        return layouts.pad_vocab(tensors[0], cfg.padded_vocab_size)
    if conv in ("qkv", "qkv_gated"):
        return layouts.merge_qkv(*tensors, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, gated=conv == "qkv_gated")
    if conv in ("gate_up", "cat"):
        return torch.cat(tensors, dim=0)
    raise ValueError(conv)


def from_mcore(cfg: ConvConfig, name: str, conv: str, full: torch.Tensor) -> list[torch.Tensor]:
    if conv == "copy":
        return [full]
    if conv == "vocab":
        return [full[: cfg.vocab_size]]
    if conv in ("qkv", "qkv_gated"):
        return list(layouts.split_qkv(full, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, gated=conv == "qkv_gated"))
    if conv == "gate_up":
        return list(full.chunk(2, dim=0))
    if conv == "cat":  # GDN in_proj
        kd, vd, hv = _gdn_sizes(cfg)
        return list(torch.split(full, [2 * kd + vd, vd, hv, hv], dim=0))
    raise ValueError(conv)


def expected_shape(cfg, name: str) -> tuple[int, ...]:
    """Shape of the full Megatron tensor (used to check config/weights agreement before writing)."""
    cfg = as_conv_config(cfg)
    h, key = cfg.hidden_size, _LAYER_RE.sub(r"\2", canonical_name(name))
    kd, vd, hv = _gdn_sizes(cfg)
    q_rows = cfg.num_heads * cfg.head_dim * (2 if cfg.attention_output_gate else 1)
    shapes = {
        "embedding.word_embeddings.weight": (cfg.padded_vocab_size, h),
        "output_layer.weight": (cfg.padded_vocab_size, h),
        "decoder.final_layernorm.weight": (h,),
        "input_layernorm.weight": (h,),
        "pre_mlp_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": (q_rows + 2 * cfg.num_kv_heads * cfg.head_dim, h),
        "self_attention.q_layernorm.weight": (cfg.head_dim,),
        "self_attention.k_layernorm.weight": (cfg.head_dim,),
        "self_attention.linear_proj.weight": (h, cfg.num_heads * cfg.head_dim),
        "mlp.linear_fc1.weight": (2 * cfg.ffn_hidden_size, h),
        "mlp.linear_fc2.weight": (h, cfg.ffn_hidden_size),
        "self_attention.in_proj.weight": (2 * kd + 2 * vd + 2 * hv, h),
        "self_attention.conv1d.weight": (2 * kd + vd, 1, cfg.linear_conv_kernel_dim),
        "self_attention.A_log": (hv,),
        "self_attention.dt_bias": (hv,),
        "self_attention.out_norm.weight": (cfg.linear_value_head_dim,),
        "self_attention.out_proj.weight": (h, vd),
    }
    return shapes[key]


def hf_to_mcore(cfg, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Megatron name, full tensor) in model order, reading HF tensors lazily through `get`."""
    cfg = as_conv_config(cfg)
    for name in mcore_names(cfg):
        conv, hf = entry(cfg, name)
        full = to_mcore(cfg, name, conv, [get(h) for h in hf])
        want = expected_shape(cfg, name)
        if tuple(full.shape) != want:
            raise ConversionError(
                f"config/weights mismatch: {name} from {hf} has shape {tuple(full.shape)}, config implies {want}"
            )
        yield name, full


def mcore_to_hf(cfg, mcore_name: str, full_tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs of one full (TP-gathered, padded) Megatron tensor."""
    cfg = as_conv_config(cfg)
    conv, hf = entry(cfg, mcore_name)
    return list(zip(hf, from_mcore(cfg, mcore_name, conv, full_tensor)))


def tp_kind(cfg, name: str) -> tuple[str, list[int] | None]:
    cfg = as_conv_config(cfg)
    key = _LAYER_RE.sub(r"\2", canonical_name(name))
    if key not in TP_KIND:
        raise ConversionError(f"unknown Megatron tensor {name!r}")
    kind = TP_KIND[key]
    if kind != "sections":
        return kind, None
    kd, vd, hv = _gdn_sizes(cfg)
    return kind, {
        "mlp.linear_fc1.weight": [cfg.ffn_hidden_size] * 2,
        "self_attention.in_proj.weight": [kd, kd, vd, vd, hv, hv],
        "self_attention.conv1d.weight": [kd, kd, vd],
    }[key]


def shard_param(cfg, name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    kind, sections = tp_kind(cfg, name)
    return layouts.shard(kind, full, tp, rank, sections)


def unshard_param(cfg, name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    kind, sections = tp_kind(cfg, name)
    return layouts.unshard(kind, shards, sections)
