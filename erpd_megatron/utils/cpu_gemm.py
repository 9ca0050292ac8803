"""x @ w^T on oneDNN's GEMM on CPU (fp32), with autograd: `linear(x, w, b)`.

On CPU, torch runs fp32 `F.linear` / `mm` on MKL's sgemm. On the AMD EPYC machines of this project MKL takes
a generic code path, while oneDNN (shipped inside torch, `torch.ops.mkldnn._linear_pointwise`) JIT-compiles
AVX-512 kernels: measured at the demo and bench shapes (1 thread, fp32), forward and input-gradient GEMMs run
1.4-2.5x faster on oneDNN; the weight-gradient GEMM (x^T dy, a long reduction) is not faster there in
general, so it stays on torch's `mm` (docs/benchmarks.md, issue 15).

`linear(x, w, b)` = x @ w^T + b: oneDNN for the forward and for dx = dy @ w, torch for dw = dy^T x and db, when
oneDNN applies (CPU, fp32, torch built with mkldnn, `ERPD_CPU_ONEDNN` not 0); plain `F.linear` otherwise
(GPU, fp64 tests, bf16). The results equal `F.linear`'s up to fp32 rounding (a different summation order:
~1e-6 relative), not bit for bit.

Users: the Megatron backend's linear layers (`megatron/cpu_linear.py`) and the CPU rollout engine's
transformers model (`use_onednn_linears`, inference only). No megatron import here.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def onednn_enabled() -> bool:
    return os.environ.get("ERPD_CPU_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
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


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T (+ b) on oneDNN, with autograd; the caller has checked `onednn_applies(x, w)`."""
    return _OneDNNLinear.apply(x, w, b)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T (+ b): oneDNN GEMMs on CPU fp32 (see the module docstring), `F.linear` otherwise."""
    if onednn_applies(x, w):
        return onednn_linear(x, w, b)
    return F.linear(x, w, b)


def use_onednn_linears(model: torch.nn.Module) -> int:
    """Route every `torch.nn.Linear` of `model` through `linear` (per instance; the class is untouched).
    Returns how many were routed. Used for the CPU rollout engine's transformers model."""
    n = 0
    for mod in model.modules():
        if type(mod) is torch.nn.Linear and not getattr(mod, "_erpd_onednn", False):
            mod.forward = _linear_forward.__get__(mod)
            mod._erpd_onednn = True
            n += 1
    return n


def _linear_forward(self, x):
    return linear(x, self.weight, self.bias)
