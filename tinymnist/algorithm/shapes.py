"""How big every tensor in a network is, worked out by hand instead of by trial.

The pytorch/examples MNIST net has `nn.Linear(9216, 128)`: the 9216 is what two 3x3
convolutions and a 2x2 max-pool leave of a 28x28 image, 64 * 12 * 12, typed in by
hand. Here that number is derived: a network is a tuple of small layer descriptions
(`Conv2d`, `MaxPool2d`, `Flatten`, `Linear`, ...), and `trace_layers` walks it from the
input image to the output, one `TraceRow` per layer with the arithmetic that sizes it.
networks.py declares the four networks as such tuples and builds their modules from
this trace, so the sizes printed by `tinymnist shapes` are the sizes that run.
tests/algorithm/test_shapes.py checks the formulas against PyTorch itself.

This file knows no particular network, only the layer vocabulary: networks.py imports
it, never the other way round.

Feature maps here are square (28x28 images, square kernels), so one side's
arithmetic sizes both.
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
    """One side of `F.conv2d`'s output: floor((size + 2p - d(k-1) - 1) / s) + 1.

    This is the formula in the `nn.Conv2d` docs; `d(k-1) + 1` is the span a dilated
    kernel covers. Where the kernel does not fit into the padded input even once,
    torch raises, and so does this.
    """
    _check_positive(size=size, kernel=kernel, stride=stride, dilation=dilation)
    _check_non_negative(padding=padding)
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise ShapeError(
            f"conv2d: a {kernel}x{kernel} kernel (dilation {dilation}) does not fit "
            f"a side of {size} padded by {padding}; the output would be empty"
        )
    return out


def pool2d_out(
    size: int,
    kernel: int,
    stride: int | None = None,
    padding: int = 0,
    dilation: int = 1,
    ceil_mode: bool = False,
) -> int:
    """One side of `F.max_pool2d`'s output, by torch's own rules (aten pooling_output_shape).

    floor((size + 2p - d(k-1) - 1) / s) + 1, or ceil(...) + 1 with ceil_mode, except
    that a last window starting beyond the input and its left padding is dropped: it
    would pool padding only. The stride defaults to the kernel size, so windows tile
    the input. torch rejects padding over half the kernel, and so does this.
    """
    stride = kernel if stride is None else stride
    _check_positive(size=size, kernel=kernel, stride=stride, dilation=dilation)
    _check_non_negative(padding=padding)
    if padding > kernel // 2:
        raise ShapeError(f"max_pool2d: padding {padding} is more than half the kernel size {kernel}")
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window would start in the right padding
    if out < 1:
        raise ShapeError(
            f"max_pool2d: a {kernel}x{kernel} window (dilation {dilation}) does not fit "
            f"a side of {size} padded by {padding}; the output would be empty"
        )
    return out


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ShapeError(f"{name} must be at least 1, got {value}")


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ShapeError(f"{name} must be at least 0, got {value}")


@dataclass(frozen=True)
class TraceRow:
    """One layer of a trace: what it makes of its input, and how many parameters it has."""

    layer: str  # the layer's name; for conv and linear layers, its parameters' key prefix
    arithmetic: str  # how the output size follows from the input size ("" where it is the same)
    shape: Shape  # one example's output shape, batch dimension left out
    params: int  # weights + biases


# The layer vocabulary. Each description knows only its shape rule; networks.py gives
# each one its computation (nn.Conv2d, F.max_pool2d, ...).


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


@dataclass(frozen=True)
class ReLU:
    """F.relu: max(x, 0), elementwise."""

    name: str = "relu"

    def trace(self, shape: Shape) -> TraceRow:
        return TraceRow(self.name, "", shape, 0)


@dataclass(frozen=True)
class Dropout:
    """F.dropout: while training, zero each value with probability p, scale the rest by 1/(1-p)."""

    name: str
    p: float

    def trace(self, shape: Shape) -> TraceRow:
        return TraceRow(self.name, "", shape, 0)


@dataclass(frozen=True)
class LogSoftmax:
    """F.log_softmax over the classes: the network outputs log-probabilities, for NLL loss."""

    name: str = "log_softmax"

    def trace(self, shape: Shape) -> TraceRow:
        return TraceRow(self.name, "", shape, 0)


Layer = Conv2d | MaxPool2d | Flatten | Linear | ReLU | Dropout | LogSoftmax


def _square_feature_maps(name: str, shape: Shape) -> Shape:
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ShapeError(f"{name}: needs square feature maps (C, H, H), got {shape}")
    return shape


def trace_layers(layers: tuple[Layer, ...], input_shape: Shape = MNIST_IMAGE) -> list[TraceRow]:
    """Each layer's output shape and parameter count, from `input_shape` to the output."""
    rows, shape = [], input_shape
    for layer in layers:
        row = layer.trace(shape)
        rows.append(row)
        shape = row.shape
    return rows
