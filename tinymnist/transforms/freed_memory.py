"""A transform, CPU only: a step's tensors reuse the memory the last step freed, not fresh pages.

Why: every step makes new tensors (activations, gradients, the new parameters and optimizer state:
the step is pure) and frees the last step's. glibc's malloc, which torch's CPU allocator calls,
maps a large block (over 128 KiB; the bound rises with the blocks freed, to at most 32 MiB) fresh
from the kernel and unmaps it when it is freed. Each page of a fresh mapping faults on its first
write, and the kernel zeroes it first: a step pays for its large tensors twice, once to fault
and zero their pages, once to fill them. 8 cnn models' stacked fc1 weights (38 MB) are mapped and
faulted anew for the parameters, the gradient and each state, every step (BENCHMARKS.md,
"Freed memory").

What it changes: malloc's mmap threshold goes to 1 GiB, so blocks below it come from the heap,
and its trim threshold to 2 GiB, so that freed heap is kept rather than handed back: the next
step's tensors land on pages already faulted in. The numbers do not change, only where they
live. The process keeps its largest heap until it exits; a training run's steps are alike, so
that is about its peak anyway.

Where: glibc (Linux). Elsewhere (macOS, Windows, musl) nothing changes and the result says so. A
library user calls `reuse_freed_memory()` once, early; the same thresholds can be given to any
program as MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30  # bytes: blocks below it come from the heap
TRIM_THRESHOLD = 2**31 - 1  # bytes, the most mallopt's int takes: free heap above it at the top goes back
reusing = False  # whether this process has asked for it and malloc took it (tinymnist info shows it)


def reuse_freed_memory() -> bool:
    """Have malloc keep freed blocks for reuse instead of unmapping them. False where the C
    library is not glibc or refuses a setting."""
    if not glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global reusing
    reusing = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return reusing


def glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or not glibc's name
        return False
