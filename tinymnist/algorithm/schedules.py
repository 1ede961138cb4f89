"""Learning-rate schedules as pure functions of the step number.

A schedule answers one question: what learning rate does optimizer step `step` use
(counted from 0, across epochs)? It keeps no state, so a resumed run asks it about
step 4700 and gets the same answer an uninterrupted run got. The training loop asks
for a whole epoch at once and hands the compiled step one 0-d tensor per step:

    schedule = functools.partial(one_cycle, total_steps=470, max_lr=0.01)
    lrs = schedule_lrs(schedule, start=235, steps=235, device=device)  # (235,) float32
    ... step(params, opt_state, images, labels, batches[i], lrs[i])      # lrs[i]: 0-d

A 0-d tensor, not a Python float: torch.compile bakes a float into the graph, so a
rate that changes every step would recompile the step every step.

`step_lr`, the seed recipes' StepLR, is a function of the epoch: every step of an
epoch uses the same rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tinymnist.errors import TinyMnistError

Schedule = Callable[[int], float]  # step number (from 0) -> learning rate


def step_lr(base_lr: float, epoch: int, step_size: int, gamma: float) -> float:
    """The learning rate of `epoch` (counted from 0) under torch's StepLR schedule:
    multiplied by `gamma` once every `step_size` epochs."""
    if step_size < 1:
        raise TinyMnistError(f"step_lr: step_size must be >= 1, got {step_size}")
    return base_lr * gamma ** (epoch // step_size)


def one_cycle(
    step: int,
    *,
    total_steps: int,
    max_lr: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal: str = "cos",
) -> float:
    """The learning rate of `step` under torch's OneCycleLR (its default two phases).

    Smith & Topin's "super-convergence" (2017) as fastai and torch implement it: the
    rate climbs from max_lr / div_factor to max_lr over the first pct_start of the
    steps, then falls to max_lr / div_factor / final_div_factor by the last step. A
    low start keeps the first steps of a fresh network stable; the long fall lets the
    weights settle, so one short run ends near its best accuracy. `anneal` is the
    curve of both phases: "cos" (half a cosine) or "linear".

    The arithmetic is OneCycleLR.get_lr's, in its order, so the floats are equal to
    the last bit; tests/algorithm/test_schedules.py holds it to torch step by step. Defaults are
    torch's. Its momentum cycling (cycle_momentum) is left out: our optimizers take
    their betas at construction.
    """
    # One-line errors for what OneCycleLR rejects, and for the steps no run trains.
    if not (isinstance(total_steps, int) and total_steps >= 1):
        raise TinyMnistError(f"one_cycle: total_steps must be a positive integer, got {total_steps!r}")
    if not 0 <= step < total_steps:
        raise TinyMnistError(f"one_cycle: step must be in 0..{total_steps - 1} (total_steps {total_steps}), got {step}")
    if not 0.0 <= pct_start <= 1.0:
        raise TinyMnistError(f"one_cycle: pct_start must be in [0, 1], got {pct_start}")
    if pct_start * total_steps == 1:
        # The warm-up would end at step 0, where it starts; torch divides 0 by 0 there.
        raise TinyMnistError(
            f"one_cycle: pct_start {pct_start} of {total_steps} steps is a warm-up of one step, "
            "which OneCycleLR cannot compute; choose another pct_start"
        )
    if not (max_lr > 0 and div_factor > 0 and final_div_factor > 0):
        raise TinyMnistError(
            "one_cycle: max_lr, div_factor and final_div_factor must be positive, "
            f"got {max_lr}, {div_factor}, {final_div_factor}"
        )
    if anneal not in _ANNEAL:
        raise TinyMnistError(f"one_cycle: anneal must be one of {', '.join(_ANNEAL)}, got {anneal!r}")
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    # Each phase: (its last step, where it starts, where it ends). The warm-up's last
    # step is fractional in torch too: float(pct_start * total_steps) - 1.
    phases = ((float(pct_start * total_steps) - 1, initial_lr, max_lr), (total_steps - 1, max_lr, min_lr))
    start_step = 0.0
    for i, (end_step, start_lr, end_lr) in enumerate(phases):
        if step <= end_step or i == len(phases) - 1:
            pct = (step - start_step) / (end_step - start_step)  # 0 -> 1 across the phase
            return _ANNEAL[anneal](start_lr, end_lr, pct)
        start_step = end_step
    raise AssertionError("unreachable: the last phase always returns")


def _anneal_cos(start: float, end: float, pct: float) -> float:
    """From start to end along half a cosine: flat at both ends, steepest midway."""
    cos_out = math.cos(math.pi * pct) + 1
    return end + (start - end) / 2.0 * cos_out


def _anneal_linear(start: float, end: float, pct: float) -> float:
    """From start to end along a straight line."""
    return (end - start) * pct + start


_ANNEAL: dict[str, Callable[[float, float, float], float]] = {"cos": _anneal_cos, "linear": _anneal_linear}


def schedule_lrs(schedule: Schedule, start: int, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The rates of steps start .. start+steps-1 as one float32 tensor on `device`, (steps,).

    Made once per epoch, so the host sends one tensor instead of one number per step;
    `lrs[i]` is the 0-d tensor step i is given. float32, as `torch.tensor(lr)` makes
    it: the dtype of the parameters the rate multiplies.
    """
    return torch.tensor([schedule(i) for i in range(start, start + steps)], dtype=torch.float32, device=device)
