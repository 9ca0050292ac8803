"""SwiGLU MLP for the local spec without megatron-core's extra copies (a ModuleSpec swap, core unpatched).

megatron-core's local MLP runs `linear_fc1` as one fused [gate; up] matmul, `chunk`s its output and
computes `silu(gate) * up` with autograd: the backward of `chunk` is a `cat` of the two [s, b, ffn]
gradients, i.e. one extra allocation and full copy per layer per step. `SwiGLU` computes the same
values with a hand-written backward that writes both gradient halves straight into one [s, b, 2 ffn]
buffer (out= kernels into its two views): no cat. Forward values and gradients are those of autograd
(same ops, same order), so the float64 and TP/PP parity tests hold unchanged.

`SwiGLUMLP` is megatron's `MLP` with that activation when the config is the plain case (gated silu,
no bias on fc1, no clamp / linear offset, no per-token scale, no TE activation); anything else goes
through megatron's own forward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP


class SwiGLU(torch.autograd.Function):
    """y = [gate; up] on the last dim -> silu(gate) * up, backward without a cat."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        gate, up = y.chunk(2, dim=-1)  # views, no copy
        act = F.silu(gate)
        ctx.save_for_backward(gate, up, act)  # what autograd's silu + mul would keep
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        gate, up, act = ctx.saved_tensors
        dy = grad.new_empty(*grad.shape[:-1], 2 * grad.shape[-1])
        d_gate, d_up = dy.chunk(2, dim=-1)
        torch.mul(grad, act, out=d_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        return dy


def swiglu(y: torch.Tensor) -> torch.Tensor:
    return SwiGLU.apply(y)


class SwiGLUMLP(MLP):
    """megatron MLP whose plain SwiGLU path uses `SwiGLU` (see the module docstring)."""

    def _plain_swiglu(self) -> bool:
        c = self.config
        return (c.gated_linear_unit and self.activation_func is F.silu and not c.use_te_activation_func
                and not c.bias_activation_fusion and not c.add_bias_linear
                and getattr(c, "activation_func_clamp_value", None) is None
                and not getattr(c, "glu_linear_offset", 0.0))

    def forward(self, hidden_states: torch.Tensor, per_token_scale: torch.Tensor | None = None, **kwargs):
        if per_token_scale is not None or not self._plain_swiglu():
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        intermediate, _ = self.linear_fc1(hidden_states)
        output, output_bias = self.linear_fc2(swiglu(intermediate))
        return output, output_bias


def swiglu_mlp_spec(mlp_spec):
    """The local spec's `mlp` entry with `SwiGLUMLP` in place of `MLP`, same submodules.

    megatron-core 0.19 gives it as `functools.partial(MLP.as_mlp_submodule, submodules=...)`; older
    versions as a `ModuleSpec(module=MLP, ...)`. Anything else is returned unchanged.
    """
    if isinstance(mlp_spec, functools.partial) and getattr(mlp_spec.func, "__self__", None) is MLP:
        return functools.partial(SwiGLUMLP.as_mlp_submodule, *mlp_spec.args, **mlp_spec.keywords)
    if getattr(mlp_spec, "module", None) is MLP:
        mlp_spec.module = SwiGLUMLP
    return mlp_spec
