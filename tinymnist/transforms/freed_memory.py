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
live. The process keeps its largest heap until it exits: peak RSS grew by up to 5% in the step
loops measured (8 cnn models: 907 to 952 MB). Threads other than the main one allocate from heaps
of at most 64 MiB, so their blocks over 64 MiB are still mapped fresh. It is process-wide and
cannot be undone; call it before other threads allocate (mallopt is not thread-safe).

Where: glibc's malloc (Linux). Elsewhere (macOS, Windows, musl, or an allocator preloaded over
glibc's) nothing changes and the result says so. A library user calls `reuse_freed_memory()` once,
early; the same thresholds can be given to any program as MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=2147483647.
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
    global reusing
    libc = glibc_malloc()
    if libc is None:
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The threshold first: where it is refused (older glibc releases capped it at 32 MiB), nothing changed.
    reusing = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    reusing = reusing and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return reusing


def glibc_malloc() -> ctypes.CDLL | None:
    """glibc, where it is the malloc this process calls; None where another C library is, or an
    allocator preloaded over it (LD_PRELOAD of tcmalloc or jemalloc, which glibc's settings miss)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
        libc, process = ctypes.CDLL("libc.so.6"), ctypes.CDLL(None)
        in_use = ctypes.cast(process.malloc, ctypes.c_void_p).value
        return libc if in_use == ctypes.cast(libc.malloc, ctypes.c_void_p).value else None
    except (AttributeError, ValueError, OSError):  # not POSIX, no glibc name (musl: None), no libc.so.6
        return None
