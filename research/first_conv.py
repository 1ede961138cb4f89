"""What transforms/first_conv.py's rewrite is worth: a first convolution's weight gradient, two ways.

    python research/first_conv.py [--models cnn,lenet,fast] [--rounds 7] > results/bench/cpu-first-conv/first-conv.txt
    python research/first_conv.py --profile fast > results/bench/cpu-first-conv/profile-fast.txt

1. The kernels, eager, on random tensors of each network's first layer at the batch the CPU step
   runs it (the recipe's whole batch; lenet's chunks of 256 before 2026-12-07): torch's conv2d_weight (oneDNN's backward
   weights), against first_conv.weight_grad_as_forward (one forward convolution, the batch as channels).
2. The step `tinymnist train` runs on the CPU (speed.device_step, fixed threads), compiled with
   the rewrite forced (first_conv.inductor_pass("always")) and refused ("never"), timed in turns;
   then which kernel the measured pass `train` compiles with (inductor_pass()) picks for that step.

Each pair is timed in turns, `--rounds` windows each, so that a shared machine's load slows both
alike; the medians and the median of the rounds' ratios are printed.

3. With `--profile MODEL`: torch.profiler's self time per step of each convolution kernel in that
   model's compiled step, without the rewrite and with it, by input shapes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from unittest import mock

import torch
from torch.nn.grad import conv2d_weight

from tinymnist.algorithm import networks, shapes
from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import initial_state
from tinymnist.transforms import first_conv, speed
from tinymnist.transforms.first_conv import weight_grad_as_forward

N_IMAGES = 60_000
WINDOW_SECONDS = 0.3


def window(fn) -> float:
    """Seconds per call over calls spanning at least WINDOW_SECONDS."""
    started, calls = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - started) < WINDOW_SECONDS:
        fn()
        calls += 1
    return elapsed / calls


def in_turns(pair: dict, rounds: int) -> dict:
    """Both callables timed in turns; each one's median seconds, and the median ratio second/first."""
    for fn in pair.values():
        fn()
        fn()
    samples = {name: [] for name in pair}
    for _ in range(rounds):
        for name, fn in pair.items():
            samples[name].append(window(fn))
    first, second = samples.values()
    ratio = statistics.median(b / a for a, b in zip(first, second, strict=True))
    return {name: statistics.median(s) for name, s in samples.items()} | {"ratio": ratio}


def kernels(model: str, rounds: int) -> dict:
    config = recipe_config(model)
    conv = networks.ARCHITECTURES[model][0]
    assert isinstance(conv, shapes.Conv2d)
    batch = config.batch_size  # one model's CPU step takes its batch whole (speed.default_micro_batch)
    side = shapes.conv2d_out(28, conv.kernel, conv.stride, conv.padding)
    x, grad_out = torch.randn(batch, 1, 28, 28), torch.randn(batch, conv.out_channels, side, side)
    weight_shape = (conv.out_channels, 1, conv.kernel, conv.kernel)
    pair = {
        "conv2d_weight": lambda: conv2d_weight(x, weight_shape, grad_out, conv.stride, conv.padding),
        "as forward": lambda: weight_grad_as_forward(x, grad_out, [conv.padding] * 2, 1),
    }
    return {"batch": batch} | in_turns(pair, rounds)


def step_loop(model: str, images, labels, rewrite: str):
    """One call of the step train runs on the CPU, advancing its own state; compiled with train's options
    but first_conv.inductor_pass(rewrite): "always", "never" or "measured" (train's)."""
    config = recipe_config(model, compile=True)
    optimizer = make_optimizer(config)
    options = speed.compile_options() | {"post_grad_custom_post_pass": first_conv.inductor_pass(rewrite)}
    with mock.patch.object(speed, "compile_options", lambda: options):
        step = speed.device_step(config, optimizer, torch.device("cpu"), adaptive_threads=False)
    state = initial_state(config, optimizer, torch.device("cpu"))
    carry = [state.params, state.opt_state]
    batches = torch.randint(0, N_IMAGES, (8, config.batch_size))
    lr, calls = torch.tensor(config.lr), [0]

    def call():
        idx = batches[calls[0] % len(batches)]
        carry[0], carry[1], _ = step(carry[0], carry[1], images, labels, idx, lr)
        calls[0] += 1

    return call


def profile(model: str, images, labels, steps: int = 6) -> None:
    """Each convolution kernel's self time per step, by input shapes, in the compiled step both ways."""
    for rewrite in ("never", "always"):
        call = step_loop(model, images, labels, rewrite)
        for _ in range(3):  # the compile, then two more
            call()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                call()
        way = "with" if rewrite == "always" else "without"
        print(f"# {model}, {way} the rewrite: ms per step, kernel, input shapes")
        for event in prof.key_averages(group_by_input_shape=True):
            if "convolution" in event.key and event.self_cpu_time_total > 0.01 * 1e3 * steps:
                print(f"{event.self_cpu_time_total / steps / 1e3:7.2f}  {event.key}  {event.input_shapes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,lenet,fast")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", default=None, help="a model: its convolution kernels, profiled, both ways")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64  # the same step function, compiled three times per model
    torch._inductor.config.fx_graph_cache = False  # so that the measured pass runs, not a cached graph's choice
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N_IMAGES, 28, 28), dtype=torch.uint8, generator=g)  # (60000, 28, 28)
    labels = torch.randint(0, 10, (N_IMAGES,), generator=g)  # (60000,)
    print(f"# {' '.join(sys.argv)}\n# torch {torch.__version__}, {torch.get_num_threads()} threads, cpu")
    if args.profile:
        profile(args.profile, images, labels)
        return
    print("# model, batch: first layer's weight gradient, ms: conv2d_weight, as forward, ratio")
    for model in args.models.split(","):
        k = kernels(model, args.rounds)
        print(f"{model}, {k['batch']}: {k['conv2d_weight'] * 1e3:.2f}, {k['as forward'] * 1e3:.2f}, {k['ratio']:.3f}x")
    print("# model: the compiled CPU step, ms: without the rewrite, with it, ratio")
    for model in args.models.split(","):
        ways = (("without", "never"), ("with", "always"))
        pair = {way: step_loop(model, images, labels, rewrite) for way, rewrite in ways}
        s = in_turns(pair, args.rounds)
        print(f"{model}: {s['without'] * 1e3:.2f}, {s['with'] * 1e3:.2f}, {s['ratio']:.3f}x", flush=True)
    print("# model: the measured pass's choice for the step's first convolution (inductor_pass(), as `train` runs it)")
    for model in args.models.split(","):
        choices = []

        def recorded(node, choices=choices):
            choices.append("as forward" if first_conv.chosen_in_force(node) else "oneDNN's backward")
            return choices[-1] == "as forward"

        with mock.patch.dict(first_conv.CHOICES, measured=recorded):
            step_loop(model, images, labels, "measured")()  # compiles on the first call
        print(f"{model}: {', '.join(choices)}", flush=True)


if __name__ == "__main__":
    main()
