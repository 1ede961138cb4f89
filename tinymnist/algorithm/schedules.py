"""Learning-rate schedules as pure functions of the step number (from 0, across epochs).

No state, so a resumed run gets the same rates as an uninterrupted one. The loop hands
the compiled step each rate as a 0-d tensor: a Python float would be baked into the graph
and recompile it at every change. `step_lr` is per epoch: every step of an epoch shares it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tinymnist.errors import TinyMnistError

Schedule = Callable[[int], float]  # step number (from 0) -> learning rate


def step_lr(base_lr: float, epoch: int, step_size: int, gamma: float) -> float:
    """torch's StepLR: the rate of `epoch` (from 0), multiplied by `gamma` every `step_size` epochs."""
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
    """The rate of `step` under torch's OneCycleLR (two phases, torch's defaults).

    Smith & Topin's super-convergence: up from max_lr / div_factor to max_lr over the first
    pct_start of the steps (a fresh network stays stable), then down to max_lr / div_factor /
    final_div_factor (the weights settle); `anneal` is the curve of both phases, "cos" or "linear".
    The arithmetic is OneCycleLR.get_lr's, in its order, so the floats equal torch's to the last bit
    (tests/algorithm/test_schedules.py). Momentum cycling is left out.
    """
    if not (isinstance(total_steps, int) and total_steps >= 1):
        raise TinyMnistError(f"one_cycle: total_steps must be a positive integer, got {total_steps!r}")
    if not 0 <= step < total_steps:
        raise TinyMnistError(f"one_cycle: step must be in 0..{total_steps - 1} (total_steps {total_steps}), got {step}")
    if not 0.0 <= pct_start <= 1.0:
        raise TinyMnistError(f"one_cycle: pct_start must be in [0, 1], got {pct_start}")
    if pct_start * total_steps == 1:  # the warm-up would end where it starts: torch divides 0 by 0
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
    warmup_end = float(pct_start * total_steps) - 1  # the warm-up's last step: fractional in torch too
    if step <= warmup_end:  # up, 0 -> 1 across the warm-up
        return _ANNEAL[anneal](initial_lr, max_lr, step / warmup_end)
    return _ANNEAL[anneal](max_lr, min_lr, (step - warmup_end) / (total_steps - 1 - warmup_end))  # down


def _anneal_cos(start: float, end: float, pct: float) -> float:
    cos_out = math.cos(math.pi * pct) + 1  # half a cosine: flat at both ends
    return end + (start - end) / 2.0 * cos_out


def _anneal_linear(start: float, end: float, pct: float) -> float:
    return (end - start) * pct + start


_ANNEAL: dict[str, Callable[[float, float, float], float]] = {"cos": _anneal_cos, "linear": _anneal_linear}


def schedule_lrs(schedule: Schedule, start: int, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The rates of steps start .. start+steps-1 as one (steps,) float32 tensor on `device`:
    one transfer per epoch, and `lrs[i]` is step i's 0-d rate, float32 as `torch.tensor(lr)` makes it."""
    return torch.tensor([schedule(i) for i in range(start, start + steps)], dtype=torch.float32, device=device)
