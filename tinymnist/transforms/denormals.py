"""A transform, CPU only: flush denormal floats to zero, in every thread torch computes on.

Why: a denormal (subnormal) float32 is one below 1.2e-38, kept with fewer significant bits;
x86 cores compute on them through a slow microcode path. Adam's first moment m shrinks by 0.9 a
step for a weight whose gradient stays 0: in mlp, the whole rows of 40 of fc1's 128 hidden units
(dead ReLUs); in mlp3, also weights of pixels that are almost always 0. Some 800
steps later m is a denormal, and there it stays: at a few multiples of the smallest denormal,
0.1 * m is under half that step, so m.lerp(0, 0.1) rounds back to m. On real digits, on an Intel
Xeon, mlp's fused Adam kernel for fc1 took 206 µs a step instead of 44 (BENCHMARKS.md "Denormals").

What it changes: values below 1.2e-38 count as 0, in and out of every float op (x86's
flush-to-zero and denormals-are-zero bits). A weight's update from such a state is at most
about lr * 1.2e-37 / eps, 1e-32, far below half the gap to the next float of any weight: in the
recipes' runs (cnn 1 epoch, lenet 5) the trained parameters came out the same to the bit.
TensorFlow sets the same bits in each of its CPU threads.

The bits are per thread (x86's MXCSR register), and on Linux a new thread starts with its
creator's: set them before torch's first parallel op, so that OpenMP's worker threads are created
with them. Set later, only the calling thread has them. The command sets them first thing; a
library user calls `flush_denormals()` before any other torch work, and its result says whether
every thread flushes.
"""

from __future__ import annotations

import warnings

import torch

DENORMAL_BITS = 1 << 20  # a float32 with a zero exponent: 1.5e-39, a denormal
GRAIN = 32768  # elements: torch gives each thread of an elementwise op at least this many


def flush_denormals() -> bool:
    """Flush denormals to zero in this thread and in the threads it starts. False where the CPU
    cannot, or where torch's threads were already running without it."""
    # numpy's finfo then finds the smallest subnormal to be 0 and warns, twice, wherever it is first
    # asked (matplotlib asks while drawing): the flush is meant, so the warning says nothing new.
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal", category=UserWarning)
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
