"""A transform, CPU only: flush denormal floats to zero, in every thread torch computes on.

Why: Adam's first moment m shrinks by 0.9 a step for a weight whose input is almost always 0
(the pixels near MNIST's border). About 800 steps after the last non-zero gradient it falls
below 1.2e-38 and stays a denormal for some 200 steps more. x86 cores compute on denormals
through a microcode assist, tens of times slower: on real digits, mlp's fused Adam kernel for
fc1 took 199 µs a step instead of 46, and the whole step 440 µs instead of 307 (Intel Xeon,
2 threads; BENCHMARKS.md "Denormals"). Random digits never show it.

What it changes: values below 1.2e-38 count as 0, in and out of every float op. The updates
such values make (lr * m / (sqrt(v) + eps), about 1e-39) are far below half an ulp of any weight,
so the parameters come out the same (checked in the same section). TensorFlow and XLA run their
CPU threads the same way.

The setting is a per-thread CPU flag (MXCSR), and a new thread starts with its creator's: set it
before torch's first parallel op, so that OpenMP's worker threads are created with it. Set later,
only the calling thread has it (`flushed_in_every_thread` tells). The command sets it first thing;
a library user calls `flush_denormals()` before any other torch work.
"""

from __future__ import annotations

import torch

DENORMAL_BITS = 1 << 20  # a float32 with a zero exponent: 1.5e-39, a denormal
CHECK_ELEMENTS = 1 << 20  # enough for torch to split an elementwise op across every thread


def flush_denormals() -> bool:
    """Flush denormals to zero in this thread and in the threads it starts; False where the CPU cannot."""
    return torch.set_flush_denormal(True)


def flushed_in_every_thread() -> bool:
    """Whether every thread of a parallel op reads a denormal as 0: an elementwise multiply, split
    across torch's threads, of a tensor that holds only denormals. The denormals are made and the
    products read as integers: a float conversion or comparison would itself flush or read as 0."""
    denormals = torch.full((CHECK_ELEMENTS,), DENORMAL_BITS, dtype=torch.int32).view(torch.float32)  # (E,)
    products = denormals * 1.0  # (E,): 0 where the thread that computed it flushes
    return bool((products.view(torch.int32) == 0).all())
