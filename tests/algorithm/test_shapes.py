"""The size arithmetic in shapes.py, with PyTorch as the oracle.

Hypothesis draws small sides, kernels, strides, paddings and dilations; where torch
accepts them, our formula must give exactly the shape torch produces, and where our
formula says "impossible", torch must refuse too.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tinymnist.algorithm import shapes
from tinymnist.algorithm.shapes import ShapeError, conv2d_out, pool2d_out
from tinymnist.errors import TinyMnistError

sides = st.integers(1, 12)
kernels = st.integers(1, 5)
strides = st.integers(1, 4)
dilations = st.integers(1, 3)
small = settings(max_examples=300, deadline=None)


def conv_or_error(size, kernel, stride, padding, dilation):
    try:
        return conv2d_out(size, kernel, stride, padding, dilation)
    except ShapeError:
        return None


def pool_or_error(size, kernel, stride, padding, dilation, ceil_mode):
    try:
        return pool2d_out(size, kernel, stride, padding, dilation, ceil_mode)
    except ShapeError:
        return None


@small
@given(sides, sides, kernels, strides, st.integers(0, 3), dilations)
def test_conv2d_out_is_the_shape_torch_produces(height, width, kernel, stride, padding, dilation):
    x = torch.zeros(1, 1, height, width)  # (1, 1, H, W): one tiny image
    weight = torch.zeros(1, 1, kernel, kernel)  # (out, in, k, k)
    ours = (
        conv_or_error(height, kernel, stride, padding, dilation),
        conv_or_error(width, kernel, stride, padding, dilation),
    )
    if None in ours:
        with pytest.raises(RuntimeError):
            F.conv2d(x, weight, stride=stride, padding=padding, dilation=dilation)
    else:
        out = F.conv2d(x, weight, stride=stride, padding=padding, dilation=dilation)
        assert tuple(out.shape[2:]) == ours


@small
@given(sides, sides, kernels, st.none() | strides, st.integers(0, 3), dilations, st.booleans())
def test_pool2d_out_is_the_shape_torch_produces(height, width, kernel, stride, padding, dilation, ceil_mode):
    x = torch.zeros(1, 1, height, width)  # (1, 1, H, W)
    args = (kernel, stride, padding, dilation, ceil_mode)
    ours = (pool_or_error(height, *args), pool_or_error(width, *args))
    call = {"kernel_size": kernel, "stride": stride, "padding": padding, "dilation": dilation, "ceil_mode": ceil_mode}
    if None in ours:
        with pytest.raises(RuntimeError):
            F.max_pool2d(x, **call)
    else:
        assert tuple(F.max_pool2d(x, **call).shape[2:]) == ours


def test_the_recipes_sizes():
    assert conv2d_out(28, 3) == 26 and conv2d_out(26, 3) == 24 and pool2d_out(24, 2) == 12  # cnn: 64*12*12
    assert conv2d_out(28, 5, padding=2) == 28 and pool2d_out(28, 2) == 14  # lenet
    assert conv2d_out(14, 5) == 10 and pool2d_out(10, 2) == 5  # lenet: 16*5*5


def test_ceil_mode_drops_a_window_that_would_start_in_the_padding():
    # 3 wide, padded by 1 each side, 2x2 windows every 2: ceil gives 3 windows, but the
    # third would start at padded position 4, past the input (positions 1..3).
    assert pool2d_out(3, 2, stride=2, padding=1, ceil_mode=True) == 2
    assert F.max_pool2d(torch.zeros(1, 1, 3, 3), 2, 2, 1, ceil_mode=True).shape[2:] == (2, 2)
    assert pool2d_out(5, 2, stride=2, ceil_mode=True) == 3  # a partial last window inside the input counts


@pytest.mark.parametrize(
    "call",
    [
        lambda: conv2d_out(2, 3),  # kernel larger than the input
        lambda: conv2d_out(5, 3, dilation=3),  # dilated span 7 > 5
        lambda: conv2d_out(0, 1),
        lambda: conv2d_out(5, 0),
        lambda: conv2d_out(5, 3, stride=0),
        lambda: conv2d_out(5, 3, padding=-1),
        lambda: pool2d_out(5, 2, padding=2),  # padding over half the kernel
        lambda: pool2d_out(1, 2),
        lambda: pool2d_out(5, 2, stride=0),
    ],
)
def test_impossible_layers_raise_a_user_facing_value_error(call):
    with pytest.raises(ShapeError) as caught:
        call()
    assert isinstance(caught.value, TinyMnistError) and isinstance(caught.value, ValueError)


def test_trace_rows_chain_and_count_parameters():
    layers = (
        shapes.Conv2d("c", 4, kernel=3, padding=1),
        shapes.MaxPool2d("p", 2),
        shapes.Flatten(),
        shapes.Linear("l", 3),
    )
    rows = shapes.trace_layers(layers, input_shape=(2, 8, 8))
    assert [row.shape for row in rows] == [(4, 8, 8), (4, 4, 4), (64,), (3,)]
    assert [row.params for row in rows] == [4 * 2 * 3 * 3 + 4, 0, 0, 64 * 3 + 3]
    assert rows[0].arithmetic == "3x3 s1 p1: floor((8 + 2*1 - 3) / 1) + 1 = 8"
    assert rows[2].arithmetic == "4 * 4 * 4 = 64"


def test_trace_rejects_a_network_that_does_not_fit():
    with pytest.raises(ShapeError, match="flatten first"):
        shapes.trace_layers((shapes.Linear("fc", 10),))
    with pytest.raises(ShapeError, match="does not fit"):
        shapes.trace_layers((shapes.Conv2d("conv", 8, kernel=5),), input_shape=(1, 4, 4))
