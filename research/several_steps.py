"""Several steps per compiled call on the CPU: the single step, k steps through torch's scan operator,
and k steps unrolled into one graph, with inductor's Python wrapper and with its C++ wrapper (what
`train --steps-per-call k` runs), in turns.

For each recipe: the step `train` runs (one call per step; called directly for mlp and mlp3),
k steps per call through scan (one graph whose body is the step, compiled by torch.compile), and
transforms/several_steps.py's k unrolled steps, called as the single step is, with either wrapper;
on torch's fixed threads, windows of about 0.5 s taken in turn, 9 rounds; medians, and the compile
time of each one's first call (from inductor's cache where an earlier run left it).

    python research/several_steps.py --k 10 mlp mlp3

Raw output: results/bench/cpu-several-steps-unrolled-amd/ (the scan alone, on an Intel Xeon:
results/bench/cpu-several-steps/).
"""

import argparse
import statistics
import time

import torch
from torch._higher_order_ops.scan import scan  # torch's scan operator (no public name in torch 2.13)

from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import initial_state, make_gradient, make_step
from tinymnist.tool.bench import bench_data
from tinymnist.transforms.denormals import flush_denormals
from tinymnist.transforms.freed_memory import reuse_freed_memory
from tinymnist.transforms.several_steps import SeveralSteps, unrolled
from tinymnist.transforms.speed import CPU_DIRECT_CALL, compiled, device_step

CPU = torch.device("cpu")


def scanned(step):
    """`step` once per row of (k, B) indices and (k,) rates, in one scan; the summed loss."""

    def steps(params, opt_state, images, labels, batch_idx, lr):
        def body(carry, row):
            (params, opt_state, total), (idx, rate) = carry, row
            params, opt_state, loss = step(params, opt_state, images, labels, idx, rate)
            return (params, opt_state, total + loss), loss

        (params, opt_state, total), _ = scan(body, (params, opt_state, torch.zeros(())), (batch_idx, lr))
        return params, opt_state, total

    return steps


def timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    k = args.k
    flush_denormals()  # as `tinymnist` does at its start
    reuse_freed_memory()
    images, labels, source = bench_data("data", CPU)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, k = {k}; data: {source}")
    head = f"| model | batch | one per call img/s | scan: {k} per call | unrolled, Python wrapper | unrolled, C++ |"
    print(f"{head} compile s: one, scan, unrolled Python, C++ |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        config = recipe_config(model, compile=True, micro_batch=0, steps_per_call=k)
        optimizer = make_optimizer(config)
        cpp = device_step(config, optimizer, CPU, adaptive_threads=False)  # SeveralSteps, as train builds it
        one, step = cpp.one, make_step(make_gradient(config), optimizer)
        scan_k = SeveralSteps(one, compiled(scanned(step)), k)
        python = SeveralSteps(one, compiled(unrolled(step, k), direct=model in CPU_DIRECT_CALL), k)
        state = initial_state(config, optimizer, CPU)
        g = torch.Generator().manual_seed(0)
        batch_idx = torch.randint(0, len(images), (k, config.batch_size), generator=g)  # (k, B)
        lr = torch.full((k,), config.lr)
        p, o = state.params, state.opt_state
        _, compile_one = timed(one, p, o, images, labels, batch_idx[0], lr[0])
        _, compile_scan = timed(scan_k, p, o, images, labels, batch_idx, lr)
        _, compile_python = timed(python, p, o, images, labels, batch_idx, lr)
        _, compile_cpp = timed(cpp, p, o, images, labels, batch_idx, lr)
        per_window = max(k, round(0.5 / max(timed(one, p, o, images, labels, batch_idx[0], lr[0])[1], 1e-6)))
        calls = max(1, per_window // k)
        sides = {"one": None, "scan": scan_k, "python": python, "cpp": cpp}
        rates = {side: [] for side in sides}
        for r in range(9):
            order = list(sides)[r % 4 :] + list(sides)[: r % 4]  # each round starts one side later
            for side in order:
                started = time.perf_counter()
                pp, oo = p, o
                for _ in range(calls):
                    if side == "one":
                        for i in range(k):
                            pp, oo, _ = one(pp, oo, images, labels, batch_idx[i], lr[i])
                    else:
                        pp, oo, _ = sides[side](pp, oo, images, labels, batch_idx, lr)
                rates[side].append(calls * k * config.batch_size / (time.perf_counter() - started))
        a, *others = (statistics.median(rates[side]) for side in sides)
        cells = " | ".join(f"{x:,.0f} ({x / a:.2f}x)" for x in others)
        compile_seconds = ", ".join(f"{t:.1f}" for t in (compile_one, compile_scan, compile_python, compile_cpp))
        print(f"| {model} | {config.batch_size} | {a:,.0f} | {cells} | {compile_seconds} |", flush=True)


if __name__ == "__main__":
    main()
