"""transforms/first_conv.py: a one-channel convolution's weight gradient as a forward convolution.

The oracle is autograd's own convolution_backward. The rewrite adds the same products in
another order, so float64 agrees to 1e-12 and float32 to float32's rounding of ~10^4-term sums.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

from tests.support import needs_cpp_compiler, random_mnist
from tinymnist.algorithm import networks
from tinymnist.algorithm.config import recipe_config
from tinymnist.algorithm.train import make_gradient
from tinymnist.transforms.first_conv import rewrite, weight_grad_as_forward
from tinymnist.transforms.speed import compiled
from tinymnist.transforms.vmap import vmapped

aten = torch.ops.aten


def autograd_weight_grads(x, grad_out, weight, padding: int, groups: int):
    """convolution_backward's weight and bias gradients, as autograd computes them."""
    _, weight_grad, bias_grad = aten.convolution_backward(
        grad_out,
        x,
        weight,
        [weight.shape[0]],
        [1, 1],
        [padding] * 2,
        [1, 1],
        False,
        [0, 0],
        groups,
        [False, True, True],
    )
    return weight_grad, bias_grad


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 6),
    groups=st.integers(1, 3),
    out_per_group=st.integers(1, 4),
    kernel=st.integers(1, 5),
    padding=st.integers(0, 2),
    side=st.integers(5, 12),
)
def test_weight_grad_as_forward_is_autograds(batch, groups, out_per_group, kernel, padding, side):
    """Any batch, kernel, padding and number of one-channel groups (N models under vmap)."""
    g = torch.Generator().manual_seed(batch * 1000 + side)
    x = torch.randn(batch, groups, side, side, generator=g, dtype=torch.float64)  # (B, G, H, W)
    weight = torch.randn(groups * out_per_group, 1, kernel, kernel, generator=g, dtype=torch.float64)
    out_side = side + 2 * padding - kernel + 1
    grad_out = torch.randn(batch, groups * out_per_group, out_side, out_side, generator=g, dtype=torch.float64)
    expected = autograd_weight_grads(x, grad_out, weight, padding, groups)
    got = weight_grad_as_forward(x, grad_out, [padding] * 2, groups)
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)


def two_conv_gradient(stride: int = 1):
    """Autograd's graph (make_fx) of a gradient through a one-channel conv and a four-channel one."""

    def loss(w1, w2, x):
        hidden = torch.nn.functional.conv2d(x, w1, stride=stride).relu()  # (B, 4, H', W')
        return torch.nn.functional.conv2d(hidden, w2).square().sum()

    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 1, 12, 12, generator=g, dtype=torch.float64),
    )
    return make_fx(torch.func.grad(loss, argnums=(0, 1)), tracing_mode="fake")(*args), args


def conv_backwards(graph: torch.fx.Graph) -> int:
    return sum(node.target is aten.convolution_backward.default for node in graph.nodes)


def test_the_pass_rewrites_the_one_channel_convolution_only():
    traced, args = two_conv_gradient()
    expected = traced(*args)
    assert conv_backwards(traced.graph) == 2
    rewrite(traced.graph)
    traced.recompile()
    assert conv_backwards(traced.graph) == 1  # the four-channel layer keeps oneDNN's backward
    for e, o in zip(expected, traced(*args), strict=True):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)


def test_the_pass_leaves_a_strided_convolution_alone():
    traced, _ = two_conv_gradient(stride=2)
    rewrite(traced.graph)
    assert conv_backwards(traced.graph) == 2


@needs_cpp_compiler
def test_compiled_gradients_take_the_rewrite_and_keep_autograds_values():
    """What `train` compiles on the CPU: fast's gradient, and lenet's for 3 models under vmap (groups of
    one channel). Each compiled graph calls convolution_backward for the second conv only."""
    data = random_mnist(64, 1, seed=0)
    images, labels = data.train_images, data.train_labels
    fast = recipe_config("fast")
    lenet = recipe_config("lenet", seeds=3)
    cases = {
        "fast": (make_gradient(fast), networks.init_params("fast", 0), torch.arange(32)),
        "lenet x3": (
            vmapped(make_gradient(lenet)),
            {
                k: torch.stack([networks.init_params("lenet", s)[k] for s in range(3)])
                for k in networks.init_params("lenet", 0)
            },
            torch.arange(48).view(3, 16),
        ),
    }
    for name, (gradient, params, batch_idx) in cases.items():
        expected_grads, expected_loss = gradient(params, images, labels, batch_idx)
        (grads, loss), (code, *_) = run_and_get_code(compiled(gradient), params, images, labels, batch_idx)
        assert code.count("aten.convolution_backward.default(") == 1, name  # calls, not comments
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        for key in expected_grads:
            scale = expected_grads[key].abs().max()
            torch.testing.assert_close(grads[key] / scale, expected_grads[key] / scale, rtol=0, atol=1e-5, msg=key)
