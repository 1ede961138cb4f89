"""Which micro-batch makes a recipe's CPU step fastest: speed.CPU_MICRO_BATCH's evidence (and,
until transforms/polyphase.py, fast's chunks of 64).

    python research/micro_batch.py --model fast --chunks 0,128,64,32 [--rounds 5] [--eager]

The step `tinymnist train` runs on the CPU (speed.device_step, compiled or `--eager`, fixed threads, with
the command line's reuse of freed memory since 2026-12-07) at the
recipe's batch size, built once per `--micro-batch` value (0: the whole batch), then timed in
turns, `--rounds` windows each, so that a shared machine's load slows every candidate alike.
Prints each one's median ms per step and the median of its per-round ratios to the first.
Random images: speed does not depend on what the digits are.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import initial_state
from tinymnist.transforms.freed_memory import reuse_freed_memory
from tinymnist.transforms.speed import device_step

N_IMAGES = 60_000
WINDOW_SECONDS = 0.5


def step_loop(model: str, micro_batch: int, images, labels, compile: bool):
    """One call of the CPU step in chunks of `micro_batch`, advancing its own state."""
    config = recipe_config(model, micro_batch=micro_batch, compile=compile)
    optimizer = make_optimizer(config)
    step = device_step(config, optimizer, torch.device("cpu"), adaptive_threads=False)
    state = initial_state(config, optimizer, torch.device("cpu"))
    carry = [state.params, state.opt_state]
    batch_idx = torch.randint(0, N_IMAGES, (config.batch_size,))  # (B,)
    lr = torch.tensor(config.lr)

    def call():
        carry[0], carry[1], _ = step(carry[0], carry[1], images, labels, batch_idx, lr)

    call()  # the compile
    call()
    return call


def window(call) -> float:
    """Seconds per step over steps spanning at least WINDOW_SECONDS."""
    started, steps = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - started) < WINDOW_SECONDS:
        call()
        steps += 1
    return elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fast")
    parser.add_argument("--chunks", default="0,128,64,32", help="--micro-batch values; the first is the reference")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="time the --no-compile step")
    args = parser.parse_args()
    reuse_freed_memory()  # as the command line does
    torch._dynamo.config.recompile_limit = 64  # train.py's one gradient, compiled per chunk size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N_IMAGES, 28, 28), dtype=torch.uint8, generator=g)  # (60000, 28, 28)
    labels = torch.randint(0, 10, (N_IMAGES,), generator=g)  # (60000,)
    print(f"# {' '.join(sys.argv)}\n# torch {torch.__version__}, {torch.get_num_threads()} threads, cpu")
    chunks = [int(chunk) for chunk in args.chunks.split(",")]
    calls = {chunk: step_loop(args.model, chunk, images, labels, not args.eager) for chunk in chunks}
    samples = {chunk: [] for chunk in calls}
    for _ in range(args.rounds):
        for chunk, call in calls.items():
            samples[chunk].append(window(call))
    first = next(iter(samples.values()))
    for chunk, seconds in samples.items():
        ratio = statistics.median(s / f for s, f in zip(seconds, first, strict=True))
        print(f"{args.model} --micro-batch {chunk}: {statistics.median(seconds) * 1e3:.2f} ms a step, {ratio:.3f}x")


if __name__ == "__main__":
    main()
