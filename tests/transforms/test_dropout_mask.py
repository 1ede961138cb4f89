"""transforms/dropout_mask.py: dropout's mask drawn by a compiled kernel on the CPU.

The masks are other draws than eager's, so the oracle is the distribution and the algebra: each
value kept with probability 1 - p and scaled by 1 / (1 - p), the gradient through the same mask the
forward drew, the draws a function of torch's global generator.
"""

import math

import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

from tests.support import needs_cpp_compiler
from tinymnist.transforms.dropout_mask import rewrite
from tinymnist.transforms.speed import compiled

aten = torch.ops.aten
P = 0.25  # the dropout probability of these tests


def targets(graph: torch.fx.Graph) -> list:
    return [node.target for node in graph.nodes if node.op == "call_function"]


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
    sigma = math.sqrt(P * (1 - P) / mask.numel())
    assert abs(mask.mean().item() - (1 - P)) < 6 * sigma


def test_the_pass_leaves_other_devices_alone():
    traced = make_fx(lambda x: torch.bernoulli(x, 1 - P), tracing_mode="fake")(torch.empty(3, 4, device="meta"))
    rewrite(traced.graph)
    assert aten.bernoulli.p in targets(traced.graph)


@needs_cpp_compiler
def test_compiled_dropout_keeps_each_value_with_probability_one_minus_p_and_scales_it():
    x = torch.rand(1000, 1000) + 0.5  # no zeros of its own
    (out,), (code, *_) = run_and_get_code(compiled(lambda x: (F.dropout(x, P, training=True),)), x)
    assert "bernoulli" not in code  # drawn in the compiled kernel, not by an eager call
    kept = out != 0
    sigma = math.sqrt(P * (1 - P) / x.numel())  # of the kept fraction, a binomial's
    assert abs(kept.float().mean().item() - (1 - P)) < 6 * sigma
    torch.testing.assert_close(out[kept], x[kept] / (1 - P), rtol=1e-6, atol=0)


@needs_cpp_compiler
def test_the_gradient_goes_through_the_mask_the_forward_drew():
    x, w = torch.randn(200, 300), torch.randn(200, 300)

    def loss(x):
        out = F.dropout(x, P, training=True)
        return (out * w).sum(), out

    grad, out = compiled(torch.func.grad(loss, has_aux=True))(x)
    kept = (out != 0).float()
    assert 0 < kept.mean() < 1
    torch.testing.assert_close(grad, kept * w / (1 - P), rtol=1e-6, atol=0)


@needs_cpp_compiler
def test_the_masks_come_from_torchs_global_generator():
    """The same seed draws the same masks and leaves the generator in the same state (so a checkpoint's
    generator state resumes a run); another seed draws others."""
    dropout = compiled(lambda x: (F.dropout(x, P, training=True),))
    x = torch.ones(100, 100)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append((dropout(x)[0], dropout(x)[0], torch.get_rng_state()))
    (a1, a2, state_a), (b1, b2, state_b), (c1, _, _) = runs
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(state_a, state_b)
    assert not torch.equal(a1, a2)  # each call draws anew
    assert not torch.equal(a1, c1)
