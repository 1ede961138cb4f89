"""tinymnist.algorithm.optim against torch.optim, the oracle: same settings, same steps, same numbers.

Each test runs our pure update and torch.optim (foreach=False, `p.grad` set by hand)
side by side over random parameter dicts, random gradients and a learning rate that
changes every step, as a schedule would.
"""

from __future__ import annotations

import inspect
import io
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import needs_cpp_compiler
from tinymnist.algorithm import optim, trees
from tinymnist.errors import TinyMnistError
from tinymnist.tool.reference import TORCH_OPTIMIZERS  # the oracle: our name -> torch.optim class

STEPS = 25
EXAMPLES = settings(max_examples=30, deadline=None)

rate = st.floats(0.0, 0.999)  # a running average's decay: beta, rho, alpha
eps = st.floats(1e-10, 1e-3)
weight_decay = st.one_of(st.just(0.0), st.floats(1e-4, 0.1))  # often off, as by default
momentum = st.one_of(st.just(0.0), st.floats(0.01, 0.99))


@st.composite
def sgd_hyperparameters(draw):
    m = draw(momentum)
    nesterov = m > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov else draw(st.one_of(st.just(0.0), st.floats(0.0, 0.9)))
    return {"momentum": m, "dampening": dampening, "nesterov": nesterov, "weight_decay": draw(weight_decay)}


adam_hyperparameters = st.fixed_dictionaries({"betas": st.tuples(rate, rate), "eps": eps, "weight_decay": weight_decay})
HYPERPARAMETERS = {
    "sgd": sgd_hyperparameters(),
    "adam": adam_hyperparameters,
    "adamw": adam_hyperparameters,
    "adadelta": st.fixed_dictionaries({"rho": st.floats(0.0, 1.0), "eps": eps, "weight_decay": weight_decay}),
    # alpha >= 0.5: centered RMSprop subtracts E[g]^2 from E[g^2], and with a small
    # alpha the two nearly cancel, leaving rounding noise in both implementations.
    "rmsprop": st.fixed_dictionaries(
        {
            "alpha": st.floats(0.5, 0.999),
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "centered": st.booleans(),
        }
    ),
}
# The base learning rates each optimizer is used with: large enough to move weights.
LR_RANGE = {
    "sgd": (1e-3, 0.5),
    "adam": (1e-4, 0.1),
    "adamw": (1e-4, 0.1),
    "adadelta": (0.1, 2.0),
    "rmsprop": (1e-4, 1e-2),
}


def random_params(gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One to three tensors of random small shapes (0-d included), like a tiny model."""
    params = {}
    for i in range(int(torch.randint(1, 4, (), generator=gen))):
        shape = torch.randint(1, 5, (int(torch.randint(0, 4, (), generator=gen)),), generator=gen).tolist()
        params[f"layer{i}.weight"] = torch.randn(shape, generator=gen, dtype=dtype)
    return params


def random_like(params: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {name: torch.randn(p.shape, generator=gen, dtype=p.dtype) for name, p in params.items()}


def run_both(name: str, hyper: dict, base_lr: float, seed: int, dtype: torch.dtype, resync: bool = False):
    """Yield ours and torch.optim's (params, state) after each of STEPS updates.

    torch.optim names its per-parameter state as ours does ("exp_avg", ...), so its
    state is regrouped into our layout: {key: {param name: tensor}}. The step counter
    is left out (torch's SGD keeps none; its others keep a float) and checked apart.
    `resync`: each of our updates starts from torch's params and state, so that only one
    update's arithmetic is compared, not a trajectory that can amplify the last bits.
    """
    gen = torch.Generator().manual_seed(seed)
    params = random_params(gen, dtype)
    theirs = {k: p.clone() for k, p in params.items()}
    oracle = TORCH_OPTIMIZERS[name](list(theirs.values()), lr=base_lr, foreach=False, **hyper)
    ours = optim.OPTIMIZERS[name](**hyper)
    state = ours.init(params)
    for step in range(1, STEPS + 1):
        grads = random_like(params, gen)
        lr = torch.tensor(base_lr * float(torch.empty(()).uniform_(0.5, 1.5, generator=gen)), dtype=dtype)
        params, state = ours.update(grads, state, params, lr)
        for k, p in theirs.items():
            p.grad = grads[k].clone()
        oracle.param_groups[0]["lr"] = float(lr)
        oracle.step()
        assert int(state["step"]) == step
        buffers = {key: value for key, value in state.items() if key != "step"}
        their_buffers = {key: {k: oracle.state[p][key] for k, p in theirs.items()} for key in buffers}
        yield (params, buffers), (theirs, their_buffers)
        if resync:
            params = {k: p.detach().clone() for k, p in theirs.items()}
            state = {"step": state["step"], **trees.tree_map(torch.clone, their_buffers)}


def test_registry_has_the_five_optimizers():
    assert set(optim.OPTIMIZERS) == set(TORCH_OPTIMIZERS)


@pytest.mark.parametrize("name", list(TORCH_OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_matches_torch_optim(name, dtype):
    # float64 shows the arithmetic is torch.optim's to 1e-6 relative, along all STEPS. In
    # float32 the roundings differ (torch does p - lr * g in one kernel, `add_(g, alpha=-lr)`,
    # we in two), and where cancellation leaves a weight near zero, a few ulps of the operands
    # show: up to 2e-6 measured. So float32 uses torch.testing's default atol, 1e-5, and
    # rtol 1e-5: Adam with beta2 = 0 and eps = 1e-10 steps by about lr * sign(grad), which
    # turns rounding in a tiny gradient into 6e-6 relative on a weight of 27 (seed 0).
    # float32 compares one update at a time (resync): along a trajectory, a gradient that
    # weight decay cancels to near zero under a denominator near eps amplifies earlier steps'
    # last bits (Adam, beta2 = 0, eps 4e-4, weight decay 0.1: 9e-5 after 21 steps).
    atol, rtol = (1e-12, 1e-6) if dtype == torch.float64 else (1e-5, 1e-5)

    @EXAMPLES
    @given(hyper=HYPERPARAMETERS[name], base_lr=st.floats(*LR_RANGE[name]), seed=st.integers(0, 2**31))
    def check(hyper, base_lr, seed):
        for ours, theirs in run_both(name, hyper, base_lr, seed, dtype, resync=dtype == torch.float32):
            torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)

    check()


def test_defaults_are_torch_optims():
    for name, constructor in optim.OPTIMIZERS.items():
        torch_params = inspect.signature(TORCH_OPTIMIZERS[name]).parameters
        for hyper, param in inspect.signature(constructor).parameters.items():
            assert param.default == torch_params[hyper].default, f"{name}({hyper}=...)"


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.999, 0.9999])
def test_bias_correction_keeps_float32_digits(beta):
    steps = torch.arange(1, 2001)
    exact = 1 - beta ** steps.double()
    ours = optim._bias_correction(beta, steps.float())
    torch.testing.assert_close(ours.double(), exact, rtol=1e-6, atol=0)


# Every optional piece of state switched on, and the state keys that brings.
FULLY_LOADED = {
    "sgd": ({"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, {"step", "momentum_buffer"}),
    "adam": ({"weight_decay": 0.01}, {"step", "exp_avg", "exp_avg_sq"}),
    "adamw": ({}, {"step", "exp_avg", "exp_avg_sq"}),
    "adadelta": ({"weight_decay": 0.01}, {"step", "square_avg", "acc_delta"}),
    "rmsprop": (
        {"momentum": 0.9, "centered": True, "weight_decay": 0.01},
        {"step", "square_avg", "grad_avg", "momentum_buffer"},
    ),
}


def test_plain_sgd_and_rmsprop_keep_only_what_they_use():
    params = {"w": torch.zeros(2)}
    assert set(optim.sgd().init(params)) == {"step"}
    assert set(optim.rmsprop().init(params)) == {"step", "square_avg"}


@pytest.mark.parametrize("name", list(FULLY_LOADED))
def test_state_is_a_plain_dict_on_the_params_device(name):
    hyper, keys = FULLY_LOADED[name]
    # The meta device stands in for a GPU: a tensor left on the CPU would show.
    params = {"w": torch.zeros(3, 2, device="meta"), "b": torch.zeros(2, device="meta")}
    state = optim.OPTIMIZERS[name](**hyper).init(params)
    assert type(state) is dict and set(state) == keys
    step = state["step"]
    assert step.shape == () and step.dtype == torch.int64 and step.device.type == "meta"
    for key in keys - {"step"}:
        assert type(state[key]) is dict and set(state[key]) == set(params)
        for p_name, p in params.items():
            t = state[key][p_name]
            assert (t.shape, t.dtype, t.device) == (p.shape, p.dtype, p.device)


@pytest.mark.parametrize("name", list(FULLY_LOADED))
def test_update_returns_the_keys_of_init_in_the_same_order(name):
    # torch.compile guards on dict key order: any reordering recompiles the step.
    hyper, _ = FULLY_LOADED[name]
    opt = optim.OPTIMIZERS[name](**hyper)
    params = {"w": torch.ones(3, 2), "b": torch.ones(2)}
    state = opt.init(params)
    new_params, new_state = opt.update(params, state, params, torch.tensor(0.1))
    assert list(new_params) == list(params) and list(new_state) == list(state)
    for key in state.keys() - {"step"}:
        assert list(new_state[key]) == list(params)


@pytest.mark.parametrize("name", list(FULLY_LOADED))
def test_state_survives_a_weights_only_checkpoint(name):
    hyper, _ = FULLY_LOADED[name]
    opt = optim.OPTIMIZERS[name](**hyper)
    gen = torch.Generator().manual_seed(0)
    params = random_params(gen, torch.float32)
    state = opt.init(params)
    params, state = opt.update(random_like(params, gen), state, params, torch.tensor(0.01))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    torch.testing.assert_close(loaded, state, rtol=0, atol=0)
    grads = random_like(params, gen)
    lr = torch.tensor(0.01)
    torch.testing.assert_close(opt.update(grads, loaded, params, lr), opt.update(grads, state, params, lr))


@pytest.mark.parametrize("name", list(FULLY_LOADED))
def test_update_never_modifies_its_inputs(name):
    hyper, _ = FULLY_LOADED[name]
    opt = optim.OPTIMIZERS[name](**hyper)
    gen = torch.Generator().manual_seed(1)
    params = random_params(gen, torch.float32)
    state = opt.init(params)
    for _ in range(3):  # the first update and later ones take different paths (SGD's buffer)
        grads, lr = random_like(params, gen), torch.tensor(0.01)
        before = trees.tree_map(torch.clone, {"grads": grads, "state": state, "params": params, "lr": {"lr": lr}})
        new_params, new_state = opt.update(grads, state, params, lr)
        after = {"grads": grads, "state": state, "params": params, "lr": {"lr": lr}}
        torch.testing.assert_close(after, before, rtol=0, atol=0)
        params, state = new_params, new_state


# (constructor, bad hyperparameters, the name the message must give)
INVALID = [
    ("sgd", {"momentum": -0.1}, "momentum"),
    ("sgd", {"weight_decay": -1e-4}, "weight_decay"),
    ("sgd", {"nesterov": True}, "nesterov"),
    ("sgd", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "nesterov"),
    ("adam", {"eps": -1e-8}, "eps"),
    ("adam", {"betas": (1.0, 0.999)}, "betas[0]"),
    ("adam", {"betas": (-0.1, 0.999)}, "betas[0]"),
    ("adam", {"betas": (0.9, 1.0)}, "betas[1]"),
    ("adam", {"weight_decay": -0.1}, "weight_decay"),
    ("adamw", {"betas": (0.9, 1.5)}, "betas[1]"),
    ("adamw", {"weight_decay": -0.1}, "weight_decay"),
    ("adadelta", {"rho": 1.1}, "rho"),
    ("adadelta", {"rho": -0.1}, "rho"),
    ("adadelta", {"eps": -1e-6}, "eps"),
    ("adadelta", {"weight_decay": -0.1}, "weight_decay"),
    ("rmsprop", {"alpha": -0.1}, "alpha"),
    ("rmsprop", {"eps": -1e-8}, "eps"),
    ("rmsprop", {"momentum": -0.9}, "momentum"),
    ("rmsprop", {"weight_decay": -0.1}, "weight_decay"),
]


@pytest.mark.parametrize("name, hyper, named", INVALID)
def test_invalid_hyperparameters_are_rejected_like_torch(name, hyper, named):
    with pytest.raises(ValueError):
        TORCH_OPTIMIZERS[name]([torch.zeros(1)], **hyper)
    with pytest.raises(TinyMnistError, match=re.escape(f"{name}: {named}")):
        optim.OPTIMIZERS[name](**hyper)


@pytest.mark.parametrize(
    "name, hyper",
    [
        ("adadelta", {"rho": 1.0}),
        ("adadelta", {"rho": 0.0}),
        ("adam", {"betas": (0.0, 0.0)}),
        ("rmsprop", {"alpha": 2.0}),
    ],
)
def test_edge_values_torch_accepts_are_accepted(name, hyper):
    TORCH_OPTIMIZERS[name]([torch.zeros(1)], **hyper)
    optim.OPTIMIZERS[name](**hyper)


def test_nan_hyperparameters_are_rejected():
    # torch.optim's `momentum < 0` lets NaN through; ours does not.
    with pytest.raises(TinyMnistError, match="momentum"):
        optim.sgd(momentum=float("nan"))
    with pytest.raises(TinyMnistError, match="eps"):
        optim.adam(eps=float("nan"))


@needs_cpp_compiler
@pytest.mark.parametrize("name", list(FULLY_LOADED))
def test_compiled_update_matches_eager_and_never_recompiles(name):
    torch._dynamo.reset()
    hyper, _ = FULLY_LOADED[name]
    opt = optim.OPTIMIZERS[name](**hyper)
    compiled = torch.compile(opt.update, fullgraph=True)
    gen = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    eager = compiled_run = (params, opt.init(params))
    # The second call must reuse the first graph, and so must the third, whose lr
    # differs: lr is a tensor input, not a constant baked into the graph.
    for call, lr in enumerate([1.0, 1.0, 0.7]):
        grads, lr = random_like(params, gen), torch.tensor(lr)
        eager = opt.update(grads, eager[1], eager[0], lr)
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            compiled_run = compiled(grads, compiled_run[1], compiled_run[0], lr)
        torch.testing.assert_close(compiled_run, eager, rtol=1e-6, atol=1e-6)


@needs_cpp_compiler
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_compiled_adam_computes_its_bias_corrections_once_a_step(name):
    # inductor inlines a 0-d value into every loop that reads it; had the two scalars
    # been inlined, each parameter's loop would hold its own expm1 of each.
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    opt = optim.OPTIMIZERS[name]()
    gen = torch.Generator().manual_seed(3)
    params = {f"w{i}": torch.randn(64 + i, generator=gen) for i in range(4)}
    compiled = torch.compile(opt.update, fullgraph=True, dynamic=False)
    _, (code,) = run_and_get_code(compiled, random_like(params, gen), opt.init(params), params, torch.tensor(0.1))
    assert code.count("expm1(") == 2, code
