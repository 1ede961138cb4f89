"""What the research scripts that compare ways of building `train`'s CPU step share: the step built
and timed in turns, each way's patch in place while its step compiles and while it is timed.

In place for the timing too: dynamo guards on what a step traced (a swapped function), and a step
called with the patch undone silently runs the graph compiled without it (no recompile, no log line).
What a patch swaps must be something dynamo guards on: a module's function (cpu_pool.first_max_pool2d),
a network template of another class (networks.TEMPLATES), the compile options (speed.compile_options).
A method swapped on a class (Network.forward) or a pass's code swapped under an unchanged cache key is
not: every way then silently runs the graph compiled first (research/first_block_backward.py's --check
counts the gradient tensors in which a way differs from train's, which shows it for ways that change bits).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from tinymnist.tool import floor
from tinymnist.tool.bench import bench_data
from tinymnist.transforms.denormals import flush_denormals


def steps_in_turns(
    model: str, images, labels, ways: dict[str, Callable[[], AbstractContextManager]], rounds: int, seconds: float
) -> dict[str, list[float]]:
    """µs a step of each way's build of floor.cpu_steps, one window of at least `seconds` per way and
    round, the ways' order reversed every other round so that a host's drift hits all alike."""
    loops = {}
    for name, way in ways.items():
        with way():
            loops[name] = floor.cpu_steps(model, images, labels)
            for _ in range(3):  # the compile, then two more
                next(loops[name])
    us = {name: [] for name in ways}
    for round_ in range(rounds):
        for name in ways if round_ % 2 == 0 else reversed(ways):
            with ways[name]():
                us[name].append(floor.window_us(loops[name], seconds))
    return us


def print_against(model: str, us: dict[str, list[float]], base: str = "train's") -> None:
    """Each way's median µs a step and the median (and range) of its rounds' ratios to `base`'s."""
    for name, times in us.items():
        ratios = [b / a for a, b in zip(us[base], times, strict=True)]
        print(
            f"{model}: {name}: {statistics.median(times):,.0f} us a step, "
            f"{statistics.median(ratios):.3f}x {base} ({min(ratios):.2f}-{max(ratios):.2f})",
            flush=True,
        )


def turns_parser(doc: str, seconds: float) -> argparse.ArgumentParser:
    """The flags every script that times ways in turns takes: --data-dir, --models, --rounds, --seconds."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--models", default="fast,lenet")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=seconds, help="the least time of one timing window")
    return parser


def compare(args: argparse.Namespace, ways: dict[str, Callable[[], AbstractContextManager]], check=None) -> None:
    """train's step and `ways`, timed in turns for each of `args.models` on the digits in `args.data_dir`;
    with `--check` (args.check), first `check(model, images, labels, ways)`."""
    torch._dynamo.config.recompile_limit = 64  # each way compiles the same functions once more
    flush_denormals()
    digits = bench_data(args.data_dir, torch.device("cpu"))
    print(f"data: {digits.source}; {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    ways = {"train's": contextlib.nullcontext} | ways
    for model in args.models.split(","):
        if check and args.check:
            check(model, digits.images, digits.labels, ways)
        print_against(model, steps_in_turns(model, digits.images, digits.labels, ways, args.rounds, args.seconds))
