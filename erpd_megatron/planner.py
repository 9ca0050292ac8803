"""Memory / FLOPs planner: will this model and parallel layout fit, and how long is a step?

For an HF config dict (Qwen3 dense, Llama, Qwen3.5 hybrid Gated-DeltaNet + gated attention) and a
`Layout` (TP, PP, DP, CP, micro batch, sequence length, recompute, distributed optimizer, dtypes,
colocated or separate SGLang rollout engine), `plan()` returns the per-GPU memory of every pipeline
stage (weights, gradients, optimizer states, activations, rollout engine weights + KV pool), the FLOPs
of one optimizer step and a step time estimated from an assumed MFU. Layouts that cannot work are
refused with reasons (`Plan.reasons`); `check_or_raise()` turns them into a `LayoutError`.

Formulas (docs/planner.md has the derivations and the CPU measurement):
- Parameters: an inventory of every tensor with its HF name, shape and TP split dimension, so the count
  is checked tensor by tensor against transformers' own model in the tests. Megatron pads the vocabulary
  to a multiple of 128 * TP; PP stage k holds layers [k L/PP, (k+1) L/PP), the first stage the embedding,
  the last stage the final norm and output layer (a copy of the embedding when tied and PP > 1).
- Weights / grads / optimizer: bytes(param dtype) + bytes(grad dtype) + Adam (fp32 master copy unless
  params are fp32, plus 2 fp32 moments), the optimizer part divided by DP x CP with the distributed
  optimizer. With bf16 params and fp32 grads this is Megatron's documented 18 bytes/param, or
  6 + 12/d with the distributed optimizer.
- Activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models") count of tensors saved for backward per layer, re-derived for what a Megatron layer saves
  today: no dropout, RMSNorm, SwiGLU (fused: saves its input only), GQA (K/V are g*d wide, not h),
  qk-norm, Qwen3.5's output gate, and Gated DeltaNet layers (conv input/pre/post activation, z, kernel
  output, gated-norm output, chunk matrices). Flash attention saves O(s) per head; the unfused path
  saves the s x s probabilities. Sequence parallelism divides the h-wide tensors by TP. Recompute
  "selective" = Megatron's core_attn recompute (drops the s x s term); "full" keeps only each layer's
  input plus one layer's working set. 1F1B pipelining keeps min(PP - k, micro-batches) micro-batches
  in flight on stage k. The last stage adds the loss head: fp32 log-softmax of the vocab-parallel logits.
- FLOPs: 6 N T for the matmuls (N = matmul parameters incl. the output layer, T = tokens) plus causal
  attention 6 * 2 a d s per token per full layer (fwd 2ads + bwd 2x), and for GDN layers a chunked
  delta-rule estimate nv (6 dk dv + 2 C (dk + dv)) per token (C = 64). Full recompute adds one forward
  to the hardware FLOPs (MFU counts model FLOPs only, as is customary). RL steps: `mean_seq_len` (packed
  sequences: the tokens actually computed, attention at the mean length) and `logprob_passes` (forward-only
  passes over the same tokens: old-policy / reference log-probs, one forward each) enter the FLOPs and
  the step time; tokens/s/GPU = step tokens / step time / GPUs. Not modelled: generation, weight sync,
  data and reward time (docs/planner.md compares the prediction with NeMo-RL's published figures).
- Rollout engine (SGLang): weights / rollout TP (vocab-parallel too) inside `rollout_mem_fraction` of
  the GPU (SGLang's mem_fraction_static); the rest of that share is the KV pool. Full-attention layers
  cost 2 g d bytes per token per layer (K/V heads replicated when rollout TP > g); GDN layers a fixed
  fp32 state nv dk dv + a conv state per sequence. Colocated engines release their memory while the
  trainer trains (release_memory / resume_memory), so the peak is max(train, rollout share), not the sum,
  unless `rollout_offload=False`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Literal

GiB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GDN_CHUNK = 64  # chunk length of the chunked gated delta rule kernels (fla / Megatron)


class LayoutError(ValueError):
    """A layout that cannot work; `reasons` lists every problem found."""

    def __init__(self, reasons: list[str]):
        self.reasons = list(reasons)
        super().__init__("layout refused:\n  - " + "\n  - ".join(self.reasons))


# ----------------------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the planner needs, read from an HF config dict."""

    family: str  # "qwen3" | "llama" | "qwen3_5"
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qk_norm: bool
    attn_gate: bool  # Qwen3.5: q_proj emits [query; gate] per head
    attention_bias: bool
    mlp_bias: bool
    layer_types: tuple[str, ...]  # per layer: "full_attention" | "linear_attention"
    gdn_k_heads: int = 0
    gdn_v_heads: int = 0
    gdn_k_dim: int = 0
    gdn_v_dim: int = 0
    gdn_conv_kernel: int = 0

    @property
    def n_full(self) -> int:
        return sum(t == "full_attention" for t in self.layer_types)

    @property
    def n_gdn(self) -> int:
        return sum(t == "linear_attention" for t in self.layer_types)

    @property
    def gdn_conv_dim(self) -> int:
        return 2 * self.gdn_k_heads * self.gdn_k_dim + self.gdn_v_heads * self.gdn_v_dim

    @classmethod
    def from_hf(cls, config: dict) -> ModelShape:
        """Accepts a CausalLM config or a composite one with `text_config` (Qwen3.5 release layout)."""
        top = config
        cfg = dict(config.get("text_config") or config)
        mt = cfg.get("model_type") or top.get("model_type")

        def need(key: str):
            if key not in cfg:
                raise ValueError(f"HF config ({mt}): missing field {key!r}")
            return cfg[key]

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        layers = need("num_hidden_layers")
        common = dict(
            hidden=hidden,
            ffn=need("intermediate_size"),
            layers=layers,
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or hidden // heads,
            vocab=need("vocab_size"),
            tied=bool(cfg.get("tie_word_embeddings", top.get("tie_word_embeddings", False))),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )
        if mt == "qwen3":
            return cls(family="qwen3", qk_norm=True, attn_gate=False,
                       layer_types=("full_attention",) * layers, **common)
        if mt == "llama":
            return cls(family="llama", qk_norm=False, attn_gate=False,
                       layer_types=("full_attention",) * layers, **common)
        if mt in ("qwen3_5", "qwen3_5_text"):
            types = cfg.get("layer_types")
            if types is None:
                every = cfg.get("full_attention_interval", 4)
                types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(layers)]
            if len(types) != layers:
                raise ValueError(f"HF config ({mt}): layer_types has {len(types)} entries, num_hidden_layers={layers}")
            bad = sorted(set(types) - {"full_attention", "linear_attention"})
            if bad:
                raise ValueError(f"HF config ({mt}): unknown layer_types {bad}")
            return cls(family="qwen3_5", qk_norm=True, attn_gate=bool(cfg.get("attn_output_gate", True)),
                       layer_types=tuple(types), gdn_k_heads=need("linear_num_key_heads"),
                       gdn_v_heads=need("linear_num_value_heads"), gdn_k_dim=need("linear_key_head_dim"),
                       gdn_v_dim=need("linear_value_head_dim"), gdn_conv_kernel=need("linear_conv_kernel_dim"),
                       **common)
        raise ValueError(f"HF config: model_type {mt!r} not supported (qwen3, llama, qwen3_5, qwen3_5_text)")


@dataclass(frozen=True)
class ParamTensor:
    name: str  # HF name (CausalLM layout)
    shape: tuple[int, ...]
    tp_dim: int | None  # dimension split over TP ranks; None = replicated (norms, ...)
    layer: int | None  # decoder layer index; None for embedding / final norm / output layer
    vocab: bool = False  # vocab-parallel (padded to a multiple of 128 * TP in Megatron)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def param_inventory(shape: ModelShape) -> list[ParamTensor]:
    """Every parameter tensor with its HF name (Qwen3/Llama/Qwen3_5 *ForCausalLM naming)."""
    h, f, d, a, g = shape.hidden, shape.ffn, shape.head_dim, shape.heads, shape.kv_heads
    out = [ParamTensor("model.embed_tokens.weight", (shape.vocab, h), 0, None, vocab=True)]
    for i, kind in enumerate(shape.layer_types):
        p = f"model.layers.{i}."
        out.append(ParamTensor(p + "input_layernorm.weight", (h,), None, i))
        if kind == "full_attention":
            q_rows = a * d * (2 if shape.attn_gate else 1)
            out += [
                ParamTensor(p + "self_attn.q_proj.weight", (q_rows, h), 0, i),
                ParamTensor(p + "self_attn.k_proj.weight", (g * d, h), 0, i),
                ParamTensor(p + "self_attn.v_proj.weight", (g * d, h), 0, i),
                ParamTensor(p + "self_attn.o_proj.weight", (h, a * d), 1, i),
            ]
            if shape.attention_bias:
                out += [
                    ParamTensor(p + "self_attn.q_proj.bias", (q_rows,), 0, i),
                    ParamTensor(p + "self_attn.k_proj.bias", (g * d,), 0, i),
                    ParamTensor(p + "self_attn.v_proj.bias", (g * d,), 0, i),
                    ParamTensor(p + "self_attn.o_proj.bias", (h,), None, i),
                ]
            if shape.qk_norm:
                out += [ParamTensor(p + "self_attn.q_norm.weight", (d,), None, i),
                        ParamTensor(p + "self_attn.k_norm.weight", (d,), None, i)]
        else:  # Gated DeltaNet
            nv, dv = shape.gdn_v_heads, shape.gdn_v_dim
            la = p + "linear_attn."
            out += [
                ParamTensor(la + "in_proj_qkv.weight", (shape.gdn_conv_dim, h), 0, i),
                ParamTensor(la + "in_proj_z.weight", (nv * dv, h), 0, i),
                ParamTensor(la + "in_proj_b.weight", (nv, h), 0, i),
                ParamTensor(la + "in_proj_a.weight", (nv, h), 0, i),
                ParamTensor(la + "conv1d.weight", (shape.gdn_conv_dim, 1, shape.gdn_conv_kernel), 0, i),
                ParamTensor(la + "dt_bias", (nv,), 0, i),
                ParamTensor(la + "A_log", (nv,), 0, i),
                ParamTensor(la + "norm.weight", (dv,), None, i),  # per-head gated RMSNorm: replicated
                ParamTensor(la + "out_proj.weight", (h, nv * dv), 1, i),
            ]
        out.append(ParamTensor(p + "post_attention_layernorm.weight", (h,), None, i))
        out += [
            ParamTensor(p + "mlp.gate_proj.weight", (f, h), 0, i),
            ParamTensor(p + "mlp.up_proj.weight", (f, h), 0, i),
            ParamTensor(p + "mlp.down_proj.weight", (h, f), 1, i),
        ]
        if shape.mlp_bias:
            out += [ParamTensor(p + "mlp.gate_proj.bias", (f,), 0, i), ParamTensor(p + "mlp.up_proj.bias", (f,), 0, i),
                    ParamTensor(p + "mlp.down_proj.bias", (h,), None, i)]
    out.append(ParamTensor("model.norm.weight", (h,), None, None))
    if not shape.tied:
        out.append(ParamTensor("lm_head.weight", (shape.vocab, h), 0, None, vocab=True))
    return out


def count_params(config: dict | ModelShape) -> int:
    """Total parameters (HF count: tied embeddings counted once, vocab unpadded)."""
    shape = config if isinstance(config, ModelShape) else ModelShape.from_hf(config)
    return sum(p.numel for p in param_inventory(shape))


def padded_vocab(vocab: int, tp: int, multiple: int = 128) -> int:
    """Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by (128) * TP."""
    m = multiple * tp
    return -(-vocab // m) * m


# ----------------------------------------------------------------------------------------- layout
@dataclass
class Layout:
    """Parallel layout and run shape of the trainer, plus the rollout engine beside it."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    micro_batch: int = 1
    """sequences per micro-batch"""
    global_batch: int = 8
    """sequences per optimizer step (sets the number of micro-batches: global / (micro * dp))"""
    seq_len: int = 4096
    """tokens per sequence (prompt + response, padded or packed): the micro-batch length memory is planned for"""
    mean_seq_len: float = 0.0
    """tokens per sequence actually computed (packed, no padding); sets the step's tokens and FLOPs
    (attention at this length). 0 = seq_len"""
    logprob_passes: int = 0
    """forward-only passes over the step's tokens besides training (RL: old-policy and reference log-probs)"""
    recompute: Literal["none", "selective", "full"] = "selective"
    sequence_parallel: bool = True
    """only takes effect with tp > 1 (Megatron requires it off with tp == 1)"""
    distributed_optimizer: bool = True
    """shard Adam states over DP x CP (Megatron's distributed optimizer)"""
    param_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    grad_dtype: Literal["bf16", "fp32"] = "fp32"
    attention: Literal["flash", "unfused"] = "flash"
    """flash (TE / SDPA kernels, O(s) saved per head) or unfused (baddbmm + softmax, s x s saved)"""
    nodes: int | None = None
    """training nodes; when set, tp * pp * dp * cp must equal nodes * gpus_per_node"""
    gpus_per_node: int = 8
    rollout: Literal["none", "colocated", "disaggregated"] = "none"
    rollout_tp: int = 1
    rollout_mem_fraction: float = 0.0
    """share of each rollout GPU SGLang takes for weights + KV pool (its mem_fraction_static)"""
    rollout_offload: bool = True
    """colocated: engine and trainer release GPU memory in turn, so the peak is the max, not the sum"""
    rollout_nodes: int = 0
    """disaggregated: nodes running rollout engines"""

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def num_micro_batches(self) -> int:
        return max(1, self.global_batch // (self.micro_batch * self.dp))


@dataclass
class Hardware:
    name: str = "H100-SXM-80GB"
    memory_gib: float = 79.2
    """usable device memory as torch reports it (an "80 GB" H100 shows ~79.2 GiB)"""
    reserved_gib: float = 3.0
    """CUDA context, NCCL buffers and allocator fragmentation, kept free by the planner"""
    peak_tflops: float = 989.0
    """dense bf16 peak per GPU (H100 SXM: 989 TFLOP/s)"""
    mfu: float = 0.35
    """assumed model FLOPs utilisation for the step-time estimate"""


H100 = Hardware()


# ----------------------------------------------------------------------------------------- results
@dataclass
class StageMemory:
    stage: int
    layers: int
    params: int  # parameters held by one GPU of this stage
    weights: float  # bytes
    grads: float
    optimizer: float
    activations: float
    rollout_weights: float = 0.0
    rollout_kv: float = 0.0
    train_total: float = 0.0
    peak: float = 0.0


@dataclass
class Plan:
    model: str
    layout: Layout
    hardware: Hardware
    total_params: int
    stages: list[StageMemory]
    flops_per_step: float  # model FLOPs (6NT + attention)
    hw_flops_per_step: float  # incl. recompute
    tokens_per_step: int
    step_time_s: float
    rollout: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.reasons

    @property
    def tokens_per_s_per_gpu(self) -> float | None:
        """predicted: step tokens / step time / GPUs (the trainer's compute at the assumed MFU only)"""
        return self.tokens_per_step / self.step_time_s / self.layout.world if self.step_time_s > 0 else None

    def implied_mfu(self, tokens_per_s_per_gpu: float) -> float:
        """The MFU a measured end-to-end throughput amounts to: tokens/s/GPU x model FLOPs per token / peak."""
        return tokens_per_s_per_gpu * self.flops_per_step / self.tokens_per_step / (self.hardware.peak_tflops * 1e12)

    @property
    def peak_stage(self) -> StageMemory | None:
        return max(self.stages, key=lambda s: s.peak) if self.stages else None

    def to_dict(self) -> dict:
        peak = self.peak_stage
        return {
            "model": self.model,
            "ok": self.ok,
            "reasons": self.reasons,
            "warnings": self.warnings,
            "layout": asdict(self.layout),
            "hardware": asdict(self.hardware),
            "total_params": self.total_params,
            "per_gpu_gib": {k: getattr(peak, k) / GiB for k in _MEM_KEYS} if peak else {},
            "peak_stage": peak.stage if peak else None,
            "stages": [{**asdict(s), **{k: getattr(s, k) / GiB for k in _MEM_KEYS}} for s in self.stages],
            "rollout": self.rollout,
            "flops_per_step": self.flops_per_step,
            "hw_flops_per_step": self.hw_flops_per_step,
            "tokens_per_step": self.tokens_per_step,
            "step_time_s": self.step_time_s,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "mfu": self.hardware.mfu,
        }

    def table(self) -> str:
        L, hw = self.layout, self.hardware
        lines = [
            f"model {self.model}: {self.total_params / 1e9:.3f} B params",
            f"layout TP{L.tp} PP{L.pp} DP{L.dp} CP{L.cp} = {L.world} GPUs, micro-batch {L.micro_batch}, "
            f"global batch {L.global_batch} x {L.seq_len} tokens, recompute {L.recompute}, "
            f"SP {'on' if L.sequence_parallel and L.tp > 1 else 'off'}, dist-opt "
            f"{'on' if L.distributed_optimizer else 'off'}, params {L.param_dtype} / grads {L.grad_dtype}, "
            f"attention {L.attention}",
        ]
        if L.rollout != "none":
            lines.append(f"rollout {L.rollout}: SGLang TP{L.rollout_tp}, mem fraction {L.rollout_mem_fraction}"
                         + (", offload between phases" if L.rollout == "colocated" and L.rollout_offload else ""))
        lines.append(f"GPU {hw.name}: {hw.memory_gib:.1f} GiB, {hw.reserved_gib:.1f} GiB kept free")
        head = f"{'stage':>5} {'layers':>6} {'params':>9} " + " ".join(f"{c:>10}" for c in _MEM_COLS)
        lines += ["", "per-GPU memory (GiB)", head]
        for s in self.stages:
            vals = " ".join(f"{getattr(s, k) / GiB:10.2f}" for k in _MEM_KEYS)
            lines.append(f"{s.stage:>5} {s.layers:>6} {s.params / 1e9:8.3f}B {vals}")
        if self.rollout:
            r = self.rollout
            lines += ["", f"rollout engine per GPU: weights {r['weights_gib']:.2f} GiB, KV pool {r['kv_pool_gib']:.2f} GiB"
                      f" = {r['kv_tokens']:,} tokens ({r['kv_bytes_per_token']:,} B/token"
                      + (f", GDN state {r['gdn_state_bytes_per_seq'] / 2**20:.1f} MiB/seq" if r["gdn_state_bytes_per_seq"] else "")
                      + f"); ~{r['max_seqs']:,} sequences of {L.seq_len} tokens"]
        lines += [
            "",
            f"step: {self.tokens_per_step:,} tokens, {_si(self.flops_per_step)}FLOP model "
            f"({_si(self.hw_flops_per_step)}FLOP incl. recompute), "
            f"~{self.step_time_s:.3g} s at MFU {hw.mfu:.0%} of {hw.peak_tflops:g} TFLOP/s",
        ]
        if self.tokens_per_s_per_gpu:
            passes = f" + {L.logprob_passes} log-prob pass(es)" if L.logprob_passes else ""
            lines.append(f"throughput: {self.tokens_per_s_per_gpu:,.0f} tokens/s/GPU (training{passes} only: "
                         "no generation, weight sync, data or reward time)")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        if self.reasons:
            lines.append("REFUSED:")
            lines += [f"  - {r}" for r in self.reasons]
        else:
            lines.append("OK: fits")
        return "\n".join(lines)


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} "


_MEM_KEYS = ["weights", "grads", "optimizer", "activations", "rollout_weights", "rollout_kv", "train_total", "peak"]
_MEM_COLS = ["weights", "grads", "optim", "activ", "roll_w", "roll_kv", "train", "peak"]


# ----------------------------------------------------------------------------------------- checks
def check_layout(shape: ModelShape, L: Layout) -> tuple[list[str], list[str]]:
    """(reasons the layout cannot work, warnings) -- divisibility and consistency only, no memory."""
    reasons: list[str] = []
    warns: list[str] = []
    for name, v in [("tp", L.tp), ("pp", L.pp), ("dp", L.dp), ("cp", L.cp), ("micro_batch", L.micro_batch),
                    ("global_batch", L.global_batch), ("seq_len", L.seq_len), ("gpus_per_node", L.gpus_per_node)]:
        if v < 1:
            reasons.append(f"{name}={v} must be >= 1")
    if L.logprob_passes < 0:
        reasons.append(f"logprob_passes={L.logprob_passes} must be >= 0")
    if not 0.0 <= L.mean_seq_len <= L.seq_len:
        reasons.append(f"mean_seq_len={L.mean_seq_len} must be in [0, seq_len={L.seq_len}] (0 = seq_len)")
    if reasons:
        return reasons, warns
    t = L.tp
    if shape.heads % t:
        reasons.append(f"attention heads {shape.heads} not divisible by TP {t}")
    if shape.kv_heads % t and t % shape.kv_heads:  # fewer groups than TP ranks: each group shared by t/groups ranks
        reasons.append(f"KV groups {shape.kv_heads} and TP {t}: neither divides the other (megatron-core splits "
                       "query groups over TP, or shares each group among TP / groups ranks)")
    if shape.ffn % t:
        reasons.append(f"ffn size {shape.ffn} not divisible by TP {t}")
    if shape.n_gdn:
        if shape.gdn_k_heads % t:
            reasons.append(f"GDN key heads {shape.gdn_k_heads} not divisible by TP {t}")
        if shape.gdn_v_heads % t:
            reasons.append(f"GDN value heads {shape.gdn_v_heads} not divisible by TP {t}")
    if shape.layers % L.pp:
        reasons.append(f"layers {shape.layers} not divisible by PP {L.pp}")
    if L.nodes is not None and L.world != L.nodes * L.gpus_per_node:
        reasons.append(f"world size mismatch: TP{L.tp} x PP{L.pp} x DP{L.dp} x CP{L.cp} = {L.world} GPUs, "
                       f"but {L.nodes} nodes x {L.gpus_per_node} GPUs = {L.nodes * L.gpus_per_node}")
    if L.global_batch % (L.micro_batch * L.dp):
        reasons.append(f"global batch {L.global_batch} not divisible by micro batch {L.micro_batch} x DP {L.dp}")
    if L.cp > 1:
        if L.seq_len % (2 * L.cp):
            reasons.append(f"sequence length {L.seq_len} not divisible by 2 x CP = {2 * L.cp} (load-balanced CP)")
        if L.attention != "flash":
            reasons.append("context parallelism needs flash attention (TE), not the unfused path")
    if t > L.gpus_per_node:
        warns.append(f"TP {t} spans nodes ({L.gpus_per_node} GPUs per node): TP traffic over the network is slow")
    if L.rollout != "none":
        rt = L.rollout_tp
        if rt < 1:
            reasons.append(f"rollout_tp={rt} must be >= 1")
            return reasons, warns
        if shape.heads % rt:
            reasons.append(f"rollout TP {rt}: attention heads {shape.heads} not divisible")
        if shape.kv_heads % rt and rt % shape.kv_heads:
            reasons.append(f"rollout TP {rt}: KV heads {shape.kv_heads} neither divisible by it nor dividing it")
        if shape.n_gdn and (shape.gdn_k_heads % rt or shape.gdn_v_heads % rt):
            reasons.append(f"rollout TP {rt}: GDN heads {shape.gdn_k_heads}/{shape.gdn_v_heads} not divisible")
        if rt > L.gpus_per_node:
            reasons.append(f"rollout TP {rt} larger than a node ({L.gpus_per_node} GPUs)")
        if not 0.0 < L.rollout_mem_fraction < 1.0:
            reasons.append(f"rollout_mem_fraction {L.rollout_mem_fraction} must be in (0, 1)")
        if L.rollout == "colocated" and L.world % rt:
            reasons.append(f"colocated rollout TP {rt} does not divide the {L.world} training GPUs")
        if L.rollout == "disaggregated" and L.rollout_nodes < 1:
            reasons.append("disaggregated rollout needs rollout_nodes >= 1")
    return reasons, warns


# ----------------------------------------------------------------------------------------- memory
def stage_layers(shape: ModelShape, pp: int) -> list[list[int]]:
    per = shape.layers // pp
    return [list(range(k * per, (k + 1) * per)) for k in range(pp)]


def stage_params(shape: ModelShape, L: Layout, layers: list[int], first: bool, last: bool) -> int:
    """Parameters held by one GPU of the stage (TP-sharded, vocab padded as in Megatron)."""
    keep = set(layers)
    vpad = padded_vocab(shape.vocab, L.tp)
    n = 0
    for p in param_inventory(shape):
        if p.layer is not None:
            if p.layer not in keep:
                continue
        elif p.name == "model.embed_tokens.weight":
            # stage 0 holds the embedding; with tied weights and PP > 1 the last stage holds a copy
            if not (first or (last and shape.tied and L.pp > 1)):
                continue
        elif not last:  # final norm, lm_head
            continue
        numel = p.numel
        if p.vocab:
            numel = vpad * shape.hidden
        n += numel // L.tp if p.tp_dim is not None else numel
    return n


def layer_activation_bytes(shape: ModelShape, kind: str, L: Layout, tokens: int) -> float:
    """Bytes one layer saves for backward for `tokens` tokens on one GPU (no recompute).

    Per-token element counts (divide by TP where the tensor is TP-split; the h-wide ones only with SP):
      attention: 2h [norm in, qkv in] + (a + 2g)d [q, k after rope, v] + (a + g)d [q, k before qk-norm]
                 + 2ad [gate, gated output] (Qwen3.5) + ad [attention output] + fp32 LSE a (flash)
                 or fp32 + e probabilities a * s (unfused)
      mlp:       2h [norm in, fc1 in] + 3f [fc1 out (gate, up), fc2 in]
      gdn:       2h + 3 conv_dim [conv in, pre-SiLU, post-SiLU q/k/v] + nv dv [z] + 2 nv dv [kernel out,
                 gated-norm out] + nv C [chunk matrices] + fp32 2 nv [g, beta]
    """
    e = DTYPE_BYTES[L.param_dtype]
    t = L.tp
    hs = shape.hidden / t if (L.sequence_parallel and t > 1) else shape.hidden
    a, g, d = shape.heads, shape.kv_heads, shape.head_dim
    mlp = 2 * hs + 3 * shape.ffn / t
    if kind == "full_attention":
        el = 2 * hs + (a + 2 * g) * d / t + a * d / t
        if shape.qk_norm:
            el += (a + g) * d / t
        if shape.attn_gate:
            el += 2 * a * d / t
        per_token = (el + mlp) * e
        if L.attention == "flash":
            per_token += 4 * a / t
        elif L.recompute == "none":  # selective / full recompute drop the s x s probabilities
            per_token += (a / t) * L.seq_len * (4 + (e if e != 4 else 0))
        return per_token * tokens
    nv, dv = shape.gdn_v_heads, shape.gdn_v_dim
    el = 2 * hs + 3 * shape.gdn_conv_dim / t + 3 * nv * dv / t + nv * GDN_CHUNK / t
    return ((el + mlp) * e + 2 * 4 * nv / t) * tokens


def stage_activation_bytes(shape: ModelShape, L: Layout, stage: int, layers: list[int], last: bool) -> float:
    tokens = L.micro_batch * L.seq_len // L.cp
    in_flight = min(L.pp - stage, L.num_micro_batches)
    e = DTYPE_BYTES[L.param_dtype]
    hs = shape.hidden / L.tp if (L.sequence_parallel and L.tp > 1) else shape.hidden
    per_layer = [layer_activation_bytes(shape, shape.layer_types[i], L, tokens) for i in layers]
    if L.recompute == "full":
        # each layer keeps its input; backward recomputes one layer at a time (its working set)
        act = in_flight * len(layers) * hs * e * tokens + (max(per_layer) if per_layer else 0.0)
    else:
        act = in_flight * sum(per_layer)
    if last:
        # loss head: final-norm in/out + fp32 log-softmax of the vocab-parallel logits, one micro-batch
        act += tokens * (2 * hs * e + padded_vocab(shape.vocab, L.tp) / L.tp * 4)
    return act


# ----------------------------------------------------------------------------------------- flops
def matmul_params(shape: ModelShape) -> int:
    """Parameters used in matmuls per token: all 2-D weights except the embedding lookup, plus the
    output layer (counted even when tied: the logits matmul is done either way)."""
    n = sum(p.numel for p in param_inventory(shape) if len(p.shape) == 2 and p.name != "model.embed_tokens.weight")
    if shape.tied:
        n += shape.vocab * shape.hidden
    return n


def forward_flops_per_token(shape: ModelShape, seq_len: int) -> tuple[float, float]:
    """(matmul FLOPs, attention/recurrence FLOPs) of one forward pass per token."""
    dense = 2.0 * matmul_params(shape)
    # causal attention: QK^T and PV over s/2 keys on average: 2 * 2 * (s/2) * d per head
    attn = shape.n_full * 2.0 * shape.heads * shape.head_dim * seq_len
    if shape.n_gdn:
        nv, dk, dv = shape.gdn_v_heads, shape.gdn_k_dim, shape.gdn_v_dim
        per_layer = nv * (6 * dk * dv + 2 * GDN_CHUNK * (dk + dv)) + 2 * shape.gdn_conv_kernel * shape.gdn_conv_dim
        attn += shape.n_gdn * per_layer
    return dense, attn


def step_flops(shape: ModelShape, L: Layout) -> tuple[int, float, float]:
    """(tokens, model FLOPs, hardware FLOPs) of one step: training = 3 forwards (fwd + 2x bwd) plus
    `logprob_passes` forwards; recompute re-runs the training forward (full) or its attention (selective)."""
    mean_len = L.mean_seq_len or L.seq_len
    tokens = round(L.global_batch * mean_len)
    dense, attn = forward_flops_per_token(shape, mean_len)
    fwd = (dense + attn) * tokens
    model = (3 + L.logprob_passes) * fwd
    extra = {"full": fwd, "selective": attn * tokens}.get(L.recompute, 0.0)
    return tokens, model, model + extra


# ----------------------------------------------------------------------------------------- plan
def rollout_memory(shape: ModelShape, L: Layout, hw: Hardware) -> dict:
    rt = L.rollout_tp
    total = count_params(shape)
    weights = total * 2 / rt  # bf16, vocab-parallel embedding / lm_head too
    share = L.rollout_mem_fraction * hw.memory_gib * GiB
    pool = max(0.0, share - weights)
    kv_heads_per_gpu = max(shape.kv_heads // rt, 1)  # replicated when rollout TP > KV heads
    kv_per_token = shape.n_full * 2 * kv_heads_per_gpu * shape.head_dim * 2
    gdn_state = 0
    if shape.n_gdn:
        gdn_state = shape.n_gdn * (shape.gdn_v_heads // rt * shape.gdn_k_dim * shape.gdn_v_dim * 4
                                   + shape.gdn_conv_dim // rt * (shape.gdn_conv_kernel - 1) * 2)
    per_seq = kv_per_token * L.seq_len + gdn_state
    return {
        "weights_gib": weights / GiB,
        "share_gib": share / GiB,
        "kv_pool_gib": pool / GiB,
        "kv_bytes_per_token": kv_per_token,
        "gdn_state_bytes_per_seq": gdn_state,
        "kv_tokens": int(pool // kv_per_token) if kv_per_token else 0,
        "max_seqs": int(pool // per_seq) if per_seq else 0,
        "_weights": weights,
        "_share": share,
    }


def plan(config: dict, layout: Layout, hardware: Hardware | None = None, name: str = "") -> Plan:
    hw = hardware or H100
    shape = ModelShape.from_hf(config)
    L = layout
    reasons, warns = check_layout(shape, L)
    total = count_params(shape)
    model_name = name or config.get("architectures", [shape.family])[0]
    tokens_step, model_flops, hw_flops = step_flops(shape, L)
    step_time = model_flops / (L.world * hw.peak_tflops * 1e12 * hw.mfu) if L.world > 0 else 0.0
    p = Plan(model=model_name, layout=L, hardware=hw, total_params=total, stages=[], flops_per_step=model_flops,
             hw_flops_per_step=hw_flops, tokens_per_step=tokens_step, step_time_s=step_time,
             reasons=reasons, warnings=warns)
    if reasons and any("must be >= 1" in r for r in reasons):
        return p
    if shape.layers % L.pp:  # cannot assign layers to stages; memory is meaningless
        return p

    roll = rollout_memory(shape, L, hw) if L.rollout != "none" else {}
    if roll and roll["_weights"] >= roll["_share"]:
        reasons.append(f"rollout engine weights {roll['weights_gib']:.1f} GiB do not fit its share "
                       f"{roll['share_gib']:.1f} GiB (raise rollout_mem_fraction or rollout TP)")
    capacity = (hw.memory_gib - hw.reserved_gib) * GiB
    pbytes, gbytes = DTYPE_BYTES[L.param_dtype], DTYPE_BYTES[L.grad_dtype]
    opt_bytes = (0 if L.param_dtype == "fp32" else 4) + 8
    shard = L.dp * L.cp if L.distributed_optimizer else 1
    for k, layers in enumerate(stage_layers(shape, L.pp)):
        first, last = k == 0, k == L.pp - 1
        n = stage_params(shape, L, layers, first, last)
        s = StageMemory(stage=k, layers=len(layers), params=n, weights=n * pbytes, grads=n * gbytes,
                        optimizer=n * opt_bytes / shard,
                        activations=stage_activation_bytes(shape, L, k, layers, last))
        s.train_total = s.weights + s.grads + s.optimizer + s.activations
        s.peak = s.train_total
        if L.rollout == "colocated":
            s.rollout_weights = roll["_weights"]
            s.rollout_kv = roll["_share"] - roll["_weights"]
            share = roll["_share"]
            s.peak = max(s.train_total, share) if L.rollout_offload else s.train_total + share
        p.stages.append(s)
    worst = max(p.stages, key=lambda s: s.peak)
    if worst.peak > capacity:
        reasons.append(f"memory: stage {worst.stage} needs {worst.peak / GiB:.1f} GiB per GPU, above the "
                       f"{capacity / GiB:.1f} GiB usable on {hw.name} ({hw.memory_gib:.1f} - {hw.reserved_gib:.1f} "
                       "reserved); try more TP/PP, full recompute, a smaller micro batch or rollout share")
    if L.rollout == "disaggregated" and roll:
        if roll["_share"] > capacity:
            reasons.append(f"rollout GPUs: share {roll['share_gib']:.1f} GiB above {capacity / GiB:.1f} GiB usable")
    p.rollout = {k: v for k, v in roll.items() if not k.startswith("_")}
    return p


def check_or_raise(config: dict, layout: Layout, hardware: Hardware | None = None, name: str = "") -> Plan:
    """plan() that raises LayoutError when the layout is refused."""
    p = plan(config, layout, hardware, name)
    if not p.ok:
        raise LayoutError(p.reasons)
    return p


# ----------------------------------------------------------------------------------------- CLI
def _load_config(args) -> tuple[dict, str]:
    if args.hf_config:  # the config.json or the model directory holding it
        from erpd_megatron.model_shapes import load_hf_config

        return load_hf_config(args.hf_config), args.hf_config
    from erpd_megatron.model_shapes import get_model_config

    return get_model_config(args.model), args.model


def build_parser() -> argparse.ArgumentParser:
    from erpd_megatron.utils.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="erpd plan", description="per-GPU memory, FLOPs and step time of a layout",
                                 formatter_class=HelpFormatter,
                                 epilog="examples:\n  erpd plan --model qwen3-4b --tp 2 --dp 4 --seq-len 16384\n"
                                        "  erpd plan --hf-config /path/config.json --nodes 4 --pp 2 --json\n"
                                        "a launcher recipe's layout: python -m launchers plan RECIPE")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default="qwen3-4b", help="embedded model name (erpd_megatron/model_shapes.py)")
    src.add_argument("--hf-config", help="an HF config.json or the model directory holding it (instead of --model)")
    src.add_argument("--recipe", help=argparse.SUPPRESS)  # moved to the launchers: say so in one line
    d = Layout()
    for f, what in [("tp", "tensor-parallel size"), ("pp", "pipeline-parallel size"), ("dp", "data-parallel size"),
                    ("cp", "context-parallel size"), ("micro_batch", "sequences per micro-batch"),
                    ("global_batch", "sequences per optimizer step"), ("seq_len", "tokens per sequence"),
                    ("gpus_per_node", "GPUs per node"), ("rollout_tp", "SGLang tensor-parallel size"),
                    ("rollout_nodes", "nodes of the disaggregated SGLang servers")]:
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None, help=f"{what} (default: {getattr(d, f)})")
    ap.add_argument("--mean-seq-len", type=float, default=None, help="tokens per sequence actually computed "
                    "(packed); sets the step's tokens and FLOPs (default: --seq-len)")
    ap.add_argument("--logprob-passes", type=int, default=None, help="forward-only passes over the step's "
                    "tokens besides training, e.g. 2 = old-policy + reference log-probs (default: 0)")
    ap.add_argument("--measured", type=float, metavar="TOKENS_PER_S_PER_GPU", help="a measured throughput to put "
                    "beside the prediction: prints the MFU it amounts to and measured / predicted")
    ap.add_argument("--nodes", type=int, default=None, help="training nodes (checks the world size; sets DP if "
                    "--dp is not given)")
    ap.add_argument("--recompute", choices=["none", "selective", "full"],
                    help=f"activation recomputation (default: {d.recompute})")
    ap.add_argument("--attention", choices=["flash", "unfused"], help=f"attention kernel (default: {d.attention})")
    ap.add_argument("--param-dtype", choices=list(DTYPE_BYTES), help=f"weights (default: {d.param_dtype})")
    ap.add_argument("--grad-dtype", choices=["bf16", "fp32"], help=f"gradient buffers (default: {d.grad_dtype})")
    ap.add_argument("--no-sequence-parallel", action="store_true", help="turn Megatron sequence parallelism off")
    ap.add_argument("--no-distributed-optimizer", action="store_true", help="replicate optimizer state over DP")
    ap.add_argument("--rollout", choices=["none", "colocated", "disaggregated"],
                    help=f"where the SGLang engine runs (default: {d.rollout})")
    ap.add_argument("--rollout-mem-fraction", type=float,
                    help=f"GPU memory share of a colocated engine (default: {d.rollout_mem_fraction})")
    ap.add_argument("--no-rollout-offload", action="store_true", help="keep the colocated engine resident")
    ap.add_argument("--mfu", type=float, default=H100.mfu, help="model FLOPs utilisation assumed for step time")
    ap.add_argument("--peak-tflops", type=float, default=H100.peak_tflops, help="dense bf16 peak per GPU")
    ap.add_argument("--gpu-mem-gib", type=float, default=H100.memory_gib, help="memory per GPU")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    return ap


def main(argv: list[str] | None = None) -> int:
    """`erpd plan ...`: prints the table (or JSON); exit code 0 = fits, 2 = refused or a bad argument."""
    args = build_parser().parse_args(argv)
    try:
        if args.recipe:
            raise ValueError(f"recipes are planned by the launchers: python -m launchers plan {args.recipe}")
        cfg, name = _load_config(args)
    except (KeyError, ValueError, OSError) as e:  # unknown model, unreadable / malformed config: one line
        print(f"erpd plan: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    L = Layout()
    for f in ["tp", "pp", "dp", "cp", "micro_batch", "global_batch", "seq_len", "gpus_per_node", "rollout_tp",
              "rollout_nodes", "nodes", "mean_seq_len", "logprob_passes", "recompute", "attention", "param_dtype", "grad_dtype", "rollout",
              "rollout_mem_fraction"]:
        v = getattr(args, f)
        if v is not None:
            setattr(L, f, v)
    if args.nodes is not None and args.dp is None:
        L.dp = max(1, args.nodes * L.gpus_per_node // (L.tp * L.pp * L.cp))
    if args.no_sequence_parallel:
        L.sequence_parallel = False
    if args.no_distributed_optimizer:
        L.distributed_optimizer = False
    if args.no_rollout_offload:
        L.rollout_offload = False
    hw = Hardware(mfu=args.mfu, peak_tflops=args.peak_tflops, memory_gib=args.gpu_mem_gib)
    p = plan(cfg, L, hw, name=name)
    out = p.to_dict()
    if args.measured is not None and p.tokens_per_s_per_gpu:
        out["measured"] = {"tokens_per_s_per_gpu": args.measured, "implied_mfu": p.implied_mfu(args.measured),
                           "measured_over_predicted": args.measured / p.tokens_per_s_per_gpu}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(p.table())
        if "measured" in out:
            m = out["measured"]
            print(f"measured: {args.measured:,.0f} tokens/s/GPU = MFU {m['implied_mfu']:.1%} (model FLOPs of the "
                  f"step above), {m['measured_over_predicted']:.2f} x the prediction")
    return 0 if p.ok else 2


if __name__ == "__main__":
    sys.exit(main())
