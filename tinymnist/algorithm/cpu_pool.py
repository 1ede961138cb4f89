"""A max-pool with F.max_pool2d's numbers whose compiled CPU backward is fast (networks.py pools with it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def max_pool2d(x: torch.Tensor, kernel: int, stride: int | None = None) -> torch.Tensor:
    """F.max_pool2d; under torch.compile on the CPU, `first_max_pool2d` for tiling windows.

    Inductor turns F.max_pool2d's backward into scalar C++ loops, about a third of lenet's
    compiled step; first_max_pool2d compiles to elementwise code (BENCHMARKS.md). Eager,
    F.max_pool2d's own kernels are faster.
    """
    height, width = x.shape[-2:]
    tiles = x.dim() == 4 and stride in (None, kernel) and height % kernel == 0 and width % kernel == 0
    if tiles and x.device.type == "cpu" and torch.compiler.is_compiling():
        return first_max_pool2d(x, kernel)
    return F.max_pool2d(x, kernel, stride)


def first_max_pool2d(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool over non-overlapping kernel x kernel windows that tile x exactly.

    As in F.max_pool2d, a window's first maximum in row-major order is picked and gets the
    gradient. Differences no run meets: a -0.0 maximum pools to +0.0; of several NaNs the first
    gets the gradient (F.max_pool2d: the last).
    """
    n, channels, height, width = x.shape
    rows, cols = height // kernel, width // kernel
    windows = x.view(n, channels, rows, kernel, cols, kernel).transpose(3, 4)  # (N, C, H', W', k, k)
    windows = windows.reshape(n, channels, rows, cols, kernel * kernel)  # (N, C, H', W', k*k), row-major
    first_max = windows.argmax(dim=-1, keepdim=True)  # (N, C, H', W', 1): the first maximum's position
    picked = torch.arange(kernel * kernel, device=x.device) == first_max  # (N, C, H', W', k*k), one True each
    return torch.where(picked, windows, 0).sum(dim=-1)  # (N, C, H', W'); the gradient flows to `picked` only
