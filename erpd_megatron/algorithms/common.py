"""Shared tensor helpers for the algorithm core: input validation and masked reductions.

Every public function in `erpd_megatron.algorithms` validates its inputs here so a bad batch fails
loudly with the argument's name ("logprobs contains NaN at 3 response positions") instead of
silently producing a NaN loss three layers later. Values *outside* the mask are never read: they are
replaced by 0 with `torch.where` (multiplying by the mask would turn a NaN pad into NaN * 0 = NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Validation does a few host syncs (.item()) per call; set False to skip it on hot paths.
CHECK_INPUTS = True


def as_mask(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    """Return `mask` as a {0,1} tensor of `like`'s dtype, after checking shape and values."""
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")
    if mask.dtype != torch.bool and CHECK_INPUTS:
        bad = int(((mask != 0) & (mask != 1)).sum().item())
        if bad:
            raise ValueError(f"{name} must contain only 0/1 values; {bad} positions are neither")
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return mask.to(dtype)


def check_tensor(
    name: str,
    x: Tensor,
    shape: tuple[int, ...] | torch.Size | None = None,
    mask: Tensor | None = None,
    finite: bool = True,
) -> None:
    """Raise ValueError if `x` is not a floating tensor of `shape`, or (finite=True) has NaN/inf where
    `mask` is set (everywhere when mask is None)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not (finite and CHECK_INPUTS):
        return
    where = mask.bool() if mask is not None else torch.ones_like(x, dtype=torch.bool)
    n_nan = int((torch.isnan(x) & where).sum().item())
    n_inf = int((torch.isinf(x) & where).sum().item())
    scope = "response positions" if mask is not None else "positions"
    if n_nan:
        raise ValueError(f"{name} contains NaN at {n_nan} {scope}")
    if n_inf:
        raise ValueError(f"{name} contains inf at {n_inf} {scope}")


def zero_outside(x: Tensor, mask: Tensor) -> Tensor:
    """x where mask is set, exactly 0 elsewhere (safe against NaN/inf padding)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def upcast(x: Tensor) -> Tensor:
    """Compute losses in at least float32 (bf16 log-ratios lose ~3 digits)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def per_token(adv: Tensor, like: Tensor, name: str = "advantages") -> Tensor:
    """Broadcast a per-sequence [B] tensor to [B, T]; pass a [B, T] tensor through (shape-checked)."""
    if not isinstance(adv, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(adv).__name__}")
    if adv.dim() == 1 and like.dim() == 2 and adv.shape[0] == like.shape[0]:
        return adv[:, None].expand_as(like)
    if adv.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(adv.shape)}, expected {tuple(like.shape)} (per token) "
            f"or ({like.shape[0]},) (per sequence)"
        )
    return adv


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    return zero_outside(x, mask).sum() if dim is None else zero_outside(x, mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over masked positions; 0 (not NaN) when the mask is empty."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over all masked positions (Bessel-corrected by default); 0 for fewer than 2 tokens."""
    n = mask.sum()
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    denom = (n - 1) if unbiased else n
    return torch.where(denom > 0, sq / denom.clamp(min=1), torch.zeros_like(sq))


def item(x: Tensor | float) -> float:
    return float(x.detach().item()) if isinstance(x, Tensor) else float(x)
