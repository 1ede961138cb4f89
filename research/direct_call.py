"""The compiled CPU step called through torch.compile against the same graph called directly.

transforms/direct_call.py traces the step once (make_fx), compiles it with inductor (compile_fx)
and calls the compiled graph without dynamo's entry. This times, per recipe, the step `tinymnist
train` builds on the CPU (transforms/speed.py's device_step, fixed threads) each way, in one
process: windows of at least 0.5 s taken in turn, 9 rounds; medians, and the median (and range)
of the rounds' own ratios. The last column is each one's compile and first 4 calls, from
inductor's caches as they are (warm after a first run).

    python research/direct_call.py --models mlp,mlp3,cnn,lenet,fast [--data-dir DIR]
"""

import argparse
import statistics
import subprocess
import time
from unittest import mock

import torch

from tinymnist.tool import floor
from tinymnist.tool.bench import bench_data
from tinymnist.transforms import speed
from tinymnist.transforms.direct_call import called_directly


def with_cpp_wrapper(fn, options):
    return called_directly(fn, options | {"cpp_wrapper": True})


# way -> (call directly?, how): device_step calls directly the networks in speed.CPU_DIRECT_CALL
WAYS = {
    "torch.compile": (False, called_directly),  # not reached: device_step calls no network directly
    "direct": (True, called_directly),
    "direct, C++ wrapper": (True, with_cpp_wrapper),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mlp,mlp3,cnn,lenet,fast")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--steps-per-call", type=int, default=1)
    args = parser.parse_args()
    images, labels, source = bench_data(args.data_dir, torch.device("cpu"))
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data: {source}; commit {commit}")
    print("| model | steps per call | way | µs a step | against torch.compile (range) | compile s |")
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        loops, compile_s = {}, {}
        for name, (direct, call) in WAYS.items():
            chosen = {model} if direct else set()
            with (
                mock.patch.object(speed, "CPU_DIRECT_CALL", chosen),
                mock.patch.object(speed, "called_directly", call),
            ):
                loops[name] = floor.cpu_steps(model, images, labels, args.steps_per_call)
                started = time.perf_counter()
                for _ in range(4):
                    next(loops[name])
                compile_s[name] = time.perf_counter() - started
        us = {name: [] for name in loops}
        for r in range(args.rounds):
            for name in loops if r % 2 == 0 else reversed(loops):
                us[name].append(floor.window_us(loops[name], args.seconds))
        for name, times in us.items():
            ratios = [y / x for x, y in zip(us["torch.compile"], times, strict=True)]
            spread = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
            median = statistics.median(times)
            print(
                f"| {model} | {args.steps_per_call} | {name} | {median:,.0f} | {spread} | {compile_s[name]:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
