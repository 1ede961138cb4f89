"""`tinymnist bench --busy-core`: the CPU step `train` runs, quiet and with one core taken.

A program keeping a core busy deschedules one of our OpenMP threads, and the others wait
for it at the barrier ending every parallel op; transforms/cpu_threads.py adapts the
thread count to that. Timed here: the step on all the threads torch found ("fixed") and
the step `train` runs ("adaptive"), both quiet, then both while a child process spins on
one core, round after round, so that a machine whose load drifts moves every side alike;
a ratio is the median of the rounds' own ratios. A window times WINDOW_SECONDS of steps after
SETTLE_SECONDS untimed, so it measures a run long quiet, or busy.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import torch

from tinymnist.algorithm.config import recipe_config
from tinymnist.errors import TinyMnistError
from tinymnist.tool.bench import (
    Digits,
    Timing,
    new_table,
    on_threads,
    our_steps,
    peak_memory_mb,
    per_round_ratio,
    print_table,
    report_head,
    warm_up,
)

WINDOW_SECONDS = 4.0  # per window: several of AdaptiveThreads' probes (cpu_threads.PROBE_EVERY periods)
SETTLE_SECONDS = 1.0  # untimed at each window's start: the load just changed, and a run meets it once

# Spins one core until killed, its parent is gone (a SIGKILLed bench runs no `finally`) or time is up.
BUSY_LOOP = """
import os, sys, time
parent, deadline = os.getppid(), time.monotonic() + float(sys.argv[1])
print("spinning", flush=True)
while os.getppid() == parent and time.monotonic() < deadline:
    pass
"""
BUSY_SECONDS = 600  # a bound, far above the two windows it spans


@contextlib.contextmanager
def busy_core(seconds: float = BUSY_SECONDS) -> Iterator[subprocess.Popen]:
    """A child process keeping one core busy for the block, gone however the block ends."""
    command = [sys.executable, "-I", "-c", BUSY_LOOP, str(seconds)]
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        if child.stdout.readline() != "spinning\n":  # it spins before the clock starts
            raise TinyMnistError(f"--busy-core: the busy process ({sys.executable} -c) did not start; see its stderr")
        yield child
        if child.poll() is not None:
            raise TinyMnistError(f"--busy-core: the windows outlasted the busy process's {seconds:.0f} s limit")
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def timed_window(steps: Iterator, batch_size: int, seconds: float) -> float:
    """Images/s over the steps run for `seconds` (a CPU step is done when it returns), after
    SETTLE_SECONDS of steps untimed."""
    settled = time.perf_counter() + SETTLE_SECONDS
    while time.perf_counter() < settled:
        next(steps)
    started, done = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - started) < seconds:
        next(steps)
        done += 1
    return done * batch_size / elapsed


def bench_busy_core(model: str, digits: Digits, most: int, timing: Timing) -> dict:
    """The fixed and the adaptive step of one model, `repeats` rounds of quiet and busy windows,
    which of the two goes first alternating from round to round."""
    config, device, compile, repeats = recipe_config(model), torch.device("cpu"), timing.compile, timing.repeats
    images, labels, _ = digits
    loop = "compiled" if compile else "eager"
    timing.log(
        f"{model}: the {loop} step on {most} threads and adaptive, quiet and with a core busy ({repeats} rounds)"
    )
    with on_threads(most):  # each model's adaptive step starts from all threads
        steps = {
            "fixed": our_steps(config, images, labels, device, compile, adaptive_threads=False),
            "adaptive": our_steps(config, images, labels, device, compile),
        }
        warm = {side: warm_up(s, device, timing.warmup) for side, s in steps.items()}
        rates = {side: {"quiet": [], "busy": []} for side in steps}
        for round in range(repeats):
            for load in ("quiet", "busy"):
                with busy_core() if load == "busy" else contextlib.nullcontext():
                    for side in ("fixed", "adaptive") if round % 2 == 0 else ("adaptive", "fixed"):
                        with on_threads(most) if side == "fixed" else contextlib.nullcontext():
                            rate = timed_window(steps[side], config.batch_size, WINDOW_SECONDS)
                        rates[side][load].append(rate)
    sides = {side: side_summary(rates[side]) for side in steps}
    return {
        "model": model,
        "batch_size": config.batch_size,
        "loop": loop,
        "first_step_seconds": warm["fixed"]["first_step_seconds"],
        **sides,
        "adaptive_vs_fixed_quiet": per_round_ratio(rates["adaptive"]["quiet"], rates["fixed"]["quiet"]),
        "peak_memory_mb": peak_memory_mb(device),
    }


def side_summary(windows: dict[str, list[float]]) -> dict:
    summary = {load: {"images_per_second": statistics.median(w), "windows": w} for load, w in windows.items()}
    return {**summary, "busy_vs_quiet": per_round_ratio(windows["busy"], windows["quiet"])}


def run_busy_core_bench(names: list[str], digits: Digits, timing: Timing) -> dict:
    most = torch.get_num_threads()
    return {
        **report_head(torch.device("cpu")),
        "data": digits.source,
        "window_seconds": WINDOW_SECONDS,
        "results": [bench_busy_core(m, digits, most, timing) for m in names],
    }


def print_busy_core_report(report: dict) -> None:
    title = f"{report['machine']}, torch {report['torch']}; data: {report['data']}"
    fixed = ("fixed quiet img/s", "fixed busy", "fixed busy/quiet")
    adaptive = ("adaptive quiet", "adaptive busy", "adaptive busy/quiet")
    table = new_table(title, ("model", "step", *fixed, *adaptive, "adaptive/fixed quiet"))
    for r in report["results"]:
        cells = [r["model"], r["loop"]]
        for side in (r["fixed"], r["adaptive"]):  # quiet, busy, busy/quiet
            rates = [f"{side[load]['images_per_second']:,.0f}" for load in ("quiet", "busy")]
            cells += [*rates, f"{side['busy_vs_quiet']:.2f}x"]
        table.add_row(*cells, f"{r['adaptive_vs_fixed_quiet']:.2f}x")
    print_table(table, width=140)
