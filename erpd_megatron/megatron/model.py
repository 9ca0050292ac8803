"""Model config (from / to Hugging Face) and the megatron GPTModel provider.

Families: "qwen3" (GQA, qk-norm, no biases), "llama" (GQA, no qk-norm), "qwen3_5" (hybrid
Gated-DeltaNet + gated attention; its layer specs live in erpd_megatron.models.qwen35).

Layer spec choice (logged):
- "te": Transformer Engine spec (fused norm+linear, TE attention), optional FP8 (hybrid format,
  delayed or current/"tensorwise" scaling) -- only when TE is importable and CUDA is present;
- "local": portable megatron-core modules + torch RMSNorm + SDPA core attention (attention.py);
  this is the CPU path and the GPU fallback.
Parameter names of the local spec are the project's canonical Megatron names (see
`megatron_param_names`); the TE spec fuses the pre-norms into linear_qkv / linear_fc1
(`...linear_qkv.layer_norm_weight`, `...linear_fc1.layer_norm_weight`): `local_to_global_name`
maps those back to the canonical names (checkpoints_conv.maps.TE_LAYER_KEYS).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

from erpd_megatron.megatron.parallel import ParallelConfig

log = logging.getLogger(__name__)

FAMILIES = ("qwen3", "llama", "qwen3_5")
# HF model_type -> family. Only bias-free RMSNorm SwiGLU decoders with RoPE are supported.
HF_MODEL_TYPES = {"qwen3": "qwen3", "llama": "llama", "qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5"}
VOCAB_PAD_MULTIPLE = 128  # megatron's make_vocab_size_divisible_by default


@dataclass
class HybridConfig:
    """Qwen3.5 hybrid-layer fields (GDN linear attention + gated full attention)."""

    layer_types: list[str]  # per layer: "linear_attention" | "full_attention"
    partial_rotary_factor: float = 0.25  # fraction of head_dim that gets RoPE
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    attn_output_gate: bool = True  # q_proj rows per head = [query, gate]


@dataclass
class ModelConfig:
    """Architecture of a dense decoder, in HF terms. `from_hf` / `to_hf` round-trip config.json."""

    family: str  # "qwen3" | "llama" | "qwen3_5"
    vocab_size: int  # true vocabulary (HF); the Megatron model pads it, see padded_vocab_size
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qk_norm: bool = True
    max_position_embeddings: int = 32768
    init_std: float = 0.02
    hybrid: HybridConfig | None = None  # qwen3_5 only

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family={self.family!r}: expected one of {FAMILIES}")
        if self.family == "qwen3_5" and self.hybrid is None:
            raise ValueError("ModelConfig.family='qwen3_5' needs hybrid=HybridConfig(...)")
        if isinstance(self.hybrid, dict):
            self.hybrid = HybridConfig(**self.hybrid)
        if self.hybrid is not None and len(self.hybrid.layer_types) != self.num_layers:
            raise ValueError(
                f"hybrid.layer_types has {len(self.hybrid.layer_types)} entries, num_layers={self.num_layers}"
            )

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocabulary rows in the Megatron model: a multiple of 128 * tp (rows past vocab_size are padding)."""
        m = VOCAB_PAD_MULTIPLE * tp
        return int(math.ceil(self.vocab_size / m) * m)

    def num_params(self) -> int:
        """Parameter count of the unpadded model (dense families)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (2 * self.head_dim if self.qk_norm else 0)
        mlp = 3 * h * self.ffn_hidden_size
        layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + emb + h

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from an HF config.json dict (Qwen3ForCausalLM, LlamaForCausalLM, Qwen3.5 [text] config)."""
        if "text_config" in hf and hf.get("model_type") == "qwen3_5":
            text = dict(hf["text_config"])
            text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
            hf = text
        mt = hf.get("model_type")
        if mt not in HF_MODEL_TYPES:
            raise ValueError(f"HF config model_type={mt!r} is not supported (supported: {sorted(HF_MODEL_TYPES)})")
        family = HF_MODEL_TYPES[mt]
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise ValueError(f"HF config {key}=True: biases are not supported by this model provider")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"HF config hidden_act={hf.get('hidden_act')!r}: only silu (SwiGLU) is supported")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"HF config rope type {rope.get('rope_type')!r}: only default RoPE is supported")
        theta = hf.get("rope_theta") or rope.get("rope_theta") or (10000.0 if family == "llama" else 1_000_000.0)
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        hybrid = None
        if family == "qwen3_5":
            prf = hf.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 0.25
            types = hf.get("layer_types")
            if types is None:  # as the converter (ConvConfig.from_hf) and transformers' Qwen3.5 config do
                interval = hf.get("full_attention_interval", 4)
                types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                         for i in range(hf["num_hidden_layers"])]
            hybrid = HybridConfig(
                layer_types=list(types),
                partial_rotary_factor=float(prf),
                linear_num_key_heads=hf.get("linear_num_key_heads", 16),
                linear_num_value_heads=hf.get("linear_num_value_heads", 32),
                linear_key_head_dim=hf.get("linear_key_head_dim", 128),
                linear_value_head_dim=hf.get("linear_value_head_dim", 128),
                linear_conv_kernel_dim=hf.get("linear_conv_kernel_dim", 4),
                attn_output_gate=hf.get("attn_output_gate", True),
            )
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            ffn_hidden_size=hf["intermediate_size"],
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qk_norm=family in ("qwen3", "qwen3_5"),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            init_std=hf.get("initializer_range", 0.02),
            hybrid=hybrid,
        )

    def to_hf(self) -> dict[str, Any]:
        """HF config dict (loadable by transformers.AutoConfig.for_model(**d))."""
        model_type = {"qwen3": "qwen3", "llama": "llama", "qwen3_5": "qwen3_5_text"}[self.family]
        arch = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "qwen3_5": "Qwen3_5ForCausalLM"}[self.family]
        d: dict[str, Any] = {
            "model_type": model_type,
            "architectures": [arch],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "initializer_range": self.init_std,
            "attention_bias": False,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        }
        if self.family == "llama":
            d["mlp_bias"] = False
        if self.hybrid is not None:
            h = self.hybrid
            d["rope_parameters"]["partial_rotary_factor"] = h.partial_rotary_factor
            d.update(
                layer_types=list(h.layer_types),
                partial_rotary_factor=h.partial_rotary_factor,
                linear_num_key_heads=h.linear_num_key_heads,
                linear_num_value_heads=h.linear_num_value_heads,
                linear_key_head_dim=h.linear_key_head_dim,
                linear_value_head_dim=h.linear_value_head_dim,
                linear_conv_kernel_dim=h.linear_conv_kernel_dim,
            )
        return d

    def layout_errors(self, par: ParallelConfig) -> list[str]:
        """Family-specific layout constraints (used by parallel.validate_layout)."""
        errs = []
        if self.hybrid is not None:
            h = self.hybrid
            for name in ("linear_num_key_heads", "linear_num_value_heads"):
                if getattr(h, name) % par.tp:
                    errs.append(f"hybrid.{name}={getattr(h, name)} is not divisible by tp={par.tp}")
        return errs


# ---------------------------------------------------------------------- megatron side


@dataclass
class BuildOptions:
    """How to build the Megatron model (not what: that is ModelConfig)."""

    spec: str = "auto"  # "auto" (TE if TE and CUDA, else local) | "local" | "te"
    dtype: torch.dtype | None = None  # None: bf16 with CUDA, fp32 on CPU
    fp8: str | None = None  # None | "hybrid" | "e4m3" (TE spec only)
    fp8_recipe: str = "delayed"  # "delayed" | "tensorwise" (current scaling) | "mxfp8" | "blockwise"
    recompute: bool = False  # full activation recompute of every layer
    attention: str = "sdpa"  # local spec core attention: "sdpa" (attention.py) | "megatron" (unfused baddbmm+softmax)
    extra_transformer_config: dict[str, Any] = field(default_factory=dict)


def have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def resolve_spec(opts: BuildOptions) -> str:
    cuda = torch.cuda.is_available()
    if opts.spec == "auto":
        return "te" if (cuda and have_te()) else "local"
    if opts.spec == "te" and not (cuda and have_te()):
        raise RuntimeError("spec='te' needs CUDA and transformer_engine (pip install transformer-engine[pytorch])")
    if opts.spec not in ("te", "local"):
        raise ValueError(f"BuildOptions.spec={opts.spec!r}: expected auto | local | te")
    return opts.spec


def kernel_availability() -> dict[str, bool]:
    """Which optional fused kernels this process can use (megatron-core 0.19.2's own availability checks)."""
    import importlib.util

    def found(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False

    from megatron.core.tensor_parallel import layers

    rope = False
    if have_te():
        try:
            from megatron.core.models.common.embeddings.rope_utils import fused_apply_rotary_pos_emb

            rope = fused_apply_rotary_pos_emb is not None
        except Exception:  # noqa: BLE001 - a broken TE install means "not available"
            rope = False
    return {
        # tensor_parallel/layers.py:49-53: apex's extension; ColumnParallelLinear refuses the flag without it
        # (layers.py:1070), and the output layer is always one, even in the TE spec
        "wgrad_accum": bool(getattr(layers, "_grad_accum_fusion_available", False)),
        # rope_utils.py:21-29: TE's fused RoPE (TransformerConfig refuses the flag without it)
        "fused_rope": rope,
        # fusions/fused_softmax.py: megatron's fused softmax CUDA extensions (local DotProductAttention only)
        "fused_softmax": found("scaled_upper_triang_masked_softmax_cuda") and found("scaled_masked_softmax_cuda"),
    }


def fast_path_flags(cuda: bool, available: dict[str, bool]) -> tuple[dict[str, bool], dict[str, str]]:
    """TransformerConfig fusion flags: each on where its kernel is available, else off with the reason.

    Returns (flags, reasons for the ones off). BuildOptions.extra_transformer_config still overrides them."""
    rules = {
        "gradient_accumulation_fusion": ("wgrad_accum", "apex's fused_weight_gradient_mlp_cuda extension is not "
                                         "importable (megatron's local linears, the output layer included, need it)"),
        "apply_rope_fusion": ("fused_rope", "Transformer Engine's fused RoPE is not importable"),
        "masked_softmax_fusion": ("fused_softmax", "megatron's scaled_(upper_triang_)masked_softmax_cuda extensions are "
                                  "not importable (only the 'megatron' core attention uses them)"),
    }
    flags, reasons = {}, {}
    for flag, (kernel, why) in rules.items():
        flags[flag] = bool(cuda and available.get(kernel))
        if not flags[flag]:
            reasons[flag] = "no CUDA" if not cuda else why
    return flags, reasons


def make_transformer_config(cfg: ModelConfig, par: ParallelConfig, opts: BuildOptions | None = None):
    """megatron TransformerConfig for `cfg` under layout `par`."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    opts = opts or BuildOptions()
    cuda = torch.cuda.is_available()
    dtype = opts.dtype or (torch.bfloat16 if cuda else torch.float32)
    spec = resolve_spec(opts)
    if opts.fp8 and spec != "te":
        raise RuntimeError("FP8 needs the Transformer Engine spec (CUDA + transformer_engine)")
    kw: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.num_kv_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.ffn_hidden_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=cfg.qk_norm,
        init_method_std=cfg.init_std,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        context_parallel_size=par.cp,
        sequence_parallel=par.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # CPU: initialise full weights on the CPU generator and split them, so every TP layout
        # starts from the same weights; fused CUDA kernels off.
        use_cpu_initialization=not cuda,
        perform_initialization=True,
        bias_dropout_fusion=cuda and spec == "te",
        persist_layer_norm=False,
        batch_p2p_comm=True,
        batch_p2p_sync=cuda,  # p2p_communication.py:419 torch.cuda.synchronize
        deallocate_pipeline_outputs=cuda,
    )
    flags, off = fast_path_flags(cuda, kernel_availability() if cuda else {})
    kw.update(flags)
    if cuda:
        log.info("fast paths on: %s; off: %s", [f for f, v in flags.items() if v] or "none",
                 "; ".join(f"{f} ({why})" for f, why in off.items()) or "none")
    if opts.recompute:
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if opts.fp8:
        kw.update(fp8=opts.fp8, fp8_recipe=opts.fp8_recipe)
    kw.update(opts.extra_transformer_config)
    return TransformerConfig(**kw)


def layer_spec(cfg: ModelConfig, tcfg, spec: str, vp_stage: int | None = None, attention: str = "sdpa"):
    """Transformer layer (or block) spec for the family and spec kind."""
    if cfg.family == "qwen3_5":
        try:
            from erpd_megatron.models.qwen35.spec import _te_base_layer_spec, qwen35_block_spec
        except ImportError as e:
            raise RuntimeError(
                "family 'qwen3_5' needs erpd_megatron.models.qwen35.spec.qwen35_block_spec, which is not importable: "
                f"{e}"
            ) from e
        # TE: attention + MLP on TE modules (FP8-capable, fused zero-centred pre-norms); GDN stays local
        return qwen35_block_spec(tcfg, cfg, vp_stage=vp_stage, base_layer_spec=_te_base_layer_spec() if spec == "te"
                                 else None)
    if spec == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_norm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from erpd_megatron.megatron.attention import SDPACoreAttention
    from erpd_megatron.megatron.cpu_linear import cpu_linear_spec
    from erpd_megatron.megatron.swiglu import swiglu_mlp_spec

    s = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_norm, normalization="RMSNorm")
    # same params / names; SwiGLU backward without megatron's chunk->cat copy (swiglu.py). The local spec's mlp is
    # a partial of MLP.as_mlp_submodule: rebind it to the subclass, keeping its submodules.
    s.submodules.mlp = swiglu_mlp_spec(s.submodules.mlp)
    # CPU fp32: the four linear layers on oneDNN's GEMM (cpu_linear.py); elsewhere megatron's own forward
    cpu_linear_spec(s)
    if attention == "sdpa":
        s.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    elif attention != "megatron":
        raise ValueError(f"BuildOptions.attention={attention!r}: expected sdpa | megatron")
    return s


def build_model(cfg: ModelConfig, par: ParallelConfig, opts: BuildOptions | None = None) -> list[torch.nn.Module]:
    """Build this rank's model chunks (one per virtual pipeline stage), on the current device.

    megatron's parallel state must be initialised (parallel.init_parallel). Returns bare GPTModels
    (no DDP wrapper; the engine adds it).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    opts = opts or BuildOptions()
    spec = resolve_spec(opts)
    tcfg = make_transformer_config(cfg, par, opts)
    rotary_percent = cfg.hybrid.partial_rotary_factor if cfg.hybrid is not None else 1.0
    if opts.fp8 and cfg.family == "qwen3_5":
        log.warning("build_model: fp8 applies to Qwen3.5's attention and MLP GEMMs only: the Gated DeltaNet "
                    "projections (in_proj / out_proj, megatron local linears) run in %s (their per-rank in_proj rows, "
                    "(2*Kd + 2*Vd + 2*Hv)/tp, are not a multiple of 16 in general)", tcfg.params_dtype)
    log.info(
        "build_model: family=%s spec=%s%s%s dtype=%s layout=%s",
        cfg.family,
        spec,
        f" attention={opts.attention}" if spec == "local" and cfg.family != "qwen3_5" else "",
        f" fp8={opts.fp8}/{opts.fp8_recipe}" if opts.fp8 else "",
        tcfg.params_dtype,
        par,
    )
    # GPTModel logs a deprecation warning on every construction (HybridModel's shipped spec is TE-only).
    gpt_log = logging.getLogger("megatron.core.models.gpt.gpt_model")
    level = gpt_log.level
    gpt_log.setLevel(logging.ERROR)
    chunks = []
    try:
        for vp in range(par.vpp or 1):
            vp_stage = vp if par.vpp else None
            m = GPTModel(
                config=tcfg,
                transformer_layer_spec=layer_spec(cfg, tcfg, spec, vp_stage, opts.attention),
                vocab_size=cfg.padded_vocab_size(par.tp),
                max_sequence_length=cfg.max_position_embeddings,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                parallel_output=True,
                share_embeddings_and_output_weights=cfg.tie_embeddings,
                position_embedding_type="rope",
                rotary_percent=rotary_percent,
                rotary_base=cfg.rope_theta,
                vp_stage=vp_stage,
            )
            m.model_type = _encoder_or_decoder()
            if torch.cuda.is_available():
                m.cuda(torch.cuda.current_device())
            chunks.append(m)
    finally:
        gpt_log.setLevel(level)
    return chunks


def _encoder_or_decoder():
    from megatron.core.enums import ModelType

    return ModelType.encoder_or_decoder


# ---------------------------------------------------------------------- names and sharding


def megatron_param_names(cfg: ModelConfig) -> list[str]:
    """Canonical (local-spec, unsharded) parameter names of a dense model, in module order."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        names += [p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight"]
        if cfg.qk_norm:
            names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
        names += [
            p + "self_attention.linear_proj.weight",
            p + "pre_mlp_layernorm.weight",
            p + "mlp.linear_fc1.weight",
            p + "mlp.linear_fc2.weight",
        ]
    names.append("decoder.final_layernorm.weight")
    if not cfg.tie_embeddings:
        names.append("output_layer.weight")
    return names


def layer_offset(cfg: ModelConfig, par: ParallelConfig, pp_rank: int, vp_stage: int | None = None) -> int:
    """Global index of the first layer of (pp_rank, vp_stage): uniform split, interleaved for vpp."""
    stages = par.pp * (par.vpp or 1)
    per = cfg.num_layers // stages
    return ((vp_stage or 0) * par.pp + pp_rank) * per


def local_to_global_name(name: str, offset: int) -> str:
    """decoder.layers.{i}.x on a pipeline stage -> decoder.layers.{i+offset}.x, in the canonical (local-spec)
    spelling: the TE spec's fused pre-norm weights (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`)
    come out as `input_layernorm.weight` / `pre_mlp_layernorm.weight` (checkpoints_conv.maps.TE_LAYER_KEYS), so
    weight sync, export and load_full_state_dict see one set of names whatever the spec. Other names unchanged."""
    if name.startswith("decoder.layers."):
        from checkpoints_conv.maps import canonical_name

        rest = name[len("decoder.layers."):]
        i, tail = rest.split(".", 1)
        return canonical_name(f"decoder.layers.{int(i) + offset}.{tail}")
    return name


def shard_full_tensor(name: str, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's shard of a full (unsharded, vocab-padded) Megatron tensor.

    Column-parallel weights split dim 0, row-parallel dim 1; linear_fc1 = [gate; up] is split
    per half (rank r holds [gate_r; up_r]); linear_qkv rows are grouped per query group, so a
    contiguous dim-0 split hands whole groups to each rank. Norms are replicated.
    """
    if tp == 1:
        return full
    if name.endswith("mlp.linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]], dim=0)
    if name.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
        return full.chunk(tp, dim=0)[tp_rank]
    if name.endswith(("linear_proj.weight", "mlp.linear_fc2.weight")):
        return full.chunk(tp, dim=1)[tp_rank]
    return full


def pad_vocab_rows(t: torch.Tensor, padded: int) -> torch.Tensor:
    """[V, H] -> [padded, H] with zero rows (HF -> Megatron)."""
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


@torch.no_grad()
def load_full_state_dict(chunks: list[torch.nn.Module], full: dict[str, torch.Tensor], cfg: ModelConfig,
                         par: ParallelConfig, strict: bool = True) -> None:
    """Copy full Megatron-named tensors (global layer indices, vocab padded or not) into this rank's chunks."""
    from megatron.core import parallel_state as ps

    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    padded = cfg.padded_vocab_size(par.tp)
    for vp, chunk in enumerate(chunks):
        offset = layer_offset(cfg, par, pp_rank, vp if par.vpp else None)
        for name, p in unwrap_model(chunk).named_parameters():
            g = local_to_global_name(name, offset)
            if g == "output_layer.weight" and cfg.tie_embeddings:
                g = "embedding.word_embeddings.weight"  # last pipeline stage's copy of the tied embedding
            if g not in full:
                if strict:
                    raise KeyError(f"load_full_state_dict: {g} missing from the given state dict")
                continue
            t = full[g]
            if g.endswith(("word_embeddings.weight", "output_layer.weight")):
                t = pad_vocab_rows(t, padded)
            t = shard_full_tensor(g, t, tp_rank, par.tp)
            if t.shape != p.shape:
                raise ValueError(f"load_full_state_dict: {g} shard shape {tuple(t.shape)} != parameter {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))


def unwrap_model(m: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (anything with `.module`) down to the GPTModel."""
    while hasattr(m, "module") and not hasattr(m, "decoder") and not hasattr(m, "embedding"):
        m = m.module
    return m
