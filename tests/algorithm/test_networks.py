"""networks.py against the tutorials' own nn.Module classes, used as oracles.

The classes below are copied from the seed tutorials (seeds/000..003), so their
state_dicts, their initialisation under torch.manual_seed, their forward passes and
the shapes their layers see are what ours must match.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.support import needs_cpp_compiler
from tests.support.tutorials import TUTORIALS, tutorial_input
from tinymnist.algorithm import cpu_pool, networks, shapes
from tinymnist.errors import TinyMnistError

ORACLES = TUTORIALS


def oracle_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The oracle's parameters under our names: the seed's `conv1.0.weight` is our `conv1.weight`."""
    return {key.replace(".0.", "."): value for key, value in net.state_dict().items()}


def load_oracle(name: str, params: dict[str, torch.Tensor]) -> nn.Module:
    net = ORACLES[name]()
    keys = {ours: theirs for ours, theirs in zip(oracle_state(net), net.state_dict(), strict=True)}
    net.load_state_dict({keys[k]: v for k, v in params.items()})
    return net


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))  # (B, 1, 28, 28)


def stack(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([d[key] for d in dicts]) for key in dicts[0]}  # each (K, ...)


@pytest.mark.parametrize("name", networks.MODEL_NAMES)
def test_init_params_is_torchs_default_init_under_the_same_seed(name):
    torch.manual_seed(7)
    expected = oracle_state(ORACLES[name]())
    before = torch.get_rng_state()
    params = networks.init_params(name, 7)
    assert torch.equal(torch.get_rng_state(), before), "init_params must not draw from the global generator"
    assert list(params) == list(expected) == [k for k, _ in networks.TEMPLATES[name].named_parameters()]
    for key in expected:
        assert torch.equal(params[key], expected[key]), key


def test_init_params_bounds_and_seeds():
    params = networks.init_params("cnn", 0)
    for key, value in params.items():
        fan_in = value.shape[1:].numel() if key.endswith("weight") else params[key.replace("bias", "weight")][0].numel()
        bound = 1 / math.sqrt(fan_in)
        assert value.abs().max() <= bound
        if value.numel() > 1000:  # U(-b, b) has standard deviation b / sqrt(3)
            assert value.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    again, other = networks.init_params("cnn", 0), networks.init_params("cnn", 1)
    assert all(torch.equal(params[k], again[k]) for k in params)
    assert not any(torch.equal(params[k], other[k]) for k in params)


def test_init_params_on_other_devices():
    meta = networks.init_params("lenet", 0, "meta")
    assert all(v.is_meta for v in meta.values())
    if torch.cuda.is_available():
        cpu, cuda = networks.init_params("lenet", 3), networks.init_params("lenet", 3, "cuda")
        assert all(torch.equal(cpu[k], cuda[k].cpu()) for k in cpu)


def test_unknown_model_names_the_valid_ones():
    for call in (
        lambda: networks.init_params("resnet", 0),
        lambda: networks.apply("resnet", {}, images(1)),
        lambda: networks.trace("resnet"),
    ):
        with pytest.raises(TinyMnistError, match="mlp, mlp3, cnn, lenet"):
            call()


@pytest.mark.parametrize("name", networks.MODEL_NAMES)
def test_apply_equals_the_tutorial_forward(name):
    params = networks.init_params(name, 0)
    x = images(5)
    ours = networks.apply(name, params, x)
    assert ours.shape == (5, networks.NUM_CLASSES)
    torch.testing.assert_close(ours, load_oracle(name, params).eval()(tutorial_input(name, x)), rtol=1e-5, atol=1e-6)
    if networks.OUTPUTS_LOG_PROBS[name]:  # log-probabilities: their exponentials sum to 1
        torch.testing.assert_close(ours.exp().sum(dim=1), torch.ones(5))


def test_fast_pools_after_relu_with_train_mnist_fasts_gradients():
    """train_mnist_fast pools before each ReLU, ours after (faster compiled on the CPU):
    max and ReLU commute, and so do their gradients, ties and all-negative windows too."""
    params, x = networks.init_params("fast", 0), images(16) - 0.5  # (16, 1, 28, 28): many windows <= 0
    labels = torch.arange(16) % networks.NUM_CLASSES
    ours = torch.func.grad(lambda p: F.cross_entropy(networks.apply("fast", p, x), labels))(params)
    oracle = load_oracle("fast", params)
    F.cross_entropy(oracle(x), labels).backward()
    theirs = {key: p.grad for key, p in oracle.named_parameters()}  # conv1.weight, ...: our names
    assert theirs.keys() == params.keys()
    for key in params:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", networks.MODEL_NAMES)
def test_loss_kinds_follow_the_tutorials(name):
    """A network ends in log_softmax exactly where the tutorial's module does: its outputs'
    exponentials then sum to 1 for every image (logits almost never do)."""
    net = ORACLES[name]().eval()
    with torch.no_grad():
        out = net(tutorial_input(name, images(8) * 10))  # (8, 10)
    ends_in_log_softmax = torch.allclose(out.exp().sum(dim=1), torch.ones(8), atol=1e-5)
    assert networks.OUTPUTS_LOG_PROBS[name] == ends_in_log_softmax


def test_templates_stay_empty_and_unchanged():
    params = networks.init_params("cnn", 0)
    networks.apply("cnn", params, images(2), train=True)
    for template in networks.TEMPLATES.values():
        assert all(p.is_meta for p in template.parameters())
        assert not list(template.buffers())


def test_train_dropout_is_the_tutorials_dropout():
    params = networks.init_params("cnn", 0)
    oracle, x = load_oracle("cnn", params).train(), images(4)  # built first: building draws numbers too
    torch.manual_seed(123)
    ours = networks.apply("cnn", params, x, train=True)
    torch.manual_seed(123)
    theirs = oracle(x)  # nn.Dropout(0.25) then nn.Dropout(0.5), from the same generator state
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, networks.apply("cnn", params, x))


def test_dropout_rates_are_a_quarter_and_a_half():
    """Wire the cnn so that its outputs read dropout's masks directly.

    Constant convolutions make every pooled value 1; dropout1 (p=0.25) leaves 0 or
    1/0.75. fc1 units 0-4 each copy one pooled value; units 5-8 are a constant 1, so
    they see dropout2 only. dropout2 (p=0.5) leaves 0 or value/0.5. fc2 class j < 9
    copies unit j; class 9 is the constant 0 that log_softmax's output is read against.
    """
    params = {k: torch.zeros_like(v) for k, v in networks.init_params("cnn", 0).items()}
    params["conv1.bias"] += 1
    params["conv2.bias"] += 1
    for unit in range(5):
        params["fc1.weight"][unit, unit] = 1
    params["fc1.bias"][5:9] = 1
    for unit in range(9):
        params["fc2.weight"][unit, unit] = 1
    torch.manual_seed(0)
    out = networks.apply("cnn", params, images(400), train=True)  # (400, 10)
    units = out[:, :9] - out[:, 9:]  # logits, recovered from log-probabilities
    both, second_only = units[:, :5], units[:, 5:]
    kept_value = (1 / (1 - 0.25)) * (1 / (1 - 0.5))
    assert torch.all(torch.isclose(both, torch.tensor(0.0), atol=1e-4) | torch.isclose(both, torch.tensor(kept_value)))
    assert torch.all(
        torch.isclose(second_only, torch.tensor(0.0), atol=1e-4) | torch.isclose(second_only, torch.tensor(2.0))
    )
    assert (both > 1).float().mean().item() == pytest.approx(0.75 * 0.5, abs=0.05)
    assert (second_only > 1).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_eval_is_deterministic_and_draws_no_randomness():
    params = networks.init_params("cnn", 0)
    before = torch.get_rng_state()
    first, second = networks.apply("cnn", params, images(3)), networks.apply("cnn", params, images(3))
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name", networks.MODEL_NAMES)
def test_vmap_over_stacked_params_equals_separate_calls(name):
    members = [networks.init_params(name, seed) for seed in range(3)]
    x = images(4)
    together = torch.func.vmap(lambda p: networks.apply(name, p, x))(stack(members))  # (K, B, 10)
    for k, params in enumerate(members):
        torch.testing.assert_close(together[k], networks.apply(name, params, x), rtol=1e-4, atol=1e-5)


def test_vmap_train_draws_a_different_dropout_mask_per_member():
    same = stack([networks.init_params("cnn", 0)] * 2)
    out = torch.func.vmap(lambda p: networks.apply("cnn", p, images(2), train=True), randomness="different")(same)
    assert out.shape == (2, 2, networks.NUM_CLASSES) and not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("name", networks.MODEL_NAMES)
def test_trace_matches_the_shapes_torch_observes(name):
    """Forward hooks on the tutorial's own modules record the shapes each layer sees."""
    net = ORACLES[name]()
    seen = []
    hooked = (nn.Conv2d, nn.Linear, nn.MaxPool2d)
    for module in net.modules():
        if isinstance(module, hooked):
            module.register_forward_hook(lambda m, args, out: seen.append((m, args[0].shape[1:], out.shape[1:])))
    net.eval()(tutorial_input(name, images(2)))

    as_module = {shapes.Conv2d: nn.Conv2d, shapes.Linear: nn.Linear, shapes.MaxPool2d: nn.MaxPool2d}
    oracle_kinds = {type(m) for m, _, _ in seen}  # pytorch/examples pools with F.max_pool2d: no hook
    rows = networks.trace(name)
    inputs = [shapes.MNIST_IMAGE] + [row.shape for row in rows[:-1]]
    expected = [
        (as_module[type(layer)], shape_in, row)
        for layer, shape_in, row in zip(networks.ARCHITECTURES[name], inputs, rows, strict=True)
        if as_module.get(type(layer)) in oracle_kinds
    ]
    assert len(seen) == len(expected)
    for (module, shape_in, shape_out), (kind, row_in, row) in zip(seen, expected, strict=True):
        assert isinstance(module, kind)
        assert (tuple(shape_in), tuple(shape_out)) == (row_in, row.shape), row.layer
        assert row.params == sum(p.numel() for p in module.parameters()), row.layer
    assert rows[-1].shape == (networks.NUM_CLASSES,)
    assert sum(row.params for row in rows) == sum(p.numel() for p in networks.init_params(name, 0).values())


def test_the_flatten_sizes_are_derived():
    assert next(r for r in networks.trace("cnn") if r.layer == "flatten").shape == (9216,)
    assert next(r for r in networks.trace("lenet") if r.layer == "flatten").shape == (400,)
    assert networks.TEMPLATES["cnn"].fc1.in_features == 9216
    assert networks.TEMPLATES["lenet"].fc1.in_features == 400


@needs_cpp_compiler
def test_compiled_train_step_has_no_graph_break():
    """What train.py compiles: grad of a dropout loss through apply, as one graph (fullgraph=True)."""
    params, x, y = networks.init_params("cnn", 0), images(8), torch.arange(8)

    def train_loss(params, x, y):
        return F.nll_loss(networks.apply("cnn", params, x, train=True), y)

    def step(params, x, y):
        grads, value = torch.func.grad_and_value(train_loss)(params, x, y)
        return grads, value, networks.apply("cnn", params, x)

    grads, loss, out = torch.compile(step, fullgraph=True)(params, x, y)
    assert {k: v.shape for k, v in grads.items()} == {k: v.shape for k, v in params.items()}
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    torch.testing.assert_close(out, networks.apply("cnn", params, x), rtol=1e-4, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    kernel=st.sampled_from([2, 3]),
    sizes=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
    levels=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_first_max_pool2d_equals_max_pool2d_in_values_and_gradient(kernel, sizes, levels, seed):
    """Few distinct values, so windows with tied maxima are common: the gradient must
    still go to the very input F.max_pool2d sends it to."""
    n, channels, rows, cols = sizes
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (n, channels, rows * kernel, cols * kernel), generator=generator).float()
    upstream = torch.randn(n, channels, rows, cols, generator=generator)  # (N, C, H', W')
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    pooled, expected = cpu_pool.first_max_pool2d(ours, kernel), F.max_pool2d(theirs, kernel)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0)
    (pooled * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)


@needs_cpp_compiler
def test_compiled_max_pool2d_routes_values_and_gradients_like_max_pool2d(monkeypatch):
    """Compiled for the CPU, cpu_pool.max_pool2d takes the first_max_pool2d route where the
    windows tile the input, and F.max_pool2d's elsewhere; either way the values and the
    input each gradient reaches are F.max_pool2d's, on inputs full of tied maxima."""
    routed = []

    def first_max_pool2d(x, kernel):
        routed.append(tuple(x.shape))
        return models_first_max_pool2d(x, kernel)

    models_first_max_pool2d = cpu_pool.first_max_pool2d
    monkeypatch.setattr(cpu_pool, "first_max_pool2d", first_max_pool2d)
    generator = torch.Generator().manual_seed(0)
    for shape, kernel, stride, takes_route in [
        ((4, 3, 8, 6), 2, None, True),
        ((2, 2, 9, 9), 3, 3, True),
        ((2, 2, 7, 6), 2, None, False),  # 7 rows: the last is dropped, as F.max_pool2d does
        ((2, 2, 8, 8), 3, 2, False),  # overlapping windows
    ]:
        routed.clear()
        x = torch.randint(0, 3, shape, generator=generator).float()  # (N, C, H, W) of 0, 1, 2: ties everywhere
        ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        pooled = torch.compile(cpu_pool.max_pool2d, fullgraph=True, dynamic=False)(ours, kernel, stride)
        expected = F.max_pool2d(theirs, kernel, stride)
        assert bool(routed) == takes_route, shape
        torch.testing.assert_close(pooled, expected, rtol=0, atol=0)
        upstream = torch.randn(expected.shape, generator=generator)  # (N, C, H', W')
        (pooled * upstream).sum().backward()
        (expected * upstream).sum().backward()
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)
