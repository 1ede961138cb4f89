"""Optimizers as pure functions over parameter dicts, as in optax (the schedules are in schedules.py):

    opt = adam(betas=(0.9, 0.999))
    state = opt.init(params)                              # fresh state: zeros, step 0
    params, state = opt.update(grads, state, params, lr)  # new dicts; inputs untouched

`state` is a plain nested dict (`{"step": 0-d int64, "exp_avg": {name: Tensor}, ...}`), so a
checkpoint loads with `torch.load(weights_only=True)`; its tensors live on the params' device,
so a CUDA graph of the step never reads the host. `update` traces whole under
`torch.compile(fullgraph=True)`: no `.item()`, Python `if`s test only hyperparameters, `lr` is
a 0-d tensor (a changing rate never recompiles; the CLI validates it), and the returned state
keeps init's key order (the compiled step guards on it). The arithmetic, defaults and checks
are torch.optim's single-tensor (`foreach=False`) code's, the tests' oracle. Left out: Adam's
`amsgrad`, `maximize`, parameter groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from tinymnist.errors import TinyMnistError

Params = dict[str, Tensor]
State = dict[str, Tensor | dict[str, Tensor]]


class Optimizer(NamedTuple):
    """An optimizer as data: two pure functions, built once by a constructor below."""

    init: Callable[[Params], State]  # params -> state
    update: Callable[[Params, State, Params, Tensor], tuple[Params, State]]  # (grads, state, params, lr)


def _require(ok: bool, message: str) -> None:
    """Reject a hyperparameter torch.optim rejects (checks read `0.0 <= x`, so NaN fails too)."""
    if not ok:
        raise TinyMnistError(message)


def _step_zero(params: Params) -> Tensor:
    """The update counter: 0-d int64 (exact at any count) on the params' device."""
    device = next(iter(params.values())).device
    return torch.zeros((), dtype=torch.int64, device=device)


def _zeros_like_each(params: Params) -> dict[str, Tensor]:
    return {name: torch.zeros_like(p) for name, p in params.items()}


def _bias_correction(beta: float, step: Tensor) -> Tensor:
    """1 - beta**step, to full precision in float32.

    Plainly, 1 - 0.999**1 cancels three of float32's seven digits; torch.optim computes it in
    float64 on the host (`.item()`), which a compiled step must not. expm1 does not cancel.
    """
    log_beta = math.log(beta) if beta > 0 else -math.inf  # 0**step = 0 for step >= 1
    return -torch.expm1(step * log_beta)


def sgd(
    *, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False
) -> Optimizer:
    """torch.optim.SGD, with optional (Nesterov) momentum. State: {"step"}, plus "momentum_buffer"
    when momentum != 0."""
    _require(0.0 <= momentum, f"sgd: momentum must be >= 0, got {momentum}")
    _require(0.0 <= weight_decay, f"sgd: weight_decay must be >= 0, got {weight_decay}")
    _require(
        not nesterov or (momentum > 0 and dampening == 0),
        f"sgd: nesterov needs momentum > 0 and dampening 0, got momentum {momentum}, dampening {dampening}",
    )

    def init(params: Params) -> State:
        state: State = {"step": _step_zero(params)}
        if momentum != 0:
            state["momentum_buffer"] = _zeros_like_each(params)
        return state

    def update(grads: Params, state: State, params: Params, lr: Tensor) -> tuple[Params, State]:
        new_params, new_buffers = {}, {}
        for name, p in params.items():
            g = grads[name]
            if weight_decay != 0:
                g = g.add(p, alpha=weight_decay)  # L2 penalty, folded into the gradient
            if momentum != 0:
                # torch.optim seeds the buffer with the first gradient, undamped; a
                # where() on the step keeps that rule without a data-dependent branch.
                running = state["momentum_buffer"][name].mul(momentum).add(g, alpha=1 - dampening)
                buf = torch.where(state["step"] == 0, g, running)
                new_buffers[name] = buf
                g = g.add(buf, alpha=momentum) if nesterov else buf  # Nesterov: look ahead
            new_params[name] = p - lr * g
        new_state: State = {"step": state["step"] + 1}
        if momentum != 0:
            new_state["momentum_buffer"] = new_buffers
        return new_params, new_state

    return Optimizer(init, update)


def adam(*, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> Optimizer:
    """Adam (Kingma & Ba, 2015) as torch.optim.Adam: weight decay joins the gradient.
    State: {"step", "exp_avg", "exp_avg_sq"}."""
    return _adam(betas, eps, weight_decay, decoupled=False)


def adamw(*, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2) -> Optimizer:
    """AdamW (Loshchilov & Hutter, 2019) as torch.optim.AdamW: the decay shrinks the weights directly,
    where in the gradient Adam's normalisation would scale it per weight. State: as adam's."""
    return _adam(betas, eps, weight_decay, decoupled=True)


def _adam(betas: tuple[float, float], eps: float, weight_decay: float, decoupled: bool) -> Optimizer:
    kind = "adamw" if decoupled else "adam"
    beta1, beta2 = betas
    _require(0.0 <= eps, f"{kind}: eps must be >= 0, got {eps}")
    _require(0.0 <= beta1 < 1.0, f"{kind}: betas[0] must be in [0, 1), got {beta1}")
    _require(0.0 <= beta2 < 1.0, f"{kind}: betas[1] must be in [0, 1), got {beta2}")
    _require(0.0 <= weight_decay, f"{kind}: weight_decay must be >= 0, got {weight_decay}")

    def init(params: Params) -> State:
        return {"step": _step_zero(params), "exp_avg": _zeros_like_each(params), "exp_avg_sq": _zeros_like_each(params)}

    def update(grads: Params, state: State, params: Params, lr: Tensor) -> tuple[Params, State]:
        step = state["step"] + 1
        # m and v start at zero, biased towards it early on; dividing by 1 - beta**step removes the
        # bias. Stacked, the two scalars are one buffer inductor computes once a step, not in every
        # parameter's vector loop (research/adam_scalars.py: mlp3's update 1.8x faster on the CPU).
        t = step.to(next(iter(params.values())).dtype)
        step_size, bias2_sqrt = torch.stack([lr / _bias_correction(beta1, t), _bias_correction(beta2, t).sqrt()])
        new_params, exp_avg, exp_avg_sq = {}, {}, {}
        for name, p in params.items():
            g = grads[name]
            if weight_decay != 0 and decoupled:
                p = p * (1 - lr * weight_decay)  # AdamW: shrink first, then step
            elif weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            m = state["exp_avg"][name].lerp(g, 1 - beta1)  # running mean of the gradient
            v = state["exp_avg_sq"][name].mul(beta2).addcmul(g, g, value=1 - beta2)  # ... of its square
            denom = v.sqrt() / bias2_sqrt + eps
            new_params[name] = p - step_size * (m / denom)
            exp_avg[name], exp_avg_sq[name] = m, v
        return new_params, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    return Optimizer(init, update)


def adadelta(*, rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0.0) -> Optimizer:
    """ADADELTA (Zeiler, 2012) as torch.optim.Adadelta: steps scaled by RMS(past updates) /
    RMS(gradients), in the weights' units; `lr` scales that (1.0 in the paper).
    State: {"step", "square_avg", "acc_delta"}."""
    _require(0.0 <= rho <= 1.0, f"adadelta: rho must be in [0, 1], got {rho}")
    _require(0.0 <= eps, f"adadelta: eps must be >= 0, got {eps}")
    _require(0.0 <= weight_decay, f"adadelta: weight_decay must be >= 0, got {weight_decay}")

    def init(params: Params) -> State:
        return {
            "step": _step_zero(params),
            "square_avg": _zeros_like_each(params),
            "acc_delta": _zeros_like_each(params),
        }

    def update(grads: Params, state: State, params: Params, lr: Tensor) -> tuple[Params, State]:
        new_params, square_avg, acc_delta = {}, {}, {}
        for name, p in params.items():
            g = grads[name]
            if weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            sq = state["square_avg"][name].mul(rho).addcmul(g, g, value=1 - rho)  # E[g^2]
            acc = state["acc_delta"][name]  # E[delta^2], up to the previous step
            delta = (acc + eps).sqrt() / (sq + eps).sqrt() * g
            new_params[name] = p - lr * delta
            square_avg[name] = sq
            acc_delta[name] = acc.mul(rho).addcmul(delta, delta, value=1 - rho)
        return new_params, {"step": state["step"] + 1, "square_avg": square_avg, "acc_delta": acc_delta}

    return Optimizer(init, update)


def rmsprop(
    *, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False
) -> Optimizer:
    """RMSprop (Hinton, lecture 6e) as torch.optim.RMSprop: the gradient over a running RMS of itself,
    or with `centered` over its running standard deviation. State: {"step", "square_avg"}, plus
    "grad_avg" when centered and "momentum_buffer" when momentum > 0."""
    _require(0.0 <= eps, f"rmsprop: eps must be >= 0, got {eps}")
    _require(0.0 <= momentum, f"rmsprop: momentum must be >= 0, got {momentum}")
    _require(0.0 <= weight_decay, f"rmsprop: weight_decay must be >= 0, got {weight_decay}")
    _require(0.0 <= alpha, f"rmsprop: alpha must be >= 0, got {alpha}")

    def init(params: Params) -> State:
        state: State = {"step": _step_zero(params), "square_avg": _zeros_like_each(params)}
        if centered:
            state["grad_avg"] = _zeros_like_each(params)
        if momentum > 0:
            state["momentum_buffer"] = _zeros_like_each(params)
        return state

    def update(grads: Params, state: State, params: Params, lr: Tensor) -> tuple[Params, State]:
        new_params, square_avg, grad_avg, momentum_buffer = {}, {}, {}, {}
        for name, p in params.items():
            g = grads[name]
            if weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            sq = square_avg[name] = state["square_avg"][name].mul(alpha).addcmul(g, g, value=1 - alpha)  # E[g^2]
            if centered:
                mean = grad_avg[name] = state["grad_avg"][name].lerp(g, 1 - alpha)  # E[g]
                rms = sq.addcmul(mean, mean, value=-1).sqrt()  # sqrt(E[g^2] - E[g]^2)
            else:
                rms = sq.sqrt()
            rms = rms + eps
            if momentum > 0:
                buf = momentum_buffer[name] = state["momentum_buffer"][name].mul(momentum).addcdiv(g, rms)
                new_params[name] = p - lr * buf
            else:
                new_params[name] = p - lr * (g / rms)
        new_state: State = {"step": state["step"] + 1, "square_avg": square_avg}
        if centered:
            new_state["grad_avg"] = grad_avg
        if momentum > 0:
            new_state["momentum_buffer"] = momentum_buffer
        return new_params, new_state

    return Optimizer(init, update)


# --optimizer NAME -> its constructor; every hyperparameter has torch.optim's default.
OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "sgd": sgd,
    "adam": adam,
    "adamw": adamw,
    "adadelta": adadelta,
    "rmsprop": rmsprop,
}

# The lr when --optimizer overrides the recipe's and --lr is not given: torch.optim's default
# (a recipe's lr belongs to its optimizer: Adadelta's 1.0 would blow up SGD).
DEFAULT_LR: dict[str, float] = {"sgd": 1e-3, "adam": 1e-3, "adamw": 1e-3, "adadelta": 1.0, "rmsprop": 1e-2}
