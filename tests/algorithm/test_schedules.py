"""schedules.py against torch.optim.lr_scheduler.OneCycleLR, the oracle, step by step."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.support import needs_cpp_compiler
from tinymnist.algorithm import optim
from tinymnist.algorithm.schedules import one_cycle, schedule_lrs, step_lr
from tinymnist.errors import TinyMnistError


def torch_one_cycle_lrs(total_steps: int, **kwargs) -> list[float]:
    """The rate each of OneCycleLR's steps trains with, read from the optimizer it drives.

    The scheduler sets step 0's rate when it is built and the next step's rate on each
    scheduler.step(), which a training loop calls after optimizer.step().
    """
    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, total_steps=total_steps, cycle_momentum=False, **kwargs)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(total_steps - 1):  # not after the last: no step follows it to need a rate
        optimizer.step()  # no gradient: changes nothing, but keeps torch's call-order check quiet
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


one_cycle_settings = st.fixed_dictionaries(
    {
        "total_steps": st.integers(1, 600),
        "max_lr": st.floats(1e-5, 10.0),
        "pct_start": st.floats(0.0, 1.0),
        "div_factor": st.floats(1.0, 1e3),
        "final_div_factor": st.floats(1.0, 1e5),
        "anneal": st.sampled_from(["cos", "linear"]),
    }
)


@settings(max_examples=60, deadline=None)
@given(one_cycle_settings)
def test_one_cycle_equals_torch_one_cycle_lr_at_every_step(kwargs):
    total_steps, anneal = kwargs["total_steps"], kwargs["anneal"]
    assume(kwargs["pct_start"] * total_steps != 1)  # torch divides by zero there (see below)
    oracle_kwargs = {k: v for k, v in kwargs.items() if k not in ("total_steps", "anneal")}
    expected = torch_one_cycle_lrs(total_steps, anneal_strategy=anneal, **oracle_kwargs)
    ours = [one_cycle(step, **kwargs) for step in range(total_steps)]
    assert ours == expected  # the same float arithmetic in the same order: equal to the last bit


def test_one_cycle_defaults_are_torchs_and_shape_the_cycle():
    total, max_lr = 470, 0.01  # the fast recipe's cycle: 2 epochs of 235 steps
    lrs = [one_cycle(step, total_steps=total, max_lr=max_lr) for step in range(total)]
    assert lrs == torch_one_cycle_lrs(total, max_lr=max_lr)
    peak = max(range(total), key=lrs.__getitem__)
    assert peak == math.floor(0.3 * total) - 1  # the warm-up's last step: pct_start 0.3
    assert lrs[peak] == max_lr
    assert lrs[0] == pytest.approx(max_lr / 25, rel=1e-12)  # div_factor 25 (cos rounds it)
    assert lrs[-1] == pytest.approx(max_lr / 25 / 1e4, rel=1e-6)  # final_div_factor 1e4
    assert all(a < b for a, b in itertools.pairwise(lrs[: peak + 1]))  # climbs, then only falls
    assert all(a > b for a, b in itertools.pairwise(lrs[peak:]))


def test_a_one_step_warm_up_fails_in_torch_too_and_is_refused_in_one_line():
    with pytest.raises(ZeroDivisionError):
        torch_one_cycle_lrs(10, max_lr=1.0, pct_start=0.1)
    with pytest.raises(TinyMnistError, match=r"pct_start 0\.1 of 10 steps") as error:
        one_cycle(0, total_steps=10, max_lr=1.0, pct_start=0.1)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"step": 10, "total_steps": 10}, "step must be in 0..9"),
        ({"step": -1, "total_steps": 10}, "step must be in 0..9"),
        ({"step": 0, "total_steps": 0}, "total_steps"),
        ({"step": 0, "total_steps": 2.5}, "total_steps"),
        ({"step": 0, "total_steps": 10, "pct_start": 1.5}, "pct_start"),
        ({"step": 0, "total_steps": 10, "pct_start": float("nan")}, "pct_start"),
        ({"step": 0, "total_steps": 10, "max_lr": 0.0}, "max_lr"),
        ({"step": 0, "total_steps": 10, "div_factor": -1.0}, "div_factor"),
        ({"step": 0, "total_steps": 10, "anneal": "exp"}, "anneal must be one of cos, linear"),
    ],
)
def test_one_cycle_rejects_what_it_cannot_compute(kwargs, names):
    kwargs = {"max_lr": 0.01, **kwargs}
    step = kwargs.pop("step")
    with pytest.raises(TinyMnistError, match=names):
        one_cycle(step, **kwargs)


def test_epochs_of_rates_join_into_the_whole_schedule():
    schedule = functools.partial(one_cycle, total_steps=3 * 7, max_lr=0.1)
    epochs = [schedule_lrs(schedule, start=7 * e, steps=7) for e in range(3)]
    assert all(lrs.shape == (7,) and lrs.dtype == torch.float32 for lrs in epochs)
    whole = torch.tensor([schedule(step) for step in range(21)])  # float32, like torch.tensor(lr)
    assert torch.equal(torch.cat(epochs), whole)
    assert schedule_lrs(schedule, start=7, steps=7, device="meta").is_meta


def test_our_adam_driven_by_schedule_lrs_follows_torch_adam_under_one_cycle_lr():
    """The fast recipe's update: per-step rates from a tensor, against torch's own pairing."""
    total, max_lr, betas = 30, 0.01, (0.7, 0.9)
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 3, generator=gen, dtype=torch.float64)}
    theirs = params["w"].clone().requires_grad_(True)
    oracle = torch.optim.Adam([theirs], lr=max_lr, betas=betas, foreach=False)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(oracle, max_lr=max_lr, total_steps=total, cycle_momentum=False)
    adam = optim.adam(betas=betas)
    state = adam.init(params)
    lrs = schedule_lrs(functools.partial(one_cycle, total_steps=total, max_lr=max_lr), 0, total).double()  # (30,)
    for step in range(total):
        grad = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        params, state = adam.update({"w": grad}, state, params, lrs[step])
        theirs.grad = grad.clone()
        oracle.step()
        scheduler.step()
        # float64 weights, but the rate went through float32 (schedule_lrs): each step
        # differs from torch's by up to 6e-8 of its size, about 1e-11 here.
        torch.testing.assert_close(params["w"], theirs.detach(), rtol=1e-9, atol=1e-9)


@needs_cpp_compiler
def test_a_compiled_step_takes_every_rate_of_an_epoch_without_recompiling():
    torch._dynamo.reset()
    lrs = schedule_lrs(functools.partial(one_cycle, total_steps=12, max_lr=0.5), 0, 12)  # (12,)

    def sgd_step(weight, grad, lr):
        return weight - lr * grad

    compiled = torch.compile(sgd_step, fullgraph=True, dynamic=False)
    weight = eager = torch.ones(4)
    grad = torch.full((4,), 0.5)
    for step in range(12):
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            weight = compiled(weight, grad, lrs[step])  # lrs[step]: a 0-d view into the epoch's tensor
        eager = sgd_step(eager, grad, lrs[step])
    torch.testing.assert_close(weight, eager)
    assert not torch.equal(weight, torch.ones(4))


@settings(max_examples=40, deadline=None)
@given(base_lr=st.floats(1e-4, 10.0), step_size=st.integers(1, 10), gamma=st.floats(0.05, 1.0))
def test_step_lr_matches_torch_steplr(base_lr, step_size, gamma):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    for epoch in range(30):
        # StepLR multiplies as it goes; ours raises gamma to a power: equal to rounding.
        assert step_lr(base_lr, epoch, step_size, gamma) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        schedule.step()


def test_step_lr_rejects_a_zero_step_size():
    with pytest.raises(TinyMnistError, match="step_size"):
        step_lr(1.0, 3, 0, 0.7)
