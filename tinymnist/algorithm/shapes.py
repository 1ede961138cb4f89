"""How big every tensor in a network is, worked out instead of typed in.

pytorch/examples' MNIST net has `nn.Linear(9216, 128)`: 9216 = 64 * 12 * 12, what two 3x3
convolutions and a 2x2 max-pool leave of a 28x28 image. Here a network is a tuple of layer
descriptions (`Conv2d`, `MaxPool2d`, `Flatten`, `Linear`, ...), and `trace_layers` walks it
from the image to the output, one `TraceRow` per layer. networks.py builds its modules from
this trace, so `tinymnist shapes` prints the sizes that run. This file knows no particular
network. Feature maps are square (28x28 images, square kernels): one side's arithmetic sizes both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tinymnist.errors import TinyMnistError

Shape = tuple[int, ...]  # one example's shape, batch dimension left out: (C, H, W) or (F,)

MNIST_IMAGE: Shape = (1, 28, 28)  # one grey channel, 28x28 pixels (the IDX files' dims)
NUM_CLASSES = 10  # the digits 0-9: the size of every network's output


class ShapeError(TinyMnistError, ValueError):
    """A layer that cannot apply to its input: the output would be empty, or torch rejects it."""


def conv2d_out(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """One side of `F.conv2d`'s output, the nn.Conv2d docs' floor((size + 2p - d(k-1) - 1) / s) + 1.

    `d(k-1) + 1` is the span of a dilated kernel; where it does not fit once, torch raises, and so does this.
    """
    _at_least(1, size=size, kernel=kernel, stride=stride, dilation=dilation)
    _at_least(0, padding=padding)
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return _not_empty(out, f"conv2d: a {kernel}x{kernel} kernel", dilation, size, padding)


def pool2d_out(
    size: int, kernel: int, stride: int | None = None, padding: int = 0, dilation: int = 1, ceil_mode: bool = False
) -> int:
    """One side of `F.max_pool2d`'s output, by torch's rules (aten pooling_output_shape).

    As conv2d_out, or ceil(...) + 1 with ceil_mode, less a last window that would pool
    padding only. The stride defaults to the kernel; torch rejects padding over half the kernel.
    """
    stride = kernel if stride is None else stride
    _at_least(1, size=size, kernel=kernel, stride=stride, dilation=dilation)
    _at_least(0, padding=padding)
    if padding > kernel // 2:
        raise ShapeError(f"max_pool2d: padding {padding} is more than half the kernel size {kernel}")
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window would start in the right padding
    return _not_empty(out, f"max_pool2d: a {kernel}x{kernel} window", dilation, size, padding)


def _not_empty(out: int, what: str, dilation: int, size: int, padding: int) -> int:
    if out < 1:
        raise ShapeError(
            f"{what} (dilation {dilation}) does not fit a side of {size} padded by {padding}; the output would be empty"
        )
    return out


def _at_least(minimum: int, **values: int) -> None:
    for name, value in values.items():
        if value < minimum:
            raise ShapeError(f"{name} must be at least {minimum}, got {value}")


@dataclass(frozen=True)
class TraceRow:
    """One layer of a trace: what it makes of its input, and how many parameters it has."""

    layer: str  # the layer's name; for conv and linear layers, its parameters' key prefix
    arithmetic: str  # how the output size follows from the input size ("" where it is the same)
    shape: Shape  # one example's output shape, batch dimension left out
    params: int  # weights + biases


# The layer vocabulary: each description knows only its shape rule; networks.py gives it its computation.


@dataclass(frozen=True)
class Conv2d:
    """nn.Conv2d: `out_channels` filters, each kernel x kernel over all input channels."""

    name: str
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0

    def trace(self, shape: Shape) -> TraceRow:
        channels, side, _ = _square_feature_maps(self.name, shape)
        out = conv2d_out(side, self.kernel, self.stride, self.padding)
        arithmetic = (
            f"{self.kernel}x{self.kernel} s{self.stride} p{self.padding}: "
            f"floor(({side} + 2*{self.padding} - {self.kernel}) / {self.stride}) + 1 = {out}"
        )
        # a k x k filter for every (output, input) channel pair, and a bias per output channel
        params = self.out_channels * channels * self.kernel**2 + self.out_channels
        return TraceRow(self.name, arithmetic, (self.out_channels, out, out), params)


@dataclass(frozen=True)
class MaxPool2d:
    """F.max_pool2d: the largest value in each kernel x kernel window, per channel."""

    name: str
    kernel: int
    stride: int | None = None  # None: the kernel size, as in torch

    def trace(self, shape: Shape) -> TraceRow:
        channels, side, _ = _square_feature_maps(self.name, shape)
        stride = self.kernel if self.stride is None else self.stride
        out = pool2d_out(side, self.kernel, stride)
        arithmetic = f"{self.kernel}x{self.kernel} s{stride}: floor(({side} - {self.kernel}) / {stride}) + 1 = {out}"
        return TraceRow(self.name, arithmetic, (channels, out, out), 0)


@dataclass(frozen=True)
class Flatten:
    """torch.flatten(x, 1): each example's feature maps become one vector."""

    name: str = "flatten"

    def trace(self, shape: Shape) -> TraceRow:
        features = math.prod(shape)
        arithmetic = f"{' * '.join(map(str, shape))} = {features}" if len(shape) > 1 else ""
        return TraceRow(self.name, arithmetic, (features,), 0)


@dataclass(frozen=True)
class Linear:
    """nn.Linear: every input feature to every one of `out_features`; in_features is traced."""

    name: str
    out_features: int

    def trace(self, shape: Shape) -> TraceRow:
        if len(shape) != 1:
            raise ShapeError(f"{self.name}: a linear layer needs a flat input, got {shape}; flatten first")
        (in_features,) = shape
        params = self.out_features * in_features + self.out_features  # a weight per pair, a bias per output
        return TraceRow(self.name, "", (self.out_features,), params)


class _SameShape:
    """A layer without parameters whose output has its input's shape."""

    def trace(self, shape: Shape) -> TraceRow:
        return TraceRow(self.name, "", shape, 0)


@dataclass(frozen=True)
class ReLU(_SameShape):
    """F.relu: max(x, 0), elementwise."""

    name: str = "relu"


@dataclass(frozen=True)
class Dropout(_SameShape):
    """F.dropout: while training, zero each value with probability p, scale the rest by 1/(1-p)."""

    name: str
    p: float


@dataclass(frozen=True)
class LogSoftmax(_SameShape):
    """F.log_softmax over the classes: the network outputs log-probabilities, for NLL loss."""

    name: str = "log_softmax"


Layer = Conv2d | MaxPool2d | Flatten | Linear | ReLU | Dropout | LogSoftmax


def _square_feature_maps(name: str, shape: Shape) -> Shape:
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ShapeError(f"{name}: needs square feature maps (C, H, H), got {shape}")
    return shape


def trace_layers(layers: tuple[Layer, ...], input_shape: Shape = MNIST_IMAGE) -> list[TraceRow]:
    """Each layer's output shape and parameter count, from `input_shape` to the output."""
    rows, shape = [], input_shape
    for layer in layers:
        rows.append(layer.trace(shape))
        shape = rows[-1].shape
    return rows
