"""Gated DeltaNet token mixer of Qwen3.5 as a tensor-parallel megatron-core module (portable torch).

Parameters (names under `decoder.layers.{i}.self_attention.`), shapes per TP rank (tp = TP size):
  in_proj.weight   [(2*Kd + 2*Vd + 2*Hv)/tp, hidden]  rows per rank: [Q_r, K_r, V_r, Z_r, B_r, A_r]
                   (Kd = key heads * key dim, Vd = value heads * value dim, Hv = value heads), the
                   Megatron-Bridge / megatron-core GatedDeltaNet layout; a rank holds whole key heads and
                   the value heads that belong to them.
  conv1d.weight    [(2*Kd + Vd)/tp, 1, kernel]         rows per rank: [Q_r, K_r, V_r]; causal depthwise
  A_log, dt_bias   [Hv/tp]
  out_norm.weight  [value dim]   plain-weight gated RMSNorm (HF `linear_attn.norm`, NOT zero-centred;
                   Megatron-Bridge stores HF-1 for its zero-centred TE norm, we keep HF values: bit-exact)
  out_proj.weight  [hidden, Vd/tp]                    row parallel
Differences from megatron-core's own GatedDeltaNet (which needs fla even to construct): same names and
TP layout, portable chunked kernel on CPU, no context parallel / packed sequences / inference cache.
The dist-checkpoint splits in_proj and conv1d into their sections, so checkpoints are TP-independent
(same keys as megatron-core: `in_proj.weight.query|key|value|z|beta|alpha`, `conv1d.weight.query|key|value`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from .gated_delta_rule import gated_delta_rule


class GatedRMSNorm(torch.nn.Module):
    """y = w * rmsnorm(x) * silu(gate), as HF Qwen3_5RMSNormGated (weight multiplies in the input dtype)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor, gate: torch.Tensor, tp_group=None) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight
        if tp_group is not None and tp_group.size() > 1:
            # The weight is replicated but each TP rank applies it to its own value heads only: its gradient
            # is the SUM of the ranks' partial gradients (identity forward, all-reduce backward), so the
            # replicas stay equal after every step (megatron only does this for q/k layernorms, by name).
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

            w = copy_to_tensor_model_parallel_region(w, group=tp_group)
        y = w * y.to(dtype)
        return (y * F.silu(gate.float())).to(dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # same formula as transformers' torch fallback (fla divides by sqrt(sum + eps): equal to ~1e-7)
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class GatedDeltaNet(MegatronModule):
    """Built by TransformerLayer as `self_attention`; returns (output, bias) like megatron attention."""

    def __init__(
        self,
        config,
        layer_number: int | None = None,
        num_key_heads: int = 16,
        num_value_heads: int = 48,
        key_head_dim: int = 128,
        value_head_dim: int = 128,
        conv_kernel: int = 4,
        eps: float = 1e-6,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config)
        from megatron.core.process_groups_config import ProcessGroupCollection

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.pg_collection = pg_collection
        tp = pg_collection.tp.size()
        if num_key_heads % tp or num_value_heads % tp or num_value_heads % num_key_heads:
            raise ValueError(
                f"GatedDeltaNet: TP={tp} must divide linear_num_key_heads={num_key_heads} and "
                f"linear_num_value_heads={num_value_heads} (and key heads must divide value heads)"
            )
        self.layer_number = layer_number
        self.tp = tp
        self.hk, self.hv = num_key_heads // tp, num_value_heads // tp  # local heads
        self.dk, self.dv = key_head_dim, value_head_dim
        self.kernel = conv_kernel
        self.sections = [self.hk * self.dk, self.hk * self.dk, self.hv * self.dv, self.hv * self.dv, self.hv, self.hv]
        self.section_names = ["query", "key", "value", "z", "beta", "alpha"]
        in_dim = 2 * num_key_heads * key_head_dim + 2 * num_value_heads * value_head_dim + 2 * num_value_heads
        v_dim = num_value_heads * value_head_dim
        self.in_proj = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, in_dim, config=config, init_method=config.init_method,
            gather_output=False, bias=False, skip_bias_add=True, is_expert=False, tp_group=pg_collection.tp,
        )
        conv_local = 2 * self.hk * self.dk + self.hv * self.dv
        self.conv1d = torch.nn.Conv1d(
            conv_local, conv_local, kernel_size=conv_kernel, groups=conv_local, bias=False,
            padding=conv_kernel - 1, dtype=config.params_dtype,
        )
        self.A_log = torch.nn.Parameter(torch.empty(self.hv, dtype=config.params_dtype))
        self.dt_bias = torch.nn.Parameter(torch.ones(self.hv, dtype=config.params_dtype))
        for p in (self.conv1d.weight, self.A_log, self.dt_bias):
            p.tensor_model_parallel = True
            p.partition_dim = 0
            p.partition_stride = 1
        self.out_norm = GatedRMSNorm(value_head_dim, eps, config.params_dtype)
        self.out_proj = tensor_parallel.RowParallelLinear(
            v_dim, config.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=False, input_is_parallel=True, skip_bias_add=True, is_expert=False, tp_group=pg_collection.tp,
        )
        if config.perform_initialization:
            with torch.no_grad():
                # A in [1, 16] as megatron / HF init; the generator is the CPU/CUDA tracker's current one.
                self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
                bound = 1.0 / math.sqrt(conv_kernel)
                self.conv1d.weight.uniform_(-bound, bound)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
        # hidden_states [s, b, h] (sequence parallel gathers inside in_proj)
        proj, _ = self.in_proj(hidden_states)
        proj = proj.transpose(0, 1)  # [b, s, local]
        b, s, _ = proj.shape
        q, k, v, z, beta, alpha = torch.split(proj, self.sections, dim=-1)
        # causal depthwise conv over the [Q_r, K_r, V_r] channels, then SiLU
        qkv = torch.cat([q, k, v], dim=-1).transpose(1, 2)
        qkv = F.conv1d(qkv, self.conv1d.weight, padding=self.kernel - 1, groups=qkv.shape[1])[..., :s]
        qkv = F.silu(qkv).transpose(1, 2)
        q, k, v = torch.split(qkv, self.sections[:3], dim=-1)
        q = l2norm(q.reshape(b, s, self.hk, self.dk).float())
        k = l2norm(k.reshape(b, s, self.hk, self.dk).float())
        v = v.reshape(b, s, self.hv, self.dv)
        if self.hv != self.hk:  # value head j reads key head j // (hv / hk)
            q = q.repeat_interleave(self.hv // self.hk, dim=2)
            k = k.repeat_interleave(self.hv // self.hk, dim=2)
        g = -self.A_log.float().exp() * F.softplus(alpha.float() + self.dt_bias.float())
        o = gated_delta_rule(q.to(v.dtype), k.to(v.dtype), v, g, beta.float().sigmoid())
        o = self.out_norm(o.reshape(-1, self.dv), z.reshape(-1, self.dv), tp_group=self.pg_collection.tp)
        o = o.reshape(b, s, self.hv * self.dv).transpose(0, 1).contiguous()
        return self.out_proj(o)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None, tp_group=None):
        """TP-independent checkpoint: in_proj / conv1d split into their named sections (megatron-core keys)."""
        from megatron.core.ssm.utils import _split_tensor_factory
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
            sharded_state_dict_default,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tp_group = tp_group if tp_group is not None else self.pg_collection.tp
        own = {"A_log": self.A_log, "dt_bias": self.dt_bias, "conv1d.weight": self.conv1d.weight}
        # tp_group must be explicit: it decides which TP rank holds the main replica of replicated tensors
        sd = make_sharded_tensors_for_checkpoint(
            own, prefix, {"A_log": 0, "dt_bias": 0, "conv1d.weight": 0}, sharded_offsets,
            tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"],
        )
        for name in ("in_proj", "out_norm", "out_proj"):
            sd.update(sharded_state_dict_default(getattr(self, name), f"{prefix}{name}.", sharded_offsets, metadata,
                                                 tp_group=tp_group))
        sd[f"{prefix}in_proj.weight"] = _split_tensor_factory(
            sd[f"{prefix}in_proj.weight"], list(self.sections), self.section_names, 0
        )
        sd[f"{prefix}conv1d.weight"] = _split_tensor_factory(
            sd[f"{prefix}conv1d.weight"], list(self.sections[:3]), ["query", "key", "value"], 0
        )
        return sd
