"""The algorithm, whole: a pure training step, the epoch loop and exact evaluation.

Read this file first. Everything the loop carries from step to step is data: the
parameters and the optimizer state are plain tensor dicts that the step takes and
returns anew, nothing is mutated, so a checkpoint is those dicts plus the random
generators' states, and a resumed run continues bit for bit.

    step(params, opt_state, images, labels, batch_idx, lr) -> (params, opt_state, loss)

`images` is the whole training set, uint8 on the device; `batch_idx` picks this
step's images, so the gather happens inside the (compiled) step. `lr` is a 0-d
tensor: a Python float would be baked into the compiled graph, and every change of
the learning rate would compile it again.

What makes the step fast or wide (torch.compile, micro-batches, CUDA graphs, vmap
over N models, an all-reduce across processes) are transforms of this same
function: transforms.py for speed, ensemble.py and distributed.py for width. Read
next: models.py (the networks), optim.py (the optimizers), then transforms.py.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from tinymnist import models, optim, schedules
from tinymnist.config import TrainConfig
from tinymnist.data import MNIST
from tinymnist.devices import synchronize
from tinymnist.errors import TinyMnistError
from tinymnist.trees import Tree, tree_map

Params = dict[str, torch.Tensor]  # the network's numbers, keyed by its nn.Module parameter names
Gradient = Callable[..., tuple[Params, torch.Tensor]]  # (params, images, labels, batch_idx) -> (grads, loss)
Step = Callable[..., tuple[Params, Tree, torch.Tensor]]  # (params, opt_state, images, labels, batch_idx, lr)


# ---- the step ---------------------------------------------------------------------------


def scale_images(images_u8: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 pixels (B, 28, 28) -> the float input the recipe trains on, (B, 1, 28, 28)."""
    x = images_u8.unsqueeze(1).float() / 255  # (B, 1, 28, 28) in 0..1
    return (x - mean) / std


def loss_function(model: str) -> Callable[..., torch.Tensor]:
    """The recipe's loss: NLL where the network ends in log_softmax, else cross-entropy."""
    return F.nll_loss if models.OUTPUTS_LOG_PROBS[model] else F.cross_entropy


def training_loss(config: TrainConfig) -> Callable[..., torch.Tensor]:
    """The loss the step minimises: the recipe's, with --label-smoothing where it is set.

    Smoothing goes through F.cross_entropy for either kind of network: on log-probabilities
    its log_softmax changes nothing (they already are normalised), so it is NLL there."""
    if config.label_smoothing:
        return functools.partial(F.cross_entropy, label_smoothing=config.label_smoothing)
    return loss_function(config.model)


def make_gradient(config: TrainConfig) -> Gradient:
    """`gradient(params, images, labels, batch_idx) -> (grads, loss)` of the batch's mean loss."""
    model, recipe, loss_fn = config.model, config.recipe, training_loss(config)

    def batch_loss(params: Params, images_u8: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = scale_images(images_u8, recipe.mean, recipe.std)  # (B, 1, 28, 28)
        out = models.apply(model, params, x, train=True)  # (B, 10), dropout on
        return loss_fn(out, labels)

    grad_and_loss = torch.func.grad_and_value(batch_loss)  # d(loss)/d(params), and the loss

    def gradient(params: Params, images: torch.Tensor, labels: torch.Tensor, batch_idx: torch.Tensor):
        return grad_and_loss(params, images[batch_idx], labels[batch_idx])  # gather (B, 28, 28), (B,)

    return gradient


def make_step(gradient: Gradient, optimizer: optim.Optimizer) -> Step:
    """The pure training step: the batch's gradient, then the optimizer's update."""

    def step(params, opt_state, images, labels, batch_idx, lr):
        grads, loss = gradient(params, images, labels, batch_idx)
        params, opt_state = optimizer.update(grads, opt_state, params, lr)
        return params, opt_state, loss

    return step


# ---- the data order ---------------------------------------------------------------------


def epoch_batches(n_images: int, batch_size: int, generator: torch.Generator, device) -> torch.Tensor:
    """This epoch's shuffled image indices as (steps, batch_size).

    Every image appears once; when batch_size does not divide n_images, the last row
    is topped up with images from a second permutation, so every step has the same
    shape and the compiled step never sees a second one. The permutation is drawn on
    the CPU from the run's own generator: the same order on every device.
    """
    order = torch.randperm(n_images, generator=generator)  # (N,)
    steps = math.ceil(n_images / batch_size)
    shortfall = steps * batch_size - n_images  # < batch_size <= n_images (config checks it)
    if shortfall:
        order = torch.cat([order, torch.randperm(n_images, generator=generator)[:shortfall]])
    return order.view(steps, batch_size).to(device)  # (steps, B)


def epoch_lrs(config: TrainConfig, epoch: int, steps: int) -> list[float]:
    """The learning rate of each step of `epoch` (from 1). The loop sends them to the device
    as one (steps,) tensor and hands the step `lrs[i]`, a 0-d view: no copy per step."""
    if config.schedule == "one-cycle":  # up to lr and down again over the whole run, step by step
        first = (epoch - 1) * steps
        return [schedules.one_cycle(i, total_steps=config.epochs * steps, max_lr=config.lr)
                for i in range(first, first + steps)]  # fmt: skip
    return [schedules.step_lr(config.lr, epoch - 1, step_size=1, gamma=config.gamma)] * steps


# ---- evaluation -------------------------------------------------------------------------


class Evaluation(NamedTuple):
    loss: float  # mean loss per test image
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


@torch.inference_mode()
def evaluate(config: TrainConfig, params: Params, images: torch.Tensor, labels: torch.Tensor) -> Evaluation:
    """Loss and correct count over the whole test set, in test_batch_size chunks.

    Losses are summed and correct predictions counted as integers on the device, then
    read once: no per-chunk averaging, so the result is exact for any chunk size.
    """
    loss_fn, recipe = loss_function(config.model), config.recipe
    loss_sum = torch.zeros((), device=images.device, dtype=torch.float64)
    correct = torch.zeros((), device=images.device, dtype=torch.int64)
    for start in range(0, len(images), config.test_batch_size):
        x = scale_images(images[start : start + config.test_batch_size], recipe.mean, recipe.std)  # (C, 1, 28, 28)
        y = labels[start : start + config.test_batch_size]  # (C,)
        out = models.apply(config.model, params, x)  # (C, 10)
        loss_sum += loss_fn(out, y, reduction="sum")
        correct += (out.argmax(dim=1) == y).sum()
    return Evaluation(loss_sum.item() / len(images), int(correct.item()), len(images))


# ---- the run's state --------------------------------------------------------------------


@dataclass(frozen=True)
class TrainState:
    """Everything a run carries across epochs; a checkpoint holds exactly this."""

    params: Params
    opt_state: Tree
    epoch: int  # completed epochs
    rng: dict  # generator states: "shuffle" (the data order), "cpu"/"cuda" (dropout)


def initial_state(config: TrainConfig, optimizer: optim.Optimizer, device) -> TrainState:
    """Epoch 0: parameters drawn from the seed, fresh optimizer state, seeded generators."""
    params = models.init_params(config.model, config.seed, device)
    torch.manual_seed(config.seed)  # dropout masks
    shuffle = torch.Generator().manual_seed(config.seed)
    return TrainState(params, optimizer.init(params), 0, capture_rng(shuffle, device))


def capture_rng(shuffle: torch.Generator, device) -> dict:
    state = {"shuffle": shuffle.get_state(), "cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(rng: dict, device) -> torch.Generator:
    """Set the global generators as they were; return the run's shuffling generator."""
    torch.set_rng_state(rng["cpu"])
    if torch.device(device).type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    shuffle = torch.Generator()
    if "shuffle" in rng:
        shuffle.set_state(rng["shuffle"])
    else:  # a checkpoint from before shuffling had its own generator: seed one from the global one
        shuffle.manual_seed(int(torch.randint(2**62, ())))
    return shuffle


# ---- the loop ---------------------------------------------------------------------------


class Reporter(Protocol):
    """Where the loop's progress goes (report.py): log lines, a progress bar, a metrics file."""

    def epoch_started(self, epoch: int, steps: int, lr: float, compiling: bool) -> None: ...
    def logged(self, epoch: int, step: int, images_seen: int, n_train: int, loss: float) -> None: ...
    def evaluated(self, record: dict) -> None: ...


class NonFiniteLoss(TinyMnistError):
    pass


@dataclass
class FitResult:
    state: TrainState  # after the last completed epoch
    records: list[dict] = field(default_factory=list)  # one per evaluation, as --metrics writes them
    first_step_seconds: float = 0.0  # the first step compiles (when compiled): timed apart
    train_seconds: float = 0.0
    images: int = 0  # images trained on in train_seconds
    steps: int = 0  # optimizer steps of this run, the first one included
    reached: dict | None = None  # with --target-accuracy: the first record at or above it

    @property
    def images_per_second(self) -> float:
        return self.images / self.train_seconds if self.train_seconds else 0.0


def fit(
    config: TrainConfig,
    data: MNIST,
    state: TrainState,
    step: Step,
    reporter: Reporter | None = None,
    on_epoch_end: Callable[[TrainState], None] | None = None,
) -> FitResult:
    """Train from `state` up to config.epochs, evaluating after every epoch (and every
    config.eval_every steps); with config.target_accuracy, stop at the first evaluation
    that reaches it.

    `step` is make_step's function or a transform of it (transforms.py). `on_epoch_end`
    gets each completed epoch's state: the caller saves checkpoints there.
    """
    device = data.train_images.device
    shuffle = restore_rng(state.rng, device)
    result = FitResult(state)

    def evaluated(epoch, train_loss, params, lr, seconds, images, steps) -> bool:
        """Evaluate and report; True when the target accuracy is reached. `seconds`,
        `images` and `steps` are the current epoch's so far."""
        record = evaluation_record(epoch, train_loss, evaluate(config, params, data.test_images, data.test_labels),
                                   lr, seconds, images)  # fmt: skip
        if config.target_accuracy is not None:  # time to accuracy: the run's totals so far (the compile apart)
            record |= {"train_seconds_total": result.train_seconds + seconds,
                       "images_total": (result.steps + steps) * config.batch_size}  # fmt: skip
        result.records.append(record)
        if reporter:
            reporter.evaluated(record)
        if config.target_accuracy is not None and record["test_accuracy"] >= config.target_accuracy:
            result.reached = result.reached or record
        return result.reached is not None

    def probe_for(epoch, steps, lrs):  # evaluates every eval_every steps within an epoch
        return lambda done, params, seconds, images: evaluated(round(epoch - 1 + done / steps, 4), None, params,
                                                               lrs[done - 1], seconds, images, done)  # fmt: skip

    if state.epoch == 0 and not config.dry_run:  # the untrained network, as the tutorials show
        if evaluated(0, None, state.params, config.lr, 0.0, 0, 0):  # a target so low that no training is needed
            return result
    for epoch in range(state.epoch + 1, config.epochs + 1):
        first = epoch == state.epoch + 1  # the step compiles on its first call
        batches = epoch_batches(len(data.train_images), config.batch_size, shuffle, device)  # (steps, B)
        lrs = epoch_lrs(config, epoch, len(batches))
        probe = probe_for(epoch, len(batches), lrs)
        params, opt_state, train_loss, timing = train_epoch(config, step, result.state, data, epoch, batches, lrs,
                                                            reporter, first, probe)  # fmt: skip
        result.first_step_seconds += timing.first_step_seconds
        if timing.stopped:  # the target was reached inside this epoch: not a completed epoch
            result.train_seconds += timing.seconds
            result.images += timing.images
            result.steps += timing.steps
            break
        reached = evaluated(epoch, train_loss, params, lrs[0], timing.seconds, timing.images, timing.steps)
        result.train_seconds += timing.seconds
        result.images += timing.images
        result.steps += timing.steps
        result.state = completed(step, params, opt_state, epoch, capture_rng(shuffle, device))
        if config.dry_run:
            break
        if on_epoch_end:
            on_epoch_end(result.state)
        if reached:
            break
    return result


def completed(step, params: Params, opt_state: Tree, epoch: int, rng: dict) -> TrainState:
    """The state after `epoch`, to keep: copies where `step` is a CUDA graph, which
    overwrites its output buffers on its next replay."""
    if getattr(step, "returns_buffers", False):
        params, opt_state = tree_map(torch.clone, params), tree_map(torch.clone, opt_state)
    return TrainState(params, opt_state, epoch, rng)


class EpochTiming(NamedTuple):
    first_step_seconds: float
    seconds: float  # the rest of the epoch, evaluations left out
    images: int  # trained on in `seconds`
    steps: int  # taken in the epoch, the first one included
    stopped: bool = False  # a mid-epoch evaluation reached the target


def train_epoch(config, step, state, data, epoch, batches, lrs, reporter, time_first_step: bool, probe=None):
    """One pass over the shuffled training set: (params, opt_state, mean loss, EpochTiming).

    The host reads the device only every log_interval steps (the running loss): no
    per-step .item(), so the CPU can queue steps ahead of a GPU. Every config.eval_every
    steps, `probe(steps done, params, seconds, images)` evaluates, off the clock; it
    returns True to stop the epoch there.
    """
    params, opt_state, device = state.params, state.opt_state, data.train_images.device
    steps = 1 if config.dry_run else len(batches)
    if reporter:
        reporter.epoch_started(epoch, steps, lrs[0], compiling=time_first_step)
    lr_tensor = torch.tensor(lrs, device=device)  # (steps,): one copy to the device per epoch
    running = torch.zeros((), device=device)  # loss summed since the last log line
    epoch_loss, first_step_seconds, timed_from = 0.0, 0.0, 0
    synchronize(device)
    started = time.perf_counter()
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, data.train_images, data.train_labels, batches[i],
                                       lr_tensor[i])  # fmt: skip
        running += loss
        if i == 0 and time_first_step:  # compilation happens here: keep it out of the speed
            synchronize(device)
            first_step_seconds, started, timed_from = time.perf_counter() - started, time.perf_counter(), 1
        if (i + 1) % config.log_interval == 0 or i + 1 == steps:
            summed = running.item()  # the only host sync inside the epoch
            if not math.isfinite(summed):
                raise NonFiniteLoss(f"loss became {summed} in epoch {epoch} by step {i + 1}; lower --lr "
                                    f"(it was {lrs[i]:g})")  # fmt: skip
            if reporter:
                since_last = (i + 1) % config.log_interval or config.log_interval
                reporter.logged(epoch, i + 1, (i + 1) * config.batch_size, len(data.train_images), summed / since_last)
            epoch_loss += summed
            running.zero_()
        if probe and config.eval_every and (i + 1) % config.eval_every == 0 and i + 1 < steps:
            synchronize(device)
            paused = time.perf_counter()
            trained = EpochTiming(first_step_seconds, paused - started, (i + 1 - timed_from) * config.batch_size, i + 1)
            if probe(i + 1, params, trained.seconds, trained.images):
                return params, opt_state, epoch_loss / (i + 1), trained._replace(stopped=True)
            started += time.perf_counter() - paused  # the evaluation is not training time
    synchronize(device)
    timing = EpochTiming(first_step_seconds, time.perf_counter() - started, (steps - timed_from) * config.batch_size,
                         steps)  # fmt: skip
    return params, opt_state, epoch_loss / steps, timing


def evaluation_record(epoch: int, train_loss: float | None, result: Evaluation, lr: float, seconds: float,
                      images: int) -> dict:  # fmt: skip
    """One line of --metrics: what the run looked like after `epoch` epochs."""
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "test_loss": result.loss,
        "test_accuracy": result.accuracy,
        "correct": result.correct,
        "total": result.total,
        "lr": lr,
        "seconds": seconds,
        "images_per_second": images / seconds if seconds else 0.0,
    }
