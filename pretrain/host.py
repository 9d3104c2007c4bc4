"""Host-side runtime settings of a training process.

CPU training allocates and frees the same large activation and gradient buffers every
step. glibc's malloc serves blocks above its mmap threshold (at most 32 MiB, adapted at
run time) with fresh ``mmap`` calls and hands freed memory at the top of the heap back to
the kernel once it exceeds the trim threshold; either way the next step touches new pages,
and the kernel zero-fills each 4 KiB page on its first touch. On the bench-cpu config that
was 50-75 thousand page faults per optimizer step (0.15-0.3 s of system time on a ~2.5 s
step; docs/benchmarks.md). ``keep_freed_memory`` raises both thresholds so freed memory
stays in the process and is reused. The cost is memory: the resident set no longer
shrinks between steps, and heap fragmentation can grow it past the step's own peak
(bench-cpu: 1578 vs 1549 MiB max RSS over 45 steps, flat after step 30; a synthetic loop
of 64 MiB blocks: 1397 vs 613 MiB). Turn it off where host memory is tight.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import torch

from polytron.pretrain.config import TrainingConfig

#: glibc ``mallopt`` parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap instead of their own ``mmap``.
MMAP_THRESHOLD_BYTES = 1 << 30
#: Free memory kept at the heap top before any is returned to the kernel.
TRIM_THRESHOLD_BYTES = (1 << 31) - 1


def _libc():
    """The C library, or None when it cannot be loaded (not Linux/glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Make glibc malloc reuse freed memory instead of returning it to the kernel.

    Process-wide and idempotent. Returns True when both settings took effect; False on
    a C library without ``mallopt`` (musl, macOS), where nothing changes.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    # both are needed: a fixed trim threshold alone also freezes the mmap threshold at
    # its 128 KiB default, which makes every activation a fresh mapping
    ok_mmap = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok_trim = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    return ok_mmap and ok_trim


def setup_host(device: torch.device, training: TrainingConfig) -> bool:
    """The process settings of a training process on ``device``; whether any took effect.

    On CPU with ``training.keep_freed_memory``: :func:`keep_freed_memory`. The trainer and
    both benchmarks call this, so they measure the process the trainer runs in.
    """
    return device.type == "cpu" and training.keep_freed_memory and keep_freed_memory()
