"""`tinymnist train --seeds N` / `--lr a,b,c` around ensemble_fit.fit_many, and `eval` of its checkpoints.

run.train does every check a single run does (config, device, output paths and their
locks, data, batch size), then hands an N-model config here: the memory estimate is
checked, the N models are stacked and trained in one vmapped step, each completed
epoch is checkpointed with all N, and a stop keeps the last checkpoint as run.py says.
Under torchrun each process trains its share of the N models (distributed_sweep.py).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from tinymnist import checkpoint, distributed, optim, run
from tinymnist.config import TrainConfig
from tinymnist.data import MNIST
from tinymnist.distributed_sweep import Sweep
from tinymnist.ensemble import ensemble_step, evaluate_many, initial_state, members
from tinymnist.ensemble_fit import evaluation_records, fit_many
from tinymnist.ensemble_memory import check_memory
from tinymnist.ensemble_report import EnsembleDisplay, final_line, model_test_line
from tinymnist.report import json_line
from tinymnist.train import FitResult, TrainState
from tinymnist.transforms import use_compile


def train_many(config: TrainConfig, mnist: MNIST, optimizer: optim.Optimizer, device: torch.device,
               resumed: TrainState | None, metrics_path: Path | None,
               cluster: distributed.Cluster | None = None) -> FitResult:  # fmt: skip
    """Train the config's N models at once (under torchrun: this process's share of them);
    print the final line; return fit_many's result (on ranks other than 0: of the share, no records)."""
    sweep = None if cluster is None else Sweep(config, cluster, mnist)
    runs = members(config) if sweep is None else sweep.runs
    check_memory(config, optimizer, device, len(runs))
    if sweep is not None:
        state = sweep.start(optimizer, device, resumed)
    else:
        state = initial_state(config, optimizer, device) if resumed is None else checkpoint.to_device(resumed, device)
    step = ensemble_step(config, optimizer, device)
    records = None if sweep is None else sweep.records  # rank 0 reports every process's models
    fit = functools.partial(fit_many, runs=runs, records=records)
    gathered = None if sweep is None else sweep.gathered
    result = run.train_and_save(config, mnist, state, step, metrics_path, append=resumed is not None, fit_function=fit,
                                display=EnsembleDisplay, gathered=gathered)  # fmt: skip
    if sweep is not None:  # the speed of the whole sweep: every share's images in the slowest share's time
        if not cluster.leader:
            return result
        result.train_seconds, result.images = sweep.train_seconds, sweep.images
    print(final_line(result.records[-1], result.state.epoch, device, result.train_seconds, result.first_step_seconds,
                     use_compile(config, device), result.images_per_second))  # fmt: skip
    return result


def eval_lines(config: TrainConfig, state: TrainState, images: torch.Tensor, labels: torch.Tensor,
               json_output: bool) -> list[str]:  # fmt: skip
    """`tinymnist eval` of an N-model checkpoint: each model's test line, then the ensemble's."""
    runs = members(config)
    evaluation = evaluate_many(config, state.params, images, labels)
    records = evaluation_records(runs, state.epoch, [None] * len(runs), evaluation, [m.lr for m in runs], 0.0, 0)
    lines = []
    for record in records:
        record = {"model": config.model, "epoch": state.epoch,
                  **{k: record[k] for k in ("test_loss", "test_accuracy", "correct", "total")},
                  **{k: record[k] for k in ("seed", "initial_lr", "ensemble", "models") if k in record}}  # fmt: skip
        lines.append(json_line(record) if json_output else model_test_line(record))
    return lines
