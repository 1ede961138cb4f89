"""transforms/dropout_mask.py: dropout's mask drawn by a compiled kernel on the CPU.

The pass meets `bernoulli.p` only where dropout is traced under torch.func's grad or vmap, as the
training step is; a plain compiled F.dropout never had it. So each test traces through torch.func.
Its masks are other draws than eager's; the oracles are the mask inductor draws for a plain
compiled F.dropout (the same expression, so the same draws for the same seed), the distribution and
the algebra: each value kept with probability 1 - p and scaled by 1 / (1 - p), the gradient through
the mask the forward drew.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

from tests.support import needs_cpp_compiler
from tinymnist.transforms import speed
from tinymnist.transforms.dropout_mask import rewrite
from tinymnist.transforms.speed import compiled

aten = torch.ops.aten
P = 0.25  # the dropout probability of these tests


def targets(graph: torch.fx.Graph) -> list:
    return [node.target for node in graph.nodes if node.op == "call_function"]


def dropout_and_gradient(x: torch.Tensor, w: torch.Tensor, p: float = P):
    """F.dropout's output and the gradient of sum(dropout(x) * w), through torch.func as the step is traced."""

    def loss(x):
        out = F.dropout(x, p, training=True)
        return (out * w).sum(), out

    grad, out = torch.func.grad(loss, has_aux=True)(x)
    return out, grad


def test_the_pass_replaces_a_cpu_bernoulli_with_uniform_draws():
    traced = make_fx(lambda x: torch.bernoulli(x, 1 - P), tracing_mode="fake")(torch.empty(300, 400))
    assert aten.bernoulli.p in targets(traced.graph)
    rewrite(traced.graph)
    traced.recompile()
    assert aten.bernoulli.p not in targets(traced.graph)
    assert aten.rand.default in targets(traced.graph)
    torch.manual_seed(0)
    mask = traced(torch.empty(300, 400))
    assert mask.shape == (300, 400) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    sigma = math.sqrt(P * (1 - P) / mask.numel())  # of the kept fraction, a binomial's
    assert abs(mask.mean().item() - (1 - P)) < 6 * sigma


@pytest.mark.parametrize(
    "draw, rewritten",
    [
        (lambda x: torch.bernoulli(x.double(), 1 - P), True),
        (lambda x: torch.bernoulli(x.to("meta"), 1 - P), False),
        (lambda x: torch.bernoulli(x, 1 - P, generator=torch.Generator()), False),
    ],
    ids=["float64: rewritten", "not the CPU", "a generator of its own"],
)
def test_which_draws_the_pass_takes(draw, rewritten):
    traced = make_fx(draw, tracing_mode="fake")(torch.empty(3, 4))
    rewrite(traced.graph)
    assert (aten.bernoulli.p not in targets(traced.graph)) is rewritten


def test_the_pass_stands_aside_when_eagers_random_numbers_are_asked_for():
    traced = make_fx(lambda x: torch.bernoulli(x, 1 - P), tracing_mode="fake")(torch.empty(3, 4))
    with torch._inductor.config.patch(fallback_random=True):
        rewrite(traced.graph)
    assert aten.bernoulli.p in targets(traced.graph)


@needs_cpp_compiler
def test_without_the_pass_the_step_calls_eager_bernoulli_and_with_it_does_not(monkeypatch):
    x, w = torch.rand(50, 60), torch.randn(50, 60)
    options = speed.compile_options()
    without = {k: v for k, v in options.items() if k != "joint_custom_pre_pass"}
    with torch._inductor.config.patch(fx_graph_cache=False):
        _, (code_without, *_) = run_and_get_code(torch.compile(dropout_and_gradient, options=without), x, w)
        _, (code_with, *_) = run_and_get_code(compiled(dropout_and_gradient), x, w)
    assert "bernoulli" in code_without
    assert "bernoulli" not in code_with


@needs_cpp_compiler
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])  # 1 - (1 - p) is not p in floats for 0.1 and 0.3
def test_the_masks_are_those_inductor_draws_for_a_plain_compiled_dropout(p):
    x, w = torch.rand(200, 300) + 0.5, torch.randn(200, 300)  # x: no zeros of its own
    torch.manual_seed(3)
    (plain,) = torch.compile(lambda x: (F.dropout(x, p, training=True),))(x)
    torch.manual_seed(3)
    out, _ = compiled(dropout_and_gradient)(x, w, p)
    assert torch.equal(out != 0, plain != 0)


@needs_cpp_compiler
def test_each_value_is_kept_with_probability_one_minus_p_scaled_and_the_gradient_goes_through_that_mask():
    x, w = torch.rand(1000, 1000) + 0.5, torch.randn(1000, 1000)
    out, grad = compiled(dropout_and_gradient)(x, w)
    kept = out != 0
    sigma = math.sqrt(P * (1 - P) / x.numel())
    assert abs(kept.float().mean().item() - (1 - P)) < 6 * sigma
    torch.testing.assert_close(out[kept], x[kept] / (1 - P), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, kept.float() * w / (1 - P), rtol=1e-6, atol=0)


@needs_cpp_compiler
def test_n_models_under_vmap_draw_masks_of_their_own():
    x, w = torch.rand(4, 100, 100) + 0.5, torch.randn(4, 100, 100)
    (out, _), (code, *_) = run_and_get_code(
        compiled(torch.func.vmap(dropout_and_gradient, randomness="different")), x, w
    )
    assert "bernoulli" not in code  # drawn by the pass's compiled kernel, as --seeds runs cnn
    masks = [(model != 0) for model in out]
    assert all(not torch.equal(masks[0], other) for other in masks[1:])


@needs_cpp_compiler
def test_the_masks_come_from_torchs_global_generator():
    """The same seed draws the same masks and leaves the generator in the same state (so a checkpoint's
    generator state resumes a run); another seed draws others."""
    step = compiled(dropout_and_gradient)
    x, w = torch.ones(100, 100), torch.ones(100, 100)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append((step(x, w)[0], step(x, w)[0], torch.get_rng_state()))
    (a1, a2, state_a), (b1, b2, state_b), (c1, _, _) = runs
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(state_a, state_b)
    assert not torch.equal(a1, a2)  # each call draws anew
    assert not torch.equal(a1, c1)
