"""How steady is transforms/first_conv.py's measured choice from one process to the next, and what it is worth.

first_conv.py times a first convolution's weight gradient both ways (oneDNN's backward, and as a forward
convolution) on random tensors before inductor compiles (until commit 93eb514: while it compiled, and
inductor's cache kept the graph, with its choice, for every later process on the processor). Each fresh
process here (part 1) times the first layers of fast, lenet and cnn (the compiled CPU step's shapes then:
micro-batches 64, 256 and 64; lenet's step takes its whole batch of 8192 since 2026-12-07) by
first_conv.py's rule (first_conv.timed_in_turns: the medians of five 5 ms windows in turns) and by a slower
one meant to be steadier (the fastest of seven 20 ms windows after 50 ms of warm-up), and prints as-forward
time over backward time: below first_conv.MARGIN (0.9) the rewrite is taken. Part 2 times `--model`'s
compiled CPU step (tool/floor.cpu_steps) in fresh processes with the kernel pinned each way
($TINYMNIST_FIRST_CONV=always, never) and measured, in turns, inductor's caches off. Part 1 times in a quiet
process; first_conv.py times before inductor compiles, where the choice may cross the margin more often than
here.

Part 3 (`--cached`, since first_conv.py measures before the compile and keys the compile on its choices)
checks that no choice outlives its process: fresh processes share one new inductor cache folder, each
made to measure one way or the other (the timer patched: as if it had measured so), in the order
as forward, oneDNN's backward, as forward, oneDNN's backward. Each prints its choice, how many of its
graphs (the micro-batch's gradient, the update) came from the cache, and its step's µs: a process takes
an earlier process's gradient graph only where it measured the same.

    python research/first_conv_choice.py --data-dir DIR [--processes 6] [--model fast] [--step-rounds 3]
    python research/first_conv_choice.py --data-dir DIR --cached [--model fast]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time

LAYERS = {  # network: (micro-batch, out channels, output side, kernel, padding) of its first convolution
    "fast": (64, 24, 24, 5, 0),
    "lenet": (256, 6, 28, 5, 2),
    "cnn": (64, 32, 26, 3, 0),
}


def fastest_after_warm_up(kernels) -> list[float]:
    """Each kernel's seconds per call in its fastest of 7 windows of 20 ms, in turns, after 50 ms of calls."""
    for kernel in kernels:
        seconds_per_call(kernel, 0.05)
    samples = [[] for _ in kernels]
    for round_ in range(7):
        turns = list(zip(kernels, samples, strict=True))
        for kernel, times in turns if round_ % 2 == 0 else reversed(turns):
            times.append(seconds_per_call(kernel, 0.02))
    return [min(times) for times in samples]


def seconds_per_call(kernel, seconds: float) -> float:
    started, calls = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - started) < seconds or calls == 0:
        kernel()
        calls += 1
    return elapsed / calls


def ratios() -> None:
    """One process's as-forward / backward ratios, by first_conv.py's rule and the slower one, for each layer."""
    import torch

    from tinymnist.transforms import first_conv
    from tinymnist.transforms.denormals import flush_denormals

    flush_denormals()
    out = []
    for name, (batch, channels, side, kernel, padding) in LAYERS.items():
        image = side + kernel - 1 - 2 * padding
        generator = torch.Generator().manual_seed(0)
        grad_out = torch.randn(batch, channels, side, side, generator=generator).contiguous(
            memory_format=torch.channels_last
        )  # (B, O, H', W') as inductor hands it: channels-last
        x = torch.randn(batch, 1, image, image, generator=generator)  # (B, 1, H, W)
        weight = torch.randn(channels, 1, kernel, kernel, generator=generator)
        options = [[channels], [1, 1], [padding, padding], [1, 1], False, [0, 0], 1, [False, True, True]]
        kernels = (
            functools.partial(torch.ops.aten.convolution_backward.default, grad_out, x, weight, *options),
            functools.partial(first_conv.weight_grad_as_forward, x, grad_out, options[2], 1),
        )
        backward, forward = first_conv.timed_in_turns(kernels)
        slow_backward, slow_forward = fastest_after_warm_up(kernels)
        out.append(f"{name} {forward / backward:.3f} (slower rule {slow_forward / slow_backward:.3f})")
    print("   ".join(out), flush=True)


def step_us(model: str, data_dir: str) -> None:
    """One process: µs a step of `model`'s compiled CPU step, median of 3 windows of 3 s."""
    import torch

    from tinymnist.tool import floor
    from tinymnist.tool.bench import bench_data
    from tinymnist.transforms.denormals import flush_denormals

    flush_denormals()
    digits = bench_data(data_dir, torch.device("cpu"))
    steps = floor.cpu_steps(model, digits.images, digits.labels)
    for _ in range(4):  # the compile, then three more
        next(steps)
    print(statistics.median(floor.window_us(steps, 3.0) for _ in range(3)), flush=True)


def cached_step(model: str, data_dir: str, measured: str) -> None:
    """One process of part 3: its first-layer choice made as `measured` says, its compile's cache hits, its
    step's µs (median of 3 windows of 3 s)."""
    import torch
    from torch._dynamo.utils import counters

    from tinymnist.tool import floor
    from tinymnist.tool.bench import bench_data
    from tinymnist.transforms import first_conv
    from tinymnist.transforms.denormals import flush_denormals

    flush_denormals()
    seconds = [2.0, 1.0] if measured == "as-forward" else [1.0, 2.0]  # (backward, as forward) per call
    first_conv.timed_in_turns = lambda kernels: seconds
    digits = bench_data(data_dir, torch.device("cpu"))
    steps = floor.cpu_steps(model, digits.images, digits.labels)
    for _ in range(4):  # the compile, then three more
        next(steps)
    us = statistics.median(floor.window_us(steps, 3.0) for _ in range(3))
    chosen = ", ".join("as forward" if faster else "oneDNN's backward" for faster in first_conv.CHOSEN.values())
    hits, misses = counters["aot_autograd"]["autograd_cache_hit"], counters["aot_autograd"]["autograd_cache_miss"]
    print(f"  measured {measured}: chose {chosen}; {hits} of {hits + misses} graphs from the cache; {us:,.0f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--model", default="fast")
    parser.add_argument("--step-rounds", type=int, default=3)
    parser.add_argument("--cached", action="store_true", help="part 3 only")
    parser.add_argument("--child", choices=["ratios", "step", "as-forward", "backward"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "ratios":
        return ratios()
    if args.child == "step":
        return step_us(args.model, args.data_dir)
    if args.child:
        return cached_step(args.model, args.data_dir, args.child)
    if args.cached:
        print(f"{args.model}'s compiled CPU step, fresh processes sharing a new inductor cache:", flush=True)
        with tempfile.TemporaryDirectory() as cache:
            env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache, "TINYMNIST_FIRST_CONV": "measured"}
            for measured in ("as-forward", "backward", "as-forward", "backward"):
                child = [sys.executable, __file__, "--child", measured, "--model", args.model]
                subprocess.run([*child, "--data-dir", args.data_dir], env=env, check=True)
        return None
    print("as forward / backward, each line a fresh process (rewrite taken below 0.9):", flush=True)
    for _ in range(args.processes):
        subprocess.run([sys.executable, __file__, "--child", "ratios"], check=True)
    print(f"{args.model}'s compiled CPU step, µs, fresh processes in turns, inductor's caches off:", flush=True)
    for round_ in range(args.step_rounds):
        for choice in ("always", "never", "measured")[:: 1 if round_ % 2 == 0 else -1]:
            env = os.environ | {"TINYMNIST_FIRST_CONV": choice, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
            child = [sys.executable, __file__, "--child", "step", "--model", args.model, "--data-dir", args.data_dir]
            us = subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout.split()[-1]
            print(f"  {choice}: {float(us):,.0f}", flush=True)


if __name__ == "__main__":
    main()
