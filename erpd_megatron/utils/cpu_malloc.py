"""Keep freed CPU memory in the process (glibc malloc), as CUDA's caching allocator does on GPU.

torch's CPU allocator is plain malloc / free. With glibc's defaults a tensor above the mmap threshold
(128 KiB, rising dynamically to at most 32 MiB) gets fresh pages from the kernel, and freeing the top of
the heap above the trim threshold hands pages back. A training step allocates and frees the same
activation-sized buffers again and again, so every step page-faults them in anew: measured on the demo
base (64 x 64 tokens, 1 thread), the Megatron log-prob pass took ~16,500 minor faults and ~30 ms of
kernel time per ~100 ms pass; on the bench model (16 x 256) both the Megatron and the plain
transformers pass spent ~20-25 % of their wall time in page faults (docs/benchmarks.md, issue 15).

`keep_freed_memory()` raises both thresholds once per process (`mallopt`, at run time: no LD_PRELOAD,
no environment set before start), so freed buffers are reused from the heap. The cost is resident
memory: the process keeps up to `TRIM_BYTES` of freed memory instead of returning it. Only glibc on
Linux; elsewhere it does nothing. `ERPD_CPU_MALLOC=0` turns it off. It is process-wide: in a benchmark
that runs the plain loop in the same process, both sides get it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_BYTES = 256 << 20  # allocations below this come from the heap (fresh mmap pages above it)
TRIM_BYTES = 512 << 20  # freed memory kept at the top of the heap before any is returned

_state: dict = {}


def keep_freed_memory() -> bool:
    """Set glibc's mmap / trim thresholds (once per process). True when they are in effect."""
    if "on" in _state:
        return _state["on"]
    on = False
    reason = ""
    if os.environ.get("ERPD_CPU_MALLOC", "1") == "0":
        reason = "ERPD_CPU_MALLOC=0"
    elif not sys.platform.startswith("linux"):
        reason = f"not glibc ({sys.platform})"
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt  # absent in musl and other libcs
            on = bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
            reason = "" if on else "mallopt refused the thresholds"
        except (OSError, AttributeError) as e:
            reason = f"no glibc mallopt ({e})"
    _state["on"] = on
    if on:
        log.debug("CPU malloc: mmap threshold %d MiB, trim threshold %d MiB", MMAP_BYTES >> 20, TRIM_BYTES >> 20)
    else:
        log.debug("CPU malloc left at its defaults: %s", reason)
    return on
