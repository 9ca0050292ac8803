"""CPU linear layers on oneDNN's GEMM (a spec swap for the local spec; megatron-core unpatched).

On CPU, torch runs fp32 `F.linear` / `mm` on MKL's sgemm. On the AMD EPYC machines of this project MKL takes
a generic code path, while oneDNN (shipped inside torch, `torch.ops.mkldnn._linear_pointwise`) JIT-compiles
AVX-512 kernels: measured at the demo and bench shapes (1 thread, fp32), forward and input-gradient GEMMs run
1.4-2.5x faster on oneDNN; the weight-gradient GEMM (x^T dy, a long reduction) is not faster there in
general, so it stays on torch's `mm` (docs/benchmarks.md, issue 15).

`linear(x, w, b)` = x @ w^T + b: oneDNN for the forward and for dx = dy @ w, torch for dw = dy^T x and db, when
oneDNN applies (CPU, fp32, torch built with mkldnn, `ERPD_CPU_ONEDNN` not 0); plain `F.linear` otherwise
(GPU, fp64 tests, bf16). The results equal `F.linear`'s up to fp32 rounding (a different summation order:
~1e-6 relative), not bit for bit.

`CPUColumnParallelLinear` / `CPURowParallelLinear` are megatron's linear layers whose forward calls
`linear` when the layer is just x @ W^T here (one TP rank, no sequence parallelism, no fused gradient
accumulation, not an expert layer); anything else goes through megatron's own forward. Parameters,
names and checkpoints are unchanged (same classes underneath). Gradients reach `param.grad` through autograd,
which megatron's DDP hook adds into its `main_grad` buffer, as for any parameter on CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


def onednn_enabled() -> bool:
    return os.environ.get("ERPD_CPU_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and onednn_enabled()


def _onednn_linear(x, w, b=None):
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _onednn_linear(x, w, b)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _onednn_linear(gy, w.t().contiguous())  # dy @ w as a linear with weight w^T ([in, out], small)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            gy2 = gy.reshape(-1, gy.shape[-1])
            if ctx.needs_input_grad[1]:
                gw = gy2.t().mm(x.reshape(-1, x.shape[-1]))
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = gy2.sum(0)
        return gx, gw, gb


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T (+ b): oneDNN GEMMs on CPU fp32 (see the module docstring), `F.linear` otherwise."""
    if _onednn_ok(x, w):
        return _OneDNNLinear.apply(x, w, b)
    return F.linear(x, w, b)


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
    """megatron's ColumnParallelLinear; `linear` on its plain path (module docstring)."""

    def forward(self, input_, weight=None, runtime_gather_output=None, **kwargs):
        w = self.weight if weight is None else weight
        if kwargs or w is None or not _onednn_ok(input_, w) or not plain_local_linear(self):
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs)
        if self.skip_bias_add:
            return linear(input_, w), self.bias
        return linear(input_, w, self.bias), None


class CPURowParallelLinear(RowParallelLinear):
    """megatron's RowParallelLinear; `linear` on its plain path (module docstring)."""

    def forward(self, input_, **kwargs):
        if kwargs or not _onednn_ok(input_, self.weight) or not plain_local_linear(self):
            return super().forward(input_, **kwargs)
        if self.skip_bias_add:
            return linear(input_, self.weight), self.bias
        return linear(input_, self.weight, self.bias), None


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
    sub = getattr(mlp, "keywords", {}).get("submodules") if hasattr(mlp, "keywords") else getattr(mlp, "submodules",
                                                                                                  None)
    if sub is not None:
        if getattr(sub, "linear_fc1", None) is ColumnParallelLinear:
            sub.linear_fc1 = CPUColumnParallelLinear
        if getattr(sub, "linear_fc2", None) is RowParallelLinear:
            sub.linear_fc2 = CPURowParallelLinear
    return layer_spec
