"""A pure-torch stand-in for ``sgl_kernel`` so that sglang 0.5.23 serves on a CPU without AMX (tests only).

Written for erpd-megatron; not sglang's code. sglang's CPU kernels live in ``sgl_kernel``'s CPU build,
which is not on PyPI and needs AMX (absent on the AMD CPUs of the test machines); without AMX sglang uses
torch-native layers anyway. What it still imports unconditionally on CPU (``SGLANG_USE_CPU_ENGINE=1``):

- ``assign_req_to_token_pool_cpu`` (``srt/mem_cache/allocation.py``): request i's new KV-cache slots
  ``out_cache_loc[sum of earlier lengths : + (end_i - start_i)]`` go into
  ``req_to_token[req_pool_indices[i], start_i:end_i]`` (what the Triton kernel of the GPU path does).
- ``copy_all_layer_kv_cache_cpu`` (``kernels/ops/kvcache/cache_move.py``; a dense model's decode never calls
  it): for every KV buffer b (raw address ``data_ptrs[b]``, row size ``strides[b]`` bytes), row ``src_loc[j]``
  is copied onto row ``tgt_loc[j]``, all rows read before any is written (safe in place, as the Triton kernel).

And one choice made at import (sglang imports this package in its scheduler process before serving):

- ``torch.get_device_module()`` with no argument returns ``torch.cuda`` on torch's CUDA build even without a
  driver (``torch._C._get_accelerator()``), and ``/release_memory_occupation`` calls its ``synchronize()``:
  the server dies. With no usable CUDA device, ``torch.cpu`` is returned instead, as a CPU build of torch does.

- the CPU kernels of speculative decoding (``kernels/ops/speculative/*.py`` import them on CPU whatever the
  model): present so the import succeeds; calling one raises ``NotImplementedError`` (we never enable
  speculative decoding).

Anything else raises ImportError at import, as with no ``sgl_kernel`` at all. On a CPU with AMX, sglang would
call the ``torch.ops.sgl_kernel.*`` CPU kernels, which only sglang's real CPU build registers.
"""

from __future__ import annotations

import torch

__version__ = "0.0.0+erpd.cpu"

_get_device_module = torch.get_device_module


def _get_device_module_cpu_fallback(device=None):
    if device is None and not torch.cuda.is_available():
        return torch.cpu
    return _get_device_module(device)


torch.get_device_module = _get_device_module_cpu_fallback


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    starts, ends = start_offset.tolist(), end_offset.tolist()
    rows = req_pool_indices.tolist()
    src = 0
    for row, start, end in zip(rows, starts, ends):
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[src:src + n].to(req_to_token.dtype)
        src += n


def copy_all_layer_kv_cache_cpu(data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor,
                                src_loc: torch.Tensor) -> None:
    import ctypes

    pairs = list(zip(tgt_loc.tolist(), src_loc.tolist()))
    for base, stride in zip(data_ptrs.tolist(), strides.tolist()):
        rows = [ctypes.string_at(base + s * stride, stride) for _, s in pairs]
        for (t, _), row in zip(pairs, rows):
            ctypes.memmove(base + t * stride, row, stride)


def _speculative_only(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name}: speculative decoding is not provided by erpd's CPU stand-in")

    kernel.__name__ = name
    return kernel


for _name in ("build_tree_kernel_efficient_cpu", "verify_tree_greedy_cpu", "rotate_input_ids_cpu",
              "fill_accept_out_cache_loc_cpu", "fill_bonus_tokens_cpu", "assign_draft_cache_locs_contiguous_cpu",
              "assign_extend_cache_locs_cpu"):
    globals()[_name] = _speculative_only(_name)
del _name
