"""A transform, CPU only: flush denormal floats to zero, in every thread torch computes on.

Why: Adam's first moment m shrinks by 0.9 a step for a weight whose input is almost always 0
(the pixels near MNIST's border). Some 800 steps after the last non-zero gradient it falls below
1.2e-38, a denormal, and there it stays: a few units above zero, m.lerp(0, 0.1) rounds back to
m. x86 cores compute on denormals through a microcode assist, many times slower: on real digits,
mlp's fused Adam kernel for fc1 took 206 µs a step instead of 44 (Intel Xeon, 2 threads;
BENCHMARKS.md "Denormals"). Random digits never show it.

What it changes: values below 1.2e-38 count as 0, in and out of every float op. The updates
such values make (lr * m / (sqrt(v) + eps), about 1e-39) are far below half an ulp of any weight:
for each of the five recipes the trained parameters came out the same to the bit (same section).
TensorFlow sets the same flag in each of its CPU threads.

The flag is per thread (x86's MXCSR), and on Linux a new thread starts with its creator's: set
it before torch's first parallel op, so that OpenMP's worker threads are created with it. Set
later, only the calling thread has it. The command sets it first thing; a library user calls
`flush_denormals()` before any other torch work, and its result says whether every thread flushes.
"""

from __future__ import annotations

import torch

DENORMAL_BITS = 1 << 20  # a float32 with a zero exponent: 1.5e-39, a denormal
GRAIN = 32768  # elements: torch gives each thread of an elementwise op at least this many


def flush_denormals() -> bool:
    """Flush denormals to zero in this thread and in the threads it starts. False where the CPU
    cannot, or where torch's threads were already running without it."""
    return torch.set_flush_denormal(True) and flushed_in_every_thread()


def flushed_in_every_thread() -> bool:
    """Whether every thread torch uses now reads a denormal as 0: an elementwise multiply, split
    across torch's threads, of a tensor that holds only denormals (threads a lower thread count
    leaves idle are not seen). The denormals are made and the products read as integers: a float
    conversion or comparison would itself flush or read as 0."""
    elements = GRAIN * torch.get_num_threads()
    denormals = torch.full((elements,), DENORMAL_BITS, dtype=torch.int32).view(torch.float32)  # (E,)
    products = denormals * 1.0  # (E,): 0 where the thread that computed it flushes
    return bool((products.view(torch.int32) == 0).all())
