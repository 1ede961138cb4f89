"""One model through the N-model step (`bench --seeds 1`): the slices taken inside the compiled graphs
or the single run's own step called on them (vmap.on_model_axis), against the single step.

Three loops built by speed.device_step, each on fixed threads with its own shuffled batches, timed
in turns in one process (`--rounds` windows of 0.4 s each):

    single          stacked=False
    in the graph    stacked, N = 1, built with wide_conv.CHOSEN emptied: vmap.n_models_gradient's and
                    n_models_update's N = 1 route, which device_step takes where models run vmapped
    on its slices   vmap.on_model_axis around the single step, where the models run apart

Prints µs a step and the median of the rounds' ratios to the single step. Denormals are flushed
and freed memory is kept, as `train` does.

    python research/one_model_route.py --data-dir DIR [--models fast,mlp3] [--rounds 11]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from unittest import mock

import torch

from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import epoch_batches, initial_state, per_model, side_by_side
from tinymnist.tool.bench import bench_data
from tinymnist.transforms import speed, vmap, wide_conv
from tinymnist.transforms.denormals import flush_denormals
from tinymnist.transforms.freed_memory import reuse_freed_memory

CPU = torch.device("cpu")


def loop(config, optimizer, step, stacked: bool, images, labels):
    state = initial_state(config, optimizer, CPU, stacked=stacked)
    params, opt_state = state.params, state.opt_state
    lr = per_model([torch.tensor(config.lr)], stacked)
    shuffle = torch.Generator().manual_seed(1)
    while True:
        for batch_idx in side_by_side([epoch_batches(len(images), config.batch_size, shuffle, CPU)], stacked):
            params, opt_state, _ = step(params, opt_state, images, labels, batch_idx, lr)
            yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--models", default="fast,mlp3")
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    flush_denormals()
    reuse_freed_memory()
    images, labels, source = bench_data(args.data_dir, CPU)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data: {source}", flush=True)
    for model in args.models.split(","):
        config = recipe_config(model)
        one = dataclasses.replace(config, seeds=1)
        optimizer = make_optimizer(config)
        single = speed.device_step(config, optimizer, CPU, stacked=False, adaptive_threads=False)
        with mock.patch.dict(wide_conv.CHOSEN, clear=True):  # as if the models ran vmapped: the in-graph route
            graph = speed.device_step(one, optimizer, CPU, stacked=True, adaptive_threads=False)
        loops = {
            "single": loop(config, optimizer, single, False, images, labels),
            "in the graph": loop(one, optimizer, graph, True, images, labels),
            "on its slices": loop(one, optimizer, vmap.on_model_axis(single), True, images, labels),
        }
        for steps in loops.values():
            for _ in range(4):
                next(steps)
        us = {name: [] for name in loops}
        for _ in range(args.rounds):
            for name, steps in loops.items():
                started, n = time.perf_counter(), 0
                while time.perf_counter() - started < 0.4:
                    next(steps)
                    n += 1
                us[name].append((time.perf_counter() - started) / n * 1e6)
        for name, times in us.items():
            ratio = statistics.median(t / s for s, t in zip(us["single"], times, strict=True))
            median = statistics.median(times)
            print(f"{model}: {name}: {median:,.0f} us a step, {ratio:.3f}x the single step", flush=True)


if __name__ == "__main__":
    main()
