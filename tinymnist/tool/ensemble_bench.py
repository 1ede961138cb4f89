"""`tinymnist bench --seeds 1,4,16`: N models in one vmapped step against N single runs.

For each model at its recipe batch size, one process times today's single-model step
(what `train` runs) and then, for each N, the vmapped step of N models (what `train
--seeds N` runs), with bench.py's timing: first step (compile) and warm-up apart, then
the median of several windows of the same number of steps. N single runs one after
another train at the single step's rate, so "time vs N singles" is

    (N models' images / vmapped images/s) / (N models' images / single images/s)
        = single images/s / vmapped images/s summed over the N models.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tinymnist.algorithm.config import make_optimizer, model_configs, recipe_config
from tinymnist.algorithm.train import epoch_batches, initial_state
from tinymnist.tool.bench import bench_data, machine_description, our_steps, time_loop, write_json
from tinymnist.transforms.speed import device_step


def ensemble_steps(config, images, labels, device, n: int, compile: bool) -> Iterator:
    """Yield after each vmapped step of n models, forever, each model on its own shuffled batches."""
    config = dataclasses.replace(config, seeds=n, compile=compile, cuda_graphs=compile)
    optimizer = make_optimizer(config)
    state = initial_state(config, optimizer, device)
    step = device_step(config, optimizer, device)
    models = model_configs(config)
    lrs = torch.tensor([m.lr for m in models], device=device)  # (N,)
    shuffles = [torch.Generator().manual_seed(m.seed) for m in models]
    params, opt_state = state.params, state.opt_state
    while True:
        batches = torch.stack([epoch_batches(len(images), config.batch_size, g, device) for g in shuffles], dim=1)
        for batch_idx in batches:  # (N, B) each
            params, opt_state, loss = step(params, opt_state, images, labels, batch_idx, lrs)
            yield params, loss


def bench_counts(
    model: str,
    counts: list[int],
    images,
    labels,
    device,
    window_images: int,
    repeats: int,
    warmup: int,
    compile: bool,
    log,
) -> dict:
    config = recipe_config(model)
    window_steps = max(1, window_images // config.batch_size)
    log(f"{model}: timing the single step ({repeats} windows of {window_steps} steps)")
    single = time_loop(
        our_steps(config, images, labels, device, compile), config.batch_size, device, window_steps, repeats, warmup
    )
    result = {
        "model": model,
        "batch_size": config.batch_size,
        "window_steps": window_steps,
        "single": single,
        "vmapped": {},
    }
    for n in counts:
        log(f"{model}: timing {n} models in one vmapped step")
        timed = time_loop(
            ensemble_steps(config, images, labels, device, n, compile),
            config.batch_size * n,
            device,
            window_steps,
            repeats,
            warmup,
        )
        timed["time_vs_n_single_runs"] = single["images_per_second"] / timed["images_per_second"]
        result["vmapped"][str(n)] = timed
    return result


def run_seeds_bench(
    models_to_run, counts, device, data_dir, window_images=4096, repeats=5, warmup=3, compile=True, log=None
) -> dict:
    """The whole benchmark as one JSON-ready dict."""
    log = log or (lambda message: print(message, file=sys.stderr))
    images, labels, source = bench_data(data_dir, device)
    return {
        "device": str(device),
        "machine": machine_description(device),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "data": source,
        "compile": compile,
        "results": [
            bench_counts(m, counts, images, labels, device, window_images, repeats, warmup, compile, log)
            for m in models_to_run
        ],
    }


def print_seeds_report(report: dict, json_path: Path | None) -> None:
    if json_path:
        write_json(json_path, report)
    table = Table(title=f"{report['machine']}, torch {report['torch']}; data: {report['data']}")
    for column in ("model", "batch", "N", "img/s (all N)", "single img/s", "time vs N singles", "compile s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in report["results"]:
        single = r["single"]["images_per_second"]
        for n, timed in r["vmapped"].items():
            table.add_row(
                r["model"],
                str(r["batch_size"]),
                n,
                f"{timed['images_per_second']:,.0f}",
                f"{single:,.0f}",
                f"{timed['time_vs_n_single_runs']:.2f}x",
                f"{timed['first_step_seconds']:.1f}",
            )
    console = Console()
    (console if console.is_terminal else Console(width=120)).print(table)
