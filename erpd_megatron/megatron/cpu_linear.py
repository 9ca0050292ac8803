"""CPU linear layers on oneDNN's GEMM (a spec swap for the local spec; megatron-core unpatched).

The GEMM itself and why it is faster on CPU: `erpd_megatron/utils/cpu_gemm.py` (`linear`).

`CPUColumnParallelLinear` / `CPURowParallelLinear` are megatron's linear layers whose forward calls
`onednn_linear` when oneDNN applies and the layer is just x @ W^T here (one TP rank, no sequence parallelism,
no fused gradient accumulation, not an expert layer); anything else goes through megatron's own forward. Parameters,
names and checkpoints are unchanged (same classes underneath). Gradients reach `param.grad` through autograd,
which megatron's DDP hook adds into its `main_grad` buffer, as for any parameter on CPU.
"""

from __future__ import annotations

import functools

import torch.distributed as dist
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from erpd_megatron.utils.cpu_gemm import onednn_applies, onednn_linear


def plain_local_linear(layer) -> bool:
    """A megatron Column/RowParallelLinear that is just ``x @ W^T (+ b)`` here: one TP rank, no sequence
    parallelism, no fused gradient accumulation (GPU: megatron's own kernel writes main_grad), no expert or
    deferred-wgrad machinery."""
    if not isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
        return False
    return (dist.get_world_size(layer.tp_group) == 1 and not layer.sequence_parallel
            and not layer.gradient_accumulation_fusion and not layer.is_expert
            and getattr(layer, "embedding_activation_buffer", None) is None
            and not getattr(layer, "delay_wgrad_compute", False))


class CPUColumnParallelLinear(ColumnParallelLinear):
    """megatron's ColumnParallelLinear; `onednn_linear` on its plain path (module docstring)."""

    def forward(self, input_, weight=None, runtime_gather_output=None, **kwargs):
        w = self.weight if weight is None else weight
        if kwargs or w is None or not onednn_applies(input_, w) or not plain_local_linear(self):
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs)
        if self.skip_bias_add:
            return onednn_linear(input_, w), self.bias
        return onednn_linear(input_, w, self.bias), None


class CPURowParallelLinear(RowParallelLinear):
    """megatron's RowParallelLinear; `onednn_linear` on its plain path (module docstring)."""

    def forward(self, input_, **kwargs):
        if kwargs or not onednn_applies(input_, self.weight) or not plain_local_linear(self):
            return super().forward(input_, **kwargs)
        if self.skip_bias_add:
            return onednn_linear(input_, self.weight), self.bias
        return onednn_linear(input_, self.weight, self.bias), None


def cpu_linear_spec(layer_spec):
    """The local layer spec with its four linear layers (QKV, attention output, MLP fc1 / fc2) swapped for the
    CPU classes, in place. megatron-core 0.19 gives the MLP as `partial(MLP.as_mlp_submodule, submodules=...)`,
    older versions as a ModuleSpec; both carry an `MLPSubmodules` with `linear_fc1` / `linear_fc2`."""
    attn = layer_spec.submodules.self_attention.submodules
    if attn.linear_qkv is ColumnParallelLinear:
        attn.linear_qkv = CPUColumnParallelLinear
    if attn.linear_proj is RowParallelLinear:
        attn.linear_proj = CPURowParallelLinear
    mlp = layer_spec.submodules.mlp
    sub = mlp.keywords.get("submodules") if isinstance(mlp, functools.partial) else getattr(mlp, "submodules", None)
    if sub is not None:
        if getattr(sub, "linear_fc1", None) is ColumnParallelLinear:
            sub.linear_fc1 = CPUColumnParallelLinear
        if getattr(sub, "linear_fc2", None) is RowParallelLinear:
            sub.linear_fc2 = CPURowParallelLinear
    return layer_spec
