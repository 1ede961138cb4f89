"""The algorithm, whole: a pure training step, the epoch loop and exact evaluation. Read this first.

    step(params, opt_state, images, labels, batch_idx, lr) -> (params, opt_state, loss)

The parameters and optimizer state are plain tensor dicts the step takes and returns anew:
nothing is mutated, so a checkpoint is those dicts plus the generators' states, and a resumed
run continues bit for bit (on a CPU, on the same threads and kernels: README.md's contract).
`images` is the whole training set, uint8 on the device; `batch_idx` picks the step's images,
so the gather happens inside the (compiled) step. `lr` is a 0-d tensor: a Python float would be
baked into the compiled graph and recompile it.

The loop trains one model or N (--seeds, an --lr list) alike: N models' params and state are
stacked along a leading model axis, and their step takes (N, B) indices and (N,) rates; the loop
never looks at that axis (`per_model`, `side_by_side`). What makes the step fast or wide
(compile, micro-batches, CUDA graphs, vmap, all-reduce) are transforms of it in
tinymnist/transforms/. Read next: networks.py, optim.py, then the transforms.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from tinymnist.algorithm import networks, optim, schedules
from tinymnist.algorithm.config import TrainConfig, model_configs
from tinymnist.algorithm.trees import Tree, tree_map
from tinymnist.errors import TinyMnistError

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
    return F.nll_loss if networks.OUTPUTS_LOG_PROBS[model] else F.cross_entropy


def training_loss(config: TrainConfig) -> Callable[..., torch.Tensor]:
    """The loss the step minimises: the recipe's, or with --label-smoothing F.cross_entropy for
    either kind of network (on log-probabilities its log_softmax changes nothing: NLL there)."""
    if config.label_smoothing:
        return functools.partial(F.cross_entropy, label_smoothing=config.label_smoothing)
    return loss_function(config.model)


def make_gradient(config: TrainConfig, apply: Callable[..., torch.Tensor] = networks.apply) -> Gradient:
    """`gradient(params, images, labels, batch_idx) -> (grads, loss)` of the batch's mean loss.
    `apply`: the network's forward (a transform may pass one that computes the same otherwise)."""
    model, recipe, loss_fn = config.model, config.recipe, training_loss(config)

    def batch_loss(params: Params, images_u8: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = scale_images(images_u8, recipe.mean, recipe.std)  # (B, 1, 28, 28)
        out = apply(model, params, x, train=True)  # (B, 10), dropout on
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
    """This epoch's shuffled image indices as (steps, batch_size), each image once.

    A short last row is topped up from a second permutation: one shape, so the step compiles once.
    Drawn on the CPU from the run's own generator: the same order on every device.
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
        return [
            schedules.one_cycle(i, total_steps=config.epochs * steps, max_lr=config.lr)
            for i in range(first, first + steps)
        ]
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
    """One model's loss and correct count over the test set, in test_batch_size chunks: summed
    and counted on the device, read once, so it is exact for any chunk size."""
    loss_fn, recipe = loss_function(config.model), config.recipe
    loss_sum = torch.zeros((), device=images.device, dtype=torch.float64)
    correct = torch.zeros((), device=images.device, dtype=torch.int64)
    for start in range(0, len(images), config.test_batch_size):
        x = scale_images(images[start : start + config.test_batch_size], recipe.mean, recipe.std)  # (C, 1, 28, 28)
        y = labels[start : start + config.test_batch_size]  # (C,)
        out = networks.apply(config.model, params, x)  # (C, 10)
        loss_sum += loss_fn(out, y, reduction="sum")
        correct += (out.argmax(dim=1) == y).sum()
    return Evaluation(loss_sum.item() / len(images), int(correct.item()), len(images))


class Evaluations(NamedTuple):
    """One evaluation of every model a run trains."""

    models: list[Evaluation]  # each model's, in stacking order
    ensemble: Evaluation | None = None  # N models: the prediction of their averaged probabilities
    probabilities: torch.Tensor | None = None  # (T, 10) N models' probabilities of each test image, summed


def evaluate_one(config: TrainConfig, params: Params, images: torch.Tensor, labels: torch.Tensor) -> Evaluations:
    """A single run's evaluation, as the loop takes it (transforms/vmap.py's evaluate_many is N models')."""
    return Evaluations([evaluate(config, params, images, labels)])


class Progress(NamedTuple):
    """Where training stands at an evaluation: what its records say besides the test results."""

    epoch: float  # completed epochs; a fraction for an evaluation inside an epoch
    train_losses: list  # each model's mean training loss over the epoch; None inside it, or untrained
    lrs: list[float]  # each model's learning rate
    seconds: float  # of training in this epoch so far: the first step and evaluations left out
    images: int  # trained on in `seconds`, by all the models together


def test_fields(result: Evaluation) -> dict:
    return {
        "test_loss": result.loss,
        "test_accuracy": result.accuracy,
        "correct": result.correct,
        "total": result.total,
    }


def per_second(images: int, seconds: float) -> float:
    return images / seconds if seconds else 0.0


def evaluation_records(models: list[TrainConfig], progress: Progress, evaluations: Evaluations) -> list[dict]:
    """An evaluation's --metrics records: what each model looked like after `progress.epoch`
    epochs. A single run has one; N models have one each (with its seed and initial lr) and
    the ensemble's, with the mean, spread and best of the models."""
    epoch, seconds, images = progress.epoch, progress.seconds, progress.images
    records = [
        {
            "epoch": epoch,
            "train_loss": loss,
            **test_fields(result),
            "lr": lr,
            "seconds": seconds,
            "images_per_second": per_second(images // len(models), seconds),
        }
        for loss, result, lr in zip(progress.train_losses, evaluations.models, progress.lrs, strict=True)
    ]
    if evaluations.ensemble is None:
        return records
    for record, model in zip(records, models, strict=True):
        record |= {"seed": model.seed, "initial_lr": model.lr}
    accuracies = [r["test_accuracy"] for r in records]
    best = max(records, key=lambda r: r["test_accuracy"])  # the first of equals: the lowest seed and lr
    ensemble = {
        "epoch": epoch,
        **test_fields(evaluations.ensemble),
        "seconds": seconds,
        "images_per_second": per_second(images, seconds),  # all the models' images
        "ensemble": True,
        "models": len(models),
        "mean_accuracy": statistics.fmean(accuracies),
        "std_accuracy": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,  # over the models (n-1)
        "min_accuracy": min(accuracies),
        "max_accuracy": max(accuracies),
        "best_seed": best["seed"],
        "best_lr": best["initial_lr"],
    }
    return [*records, ensemble]


class TestSet:
    """The loop's evaluation: each model of this process on the test set, as --metrics records.
    `evaluate_models`: evaluate_one, vmap.evaluate_many for N models, or a torchrun sweep's own."""

    def __init__(self, config: TrainConfig, models: list[TrainConfig], data: Dataset, evaluate_models=evaluate_one):
        self.config, self.models, self.evaluate_models = config, models, evaluate_models
        self.images, self.labels = data.test_images, data.test_labels

    def __call__(self, params: Params, progress: Progress) -> list[dict]:
        evaluations = self.evaluate_models(self.config, params, self.images, self.labels)
        return evaluation_records(self.models, progress, evaluations)


# ---- the run's state --------------------------------------------------------------------


@dataclass(frozen=True)
class TrainState:
    """Everything a run carries across epochs, as a checkpoint holds it; for N models every leaf,
    the shuffling state too, has a leading model axis."""

    params: Params
    opt_state: Tree
    epoch: int  # completed epochs
    rng: dict  # generator states: "shuffle" (each model's data order), "cpu"/"cuda" (dropout)


def per_model(trees: list, stacked: bool):
    """N models' trees (or tensors) as one, each leaf stacked along a new leading model axis;
    a single run's one tree as it is."""
    if not stacked:
        (tree,) = trees
        return tree
    if isinstance(trees[0], torch.Tensor):
        return torch.stack(trees)
    return tree_map(lambda *leaves: torch.stack(leaves), *trees)


def side_by_side(tensors: list[torch.Tensor], stacked: bool) -> torch.Tensor:
    """Each model's per-step tensor (steps, ...) as one (steps, N, ...): step i's row holds
    every model's batch or rate; a single run's tensor as it is."""
    return torch.stack(tensors, dim=1) if stacked else tensors[0]


def initial_state(
    config: TrainConfig, optimizer: optim.Optimizer, device, models: list | None = None, stacked: bool | None = None
) -> TrainState:
    """Epoch 0 of each model (or of `models`, a torchrun process's share): parameters from its seed,
    fresh optimizer state, its own shuffling generator. The global generator (dropout) gets the
    first seed. `stacked` (default: N > 1) gives the state its leading model axis."""
    models = model_configs(config) if models is None else models
    stacked = config.n_models > 1 if stacked is None else stacked
    params = [networks.init_params(m.model, m.seed, device) for m in models]
    torch.manual_seed(config.seed)
    shuffles = [torch.Generator().manual_seed(m.seed) for m in models]
    opt_state = per_model([optimizer.init(p) for p in params], stacked)
    return TrainState(per_model(params, stacked), opt_state, 0, capture_rng(shuffles, device, stacked))


def capture_rng(shuffles: list[torch.Generator], device, stacked: bool) -> dict:
    state = {"shuffle": per_model([g.get_state() for g in shuffles], stacked), "cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(rng: dict, device) -> list[torch.Generator]:
    """Set the global generators as they were; return each model's shuffling generator."""
    torch.set_rng_state(rng["cpu"])
    if torch.device(device).type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    states = rng["shuffle"] if rng["shuffle"].dim() == 2 else rng["shuffle"][None]  # (N, L)
    shuffles = [torch.Generator() for _ in states]
    for generator, state in zip(shuffles, states, strict=True):
        generator.set_state(state.clone())  # a row of its own: set_state on a view crashed torch 2.13
    return shuffles


def completed(step, params: Params, opt_state: Tree, epoch: int, rng: dict) -> TrainState:
    """The state after `epoch`, to keep: copies where `step` is a CUDA graph, whose next replay
    overwrites its output buffers."""
    if getattr(step, "returns_buffers", False):
        params, opt_state = tree_map(torch.clone, params), tree_map(torch.clone, opt_state)
    return TrainState(params, opt_state, epoch, rng)


# ---- the loop ---------------------------------------------------------------------------


class Dataset(Protocol):
    """MNIST on the device (tinymnist.data.MNIST)."""

    train_images: torch.Tensor  # (N, 28, 28) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor  # (T, 28, 28) uint8
    test_labels: torch.Tensor  # (T,) int64


class Reporter(Protocol):
    """Where the loop's progress goes (tool/report.py): log lines, a progress bar, a metrics file."""

    def epoch_started(self, epoch: int, steps: int, lr: float, compiling: bool) -> None: ...
    def logged(self, epoch: int, step: int, images_seen: int, n_train: int, loss: float) -> None: ...
    def evaluated(self, record: dict) -> None: ...


class NonFiniteLoss(TinyMnistError):
    pass


@dataclass(frozen=True)
class Training:
    """What `fit` runs, besides the data and the state it starts from."""

    config: TrainConfig  # epochs, batch size, log interval, --eval-every, --target-accuracy, --dry-run
    models: list[TrainConfig]  # each model the step trains, in stacking order (one for a single run)
    step: Step  # make_step's step, or a transform of it (tinymnist/transforms)
    evaluate: Callable[[Params, Progress], list[dict]]  # an evaluation's records (TestSet)
    reporter: Reporter | None = None
    on_epoch_end: Callable[[TrainState], None] | None = None  # gets each completed epoch: checkpoints go here
    steps_per_call: int = 1  # > 1: the step takes (n, [N,] B) indices and (n, [N]) rates (several_steps.py)


@dataclass
class FitResult:
    state: TrainState  # after the last completed epoch
    records: list[dict] = field(default_factory=list)  # one per model and evaluation, as --metrics writes them
    first_step_seconds: float = 0.0  # the first step compiles (when compiled): timed apart
    untimed_seconds: float = 0.0  # later calls that compiled again (a new thread count): timed apart
    train_seconds: float = 0.0
    images: int = 0  # images trained on in train_seconds, by all the models together
    steps: int = 0  # optimizer steps of this run, the first one included
    reached: list = field(default_factory=list)  # --target-accuracy: each model's first record at or above it

    @property
    def images_per_second(self) -> float:
        return per_second(self.images, self.train_seconds)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Clock:
    """Seconds of training, stopped around the first (compiling) step and evaluations; the device
    is synchronized at each reading, so queued work counts. `untimed_total`: the step's running total
    of seconds spent on work that is not training (a transform compiling again mid-run,
    cpu_threads.py), left out of every lap and kept apart in untimed_seconds."""

    def __init__(self, device: torch.device, untimed_total: Callable[[], float] = lambda: 0.0):
        self.device, self.untimed_total = device, untimed_total
        self.seconds, self.untimed_seconds = 0.0, 0.0
        self.started, self.untimed_at_start = 0.0, 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.started, self.untimed_at_start = time.perf_counter(), self.untimed_total()

    def stop(self, count: bool = True) -> float:
        """The seconds since start less the untimed ones; added to the total unless `count` is False."""
        synchronize(self.device)
        untimed = self.untimed_total() - self.untimed_at_start
        lap = time.perf_counter() - self.started - untimed
        self.seconds += lap if count else 0.0
        self.untimed_seconds += untimed
        return lap


def steps_this_call(training: Training, done: int, steps: int, left: int) -> int:
    """How many steps the next call of the step takes: one, or up to steps_per_call, ending at
    the next log line, evaluation or epoch end at the latest (`done` steps of the epoch so far)."""
    config = training.config
    until_eval = config.eval_every - done % config.eval_every if config.eval_every else steps
    until_log = config.log_interval - done % config.log_interval
    return min(training.steps_per_call, until_log, until_eval, steps - done, left)


def fit(training: Training, data: Dataset, state: TrainState) -> FitResult:
    """Train from `state` up to config.epochs, evaluating (clock stopped) after every epoch and
    every config.eval_every steps; with config.target_accuracy, stop once every model reached it.

    The host reads the device only every log_interval steps (the running loss): no per-step
    .item(), so the CPU can queue steps ahead of a GPU. A call of the step is one step, or with
    steps_per_call > 1 the steps up to the next log line or evaluation."""
    config, step, reporter = training.config, training.step, training.reporter
    device, n_train, n_models = data.train_images.device, len(data.train_images), len(training.models)
    stacked = config.n_models > 1  # the state has a leading model axis
    steps = math.ceil(n_train / config.batch_size)  # per epoch: epoch_batches tops up the last batch
    shuffles = restore_rng(state.rng, device)
    # A call that compiled again (AdaptiveThreads at a new thread count) is off the clock, its images counted.
    result, clock = FitResult(state), Clock(device, getattr(step, "untimed_seconds", lambda: 0.0))
    params, opt_state = state.params, state.opt_state
    if state.epoch == 0 and not config.dry_run:  # the untrained network, as the tutorials show
        untrained = Progress(0, [None] * n_models, [m.lr for m in training.models], 0.0, 0)
        if evaluated(training, result, params, untrained, clock):  # a target so low that no training is needed
            return result
    first = state.epoch * steps
    last = first + 1 if config.dry_run else config.epochs * steps
    clock.start()
    s, compile_steps = first, 0  # steps of the run so far; those of the first (compiling) call
    while s < last:
        epoch, i = s // steps + 1, s % steps  # i: steps of this epoch before this call
        if i == 0:  # a new epoch: each model's own data order and learning rates
            orders = [epoch_batches(n_train, config.batch_size, g, device) for g in shuffles]  # N x (steps, B)
            batches = side_by_side(orders, stacked)  # (steps, [N,] B)
            lrs = [epoch_lrs(m, epoch, steps) for m in training.models]  # N lists of `steps` rates
            lr_tensor = side_by_side([torch.tensor(r) for r in lrs], stacked).to(device)  # (steps, [N]): one copy
            running = torch.zeros(batches.shape[1:-1], device=device)  # ([N],) loss summed since the last log
            epoch_losses, epoch_start = [0.0] * n_models, clock.seconds
            if reporter:
                reporter.epoch_started(epoch, last - first if config.dry_run else steps, lrs[0][0], s == first)
        n = steps_this_call(training, i, steps, last - s)
        these = i if training.steps_per_call == 1 else slice(i, i + n)  # one batch, or (n, [N,] B)
        params, opt_state, loss = step(
            params, opt_state, data.train_images, data.train_labels, batches[these], lr_tensor[these]
        )
        running += loss
        s, done = s + n, i + n  # done: steps of this epoch, this call's included
        result.steps += n
        if s == first + n:  # the step compiles on its first call: keep that out of the speed
            result.first_step_seconds, compile_steps = clock.stop(count=False), n
            clock.start()
        epoch_end = done == steps or s == last
        if done % config.log_interval == 0 or epoch_end:
            summed = running.reshape(-1).tolist()  # the only host sync between evaluations
            check_finite(training.models, summed, epoch, done, [r[done - 1] for r in lrs])
            if reporter:
                since_last = done % config.log_interval or config.log_interval
                reporter.logged(epoch, done, done * config.batch_size, n_train, sum(summed) / n_models / since_last)
            epoch_losses = [total + loss for total, loss in zip(epoch_losses, summed, strict=True)]
            running.zero_()
        if not epoch_end and not (config.eval_every and done % config.eval_every == 0):
            continue
        clock.stop()  # ---- evaluation, off the clock ----
        timed = done - compile_steps * (first // steps + 1 == epoch)  # this epoch's steps less the compiling call's
        seconds, images = clock.seconds - epoch_start, timed * config.batch_size * n_models
        if epoch_end:
            progress = Progress(epoch, [total / done for total in epoch_losses], [r[0] for r in lrs], seconds, images)
        else:
            fraction = round(epoch - 1 + done / steps, 4)
            progress = Progress(fraction, [None] * n_models, [r[done - 1] for r in lrs], seconds, images)
        reached = evaluated(training, result, params, progress, clock)
        if epoch_end:
            result.state = completed(step, params, opt_state, epoch, capture_rng(shuffles, device, stacked))
            if training.on_epoch_end and not config.dry_run:
                training.on_epoch_end(result.state)
        if reached:
            break
        clock.start()
    result.train_seconds, result.untimed_seconds = clock.seconds, clock.untimed_seconds
    result.images = max(result.steps - compile_steps, 0) * config.batch_size * n_models
    return result


def evaluated(training: Training, result: FitResult, params: Params, progress: Progress, clock: Clock) -> bool:
    """Evaluate every model, report and keep the records; True once every model has reached
    --target-accuracy. Each model's first record at or above it says so ("reached_target")."""
    config, target = training.config, training.config.target_accuracy
    records = training.evaluate(params, progress)
    models = [r for r in records if not r.get("ensemble")]
    if target is not None:  # time to accuracy: the run's totals so far, the compile left out
        result.reached = result.reached or [None] * len(models)
        for j, record in enumerate(models):
            record |= {"train_seconds_total": clock.seconds, "images_total": result.steps * config.batch_size}
            if result.reached[j] is None and record["test_accuracy"] >= target:
                record["reached_target"] = True
                result.reached[j] = record
    for record in records:
        result.records.append(record)
        if training.reporter:
            training.reporter.evaluated(record)
    return target is not None and all(result.reached)


def check_finite(models: list[TrainConfig], summed: list[float], epoch: int, step: int, lrs: list[float]) -> None:
    """NonFiniteLoss naming the epoch and step, and the model when there are several."""
    for model, loss, lr in zip(models, summed, lrs, strict=True):
        if math.isfinite(loss):
            continue
        if len(models) == 1:
            raise NonFiniteLoss(f"loss became {loss} in epoch {epoch} by step {step}; lower --lr (it was {lr:g})")
        raise NonFiniteLoss(
            f"the loss of the model with seed {model.seed}, --lr {model.lr:g} became {loss} in "
            f"epoch {epoch} by step {step}; lower its --lr (it was {lr:g})"
        )
