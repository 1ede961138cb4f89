"""`tinymnist bench --floor`: how far each recipe's CPU step is from the work it cannot skip.

The step is the one `train` runs on the CPU (compiled, its batch in one piece) on fixed
threads, at the recipe's batch size; also K steps per call where it can.
The floor, timed with torch's own kernels on random tensors of the step's shapes, is:
- every conv and linear layer's products: forward, weight gradient (for a one-channel conv, by
  oneDNN's backward or as a forward convolution, transforms/first_conv.py, the faster in each round)
  and (but for the first layer, whose input needs no gradient) input gradient, at the whole batch or
  in micro-batches of speed.CPU_MICRO_BATCH, whichever is faster. Elementwise work (biases, ReLU,
  pooling, the loss) is left out: a perfect step would fold it into the products.
- the optimizer's memory traffic: parameters, gradients and optimizer state read, parameters
  and state written, timed as torch.add over arrays of the parameter count and scaled.

Each round times a window of steps, then the floor, so load from other programs hits both;
step/floor is the median of the rounds' ratios. Run it quiet: while another program keeps a
core busy, every parallel op waits for a descheduled thread.

Where the step's time goes: each round also runs a window of steps under torch's profiler and
takes the share of its time spent inside the products' ATen calls (convolutions, matrix products,
with whatever they call: oneDNN's own layout copies count as theirs). That share of the step's
time is its products, to set beside the floor's; the rest is the step less its products: the
compiled elementwise kernels, the optimizer's update, copies, and the calls' overhead. The profiler
costs time of its own, most of it in the many short calls of a small step: mlp3's profiled step took
1.1-1.2x its plain one, most of that inside the products, so its products' share reads about 10%
high there (the JSON keeps the profiled step's time); a convolutional step's is within its noise.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd import profiler_legacy
from torch.nn.grad import conv2d_input, conv2d_weight

from tinymnist.algorithm import networks, shapes
from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import initial_state
from tinymnist.tool.bench import Digits, new_table, print_table, report_head
from tinymnist.tool.report import counted
from tinymnist.transforms import speed
from tinymnist.transforms.first_conv import weight_grad_as_forward

CPU = torch.device("cpu")
STEP_SECONDS = 0.25  # the least time one window of steps spans
PRODUCT_SECONDS = 0.01  # the least time one measurement of a product spans: far above the clock's resolution
STEPS_PER_CALL = 10  # K of `train --steps-per-call K` timed beside the one-step call
AS_FORWARD = "_as_forward"  # a product's name with it: the same product by first_conv.py's kernel
# The ATen calls a step's products run in, as torch's profiler names them; aten::convolution holds the
# forward's oneDNN call, and a compiled step calls the others directly
PRODUCT_OPS = frozenset(
    {"aten::convolution", "aten::convolution_backward", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
)


# ---- what a step must compute -------------------------------------------------------------


@dataclass(frozen=True)
class ProductLayer:
    """A conv or linear layer, with one example's input and output shapes."""

    layer: shapes.Conv2d | shapes.Linear
    shape_in: shapes.Shape  # (C, H, W) or (F,)
    shape_out: shapes.Shape
    first: bool  # its input is the image: no input gradient

    def macs(self) -> int:
        """Multiply-adds per example of the forward product; each gradient product has as many."""
        if isinstance(self.layer, shapes.Linear):
            return self.shape_in[0] * self.shape_out[0]  # in x out weights, each used once
        channels_out, height, width = self.shape_out  # each output value: a k x k x C_in dot product
        return channels_out * height * width * self.shape_in[0] * self.layer.kernel**2

    def products(self) -> tuple[str, ...]:
        return ("forward", "weight_grad") if self.first else ("forward", "weight_grad", "input_grad")


def product_layers(model: str) -> list[ProductLayer]:
    """The network's conv and linear layers, in order, with their traced shapes."""
    layers, rows = networks.ARCHITECTURES[model], networks.trace(model)
    inputs = [shapes.MNIST_IMAGE] + [row.shape for row in rows[:-1]]  # a layer sees the output before it
    found = [
        (layer, shape_in, row.shape)
        for layer, shape_in, row in zip(layers, inputs, rows, strict=True)
        if isinstance(layer, (shapes.Conv2d, shapes.Linear))
    ]
    return [ProductLayer(*layer, first=i == 0) for i, layer in enumerate(found)]


def step_flops(model: str, batch: int) -> int:
    """FLOPs of the floor's products for one step of `batch` images (a multiply-add is 2)."""
    return sum(2 * batch * p.macs() * len(p.products()) for p in product_layers(model))


def product_calls(p: ProductLayer, batch: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Each of the layer's products on random tensors of its shapes, ready to call."""
    x, grad_out = torch.randn(batch, *p.shape_in), torch.randn(batch, *p.shape_out)  # (B, C, H, W) or (B, F)
    if isinstance(p.layer, shapes.Linear):
        weight = torch.randn(p.shape_out[0], p.shape_in[0])  # (out, in), as nn.Linear keeps it
        calls = {
            "forward": lambda: x @ weight.t(),  # (B, out)
            "weight_grad": lambda: grad_out.t() @ x,  # (out, in)
            "input_grad": lambda: grad_out @ weight,  # (B, in)
        }
    else:
        conv = p.layer
        weight = torch.randn(conv.out_channels, p.shape_in[0], conv.kernel, conv.kernel)  # (C_out, C_in, k, k)
        stride, padding = conv.stride, conv.padding
        calls = {
            "forward": lambda: F.conv2d(x, weight, None, stride, padding),  # (B, C_out, H', W')
            "weight_grad": lambda: conv2d_weight(x, weight.shape, grad_out, stride, padding),  # like weight
            "input_grad": lambda: conv2d_input(x.shape, weight, grad_out, stride, padding),  # like x
        }
        if p.shape_in[0] == 1 and stride == 1:  # the kernel the compiled step runs (transforms/first_conv.py)
            calls["weight_grad" + AS_FORWARD] = lambda: weight_grad_as_forward(x, grad_out, [padding] * 2, 1)[0]
    return {name: call for name, call in calls.items() if name.removesuffix(AS_FORWARD) in p.products()}


def cheapest_total(times: dict[str, float]) -> float:
    """A way's products summed, each by its faster kernel: "conv1.weight_grad_as_forward@256" is another
    kernel for "conv1.weight_grad@256"."""
    best = {}
    for name, us in times.items():
        product = name.replace(AS_FORWARD, "")  # "conv1.weight_grad@256"
        best[product] = min(us, best.get(product, math.inf))
    return sum(best.values())


def optimizer_arrays(model: str) -> int:
    """Arrays of the parameters' size an update must touch: the gradient read; the parameters
    and each per-parameter state read and written."""
    params = networks.init_params(model, 0)
    state = make_optimizer(recipe_config(model)).init(params)
    per_param = sum(isinstance(value, dict) and value.keys() == params.keys() for value in state.values())
    return 1 + 2 * (1 + per_param)


class Timed:
    """A call repeated often enough per measurement that the clock's resolution does not matter."""

    def __init__(self, fn, weight: float = 1):
        self.fn, self.weight = fn, weight  # weight: how many such calls the step's work is
        for _ in range(3):
            fn()
        started = time.perf_counter()
        fn()
        self.calls = max(1, math.ceil(PRODUCT_SECONDS / max(time.perf_counter() - started, 1e-9)))

    def microseconds(self) -> float:
        started = time.perf_counter()
        for _ in range(self.calls):
            self.fn()
        return (time.perf_counter() - started) / self.calls * 1e6 * self.weight


def floor_parts(model: str, batch: int, micro_batch: int) -> dict[str, dict[str, Timed]]:
    """The floor's measurements by way of batching ("whole", "micro"), plus "optimizer"."""
    ways = {"whole": {batch: 1}}
    if 0 < micro_batch < batch:  # torch.split's chunk sizes, counted
        ways["micro"] = collections.Counter(len(c) for c in torch.arange(batch).split(micro_batch))
    parts = {
        way: {
            f"{p.layer.name}.{name}" + (f"@{size}" if way == "micro" else ""): Timed(fn, count)
            for size, count in sizes.items()
            for p in product_layers(model)
            for name, fn in product_calls(p, size).items()
        }
        for way, sizes in ways.items()
    }
    n_params = sum(row.params for row in networks.trace(model))
    a, b, out = torch.randn(n_params), torch.randn(n_params), torch.empty(n_params)  # (P,) each
    arrays = optimizer_arrays(model)  # torch.add moves 3 arrays: scale its time to the update's
    parts["optimizer"] = {"traffic": Timed(lambda: torch.add(a, b, out=out), arrays / 3)}
    return parts


# ---- the step, timed against it ------------------------------------------------------------


def cpu_steps(model: str, images, labels, steps_per_call: int = 1) -> Iterator[int]:
    """Yield the steps done by each call of the step `train` runs for `model` on the CPU, on
    fixed threads, forever; `steps_per_call` as `train --steps-per-call`."""
    config = recipe_config(model, compile=True, steps_per_call=steps_per_call)
    optimizer = make_optimizer(config)
    step = speed.device_step(config, optimizer, CPU, adaptive_threads=False)
    k = speed.steps_per_call(config, CPU)
    state = initial_state(config, optimizer, CPU)
    params, opt_state = state.params, state.opt_state
    g = torch.Generator().manual_seed(0)
    batches = torch.randint(0, len(images), (16, k, config.batch_size), generator=g)  # 16 calls' (k, B) index rows
    lr = torch.full((k,), config.lr)
    for batch_idx in itertools.cycle(batches):
        if k == 1:
            params, opt_state, _ = step(params, opt_state, images, labels, batch_idx[0], lr[0])
        else:
            params, opt_state, _ = step(params, opt_state, images, labels, batch_idx, lr)
        yield k


def window_us(calls: Iterator[int], seconds: float) -> float:
    """Microseconds per step over whole calls spanning at least `seconds`."""
    started, steps = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - started) < seconds:
        steps += next(calls)
    return elapsed / steps * 1e6


def products_share(calls: Iterator[int], seconds: float) -> tuple[float, float]:
    """The share of a window of steps, spanning at least `seconds`, spent in PRODUCT_OPS under torch's
    profiler, and the profiled window's microseconds per step."""
    with profiler_legacy.profile() as profile:  # the same events as torch.profiler's, without kineto's lines on stderr
        us = window_us(calls, seconds)
    events = profile.function_events
    return products_seconds(events) / window_seconds(events), us


def products_seconds(events) -> float:
    """Seconds in PRODUCT_OPS calls, each counted once with what it calls (oneDNN's convolution inside
    aten::convolution is not counted again): the calls on the profiled thread run one after another."""

    def inside_a_product(event) -> bool:
        parent = event.cpu_parent
        while parent is not None and parent.name not in PRODUCT_OPS:
            parent = parent.cpu_parent
        return parent is not None

    return sum(e.cpu_time_total for e in events if e.name in PRODUCT_OPS and not inside_a_product(e)) / 1e6


def window_seconds(events) -> float:
    """From the first profiled call's start to the last one's end."""
    return (max(e.time_range.end for e in events) - min(e.time_range.start for e in events)) / 1e6


def measure(model: str, images, labels, rounds: int, log: Callable[[str], None]) -> dict:
    """Rounds of (a window of steps, each floor measurement); medians, and step/floor per round."""
    batch, micro_batch = recipe_config(model).batch_size, speed.CPU_MICRO_BATCH  # the floor's other way
    several = dataclasses.replace(recipe_config(model, compile=True), steps_per_call=STEPS_PER_CALL)
    batches = math.ceil(len(images) / batch)  # an epoch's
    refused = speed.several_steps_refused(several, CPU) or speed.several_steps_cut_short(several, batches)
    log(f"{model}: compiling the step" + ("" if refused else f" and {STEPS_PER_CALL} steps per call"))
    loops = {"step": cpu_steps(model, images, labels)}
    if not refused:
        loops["k_steps"] = cpu_steps(model, images, labels, STEPS_PER_CALL)
    started = time.perf_counter()
    for calls in loops.values():
        for _ in range(4):  # the compile, then three more
            next(calls)
    compile_seconds = time.perf_counter() - started
    parts = floor_parts(model, batch, micro_batch)
    samples = collections.defaultdict(list)  # "step", "k_steps", each way's total, "way/product": us per round
    shares, profiled_us = [], []  # per round: a profiled window's share spent in the products, and its µs a step
    for _ in range(rounds):
        for name, calls in loops.items():
            samples[name].append(window_us(calls, STEP_SECONDS))
        share, us = products_share(loops["step"], STEP_SECONDS)
        shares.append(share)
        profiled_us.append(us)
        for way, timed in parts.items():
            times = {name: t.microseconds() for name, t in timed.items()}
            samples[way].append(cheapest_total(times))
            for name, us in times.items():
                samples[f"{way}/{name}"].append(us)
    median = {key: statistics.median(values) for key, values in samples.items()}
    faster_way = min((way for way in parts if way != "optimizer"), key=median.get)  # whole batch or micro-batches
    products = samples[faster_way]
    floors = [p + o for p, o in zip(products, samples["optimizer"], strict=True)]
    over_floor = {
        f"{name}_over_floor": statistics.median(s / f for s, f in zip(samples[name], floors, strict=True))
        for name in loops
    }
    step_products = [share * step for share, step in zip(shares, samples["step"], strict=True)]
    step_products_us = statistics.median(step_products)
    return {
        "model": model,
        "batch": batch,
        "micro_batch": micro_batch if "micro" in parts else None,
        "faster_way": faster_way,
        "optimizer_arrays": optimizer_arrays(model),
        "params": sum(row.params for row in networks.trace(model)),
        "flops": step_flops(model, batch),
        "compile_seconds": compile_seconds,
        "step_us": median["step"],
        "k_steps_us": median.get("k_steps"),
        "k_steps_refused": refused,
        "products_us": statistics.median(products),
        "optimizer_us": median["optimizer"],
        "floor_us": statistics.median(floors),
        **over_floor,
        "step_products_us": step_products_us,
        "step_rest_us": median["step"] - step_products_us,  # so that a row of the table adds up
        "step_products_over_products": statistics.median(s / p for s, p in zip(step_products, products, strict=True)),
        "step_products_shares": shares,
        "profiled_step_us": profiled_us,
        "medians_us": median,
        "samples_us": dict(samples),
    }


def run_floor_bench(names: list[str], digits: Digits, rounds: int, log) -> dict:
    images, labels, _ = digits
    return {
        **report_head(CPU),
        "data": digits.source,
        "steps_per_call": STEPS_PER_CALL,
        "rounds": rounds,
        "results": [measure(model, images, labels, rounds, log) for model in names],
    }


def print_floor_report(report: dict) -> None:
    k = report["steps_per_call"]
    title = f"{report['machine']}, torch {report['torch']}; medians of {counted(report['rounds'], 'round')}"
    columns = ("model", "batch", "step us", f"{k} per call us", "products us", "GFLOP/s", "optimizer us")
    table = new_table(title, (*columns, "floor us", "step/floor", f"{k} per call/floor"))
    for r in report["results"]:
        several = "-" if r["k_steps_us"] is None else f"{r['k_steps_us']:,.0f}"
        several_ratio = "-" if r["k_steps_us"] is None else f"{r['k_steps_over_floor']:.2f}x"
        table.add_row(
            r["model"],
            str(r["batch"]),
            f"{r['step_us']:,.0f}",
            several,
            f"{r['products_us']:,.0f} ({r['faster_way']})",
            f"{r['flops'] / r['products_us'] / 1e3:,.1f}",
            f"{r['optimizer_us']:,.0f}",
            f"{r['floor_us']:,.0f}",
            f"{r['step_over_floor']:.2f}x",
            several_ratio,
        )
    print_table(table, width=140)
    split = new_table(
        "Where the step's time goes: its products' ATen calls (profiled) and the rest",
        ("model", "step us", "its products us", "over the floor's products", "the rest us"),
    )
    for r in report["results"]:
        split.add_row(
            r["model"],
            f"{r['step_us']:,.0f}",
            f"{r['step_products_us']:,.0f}",
            f"{r['step_products_over_products']:.2f}x",
            f"{r['step_rest_us']:,.0f}",
        )
    print_table(split)
    for r in report["results"]:
        if r["k_steps_refused"]:
            print(f"{r['model']}: no {k} steps per call: {r['k_steps_refused']}")
