"""RMSNorms of Qwen3.5 that megatron-core's torch norms do not provide.

`ZeroCenteredRMSNorm`: y = x / rms(x) * (1 + w), computed in fp32 and cast back (HF Qwen3_5RMSNorm). The
stored weight is the HF weight as is (initialised to 0). Used for input / pre-MLP / q / k / final norms.
Megatron's WrappedTorchNorm refuses `layernorm_zero_centered_gamma`, so this is the CPU-portable one.
The GDN output norm (HF `linear_attn.norm`) is NOT zero-centred: see gdn.GatedRMSNorm.
"""

from __future__ import annotations

import torch


class ZeroCenteredRMSNorm(torch.nn.Module):
    """Megatron norm signature: (config, hidden_size, eps)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__()
        self.eps = eps
        dtype = getattr(config, "params_dtype", torch.float32)
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        # Megatron all-reduces grads of params flagged sequence_parallel across the TP group.
        self.weight.sequence_parallel = bool(getattr(config, "sequence_parallel", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)
