"""Does compiling CPU kernels for a thread count read at run time cost a quiet step anything?

speed.compiled sets inductor's cpp.dynamic_threads so that AdaptiveThreads can change
the thread count without a recompile; inductor's own note says it may cost a little.
This times the compiled step both ways on fixed threads, windows in turn, in one process.

    python research/dynamic_threads.py mlp cnn

Raw output: results/bench/cpu-busy-core/dynamic-threads.txt.
"""

import statistics
import sys

import torch

from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import initial_state, make_gradient, make_step
from tinymnist.tool.bench import bench_data, warm_up, window_rate
from tinymnist.transforms.speed import micro_batched


def steps(config, images, labels, dynamic: bool):
    optimizer = make_optimizer(config)
    state = initial_state(config, optimizer, "cpu")
    options = {"cpp.dynamic_threads": dynamic}
    gradient = make_gradient(config)
    if config.batch_size > 256:  # as device_step: compiled pieces, 256-image chunks
        gradient = micro_batched(torch.compile(gradient, fullgraph=True, dynamic=False, options=options), 256)
        step = make_step(gradient, optimizer)
    else:
        step = torch.compile(make_step(gradient, optimizer), fullgraph=True, dynamic=False, options=options)
    params, opt_state, lr = state.params, state.opt_state, torch.tensor(config.lr)
    g = torch.Generator().manual_seed(0)
    while True:
        batch_idx = torch.randint(0, len(images), (config.batch_size,), generator=g)
        params, opt_state, loss = step(params, opt_state, images, labels, batch_idx, lr)
        yield loss


def main(models):
    images, labels, source = bench_data("data", torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data: {source}")
    print("| model | static threads img/s | dynamic threads img/s | dynamic/static |")
    print("|---|---|---|---|")
    for model in models:
        config = recipe_config(model)
        runs = {dynamic: steps(config, images, labels, dynamic) for dynamic in (False, True)}
        for s in runs.values():
            warm_up(s, torch.device("cpu"), 3)
        window = max(1, 32768 // config.batch_size) if model.startswith("mlp") else max(1, 2048 // config.batch_size)
        rates = {dynamic: [] for dynamic in runs}
        for r in range(9):
            for dynamic in (False, True) if r % 2 == 0 else (True, False):
                rates[dynamic].append(window_rate(runs[dynamic], config.batch_size, torch.device("cpu"), window))
        static, dynamic = statistics.median(rates[False]), statistics.median(rates[True])
        print(f"| {model} | {static:,.0f} | {dynamic:,.0f} | {dynamic / static:.2f}x |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
