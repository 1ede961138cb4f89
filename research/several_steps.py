"""Several steps per compiled call on the CPU: worth it for which recipes, and at what compile cost?

For each recipe: the compiled single step (one call per step, what `train` ran before)
against transforms/several_steps.py's SeveralSteps (k steps per call through torch's scan
operator), on torch's fixed threads, windows of about 0.5 s taken in turn, 9 rounds;
medians, and the compile time of each one's first call.

    python research/several_steps.py --k 10 mlp mlp3 cnn

Raw output: results/bench/cpu-several-steps/.
"""

import argparse
import statistics
import time

import torch

from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import initial_state, make_gradient, make_step
from tinymnist.tool.bench import bench_data
from tinymnist.transforms.several_steps import SeveralSteps, scanned
from tinymnist.transforms.speed import compiled, default_micro_batch, micro_batched


def timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--k", type=int, default=10)
    args, k = parser.parse_args(), parser.parse_args().k
    images, labels, source = bench_data("data", torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, k = {k}; data: {source}")
    print("| model | batch | one step per call img/s | k per call img/s | ratio | compile s: one, scan |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        config = recipe_config(model)
        optimizer = make_optimizer(config)
        gradient = make_gradient(config)
        micro = default_micro_batch(torch.device("cpu"), model)
        if 0 < micro < config.batch_size:  # as device_step: compiled pieces, the chunk loop in Python
            gradient = micro_batched(compiled(gradient), micro)
        step = make_step(gradient, optimizer)
        one, scan_k = compiled(step), compiled(scanned(step))
        state = initial_state(config, optimizer, "cpu")
        g = torch.Generator().manual_seed(0)
        batch_idx = torch.randint(0, len(images), (k, config.batch_size), generator=g)  # (k, B)
        lr = torch.full((k,), config.lr)
        p, o = state.params, state.opt_state
        _, compile_one = timed(one, p, o, images, labels, batch_idx[0], lr[0])
        _, compile_scan = timed(scan_k, p, o, images, labels, batch_idx, lr)
        several = SeveralSteps(one, scan_k, k)
        per_window = max(k, round(0.5 / max(timed(one, p, o, images, labels, batch_idx[0], lr[0])[1], 1e-6)))
        calls = max(1, per_window // k)
        rates = {"one": [], "several": []}
        for r in range(9):
            for side in ("one", "several") if r % 2 == 0 else ("several", "one"):
                started = time.perf_counter()
                pp, oo = p, o
                for _ in range(calls):
                    if side == "one":
                        for i in range(k):
                            pp, oo, _ = one(pp, oo, images, labels, batch_idx[i], lr[i])
                    else:
                        pp, oo, _ = several(pp, oo, images, labels, batch_idx, lr)
                rates[side].append(calls * k * config.batch_size / (time.perf_counter() - started))
        a, b = statistics.median(rates["one"]), statistics.median(rates["several"])
        compile_seconds = f"{compile_one:.1f}, {compile_scan:.1f}"
        print(f"| {model} | {config.batch_size} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x | {compile_seconds} |", flush=True)


if __name__ == "__main__":
    main()
