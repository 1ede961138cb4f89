"""Can the backward of the first block (conv1, ReLU, max-pool) in `lenet`'s and `fast`'s compiled CPU step get faster?

In both steps one generated kernel is the largest item after the convolutions (inductor's kernel
profile, AMD EPYC, a throwaway script, per micro-batch: `lenet` 4.1 of 22 ms, `fast` 3.1 of 12.7
ms): the max-pool's backward fused with ReLU's and with the weight-gradient kernels of
transforms/first_conv.py. Its loops run scalar: the gradient of conv1's output at (y, x) reads its
window's at (y // 2, x // 2), which inductor's vectorizer does not take, and the (O, H, W, B) copy
first_conv.py's convolution wants is written in a loop that also sums the bias. Cutting that kernel
to a tenth would bring both steps near 1.5x their floor (issue 20, point 3). This times `train`'s
step (tool/floor.cpu_steps) against the same step with:

    polyphase          conv1 -> ReLU -> pool as one stride-2 convolution over the window's 4 positions
                       (the 4 shifted images as one batch of 4B), the pool a first maximum over those 4
                       planes: every pool tensor is (4, B, O, H/2, W/2), no (y // 2, x // 2) index
    polyphase-dilated  the same, and that stride-2 convolution's weight gradient as a forward
                       convolution with dilation 2 (first_conv.py's rewrite, which takes stride 1 only,
                       widened to strides; oneDNN's own stride-2 backward is slow for one input channel)
    pool-first-cl      the pool before each ReLU (max and ReLU commute: the same values and gradients;
                       ReLU's mask then reads the pooled quarter), and first_conv.py's kernels stored as
                       the (O, H, W, B) its convolution wants, the bias summed from them: in isolation
                       (random tensors, this block's backward alone; a throwaway script) 0.65x the
                       time for lenet's shapes
    masked-sum         the pool as a sum over each window of the input where its first maximum is,
                       so that autograd's backward is an expand, not a gather
    channels-last-pool cpu_pool.first_max_pool2d over the input laid out (N, H, W, C), every index affine in
                       the channel, so that the pool's backward could be vectorized over the channels
    gather             every pool a gather of each window's first maximum: its backward a scatter of the
                       pooled gradient (ATen's scatter_add, called from the compiled code), ReLU's a loop
                       of its own over contiguous values
    unfold             first_conv.py's weight gradient as im2col and a batched product over the batch,
                       (B, O, H'W') @ (B, H'W', k*k) summed over B: the gradient stays in the layout the
                       pool's backward writes, with no (O, H', W', B) copy for a forward convolution
    aten-pool          every pool F.max_pool2d, as inductor compiles it (its low-memory forward with int8
                       offsets; its backward a scatter into zeros)
    c-backward         aten-pool with both pool kernels hand-written in C and spliced in after autograd,
                       the ReLU's backward folded into the pool's (research/pool_kernel.py)
    control            train's step itself, compiled and timed as a way of its own (its rounds show the
                       host's noise and any advantage of a way's place in the turns)

each patched in while its step compiles and while it is timed (research/in_turns.py): the networks
as templates of another class (dynamo guards on the template, not on Network.forward), the weight
gradient's rewrite as a pass of its own in the compile options (a graph of its own, under a cache key
of its own). `--check` first compares each way's compiled gradient (train's too) of one batch with the
plain network's eager one.

    python research/first_block_backward.py --data-dir DIR [--models fast,lenet] [--rounds 5]
        [--seconds 2] [--variants a,b] [--check] [--first-conv always|never|measured]

`--first-conv` pins first_conv.py's kernel for every way (default always: the rewrite, as on the AMD
EPYC these were measured on). Measured, a process makes one choice per shape for all its ways, but
that choice may differ from one process to the next (research/first_conv_choice.py) and then decides a
comparison between runs by itself. (When these were measured, before commit 93eb514, a graph from
inductor's cache also carried the choice of the process that compiled it.)

`pool-first-cl` and `masked-sum` change the second pool too (every ReLU-then-pool pair, every pool),
and `pool-first-cl` makes two changes at once.

A custom backward would have been the direct way, but inside torch.compile torch.func.grad
ignores an autograd.Function's own backward (torch 2.13: pytorch#193279, wrong gradients with no
error) and refuses a torch.library custom op's registered one. `c-backward` goes around that: its ops
replace nodes of the graph autograd has already written.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
from contextlib import AbstractContextManager
from unittest import mock

import pool_kernel  # research/pool_kernel.py
import torch
import torch.nn.functional as F
from in_turns import compare  # research/in_turns.py

from tinymnist.algorithm import cpu_pool, networks
from tinymnist.algorithm.config import recipe_config
from tinymnist.algorithm.shapes import Conv2d, MaxPool2d, ReLU
from tinymnist.algorithm.train import make_gradient
from tinymnist.transforms import first_conv, graph_splice, speed

aten = torch.ops.aten


def polyphase_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """max_pool2d(relu(conv2d(x, weight, bias, padding=padding)), 2) for a stride-1 convolution whose
    output has even sides: each window position's outputs from one stride-2 convolution."""
    batch, (channels_out, _, kernel, _) = x.shape[0], weight.shape
    padded = F.pad(x, (padding,) * 4)  # (B, C, H+2p, W+2p)
    half = (padded.shape[-1] - kernel + 1) // 2  # the pooled side
    rows = 2 * (half - 1) + kernel  # the input rows a stride-2 convolution reads for `half` outputs
    shifted = [padded[:, :, dy : dy + rows, dx : dx + rows] for dy in (0, 1) for dx in (0, 1)]  # row-major
    planes = F.conv2d(torch.cat(shifted), weight, bias, stride=2)  # (4B, O, H/2, W/2)
    planes = planes.view(4, batch, channels_out, half, half)
    first = planes.argmax(dim=0, keepdim=True)  # (1, B, O, H/2, W/2): the window's first maximum
    picked = torch.arange(4, device=x.device).view(4, 1, 1, 1, 1) == first
    return torch.relu(torch.where(picked, planes, 0).sum(dim=0))  # (B, O, H/2, W/2); max and ReLU commute


class SameNetwork(networks.Network):
    """networks.Network under another name: the control, train's step compiled and timed as a way of its own."""


class PolyphaseNetwork(networks.Network):
    """A network whose first (Conv2d, ReLU, MaxPool2d), when compiling, is polyphase_block."""

    def forward(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        layers = self.layers
        first = isinstance(layers[0], Conv2d) and isinstance(layers[1], ReLU) and isinstance(layers[2], MaxPool2d)
        if not (first and torch.compiler.is_compiling()):
            return super().forward(x, train)
        conv = getattr(self, layers[0].name)
        x = polyphase_block(x, conv.weight, conv.bias, layers[0].padding)
        return forward_through(self, layers[3:], x, train)


class PoolFirstNetwork(networks.Network):
    """A network with each ReLU that a MaxPool2d follows moved after it."""

    def forward(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        layers = list(self.layers)
        for i in range(len(layers) - 1):
            if isinstance(layers[i], ReLU) and isinstance(layers[i + 1], MaxPool2d):
                layers[i], layers[i + 1] = layers[i + 1], layers[i]
        return forward_through(self, layers, x, train)


def forward_through(network: networks.Network, layers, x: torch.Tensor, train: bool) -> torch.Tensor:
    """networks.Network.forward through `layers` instead of the network's own (set as a plain attribute,
    which dynamo traces; mock.patch would break the graph)."""
    own = network.layers
    object.__setattr__(network, "layers", tuple(layers))
    try:
        return networks.Network.forward(network, x, train)
    finally:
        object.__setattr__(network, "layers", own)


def templates(network_class) -> AbstractContextManager:
    """networks.TEMPLATES built from `network_class`. The templates are swapped, not Network.forward:
    dynamo guards on the template networks.apply looks up, not on its class's forward (a step compiled
    with another forward in place silently reuses the graph compiled first)."""
    built = {name: network_class(layers) for name, layers in networks.ARCHITECTURES.items()}
    return mock.patch.dict(networks.TEMPLATES, built)


def weight_grad_widened(x, grad_out, padding: list[int], groups: int, stride=(1, 1), stored: bool = False):
    """first_conv.weight_grad_as_forward, widened: for a convolution of any stride (the stride becomes the
    forward convolution's dilation: dW[o, i, j] sums dY[b, o, y, x] * X[b, s*y + i, s*x + j]), and with
    `stored`, its kernels stored (O, H', W', B) by an explicit copy and the bias gradient summed from that
    copy rather than in the loop that writes it."""
    batch, _, height, width = x.shape
    channels = x.permute(1, 0, 2, 3).reshape(1, groups * batch, height, width)  # (1, G*B, H, W)
    kernels = grad_out.permute(1, 0, 2, 3)  # (G*O, B, H', W')
    if stored:
        kernels = kernels.contiguous(memory_format=torch.channels_last)  # stored (G*O, H', W', B)
    weight_grad = aten.convolution(channels, kernels, None, [1, 1], padding, list(stride), False, [0, 0], groups)
    weight_grad = weight_grad.flatten().view(kernels.shape[0], 1, *weight_grad.shape[-2:])
    bias_grad = kernels.sum(dim=(1, 2, 3)) if stored else grad_out.sum(dim=(0, 2, 3))
    return weight_grad, bias_grad


def strided_rewritable(node: torch.fx.Node) -> bool:
    """first_conv.rewritable without its stride-1 condition."""
    grad_out, x, weight, _, _, _, dilation, transposed, _, _, mask = node.args
    values = [arg.meta.get("val") for arg in (grad_out, x, weight)]
    return (
        all(isinstance(v, torch.Tensor) for v in values)
        and values[1].device.type == "cpu"
        and values[2].shape[1] == 1
        and list(dilation) == [1, 1]
        and not transposed
        and not mask[0]
        and mask[1]
    )


def strided_replace(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """first_conv.replace, passing the node's stride to weight_grad_widened."""
    stride = list(node.args[4])
    with mock.patch.object(first_conv, "weight_grad_as_forward", functools.partial(weight_grad_widened, stride=stride)):
        first_conv.replace(graph, node)


def strided_rewrite(graph: torch.fx.Graph) -> None:
    """first_conv.rewrite with strided convolutions rewritten always (stride 1: first_conv's choice)."""
    choose = first_conv.CHOICES[first_conv.environment_choice()]
    for node in list(graph.nodes):
        if node.target is aten.convolution_backward.default and strided_rewritable(node):
            if list(node.args[4]) != [1, 1]:
                strided_replace(graph, node)
            elif choose(node):
                first_conv.replace(graph, node)


def kernels_stored_rewrite(graph: torch.fx.Graph) -> None:
    """first_conv.rewrite (its choice) with weight_grad_widened's kernels stored."""
    with mock.patch.object(first_conv, "weight_grad_as_forward", functools.partial(weight_grad_widened, stored=True)):
        first_conv.rewrite(graph, first_conv.CHOICES[first_conv.environment_choice()])


def with_first_conv_pass(rewrite) -> AbstractContextManager:
    """speed.compile_options with `rewrite` as the post-grad pass in first_conv.py's place, under a cache
    key of its own: a step compiled with first_conv.py's module patched instead would share the key (and
    the compiled graph) of train's, and dynamo would reuse the graph compiled first."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class Pass(CustomGraphPass):
        measured = first_conv.chosen_pass().measured  # first_conv's choices measured before the compile

        def __call__(self, graph: torch.fx.Graph) -> None:
            rewrite(graph)

        def uuid(self) -> bytes:  # first_conv.inductor_pass's (its choices in force), this file's, the rewrite's name
            files = (__file__, first_conv.__file__, graph_splice.__file__, pool_kernel.__file__)
            return first_conv.chosen_pass().uuid() + get_hash_for_files(files) + rewrite.__name__.encode()

    options = speed.compile_options() | {"post_grad_custom_post_pass": Pass()}
    return mock.patch.object(speed, "compile_options", lambda: options)


def masked_sum_pool(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """cpu_pool.first_max_pool2d as a sum over each window of x where its first maximum is."""
    n, channels, height, width = x.shape
    rows, cols = height // kernel, width // kernel
    with torch.no_grad():
        windows = x.view(n, channels, rows, kernel, cols, kernel).transpose(3, 4).reshape(n, channels, rows, cols, -1)
        first = windows.argmax(dim=-1)[:, :, :, None, :, None]  # (N, C, H', 1, W', 1)
        position = torch.arange(kernel * kernel, device=x.device).view(1, 1, 1, kernel, 1, kernel)  # row-major
        picked = first == position  # (N, C, H', k, W', k)
    tiles = x.view(n, channels, rows, kernel, cols, kernel)
    return torch.where(picked, tiles, 0).sum(dim=(3, 5))  # (N, C, H', W'); backward: the gradient expanded


def channels_last_pool(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """cpu_pool.first_max_pool2d over x laid out (N, H, W, C): every index affine in the channel."""
    n, channels, height, width = x.shape
    rows, cols = height // kernel, width // kernel
    xl = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # (N, H, W, C), C innermost
    windows = xl.view(n, rows, kernel, cols, kernel, channels).permute(0, 1, 3, 2, 4, 5)  # (N, H', W', k, k, C)
    windows = windows.reshape(n, rows, cols, kernel * kernel, channels)  # (N, H', W', k*k, C)
    first = windows.argmax(dim=3, keepdim=True)  # (N, H', W', 1, C)
    picked = torch.arange(kernel * kernel, device=x.device).view(-1, 1) == first  # (N, H', W', k*k, C)
    return torch.where(picked, windows, 0).sum(dim=3).permute(0, 3, 1, 2)  # (N, C, H', W'), channels-last


def gather_pool(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """cpu_pool.first_max_pool2d as a gather of each window's first maximum from x's flattened planes, so that
    autograd's backward is a scatter of the pooled gradient (one store per window, no (y // 2, x // 2) index
    per input value) and ReLU's backward a loop of its own over contiguous values."""
    n, channels, height, width = x.shape
    rows, cols = height // kernel, width // kernel
    with torch.no_grad():
        windows = x.view(n, channels, rows, kernel, cols, kernel).transpose(3, 4).reshape(n, channels, rows, cols, -1)
        first = windows.argmax(dim=-1)  # (N, C, H', W'): the first maximum's position in its window, row-major
        top = torch.arange(rows, device=x.device).view(-1, 1) * kernel  # (H', 1): each window's first row
        left = torch.arange(cols, device=x.device) * kernel  # (W',): each window's first column
        flat = (top + first // kernel) * width + left + first % kernel  # (N, C, H', W'): its place in the plane
    return x.flatten(2).gather(2, flat.flatten(2)).view(n, channels, rows, cols)  # (N, C, H', W')


def weight_grad_unfold(x, grad_out, padding: list[int], groups: int):
    """The first convolution's weight gradient (one model: groups 1) as im2col and a batched product over
    the batch: dY stays (B, O, H'W') as the pool's backward writes it, with no (O, H', W', B) copy."""
    assert groups == 1, "one model's step only"
    batch, out_h, out_w = x.shape[0], *grad_out.shape[-2:]
    kernel = x.shape[-2] + 2 * padding[0] - out_h + 1
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))  # (B, 1, H+2p, W+2p)
    # (no unfold or stack: this is spliced into the graph after inductor's decompositions)
    shifted = [padded[:, :, i : i + out_h, j : j + out_w] for i in range(kernel) for j in range(kernel)]
    patches = torch.cat(shifted, dim=1).view(batch, kernel * kernel, out_h * out_w)  # (B, k*k, H'W')
    dy = grad_out.flatten(2)  # (B, O, H'W')
    weight_grad = torch.bmm(dy, patches.permute(0, 2, 1)).sum(0)  # (B, O, k*k) summed over B: (O, k*k)
    return weight_grad.view(-1, 1, kernel, kernel), grad_out.sum(dim=(0, 2, 3))


def unfold_rewrite(graph: torch.fx.Graph) -> None:
    """first_conv.rewrite (its choice) with weight_grad_unfold."""
    with mock.patch.object(first_conv, "weight_grad_as_forward", weight_grad_unfold):
        first_conv.rewrite(graph, first_conv.CHOICES[first_conv.environment_choice()])


def pool_kernel_rewrite(graph: torch.fx.Graph) -> None:
    """pool_kernel.py's C backward for every 2x2 max-pool (F.max_pool2d's), then first_conv.rewrite (its choice)."""
    pool_kernel.rewrite(graph)
    first_conv.rewrite(graph, first_conv.CHOICES[first_conv.environment_choice()])


def aten_pool(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """F.max_pool2d, as inductor compiles it (prims._low_memory_max_pool_with_offsets; a scatter backward)."""
    return F.max_pool2d(x, kernel)


@contextlib.contextmanager
def patched(*patches):
    """Each patch a context manager or (object, attribute, value), all in place at once."""
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch if isinstance(patch, AbstractContextManager) else mock.patch.object(*patch))
        yield


VARIANTS = {
    "control": lambda: templates(SameNetwork),
    "polyphase": lambda: templates(PolyphaseNetwork),
    "polyphase-dilated": lambda: patched(templates(PolyphaseNetwork), with_first_conv_pass(strided_rewrite)),
    "pool-first-cl": lambda: patched(templates(PoolFirstNetwork), with_first_conv_pass(kernels_stored_rewrite)),
    "masked-sum": lambda: patched((cpu_pool, "first_max_pool2d", masked_sum_pool)),
    "channels-last-pool": lambda: patched((cpu_pool, "first_max_pool2d", channels_last_pool)),
    "unfold": lambda: with_first_conv_pass(unfold_rewrite),
    "gather": lambda: patched((cpu_pool, "first_max_pool2d", gather_pool)),
    "aten-pool": lambda: patched((cpu_pool, "first_max_pool2d", aten_pool)),
    "c-backward": lambda: patched((cpu_pool, "first_max_pool2d", aten_pool), with_first_conv_pass(pool_kernel_rewrite)),
}


def check(model: str, images: torch.Tensor, labels: torch.Tensor, ways: dict) -> None:
    """Each way's compiled gradient of one batch against the plain network's eager one, and how many of
    its tensors differ from train's compiled ones in any bit (none: as likely the same graph as exact sums)."""
    config = recipe_config(model)
    params = networks.init_params(model, seed=0)
    batch_idx = torch.arange(256)  # lenet's micro-batch (fast's is 64: a graph of another shape than the timed one)
    gradient = make_gradient(config)
    plain, _ = gradient(params, images, labels, batch_idx)
    compiled = {}
    for name, way in ways.items():
        with way():
            compiled[name], _ = speed.compiled(gradient)(params, images, labels, batch_idx)
        grads, trains = compiled[name], next(iter(compiled.values()))
        worst = max(float((grads[k] - plain[k]).abs().max() / plain[k].abs().max()) for k in plain)
        differ = sum(not torch.equal(grads[k], trains[k]) for k in plain)
        print(
            f"{model}: {name}: gradients within {worst:.1e} of the plain eager ones (relative to each's largest); "
            f"{differ} of {len(plain)} tensors differ from train's compiled ones",
            flush=True,
        )
        assert worst < 1e-5, f"{name}'s gradients are not autograd's"  # float32 sums in another order: ~1e-6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--models", default="fast,lenet")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--first-conv", default="always", choices=["always", "never", "measured"])
    args = parser.parse_args()
    # The same first-layer kernel in every way's graph and every run: measured, it may differ between
    # processes (research/first_conv_choice.py), which would decide the comparison.
    os.environ[first_conv.CHOICE_ENV] = args.first_conv
    compare(args, {name: VARIANTS[name] for name in args.variants.split(",")}, check)


if __name__ == "__main__":
    main()
