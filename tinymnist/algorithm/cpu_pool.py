"""A speed trick for the CPU: a max-pool whose compiled backward is fast, with F.max_pool2d's numbers.

It lives in the forward pass (networks.py calls `max_pool2d` for every pooling layer), so
unlike the step transforms of transforms/ it cannot wrap the step from outside; it
changes nothing but speed, and only under torch.compile on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def max_pool2d(x: torch.Tensor, kernel: int, stride: int | None = None) -> torch.Tensor:
    """F.max_pool2d; compiled for the CPU, the same numbers by a route that compiles well.

    torch.compile turns F.max_pool2d's backward into scalar C++ loops on the CPU, about
    a third of lenet's compiled step. `first_max_pool2d` gives the same values, sends
    each gradient to the same input and compiles to elementwise code: lenet's compiled step is
    measurably faster (BENCHMARKS.md). Eager, F.max_pool2d's own kernels are faster.
    (`is_compiling` is true under any torch.compile backend and torch.export too.)
    """
    height, width = x.shape[-2:]
    tiles = x.dim() == 4 and stride in (None, kernel) and height % kernel == 0 and width % kernel == 0
    if tiles and x.device.type == "cpu" and torch.compiler.is_compiling():
        return first_max_pool2d(x, kernel)
    return F.max_pool2d(x, kernel, stride)


def first_max_pool2d(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool over non-overlapping kernel x kernel windows that tile x exactly.

    Like F.max_pool2d, where a window's maximum occurs more than once (all-zero ReLU
    outputs, often), the first in row-major order is the one picked, and the one whose
    input gets the gradient. Two differences no training run meets: a window whose
    maximum is -0.0 pools to +0.0, and of several NaNs the first gets the gradient
    (F.max_pool2d: the last).
    """
    n, channels, height, width = x.shape
    rows, cols = height // kernel, width // kernel
    windows = x.view(n, channels, rows, kernel, cols, kernel).transpose(3, 4)  # (N, C, H', W', k, k)
    windows = windows.reshape(n, channels, rows, cols, kernel * kernel)  # (N, C, H', W', k*k), row-major
    first_max = windows.argmax(dim=-1, keepdim=True)  # (N, C, H', W', 1): the first maximum's position
    picked = torch.arange(kernel * kernel, device=x.device) == first_max  # (N, C, H', W', k*k), one True each
    return torch.where(picked, windows, 0).sum(dim=-1)  # (N, C, H', W'); the gradient flows to `picked` only
