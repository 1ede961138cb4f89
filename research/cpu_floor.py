"""How far is each recipe's CPU step from its floor? Both timed in one process.

    python research/cpu_floor.py [--models mlp,cnn] [--rounds 7] [--threads N [--cpu-time]] [--json PATH] [--profile]

The step is the one `tinymnist train` runs on the CPU (speed.device_step,
compiled; batches over 256 images in micro-batches), at the recipe's batch size.

The floor is the work no implementation of that step can skip, timed with torch's own
CPU kernels (oneDNN / MKL) on random tensors of the step's shapes:
- the matrix products of every conv and linear layer: forward, the weight gradient and,
  but for the first layer (whose input, the image, needs no gradient), the input
  gradient. Linear: three matmuls; conv: F.conv2d and torch.nn.grad's conv2d_weight and
  conv2d_input. At the whole batch, or in the step's micro-batches where it splits the
  batch, whichever is faster. Biases, ReLU, pooling, dropout and the loss are left out:
  elementwise work a perfect step would fold into the products.
- the optimizer's memory traffic: every parameter, its gradient and its optimizer state
  read, parameter and state written (Adam: 7 arrays), timed as torch.add over arrays of
  the parameter count (2 read, 1 written) and scaled to that many arrays.

Each round times a window of steps, then each product and the traffic, so load from
other tenants hits both; the medians over rounds are reported, and step/floor is the
median of each round's ratio. FLOPs count a multiply-add as 2. `--profile` then
prints where the compiled step's time goes, op by op. BENCHMARKS.md quotes the output.
With more threads than idle cores, every parallel region waits for a descheduled thread
(ops of 100 us took 25 ms on a busy 2-core host): measure on a quiet machine, or with
`--threads 1 --cpu-time`, which times by the process's CPU time rather than the wall
clock, so time the process spent descheduled does not count (caches and memory
bandwidth are still shared with whatever else runs).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from floor_products import floor_parts, optimizer_arrays, step_flops  # research/, beside this file

from tinymnist.algorithm import networks
from tinymnist.algorithm.config import RECIPES, make_optimizer, recipe_config
from tinymnist.transforms import speed

CPU = torch.device("cpu")
N_IMAGES = 60_000  # MNIST's training set: the step gathers its batch from all of it
WINDOW_SECONDS = 0.25  # the least time one window of steps spans


def compiled_steps(model: str):
    """Yield after each step `tinymnist train` runs on the CPU for `model`, forever."""
    config = recipe_config(model, compile=True)
    optimizer = make_optimizer(config)
    step = speed.device_step(config, optimizer, CPU)
    params = networks.init_params(model, config.seed)
    opt_state, lr = optimizer.init(params), torch.tensor(config.lr)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N_IMAGES, 28, 28), dtype=torch.uint8, generator=g)  # (N, 28, 28)
    labels = torch.randint(0, 10, (N_IMAGES,), generator=g)  # (N,)
    batches = torch.randint(0, N_IMAGES, (16, config.batch_size), generator=g)  # (16, B) index rows
    for batch_idx in itertools.cycle(batches):
        params, opt_state, _ = step(params, opt_state, images, labels, batch_idx, lr)
        yield


def measure(model: str, rounds: int, clock=time.perf_counter) -> dict:
    """Rounds of (a window of steps, each floor measurement); medians, and step/floor per round."""
    batch, micro_batch = RECIPES[model].batch_size, speed.default_micro_batch(CPU)
    steps = compiled_steps(model)
    started = time.perf_counter()
    next(steps)  # the compile
    compile_seconds = time.perf_counter() - started
    for _ in itertools.islice(steps, 3):
        pass
    started = clock()
    next(steps)
    window = max(2, math.ceil(WINDOW_SECONDS / max(clock() - started, 1e-9)))
    parts = floor_parts(model, batch, micro_batch, clock)
    samples = collections.defaultdict(list)  # "step", each way's total, "way/product": microseconds per round
    for _ in range(rounds):
        started = clock()
        for _ in itertools.islice(steps, window):
            pass
        samples["step"].append((clock() - started) / window * 1e6)
        for way, timed in parts.items():
            times = {name: t.microseconds() for name, t in timed.items()}
            samples[way].append(sum(times.values()))
            for name, us in times.items():
                samples[f"{way}/{name}"].append(us)
    ways = [way for way in parts if way != "optimizer"]
    products = [min(per_way) for per_way in zip(*(samples[way] for way in ways), strict=True)]  # the faster batching
    floors = [p + o for p, o in zip(products, samples["optimizer"], strict=True)]
    median = {key: statistics.median(values) for key, values in samples.items()}
    return {
        "model": model,
        "batch": batch,
        "micro_batch": micro_batch if "micro" in parts else None,
        "faster_way": min(ways, key=median.get),
        "optimizer": RECIPES[model].optimizer,
        "optimizer_arrays": optimizer_arrays(model),
        "params": sum(row.params for row in networks.trace(model)),
        "flops": step_flops(model, batch),
        "compile_seconds": compile_seconds,
        "window_steps": window,
        "step_us": median["step"],
        "products_us": statistics.median(products),
        "optimizer_us": median["optimizer"],
        "floor_us": statistics.median(floors),
        "step_over_floor": statistics.median(s / f for s, f in zip(samples["step"], floors, strict=True)),
        "medians_us": median,
        "samples_us": dict(samples),
    }


def print_result(r: dict) -> None:
    gflops = r["flops"] / r["products_us"] / 1e3
    print(
        f"{r['model']:6} {r['batch']:6} {r['step_us']:10.0f} {r['products_us']:12.0f} {r['faster_way']:>6} "
        f"{gflops:8.1f} {r['optimizer_us']:10.0f} {r['floor_us']:10.0f} {r['step_over_floor']:9.2f}x",
        flush=True,
    )


def print_breakdown(r: dict) -> None:
    """Each product's median, in the faster batching, and the traffic."""
    prefix = r["faster_way"] + "/"
    parts = [(key[len(prefix) :], us) for key, us in r["medians_us"].items() if key.startswith(prefix)]
    parts.append(
        (
            f"optimizer traffic ({r['optimizer_arrays']} arrays of {r['params']:,} floats)",
            r["medians_us"]["optimizer/traffic"],
        )
    )
    print(f"  {r['model']}: " + ", ".join(f"{name} {us:.0f}" for name, us in parts) + " us")


def print_profile(model: str, steps_profiled: int) -> None:
    """Self time per compiled step of each op and generated kernel, largest first."""
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    inductor_config.cpp.enable_kernel_profile = True  # name each generated C++ kernel in the profile
    torch._dynamo.reset()  # so that the step compiles again, with the kernels named
    steps = compiled_steps(model)
    for _ in itertools.islice(steps, 10):  # compile (with kernel names) and warm up
        pass
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        for _ in itertools.islice(steps, steps_profiled):
            pass
    events = sorted(profiled.key_averages(), key=lambda event: -event.self_cpu_time_total)
    print(f"{model}: profile of {steps_profiled} compiled steps (self time per step; the profiler adds some):")
    for event in events[:10]:
        print(f"  {event.self_cpu_time_total / steps_profiled:10.1f} us  {event.key[:90]}")


def machine(cpu_time: bool) -> dict:
    return {
        "threads": torch.get_num_threads(),
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "data": "random uint8 images",
        "clock": "process CPU time" if cpu_time else "wall",
    }


def write_json(path: Path, results: dict) -> None:
    """All or nothing: written beside `path`, renamed over it once complete."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(json.dumps(results, indent=1))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.error = lambda message: sys.exit(f"cpu_floor: error: {message}")  # one line, no usage block
    parser.add_argument("--models", default=",".join(RECIPES), help="comma-separated recipes")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved measurements per recipe")
    parser.add_argument("--threads", type=int, help="torch's CPU threads; default: torch's own (one per core)")
    parser.add_argument("--cpu-time", action="store_true", help="with --threads 1: time by the process's CPU time")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--profile", action="store_true", help="then profile each recipe's compiled step")
    args = parser.parse_args()
    args.models = args.models.split(",")
    if unknown := [m for m in args.models if m not in RECIPES]:
        parser.error(f"--models: {', '.join(unknown)} unknown; choose from {', '.join(RECIPES)}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time needs --threads 1 (a second thread's CPU time counts its waits too)")
    if args.json and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: folder {args.json.parent} does not exist; create it first")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(", ".join(f"{k} {v}" for k, v in machine(args.cpu_time).items()) + f"; medians of {args.rounds} rounds")
    print(
        f"{'model':6} {'batch':>6} {'step us':>10} {'products us':>12} {'way':>6} {'GFLOP/s':>8} "
        f"{'optim. us':>10} {'floor us':>10} {'step/floor':>10}"
    )
    results = []
    for model in args.models:
        results.append(measure(model, args.rounds, clock))
        print_result(results[-1])
    for r in results:
        print_breakdown(r)
    if args.json:
        write_json(args.json, {"machine": machine(args.cpu_time), "rounds": args.rounds, "recipes": results})
    if args.profile:
        for r in results:
            print_profile(r["model"], steps_profiled=max(2, r["window_steps"]))


if __name__ == "__main__":
    main()
