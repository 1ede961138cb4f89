"""cnn's compiled CPU step with dropout's masks as inductor keeps them against masks it generates.

On the CPU inductor keeps `aten::bernoulli_` as an eager fallback (so that a compiled run draws
eager's masks); the profile of cnn's step shows it at about 3 ms a call, twice a step. The other
way is a mask inductor compiles itself, `rand(shape) > p`: a Philox kernel fused with the
multiply, but other masks than eager's for the same seed. `train` takes the second way since
2026-12-06 (transforms/dropout_mask.py, a pass in speed.compile_options). This times the step
`train` builds (device_step, fixed threads) both ways, in turns in one process, the pass left out
of the compile options for the first way; windows of at least 1 s, 9 rounds; medians and the range
of the rounds' ratios; then a profile of 20 steps of each way (torch.profiler, the ops that took most).

    python research/cnn_dropout_mask.py [--data-dir DIR]
"""

import argparse
import contextlib
import statistics
from unittest import mock

import torch

from tinymnist.tool import floor
from tinymnist.tool.bench import bench_data
from tinymnist.transforms import speed


def without_the_pass():
    """speed.compile_options without dropout_mask.py's pass: inductor keeps bernoulli_ as an eager call."""
    options = {k: v for k, v in speed.compile_options().items() if k != "joint_custom_pre_pass"}
    return mock.patch.object(speed, "compile_options", lambda: options)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    images, labels, source = bench_data(args.data_dir, torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data: {source}")
    ways = {
        "bernoulli_ fallback": without_the_pass,
        "compiled mask (train's, dropout_mask.py)": contextlib.nullcontext,
    }
    loops, us = {}, {name: [] for name in ways}
    for name, swapped in ways.items():
        with swapped():
            loops[name] = floor.cpu_steps("cnn", images, labels)
            for _ in range(4):  # the compile, then three more
                next(loops[name])
    for r in range(args.rounds):
        for name in ways if r % 2 == 0 else reversed(ways):
            with ways[name]():
                us[name].append(floor.window_us(loops[name], 1.0))
    base = us["bernoulli_ fallback"]
    print("| way | µs a step | against the fallback (range) |")
    print("|---|---|---|")
    for name, times in us.items():
        ratios = [b / a for a, b in zip(base, times, strict=True)]
        spread = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        print(f"| {name} | {statistics.median(times):,.0f} | {spread} |")
    for name, loop in loops.items():
        with ways[name](), torch.profiler.profile() as profile:
            for _ in range(20):
                next(loop)
        print(f"\n{name}, 20 steps:")
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=6, max_name_column_width=40))


if __name__ == "__main__":
    main()
