"""Host-side settings for CPU training: keep freed activation memory in the process.

glibc serves every allocation of 32 MB or more (the largest mmap threshold it allows) with a fresh
``mmap`` and unmaps it on free, and returns the top of its heap to the OS above 128 KB free. A
training step allocates and frees the same large activations every iteration (one layer's
attention scores at b=2, 8 heads, s=1024 in bf16 are exactly 32 MB), so each step page-faults all
of them in again and the kernel zeroes every page: on the benchmark model this was ~30% of a bf16
step's CPU time (benchmarks/README.md). ``keep_freed_memory`` tells glibc not to map large blocks
separately and not to trim the heap, so freed activations are reused by the next step. Resident
memory then stays at the step's high-water mark between steps instead of dropping back, which is
what a training process reaches every step anyway, but the heap fragments: at seq 2048 the bf16
step's high-water mark was 1.0-1.1 GB with the setting against 0.67 GB without it (and 2.8 vs 3.3
CPU-s per step). ``MEGATRON_GLM_KEEP_FREED_MEMORY=0`` in the environment leaves glibc alone
(memory first). Other allocators (jemalloc, tcmalloc via ``LD_PRELOAD``) cache on their own; on
non-glibc systems this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

__all__ = ["ENV_VAR", "keep_freed_memory"]

ENV_VAR = "MEGATRON_GLM_KEEP_FREED_MEMORY"

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed large blocks (idempotent); False where unavailable or
    turned off with ``MEGATRON_GLM_KEEP_FREED_MEMORY=0``."""
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV_VAR, "1") == "0":
        logger.info("keep_freed_memory: %s=0, allocator left as it is", ENV_VAR)
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        logger.info("keep_freed_memory: no C library found, allocator left as it is")
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.info("keep_freed_memory: %s has no mallopt (not glibc), allocator unchanged", name)
        return False
    # mmap_max 0: large blocks come from the heap; trim threshold 2 GB: free heap stays mapped.
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _INT_MAX)):
        logger.warning("keep_freed_memory: mallopt refused the settings, allocator unchanged")
        return False
    _applied = True
    return True
