"""Each network's convolutions alone, N models at once: every rule of transforms/wide_conv.py, eager.

    python research/wide_conv_layers.py [--models cnn,lenet,fast] [--n 8] [--repeats 5] [--threads T]

For each convolution of each network, at the images one CPU chunk holds (the recipe's
batch, at most speed.CPU_MICRO_BATCH) for each of N models: forward and backward (the
gradient of the weights, and of the input unless it is the image), timed for N separate
plain convolutions one after another ("singles") and for each rule of CONV_RULES. The
fastest of `--repeats` runs counts (a shared machine only ever slows a run down). This
isolates the convolution; research/wide_conv.py times the whole step, which decides.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from tinymnist.algorithm import networks, shapes
from tinymnist.algorithm.config import recipe_config
from tinymnist.transforms.speed import CPU_MICRO_BATCH
from tinymnist.transforms.wide_conv import CONV_RULES


def fastest(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels on the first call
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def forward_backward(rule, x, weight, bias, layer) -> None:
    out = rule(x, weight, bias, layer.stride, layer.padding)  # (N, B, O, H', W')
    out.backward(torch.ones_like(out))


def singles(x, weight, bias, layer) -> None:
    for xi, wi, bi in zip(x, weight, bias, strict=True):  # model by model, as N single runs do
        xi, wi, bi = (t.detach().requires_grad_(t.requires_grad) for t in (xi, wi, bi))
        out = F.conv2d(xi, wi, bi, layer.stride, layer.padding)  # (B, O, H', W')
        out.backward(torch.ones_like(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,lenet,fast")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"# N = {args.n}, torch {torch.__version__}, {threads} threads; ms, the fastest of {args.repeats}")
    for model in args.models.split(","):
        batch = min(recipe_config(model).batch_size, CPU_MICRO_BATCH)
        layers = networks.ARCHITECTURES[model]
        inputs = [shapes.MNIST_IMAGE] + [row.shape for row in shapes.trace_layers(layers)[:-1]]
        for layer, shape in zip(layers, inputs, strict=True):
            if not isinstance(layer, shapes.Conv2d):
                continue
            channels, side, _ = shape  # (C, H, W)
            first = channels == 1  # the images: no gradient to send back
            x = torch.randn(args.n, batch, channels, side, side, requires_grad=not first)  # (N, B, C, H, W)
            weight = torch.randn(args.n, layer.out_channels, channels, layer.kernel, layer.kernel, requires_grad=True)
            bias = torch.randn(args.n, layer.out_channels, requires_grad=True)  # (N, O)
            times = {"singles": fastest(lambda: singles(x, weight, bias, layer), args.repeats)}  # noqa: B023
            for name, rule in CONV_RULES.items():
                times[name] = fastest(lambda: forward_backward(rule, x, weight, bias, layer), args.repeats)  # noqa: B023
            cells = "  ".join(f"{name} {seconds * 1e3:7.1f}" for name, seconds in times.items())
            print(f"{model}.{layer.name} {batch}x{channels}x{side}x{side} -> {layer.out_channels}: {cells}", flush=True)


if __name__ == "__main__":
    main()
