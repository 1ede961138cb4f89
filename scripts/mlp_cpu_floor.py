"""How fast could an mlp step be on this CPU? The matrix products alone, against the step.

    python scripts/mlp_cpu_floor.py

Times, in one process: the tutorials' loop (tinymnist bench's reference), our compiled
step, and the two matrix products every mlp step must do on its 64 x 784 batch (fc1
forward, and fc1's weight gradient as autograd computes it). Everything else a step
does (gathering and scaling the batch, the loss, the Adam update, torch.compile's entry)
has to fit in what is left of a tenth of the reference step for 10x to be possible;
a profile of 200 compiled steps shows what each of those costs. BENCHMARKS.md quotes
its output.
"""

import itertools
import time

import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

from tinymnist.bench import bench_data, our_steps, time_loop
from tinymnist.config import recipe_config
from tinymnist.models import init_params
from tinymnist.reference import reference_loop

WINDOW_STEPS, REPEATS, WARMUP = 256, 5, 20


def microseconds(fn, calls: int = 2000) -> float:
    """Best of 5 rounds of `calls` calls, per call: the least disturbed by other tenants."""
    for _ in range(100):
        fn()
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - started) / calls * 1e6)
    return min(rounds)


def main() -> None:
    device = torch.device("cpu")
    config = recipe_config("mlp")
    images, labels, source = bench_data("data", device)
    params = init_params("mlp", config.seed, device)
    loops = {
        "reference": reference_loop(config, params, images, labels, device),
        "compiled": our_steps(config, images, labels, device, compile=True),
    }
    step_us = {}
    for name, steps in loops.items():
        rate = time_loop(steps, config.batch_size, device, WINDOW_STEPS, REPEATS, WARMUP)["images_per_second"]
        step_us[name] = config.batch_size / rate * 1e6

    x = torch.randn(config.batch_size, 784)  # (64, 784): a batch, flattened
    weight = torch.randn(128, 784)  # fc1.weight, (out, in) as nn.Linear keeps it
    grad_out = torch.randn(config.batch_size, 128)  # (64, 128): the loss gradient at fc1's output
    forward = microseconds(lambda: x @ weight.t())  # (64, 128)
    weight_grad = microseconds(lambda: grad_out.t() @ x)  # (128, 784)

    budget = step_us["reference"] / 10
    print(f"mlp, batch {config.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}; {source}")
    print(f"reference step       {step_us['reference']:8.0f} us   (10x needs {budget:.0f} us per step)")
    print(f"our compiled step    {step_us['compiled']:8.0f} us   ({step_us['reference'] / step_us['compiled']:.2f}x)")
    print(f"fc1 forward matmul   {forward:8.0f} us")
    print(f"fc1 weight gradient  {weight_grad:8.0f} us")
    print(f"left for the rest    {budget - forward - weight_grad:8.0f} us of the 10x budget")
    print_profile(our_steps(config, images, labels, device, compile=True), steps_profiled=200)


def print_profile(steps, steps_profiled: int) -> None:
    """Self time per compiled step of each op and generated kernel, largest first."""
    inductor_config.cpp.enable_kernel_profile = True  # name each generated C++ kernel in the profile
    torch._dynamo.reset()  # so that the step compiles again, with the kernels named
    for _ in itertools.islice(steps, 50):  # compile (with kernel names) and warm up
        pass
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        for _ in itertools.islice(steps, steps_profiled):
            pass
    events = sorted(profiled.key_averages(), key=lambda event: -event.self_cpu_time_total)
    print(f"profile of {steps_profiled} compiled steps (self time per step; the profiler adds some):")
    for event in events[:10]:
        print(f"  {event.self_cpu_time_total / steps_profiled:8.1f} us  {event.key[:90]}")


if __name__ == "__main__":
    main()
