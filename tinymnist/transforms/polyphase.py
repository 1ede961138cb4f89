"""A speed trick for the CPU: the first block (a one-channel convolution, ReLU, 2x2 max-pool) as one product.

A 2x2 max-pool reads each window's 4 positions, the window's phases (dy, dx). Grouping the first
convolution's output positions by phase makes the block three plain steps:

    patches[d, b, Y, X, :] = the k x k patch of image b under position (2Y + dy, 2X + dx)    (im2col)
    planes = patches @ weight^T + bias        (4, B, H/2, W/2, O): one matrix product for all phases
    out = ReLU(first maximum over the 4 planes)                      (B, O, H/2, W/2)

Every index is affine, so inductor writes the pool and its backward (the pooled gradient routed to
its window's first maximum, ReLU's mask, the bias's sum) as vectorized loops over contiguous values,
and autograd's weight gradient is one more product, routed gradient^T @ patches. Compiled from the
plain layers, the same block's backward is a scalar loop over the full-resolution gradient (the
value at (y, x) reads its window's at (y // 2, x // 2)) and a convolution's weight gradient
(first_conv.py). Bias and ReLU commute with the maximum, and a window's first maximum is the one
F.max_pool2d picks, so the values and the gradients are the plain layers', to float rounding (the
products add in another order): tests/transforms/test_polyphase.py checks them, ties and NaN included.

It pays where a patch (k*k values) and the output channels are of one size. On a 2-core AMD EPYC,
fast's compiled CPU step (25 values, 24 channels) took 0.92-0.98x the time of the same step through
the layers (medians of three runs, each within its rounds' spread), both on its 256 images in one
piece, and 1.42x and 1.38x its floor against 1.52x; lenet's (25 values, 6 channels: the patches
hold 4x its output) took 1.45-1.47x (research/polyphase_first_block.py, BENCHMARKS.md). So
speed.py takes it for fast alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinymnist.algorithm import networks, shapes
from tinymnist.algorithm.networks import Params
from tinymnist.algorithm.shapes import Conv2d, Layer, MaxPool2d, ReLU

PHASES = 4  # a 2x2 window's positions, row-major as F.max_pool2d scans them: (0, 0), (0, 1), (1, 0), (1, 1)


def polyphase_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """F.max_pool2d(F.relu(F.conv2d(x, weight, bias, padding=padding)), 2) for a square image x (B, 1, H, H),
    weight (O, 1, k, k), stride 1 and an even output side S (what `takes` checks of a network): -> (B, O,
    S/2, S/2), with channels-last strides. A window's NaN is its maximum, as in F.max_pool2d."""
    batch, channels_out = x.shape[0], weight.shape[0]
    patches, half = phase_patches(x, weight.shape[-1], padding)  # (4*B*Y*X, k*k)
    planes = patches @ weight.flatten(1).t()  # (4*B*Y*X, O)
    # The bias added here, where inductor fuses it into the pool's kernel: added inside the product (addmm),
    # the step took 1.5-1.8x the time (research/polyphase_first_block.py's bias-in-product)
    planes = planes.view(PHASES, batch, half, half, channels_out) + bias  # (4, B, Y, X, O)
    return relu_max_over_phases(planes).permute(0, 3, 1, 2)  # (B, O, Y, X)


def phase_patches(x: torch.Tensor, kernel: int, padding: int) -> tuple[torch.Tensor, int]:
    """Every k x k patch of the one-channel images x (B, 1, H, H) as a row, grouped by its place in its
    2x2 pool window: (4*B*Y*X, k*k), phase-major, and the pooled side Y = X."""
    batch = x.shape[0]
    padded = F.pad(x, (padding,) * 4)[:, 0]  # (B, H+2p, W+2p)
    half = (padded.shape[-1] - kernel + 1) // 2  # the pooled side, S/2
    windows = padded.unfold(1, kernel, 1).unfold(2, kernel, 1)  # (B, S, S, k, k): every patch, a view
    windows = windows.reshape(batch, half, 2, half, 2, kernel * kernel)  # (B, Y, dy, X, dx, k*k)
    return windows.permute(2, 4, 0, 1, 3, 5).reshape(-1, kernel * kernel), half  # (4*B*Y*X, k*k)


def relu_max_over_phases(planes: torch.Tensor) -> torch.Tensor:
    """relu(max over the 4 phases) of planes (4, B, Y, X, O) -> (B, Y, X, O), the maximum the first one as
    cpu_pool.first_max_pool2d picks it, ReLU a mask in the pick: ReLU applied after the pick, the step
    took 1.2-1.3x the time (research/polyphase_first_block.py's relu-after)."""
    first = planes.argmax(dim=0, keepdim=True)  # (1, B, Y, X, O): the window's first maximum
    phase = torch.arange(PHASES, device=planes.device).view(PHASES, 1, 1, 1, 1)
    kept = (phase == first) & ~(planes <= 0)  # (4, B, Y, X, O): the pool's pick, then ReLU's mask (NaN kept)
    # a sum with one term at most: its gradient goes to the kept value alone
    return torch.where(kept, planes, 0).sum(dim=0)  # (B, Y, X, O)


def takes(layers: tuple[Layer, ...]) -> bool:
    """Whether the network starts with a block polyphase_block computes: a stride-1 convolution of the
    one-channel image with an even output side, ReLU, and a 2x2 max-pool of stride 2."""
    if len(layers) < 3 or not isinstance(layers[0], Conv2d):
        return False
    conv, relu, pool = layers[:3]
    side = shapes.conv2d_out(shapes.MNIST_IMAGE[-1], conv.kernel, conv.stride, conv.padding)
    return (
        conv.stride == 1
        and side % 2 == 0
        and isinstance(relu, ReLU)
        and isinstance(pool, MaxPool2d)
        and pool.kernel == 2
        and pool.stride in (None, 2)
    )


class PolyphaseNetwork(networks.Network):
    """networks.Network with its first three layers computed by polyphase_block: the same parameters."""

    def forward(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        conv = self.layers[0]
        module = getattr(self, conv.name)  # with the weights functional_call passed in
        x = polyphase_block(x, module.weight, module.bias, conv.padding)  # (B, 1, 28, 28) -> (B, O, S/2, S/2)
        for layer in self.layers[3:]:
            x = self.layer_forward(layer, x, train)
        return x  # (B, 10)


# Built once, as networks.TEMPLATES are: a module built inside a compiled function breaks its graph.
TEMPLATES = {name: PolyphaseNetwork(layers) for name, layers in networks.ARCHITECTURES.items() if takes(layers)}


def apply(name: str, params: Params, x: torch.Tensor, train: bool = False) -> torch.Tensor:
    """networks.apply through PolyphaseNetwork: the same outputs, to float rounding."""
    return torch.func.functional_call(TEMPLATES[name], params, (x,), {"train": train}, strict=True)
