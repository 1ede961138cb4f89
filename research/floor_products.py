"""What a training step must compute, whatever runs it: each layer's products, their
FLOPs, and the arrays the optimizer's update must touch; and `floor_parts`, all of it
as calls ready to time. research/cpu_floor.py times them against the step.

A conv or linear layer's step does three products of the same multiply-add count: the
forward one, the weight gradient and the input gradient, but for the network's first
layer, whose input (the image) needs no gradient. Shapes come from networks.trace, so
they are the shapes that run.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from tinymnist.algorithm import networks, shapes
from tinymnist.algorithm.config import make_optimizer, recipe_config

PRODUCT_SECONDS = 0.01  # the least time one measurement of a call spans: far above the clock's resolution


@dataclass(frozen=True)
class ProductLayer:
    """A conv or linear layer, with one example's input and output shapes."""

    layer: shapes.Conv2d | shapes.Linear
    shape_in: shapes.Shape  # (C, H, W) or (F,)
    shape_out: shapes.Shape
    first: bool  # its input is the image: no input gradient

    def macs(self) -> int:
        """Multiply-adds per example of the forward product; each gradient product has as many."""
        if isinstance(self.layer, shapes.Linear):
            return self.shape_in[0] * self.shape_out[0]  # in x out weights, each used once
        channels_out, height, width = self.shape_out  # each output value: a k x k x C_in dot product
        return channels_out * height * width * self.shape_in[0] * self.layer.kernel**2

    def products(self) -> tuple[str, ...]:
        return ("forward", "weight_grad") if self.first else ("forward", "weight_grad", "input_grad")


def product_layers(model: str) -> list[ProductLayer]:
    """The network's conv and linear layers, in order, with their traced shapes."""
    layers, rows = networks.ARCHITECTURES[model], networks.trace(model)
    inputs = [shapes.MNIST_IMAGE] + [row.shape for row in rows[:-1]]  # a layer sees the output before it
    found = [
        (layer, shape_in, row.shape)
        for layer, shape_in, row in zip(layers, inputs, rows, strict=True)
        if isinstance(layer, (shapes.Conv2d, shapes.Linear))
    ]
    return [ProductLayer(*layer, first=i == 0) for i, layer in enumerate(found)]


def step_flops(model: str, batch: int) -> int:
    """FLOPs of the floor's products for one step of `batch` images."""
    return sum(2 * batch * p.macs() * len(p.products()) for p in product_layers(model))


def product_calls(p: ProductLayer, batch: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Each of the layer's products on random tensors of its shapes, ready to call."""
    x, grad_out = torch.randn(batch, *p.shape_in), torch.randn(batch, *p.shape_out)  # (B, C, H, W) or (B, F)
    if isinstance(p.layer, shapes.Linear):
        weight = torch.randn(p.shape_out[0], p.shape_in[0])  # (out, in), as nn.Linear keeps it
        calls = {
            "forward": lambda: x @ weight.t(),  # (B, out)
            "weight_grad": lambda: grad_out.t() @ x,  # (out, in)
            "input_grad": lambda: grad_out @ weight,
        }  # (B, in)
    else:
        conv = p.layer
        weight = torch.randn(conv.out_channels, p.shape_in[0], conv.kernel, conv.kernel)  # (C_out, C_in, k, k)
        stride, padding = conv.stride, conv.padding
        calls = {
            "forward": lambda: F.conv2d(x, weight, None, stride, padding),  # (B, C_out, H', W')
            "weight_grad": lambda: conv2d_weight(x, weight.shape, grad_out, stride, padding),  # like weight
            "input_grad": lambda: conv2d_input(x.shape, weight, grad_out, stride, padding),
        }  # like x
    return {name: calls[name] for name in p.products()}


def optimizer_arrays(model: str) -> int:
    """Arrays of the parameters' size an update must touch: the gradient read; the parameters
    and each per-parameter state read and written."""
    params = networks.init_params(model, 0)
    state = make_optimizer(recipe_config(model)).init(params)
    per_param = sum(isinstance(value, dict) and value.keys() == params.keys() for value in state.values())
    return 1 + 2 * (1 + per_param)


class Timed:
    """A call repeated often enough per measurement that the clock's resolution does not matter."""

    def __init__(self, fn, weight: float = 1, clock=time.perf_counter):
        self.fn, self.weight, self.clock = fn, weight, clock  # weight: how many such calls the step's work is
        for _ in range(3):
            fn()
        started = clock()
        fn()
        self.calls = max(1, math.ceil(PRODUCT_SECONDS / max(clock() - started, 1e-9)))

    def microseconds(self) -> float:
        started = self.clock()
        for _ in range(self.calls):
            self.fn()
        return (self.clock() - started) / self.calls * 1e6 * self.weight


def floor_parts(model: str, batch: int, micro_batch: int, clock=time.perf_counter) -> dict[str, dict[str, Timed]]:
    """The floor's measurements by way of batching ("whole", "micro"), plus "optimizer"."""
    ways = {"whole": {batch: 1}}
    if 0 < micro_batch < batch:  # the step's chunks: torch.split's sizes, counted
        ways["micro"] = collections.Counter(len(c) for c in torch.arange(batch).split(micro_batch))
    parts = {
        way: {
            f"{p.layer.name}.{name}" + (f"@{size}" if way == "micro" else ""): Timed(fn, count, clock)
            for size, count in sizes.items()
            for p in product_layers(model)
            for name, fn in product_calls(p, size).items()
        }
        for way, sizes in ways.items()
    }
    n_params = sum(row.params for row in networks.trace(model))
    a, b, out = torch.randn(n_params), torch.randn(n_params), torch.empty(n_params)  # (P,) each
    arrays = optimizer_arrays(model)  # torch.add moves 3 arrays: scale its time to the update's
    parts["optimizer"] = {"traffic": Timed(lambda: torch.add(a, b, out=out), arrays / 3, clock)}
    return parts
