"""Pool then ReLU (train_mnist_fast's order) or ReLU then pool (ours): the compiled CPU step.

    python research/fast_pool_order.py --data DIR [--rounds 12] > results/fast-recipe/pool-order.txt

Both orders compute the same values and gradients (tests/algorithm/test_networks.py checks it), so
the `fast` network may use either; this times the `fast` recipe's step with each, in
alternating windows in one process (the CPU is shared: the fastest window of each is the
least disturbed), compiled as `tinymnist train` compiles on the CPU (cpu_pool's max-pool
inside torch.compile), and ReLU-then-pool eager as well.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from tinymnist.algorithm import networks, optim
from tinymnist.algorithm.shapes import Conv2d, MaxPool2d, ReLU
from tinymnist.data import load_mnist

BATCH, LABEL_SMOOTHING, MNIST_MEAN, MNIST_STD = 256, 0.1, 0.1307, 0.3081  # the fast recipe's


def pool_first(layers: tuple) -> tuple:
    """train_mnist_fast's order: every (ReLU, MaxPool2d) pair swapped."""
    out = list(layers)
    for i in range(len(out) - 1):
        if isinstance(out[i], ReLU) and isinstance(out[i + 1], MaxPool2d) and isinstance(out[i - 1], Conv2d):
            out[i], out[i + 1] = out[i + 1], out[i]
    return tuple(out)


def make_step(template: torch.nn.Module, compile: bool):
    adam = optim.adam(betas=(0.7, 0.9))

    def loss(params, x_u8, y):
        x = (x_u8.unsqueeze(1).float() / 255 - MNIST_MEAN) / MNIST_STD  # (B, 1, 28, 28)
        return F.cross_entropy(torch.func.functional_call(template, params, (x,)), y, label_smoothing=LABEL_SMOOTHING)

    grad_and_loss = torch.func.grad_and_value(loss)

    def step(params, state, images, labels, idx, lr):
        grads, value = grad_and_loss(params, images[idx], labels[idx])
        return (*adam.update(grads, state, params, lr), value)

    return (torch.compile(step, fullgraph=True, dynamic=False) if compile else step), adam


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--window", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = load_mnist(args.data, torch.device("cpu"))
    ours = networks.ARCHITECTURES["fast"]
    variants = {
        "pool then ReLU, compiled": (networks.Network(pool_first(ours)), True),
        "ReLU then pool, compiled": (networks.Network(ours), True),
        "ReLU then pool, eager": (networks.Network(ours), False),
    }
    lr, steps_per_epoch = torch.tensor(1e-3), len(data.train_images) // BATCH
    epoch_steps = math.ceil(len(data.train_images) / BATCH)  # the last batch topped up, as training does
    batches = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(0))
    batches = batches[: steps_per_epoch * BATCH].view(steps_per_epoch, BATCH)  # (steps, B)
    runs = {}
    for name, (template, compile) in variants.items():
        step, adam = make_step(template, compile)
        params = networks.init_params("fast", 0)
        runs[name] = {"step": step, "state": (params, adam.init(params)), "times": []}
    done = 0
    for round_ in range(args.rounds + 1):  # round 0 compiles and warms up
        for run in runs.values():
            started = time.perf_counter()
            for i in range(done, done + args.window):
                params, state, _ = run["step"](
                    *run["state"], data.train_images, data.train_labels, batches[i % steps_per_epoch], lr
                )
                run["state"] = (params, state)
            if round_:
                run["times"].append((time.perf_counter() - started) / args.window)
        done += args.window
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds of {args.window} steps")
    for name, run in runs.items():
        best, median = min(run["times"]), statistics.median(run["times"])
        print(
            f"{name:26s} ms/step: best {best * 1e3:6.1f}, median {median * 1e3:6.1f};  "
            f"s/epoch ({epoch_steps} steps): best {best * epoch_steps:5.2f}"
        )
    print("ms/step, every window:", {name: [round(t * 1e3, 1) for t in run["times"]] for name, run in runs.items()})


if __name__ == "__main__":
    main()
