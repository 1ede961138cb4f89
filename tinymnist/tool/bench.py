"""`tinymnist bench`: the tutorials' DataLoader loop against our step, same data, same run.

For each model at its recipe batch size, three ways to train are timed in one
process on one device: (a) the reference loop of reference.py, (b) our step eager,
(c) our step compiled. Each is warmed up first (the compile is timed apart), then
all are timed in turns, a window of steps of each per round; the median window gives
images/s. Ratios are (b)/(a) and (c)/(a), the median of each round's, so a noisy
shared machine slows all three alike (bench --seeds times its loops the same way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from rich.console import Console
from rich.table import Table

from tinymnist import data
from tinymnist.algorithm import networks
from tinymnist.algorithm.config import make_optimizer, model_configs, recipe_config
from tinymnist.algorithm.train import epoch_batches, initial_state, per_model, side_by_side, synchronize
from tinymnist.tool.memory import check_memory
from tinymnist.tool.outputs import atomic_output
from tinymnist.tool.reference import reference_loop
from tinymnist.tool.report import counted
from tinymnist.transforms.speed import device_step

try:  # peak RSS of the process; POSIX only
    import resource
except ImportError:  # Windows: peak memory is not reported
    resource = None


class Digits(NamedTuple):
    """What every timed loop trains on: the images (N, 28, 28) uint8 and labels (N,) on the device."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str  # said in the report: real MNIST, or random digits


def to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class Timing:
    """How each loop is timed: the first (compiling) step and `warmup` more apart, then `repeats`
    rounds of a window of about `window_images` images of every loop in turn, the medians counting;
    `compile` also times the compiled step; `log` hears what is being timed."""

    window_images: int = 4096
    repeats: int = 5
    warmup: int = 3
    compile: bool = True
    log: Callable[[str], None] = to_stderr


def bench_data(data_dir, device: torch.device) -> Digits:
    """Real MNIST training images where the files are there, else random ones of the same shape."""
    if not data.missing_files(data_dir):
        mnist = data.load_mnist(data_dir, device)
        return Digits(mnist.train_images, mnist.train_labels, f"real MNIST from {data_dir}")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60_000, 28, 28), dtype=torch.uint8, generator=g)  # (N, 28, 28), N as MNIST's
    labels = torch.randint(0, 10, (60_000,), generator=g)  # (N,)
    return Digits(images.to(device), labels.to(device), f"random uint8 (MNIST files not found in {data_dir})")


def our_steps(
    config, images, labels, device, compile: bool, stacked: bool | None = None, adaptive_threads: bool = True
) -> Iterator:
    """Yield (params, loss) after each step `train` runs for the config (one model or N), forever,
    each model on its own shuffled batches at its first learning rate. `stacked` forces the
    N-model step, even for one; `adaptive_threads=False` keeps a CPU step on the threads it finds."""
    stacked = config.n_models > 1 if stacked is None else stacked
    optimizer = make_optimizer(config)
    state = initial_state(config, optimizer, device, stacked=stacked)
    config = dataclasses.replace(config, compile=compile, cuda_graphs=compile)  # (b) eager is the plain eager step
    step = device_step(config, optimizer, device, stacked=stacked, adaptive_threads=adaptive_threads)
    models = model_configs(config)
    lr = per_model([torch.tensor(m.lr) for m in models], stacked).to(device)  # ([N],)
    shuffles = [torch.Generator().manual_seed(m.seed) for m in models]
    params, opt_state = state.params, state.opt_state
    while True:
        orders = [epoch_batches(len(images), config.batch_size, g, device) for g in shuffles]
        for batch_idx in side_by_side(orders, stacked):  # ([N,] B) each
            params, opt_state, loss = step(params, opt_state, images, labels, batch_idx, lr)
            yield params, loss


def peak_memory_mb(device: torch.device) -> float | None:
    """CUDA: most bytes allocated since the last reset. CPU: the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@contextlib.contextmanager
def on_threads(n: int) -> Iterator[None]:
    """torch's CPU thread count n for the block, then back to what it was. An adaptive step leaves
    torch on the count it chose, process-wide: each timed loop must start on the same count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Loop(NamedTuple):
    """A loop to time: its steps (an endless iterator) and the images one step trains, all models'."""

    steps: Iterator
    images_per_step: int


def time_in_turns(loops: dict[str, Loop], device, window_steps: int, timing: Timing) -> dict[str, dict]:
    """Each loop's first step (the compile) and warm-up timed apart, then one untimed window of each
    (a loop warmed up first has sat through the others' compiles); then `timing.repeats` rounds of
    one window of every loop in turn, each round starting one loop later, so that a machine whose
    load drifts slows every loop alike and no loop always follows the same one. Per loop: the
    median images/s and each round's ("rates")."""
    # torch's thread count is the process's: an adaptive step (cpu_threads.py) changes it for itself, so
    # each loop starts on bench's count and each window goes on with the count that loop's last one left
    threads = dict.fromkeys(loops, torch.get_num_threads())
    results, peaks = {}, {}
    with on_threads(torch.get_num_threads()):
        for name, loop in loops.items():
            with on_loops_threads(threads, name), peak_memory(device, peaks, name):
                results[name] = warm_up(loop.steps, device, timing.warmup)
        names = list(loops)
        for name in names:  # untimed: settles what the compiles left (caches, an adaptive step's clock)
            with on_loops_threads(threads, name):
                window_rate(loops[name].steps, loops[name].images_per_step, device, window_steps)
        for i in range(timing.repeats):
            for name in names[i % len(names) :] + names[: i % len(names)]:  # abc, bca, cab, ...
                with on_loops_threads(threads, name), peak_memory(device, peaks, name):
                    rate = window_rate(loops[name].steps, loops[name].images_per_step, device, window_steps)
                results[name].setdefault("rates", []).append(rate)
                results[name]["fewest_threads"] = min(threads[name], results[name].get("fewest_threads", threads[name]))
    for name, result in results.items():
        result["images_per_second"] = statistics.median(result["rates"])  # --repeats is at least 1
        result["peak_memory_mb"] = peaks[name]
    return results


def busy_note(model: str, results: dict[str, dict], threads: int) -> str | None:
    """A note where an adaptive step left its threads while timed, as it does only while another program
    takes a core (cpu_threads.py): loops on fixed threads stall then, the tutorials' among them, so the
    ratios are not a quiet machine's (many times higher on 2 cores). The count is read at each window's end,
    so a probe of fewer threads that came back within a window goes unseen: the note can be missing, not wrong."""
    fewest = min(result.get("fewest_threads", threads) for result in results.values())
    if fewest >= threads:
        return None
    return (
        f"tinymnist: note: {model}: another program took a core while the loops were timed (an adaptive step "
        f"went to {counted(fewest, 'thread')} of {threads}); the reference loop's fixed threads stall then, so "
        "these ratios are not a quiet machine's: rerun on a quiet one to compare with BENCHMARKS.md"
    )


@contextlib.contextmanager
def on_loops_threads(threads: dict[str, int], name: str) -> Iterator[None]:
    """Run the block on threads[name], and keep there the count it ends on."""
    torch.set_num_threads(threads[name])
    yield
    threads[name] = torch.get_num_threads()


@contextlib.contextmanager
def peak_memory(device, peaks: dict, name: str) -> Iterator[None]:
    """peaks[name]: the most memory seen while `name`'s blocks ran. CUDA: allocated (all live loops'
    tensors, not this loop's alone); CPU: the process's peak RSS so far."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    peak = peak_memory_mb(device)  # None where it cannot be known
    peaks[name] = None if peak is None else max(peak, peaks.get(name) or 0.0)


def per_round_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of one side's images/s over another's in the same round: load that
    drifts between rounds cancels out, as it would not between two medians."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def warm_up(steps: Iterator, device, warmup: int) -> dict:
    """The first step (the compile) and `warmup` more, each timed apart from the windows."""
    started = time.perf_counter()
    next(steps)
    synchronize(device)
    first_step = time.perf_counter() - started
    started = time.perf_counter()
    for _ in itertools.islice(steps, warmup):
        pass
    synchronize(device)
    return {"first_step_seconds": first_step, "warmup_seconds": time.perf_counter() - started}


def window_rate(steps: Iterator, images_per_step: int, device, window_steps: int) -> float:
    """Images/s over one window of `window_steps` steps."""
    started = time.perf_counter()
    for _ in itertools.islice(steps, window_steps):
        pass
    synchronize(device)
    return window_steps * images_per_step / (time.perf_counter() - started)


def bench_model(model: str, digits: Digits, device, timing: Timing) -> dict:
    """Time (a) reference, (b) eager, (c) compiled for one model at its recipe batch size, in turns."""
    config, (images, labels, _) = recipe_config(model), digits
    window_steps = max(1, timing.window_images // config.batch_size)
    params = networks.init_params(model, config.seed, device)
    loops = {
        "reference": Loop(reference_loop(config, params, images, labels, device), config.batch_size),
        "eager": Loop(our_steps(config, images, labels, device, compile=False), config.batch_size),
    }
    if timing.compile:
        loops["compiled"] = Loop(our_steps(config, images, labels, device, compile=True), config.batch_size)
    log_turns(timing, model, list(loops), window_steps)
    result = {"model": model, "batch_size": config.batch_size, "window_steps": window_steps}
    threads = torch.get_num_threads()
    result.update(time_in_turns(loops, device, window_steps, timing))
    if device.type == "cpu" and (note := busy_note(model, {name: result[name] for name in loops}, threads)):
        timing.log(note)
    for name in list(loops)[1:]:  # eager, and compiled if timed
        result[f"{name}_vs_reference"] = per_round_ratio(result[name]["rates"], result["reference"]["rates"])
    return result


def log_turns(timing: Timing, model: str, names: list[str], window_steps: int) -> None:
    timing.log(
        f"{model}: compiling, warming up, then timing {', '.join(names)} in turns "
        f"({counted(timing.repeats, 'round')} of a window of {counted(window_steps, 'step')} each)"
    )


def write_json(path: Path, report: dict) -> None:
    """--json, whole or not at all: a full disk after minutes of timing leaves no half a file."""
    with atomic_output(path, "--json") as f:
        f.write((json.dumps(report, indent=2) + "\n").encode())


def new_table(title: str, columns: tuple[str, ...]) -> Table:
    """A table with its first column (the model or loop) left-aligned, the numbers right-aligned."""
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    return table


def print_table(table: Table, width: int = 120) -> None:
    """A rich table on the terminal; a log file or pipe gets it `width` wide, every digit shown."""
    console = Console()
    (console if console.is_terminal else Console(width=width)).print(table)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def report_head(device: torch.device) -> dict:
    """The fields every bench report starts with: where and when it ran."""
    return {
        "device": str(device),
        "machine": machine_description(device),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def run_bench(models_to_run, device, data_dir, timing: Timing = Timing()) -> dict:
    """The whole benchmark as one JSON-ready dict."""
    digits = bench_data(data_dir, device)
    return {
        **report_head(device),
        "data": digits.source,
        "results": [bench_model(m, digits, device, timing) for m in models_to_run],
    }


def print_report(report: dict, json_path: Path | None) -> None:
    """The results as a table (every digit when the output is a log file); the raw dict as JSON."""
    if json_path:
        write_json(json_path, report)
    columns = ("model", "batch", "ref img/s", "eager img/s", "compiled img/s", "eager/ref", "compiled/ref")
    title = f"{report['machine']}, torch {report['torch']}; data: {report['data']}"
    table = new_table(title, (*columns, "compile s", "peak MB"))
    for r in report["results"]:
        compiled = r.get("compiled")
        peaks = [v["peak_memory_mb"] for v in r.values() if isinstance(v, dict) and v["peak_memory_mb"] is not None]
        table.add_row(
            r["model"],
            str(r["batch_size"]),
            f"{r['reference']['images_per_second']:,.0f}",
            f"{r['eager']['images_per_second']:,.0f}",
            f"{compiled['images_per_second']:,.0f}" if compiled else "-",
            f"{r['eager_vs_reference']:.2f}x",
            f"{r['compiled_vs_reference']:.2f}x" if compiled else "-",
            f"{compiled['first_step_seconds']:.1f}" if compiled else "-",
            f"{max(peaks):,.0f}" if peaks else "-",
        )
    print_table(table)


# ---- bench --seeds 1,4,16: N models in one step against N single runs ----------------------


def check_counts_fit(models: list[str], n_models: int, device: torch.device, flag: str = "--seeds") -> None:
    """N models of each recipe at once: refused before any timing when they cannot fit, as train
    --seeds is (memory.py), in constant time however large N is."""
    for model in models:
        config = recipe_config(model)
        check_memory(config, make_optimizer(config), device, n_models, flag=flag)


def bench_counts(model: str, counts: list[int], digits: Digits, device, timing: Timing) -> dict:
    """The single-model step `train` runs and, for each N, the N-model step of `train --seeds N`,
    timed in turns. N single runs in a row train at the single step's rate, so the time of N models
    against N single runs is single images/s over N-model images/s (summed over N), in each round."""
    config, (images, labels, _), compile = recipe_config(model), digits, timing.compile
    window_steps = max(1, timing.window_images // config.batch_size)
    loops = {"single": Loop(our_steps(config, images, labels, device, compile), config.batch_size)}
    for n in counts:
        steps = our_steps(dataclasses.replace(config, seeds=n), images, labels, device, compile, stacked=True)
        loops[str(n)] = Loop(steps, config.batch_size * n)
    log_turns(timing, model, ["single", *(counted(n, "model") for n in counts)], window_steps)
    timed = time_in_turns(loops, device, window_steps, timing)
    single = timed.pop("single")
    for n_models in timed.values():
        n_models["time_vs_n_single_runs"] = per_round_ratio(single["rates"], n_models["rates"])
    return {
        "model": model,
        "batch_size": config.batch_size,
        "window_steps": window_steps,
        "single": single,
        "n_models": timed,
    }


def run_seeds_bench(models_to_run, counts, device, data_dir, timing: Timing = Timing()) -> dict:
    """The whole benchmark as one JSON-ready dict."""
    digits = bench_data(data_dir, device)
    return {
        **report_head(device),
        "data": digits.source,
        "compile": timing.compile,
        "results": [bench_counts(m, counts, digits, device, timing) for m in models_to_run],
    }


def print_seeds_report(report: dict, json_path: Path | None) -> None:
    if json_path:
        write_json(json_path, report)
    columns = ("model", "batch", "N", "img/s (all N)", "single img/s", "time vs N singles", "compile s")
    table = new_table(f"{report['machine']}, torch {report['torch']}; data: {report['data']}", columns)
    for r in report["results"]:
        single = r["single"]["images_per_second"]
        for n, timed in r["n_models"].items():
            table.add_row(
                r["model"],
                str(r["batch_size"]),
                n,
                f"{timed['images_per_second']:,.0f}",
                f"{single:,.0f}",
                f"{timed['time_vs_n_single_runs']:.2f}x",
                f"{timed['first_step_seconds']:.1f}",
            )
    print_table(table)
