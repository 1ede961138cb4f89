"""train.fit for N models: the same epoch loop around ensemble.py's vmapped step.

Each epoch, every model shuffles with its own generator and follows its own learning-rate
schedule, exactly as its single run would (train.epoch_batches, train.epoch_lrs); the
step then takes all N batches (N, B) and rates (N,) at once. The host still reads the
device only every log_interval steps. Each evaluation gives N records (--metrics: one
per model, with its seed and initial lr) and one with "ensemble": true.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from tinymnist.config import TrainConfig
from tinymnist.data import MNIST
from tinymnist.devices import synchronize
from tinymnist.ensemble import EnsembleEvaluation, capture_rngs, evaluate_many, members, restore_rngs
from tinymnist.train import (
    EpochTiming,
    FitResult,
    NonFiniteLoss,
    Reporter,
    Step,
    TrainState,
    completed,
    epoch_batches,
    epoch_lrs,  # fmt: skip
    evaluation_record,
)
from tinymnist.trees import Tree

# An evaluation's records from (epoch, each model's train loss, stacked params, each model's lr,
# seconds, images): one per model and the ensemble's, as --metrics writes them.
Records = Callable[[int, list, Tree, list, float, int], list[dict]]


def fit_many(
    config: TrainConfig,
    data: MNIST,
    state: TrainState,
    step: Step,
    reporter: Reporter | None = None,
    on_epoch_end: Callable[[TrainState], None] | None = None,
    runs: list[TrainConfig] | None = None,
    records: Records | None = None,
) -> FitResult:
    """train.fit over the stacked state of the config's N models; `step` is ensemble_step's.

    A torchrun process trains a share of the models (distributed_sweep.py): `runs` are its
    models, `records` its evaluation, which reports every process's models on rank 0."""
    device = data.train_images.device
    runs = members(config) if runs is None else runs
    shuffles = restore_rngs(state.rng, device)
    result = FitResult(state)

    def own_records(epoch, train_losses, params, lrs, seconds, images):
        evaluation = evaluate_many(config, params, data.test_images, data.test_labels)
        return evaluation_records(runs, epoch, train_losses, evaluation, lrs, seconds, images)

    def evaluated(*evaluation):
        for record in (records or own_records)(*evaluation):
            result.records.append(record)
            if reporter:
                reporter.evaluated(record)

    if state.epoch == 0 and not config.dry_run:  # the untrained networks, as a single run shows
        evaluated(0, [None] * len(runs), state.params, [run.lr for run in runs], 0.0, 0)
    for epoch in range(state.epoch + 1, config.epochs + 1):
        first = epoch == state.epoch + 1  # the step compiles on its first call
        batches = torch.stack([epoch_batches(len(data.train_images), config.batch_size, shuffle, device)
                               for shuffle in shuffles], dim=1)  # (steps, N, B)  # fmt: skip
        lrs = [
            list(rates) for rates in zip(*(epoch_lrs(run, epoch, len(batches)) for run in runs), strict=True)
        ]  # steps x N
        params, opt_state, train_losses, timing = train_epoch_many(config, runs, step, result.state, data, epoch,
                                                                   batches, lrs, reporter, first)  # fmt: skip
        result.first_step_seconds += timing.first_step_seconds
        result.train_seconds += timing.seconds
        result.images += timing.images
        evaluated(epoch, train_losses, params, lrs[0], timing.seconds, timing.images)
        result.state = completed(step, params, opt_state, epoch, capture_rngs(shuffles, device))
        if config.dry_run:
            break
        if on_epoch_end:
            on_epoch_end(result.state)
    return result


def train_epoch_many(config, runs, step, state, data, epoch, batches, lrs, reporter, time_first_step: bool):
    """train.train_epoch for N models: (params, opt_state, each model's mean loss, EpochTiming).
    The log lines show the loss averaged over the models; images count every model's."""
    params, opt_state, device = state.params, state.opt_state, data.train_images.device
    steps, n = (1 if config.dry_run else len(batches)), batches.shape[1]
    if reporter:
        reporter.epoch_started(epoch, steps, lrs[0][0], compiling=time_first_step)
    lr_tensor = torch.tensor(lrs, device=device)  # (steps, N): one copy to the device per epoch
    running = torch.zeros(n, device=device)  # (N,) each model's loss summed since the last log line
    epoch_losses, first_step_seconds, timed_from = [0.0] * n, 0.0, 0
    synchronize(device)
    started = time.perf_counter()
    for i in range(steps):
        params, opt_state, loss = step(
            params, opt_state, data.train_images, data.train_labels, batches[i], lr_tensor[i]
        )
        running += loss  # (N,)
        if i == 0 and time_first_step:  # compilation happens here: keep it out of the speed
            synchronize(device)
            first_step_seconds, started, timed_from = time.perf_counter() - started, time.perf_counter(), 1
        if (i + 1) % config.log_interval == 0 or i + 1 == steps:
            summed = running.tolist()  # the only host sync inside the epoch
            check_finite(summed, runs, epoch, i, lrs[i])
            if reporter:
                since_last = (i + 1) % config.log_interval or config.log_interval
                reporter.logged(epoch, i + 1, (i + 1) * config.batch_size, len(data.train_images),
                                sum(summed) / n / since_last)  # fmt: skip
            epoch_losses = [total + s for total, s in zip(epoch_losses, summed, strict=True)]
            running.zero_()
    synchronize(device)
    timing = EpochTiming(
        first_step_seconds, time.perf_counter() - started, (steps - timed_from) * config.batch_size * n, steps
    )
    return params, opt_state, [loss / steps for loss in epoch_losses], timing


def check_finite(summed: list[float], runs: list[TrainConfig], epoch: int, i: int, lrs: list[float]) -> None:
    """NonFiniteLoss naming the first model whose loss is NaN or infinite."""
    for run, loss, lr in zip(runs, summed, lrs, strict=True):
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"the loss of the model with seed {run.seed}, --lr {run.lr:g} became {loss} in "
                                f"epoch {epoch} by step {i + 1}; lower its --lr (it was {lr:g})")  # fmt: skip


def evaluation_records(runs, epoch, train_losses, evaluation: EnsembleEvaluation, lrs, seconds, images) -> list[dict]:
    """One record per model (a single run's fields, plus its seed and initial lr) and the ensemble's."""
    per_model_images = images // len(runs)
    records = [
        {**evaluation_record(epoch, loss, result, lr, seconds, per_model_images), "seed": run.seed,
         "initial_lr": run.lr}
        for run, loss, result, lr in zip(runs, train_losses, evaluation.models, lrs, strict=True)
    ]  # fmt: skip
    accuracies = [r["test_accuracy"] for r in records]
    ensemble = evaluation_record(epoch, None, evaluation.ensemble, lrs[0], seconds, images)
    del ensemble["train_loss"], ensemble["lr"]  # not one model's
    best = max(records, key=lambda r: r["test_accuracy"])  # the first of equals: the lowest seed and lr
    records.append({
        **ensemble, "ensemble": True, "models": len(runs),
        "mean_accuracy": statistics.fmean(accuracies),
        "std_accuracy": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,  # over the models (n-1)
        "min_accuracy": min(accuracies), "max_accuracy": max(accuracies),
        "best_seed": best["seed"], "best_lr": best["initial_lr"],
    })  # fmt: skip
    return records
