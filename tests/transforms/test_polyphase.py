"""transforms/polyphase.py: the first block as one product gives the plain layers' values and gradients."""

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import needs_cpp_compiler
from tests.support.tutorials import TUTORIALS
from tinymnist.algorithm import networks, shapes
from tinymnist.algorithm.config import recipe_config
from tinymnist.algorithm.train import make_gradient
from tinymnist.transforms import polyphase, speed
from tinymnist.transforms.polyphase import polyphase_block


def plain_block(x, weight, bias, padding):
    """What the block replaces, in torch's own ops."""
    return F.max_pool2d(F.relu(F.conv2d(x, weight, bias, padding=padding)), 2)


def values_and_gradients(block, x, weight, bias, padding, grad_out):
    """The block's output and the weight's and bias's gradients for the upstream gradient `grad_out`."""
    out, pullback = torch.func.vjp(lambda w, b: block(x, w, b, padding), weight, bias)
    return out, *pullback(grad_out)


@st.composite
def block_cases(draw, integers: bool):
    """(x, weight, bias, upstream gradient), padding: random shapes with an even convolution output;
    `integers`: small whole numbers, so that every sum is exact in float32 and windows tie often
    (MNIST's blank background ties every window)."""
    batch, channels = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    kernel, padding = draw(st.integers(1, 5)), draw(st.integers(0, 2))
    out_side = 2 * draw(st.integers(1, 5))
    side = out_side + kernel - 1 - 2 * padding  # the input side that gives it
    if side < 1:
        side, padding = out_side + kernel - 1, 0
    pooled = out_side // 2
    sizes = [(batch, 1, side, side), (channels, 1, kernel, kernel), (channels,), (batch, channels, pooled, pooled)]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if integers:  # pixels 0 or 1, the rest -2 to 2
        pixels = torch.randint(0, 2, sizes[0], generator=g).float()
        tensors = [pixels] + [torch.randint(-2, 3, size, generator=g).float() for size in sizes[1:]]
    else:
        tensors = [torch.randn(size, generator=g) for size in sizes]
    return tuple(tensors), padding


@settings(max_examples=60, deadline=None)
@given(block_cases(integers=False))
def test_the_block_is_conv_relu_max_pool_to_float_rounding(case):
    (x, weight, bias, grad_out), padding = case
    got = values_and_gradients(polyphase_block, x, weight, bias, padding, grad_out)
    expected = values_and_gradients(plain_block, x, weight, bias, padding, grad_out)
    assert got[0].shape == expected[0].shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # the products add in another order


@settings(max_examples=60, deadline=None)
@given(block_cases(integers=True))
def test_ties_send_the_gradient_where_max_pool_sends_it(case):
    """Whole numbers: every sum exact, so the values and gradients must be F.max_pool2d's to the bit,
    ties (the window's first maximum takes the gradient) and all-negative windows (none does) included."""
    (x, weight, bias, grad_out), padding = case
    got = values_and_gradients(polyphase_block, x, weight, bias, padding, grad_out)
    expected = values_and_gradients(plain_block, x, weight, bias, padding, grad_out)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_nan_is_its_windows_maximum_as_in_max_pool():
    """A NaN weight must show in the output (and so in the loss), not vanish behind ReLU's mask."""
    x, weight, bias = torch.rand(2, 1, 6, 6), torch.randn(3, 1, 3, 3), torch.randn(3)
    weight[1, 0, 1, 1] = float("nan")  # channel 1: NaN everywhere
    x[0, 0, 0, 0] = float("nan")  # image 0: NaN in the first windows of every channel
    got, expected = polyphase_block(x, weight, bias, 0), plain_block(x, weight, bias, 0)
    assert got[:, 1].isnan().all() and got[0, :, 0, 0].isnan().all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_it_takes_the_networks_that_start_with_its_block():
    assert set(polyphase.TEMPLATES) == {"lenet", "fast"}  # cnn's conv1 feeds conv2; mlp's have none
    conv, relu, pool = networks.ARCHITECTURES["fast"][:3]
    assert polyphase.takes((conv, relu, pool))
    assert polyphase.takes((conv, relu, shapes.MaxPool2d("pool", kernel=2, stride=2)))
    odd = shapes.Conv2d("conv1", 8, kernel=4)  # 28 -> 25: windows would not tile it
    assert not polyphase.takes((odd, relu, pool))
    assert not polyphase.takes((shapes.Conv2d("conv1", 8, kernel=3, stride=2), relu, pool))
    assert not polyphase.takes((conv, pool, relu))
    assert not polyphase.takes((conv, relu, shapes.MaxPool2d("pool", kernel=3)))
    assert not polyphase.takes((conv, relu, shapes.MaxPool2d("pool", kernel=2, stride=1)))


@pytest.mark.parametrize("model", sorted(polyphase.TEMPLATES))
def test_a_network_through_it_is_the_tutorials_module(model):
    """Values and every parameter's gradient against the tutorial's own nn.Module under autograd
    (train_mnist_fast's pools before its ReLU: the same numbers)."""
    params = networks.init_params(model, 0)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)) - 0.5  # many windows <= 0
    labels = torch.arange(16) % networks.NUM_CLASSES
    ours = torch.func.grad_and_value(lambda p: F.cross_entropy(polyphase.apply(model, p, x), labels))(params)
    oracle = TUTORIALS[model]()
    oracle.load_state_dict(dict(zip(oracle.state_dict(), params.values(), strict=True)))
    loss = F.cross_entropy(oracle(x), labels)
    loss.backward()
    theirs = dict(zip(params, (p.grad for p in oracle.parameters()), strict=True))
    torch.testing.assert_close(ours, (theirs, loss.detach()), rtol=1e-5, atol=1e-6)


@needs_cpp_compiler
def test_compiled_ties_send_the_gradient_where_max_pool_sends_it():
    """Inductor's kernels for the block at fast's shapes, on whole numbers (exact sums, many ties): the
    values and gradients of F.max_pool2d's layers, eager, to the bit."""
    compiled_block = torch.compile(functools.partial(values_and_gradients, polyphase_block), fullgraph=True)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 2, (4, 1, 28, 28), generator=g).float()  # ink or blank
        weight, bias = (
            torch.randint(-2, 3, (24, 1, 5, 5), generator=g).float(),
            torch.randint(-2, 3, (24,), generator=g).float(),
        )
        grad_out = torch.randint(-2, 3, (4, 24, 12, 12), generator=g).float()
        expected = values_and_gradients(plain_block, x, weight, bias, 0, grad_out)
        torch.testing.assert_close(compiled_block(x, weight, bias, 0, grad_out), expected, rtol=0, atol=0)


@needs_cpp_compiler
def test_compiled_for_the_cpu_it_is_the_plain_networks_gradient():
    """fast's gradient as train compiles it on the CPU (speed.network_apply) against the plain layers'
    eager gradient, on digits-like images (mostly blank, so whole windows tie)."""
    config = recipe_config("fast", compile=True)
    apply = speed.network_apply(config, torch.device("cpu"), compile=True)
    assert apply is polyphase.apply
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 28, 28, generator=g) > 0.8).to(torch.uint8) * 255  # (64, 28, 28): ink or blank
    labels = torch.randint(0, 10, (64,), generator=g)
    params, batch_idx = networks.init_params("fast", 0), torch.arange(64)
    got = speed.compiled(make_gradient(config, apply))(params, images, labels, batch_idx)
    expected = make_gradient(config)(params, images, labels, batch_idx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
