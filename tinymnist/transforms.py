"""What makes the pure step fast: transforms that keep its signature and its result.

train.py's step is the algorithm; each function here takes a step (or its gradient)
and returns one that computes the same thing faster on some device:

    compiled(step)                 torch.compile: one fused graph, compiled once
    micro_batched(gradient, n)     the batch's gradient as the sum of n-image chunks
    GraphedStep(step)              CUDA: the step recorded once, replayed with one launch
                                   (cuda_graph.py)

`device_step` composes them the way `tinymnist train` runs them on a device. What
each one is worth, measured, is in BENCHMARKS.md. The wide transforms (N models
under torch.func.vmap, an all-reduce across processes) live beside this file.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tinymnist import optim
from tinymnist.config import TrainConfig
from tinymnist.cuda_graph import GraphedStep
from tinymnist.devices import cpu_compiler
from tinymnist.train import Gradient, Step, make_gradient, make_step

# Images per gradient chunk on the CPU, where `tinymnist bench` measured lenet's
# 8192-image step about twice as fast in chunks of 256 (BENCHMARKS.md).
CPU_MICRO_BATCH = 256


def compiled(fn):
    """torch.compile as one graph (fullgraph: a graph break is a bug here, not a fallback).

    dynamic=False: every call has the same shapes, and a second model compiled in the
    same process (tinymnist bench) must not turn its sizes symbolic."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


def micro_batched(gradient: Gradient, micro_batch: int) -> Gradient:
    """The same gradient, computed over chunks of `micro_batch` images and summed.

    Each chunk's mean-loss gradient is weighted by its share of the batch, so the sum
    is the whole batch's mean-loss gradient; each chunk's activations fit in a CPU's
    cache (lenet's 8192 images at once do not). The Python loop stays outside any
    compiled graph: `gradient` itself is what gets compiled, once per chunk shape.
    """

    def chunked_gradient(params, images, labels, batch_idx):
        grads, loss = None, 0.0
        for chunk in batch_idx.split(micro_batch):  # (micro_batch,) each, the last maybe shorter
            share = len(chunk) / len(batch_idx)
            chunk_grads, chunk_loss = gradient(params, images, labels, chunk)
            chunk_grads = {k: g * share for k, g in chunk_grads.items()}
            grads = chunk_grads if grads is None else {k: grads[k] + g for k, g in chunk_grads.items()}
            loss = loss + chunk_loss * share
        return grads, loss

    return chunked_gradient


def device_step(config: TrainConfig, optimizer: optim.Optimizer, device: torch.device,
                data_parallel: Callable[[Gradient], Gradient] | None = None) -> Step:  # fmt: skip
    """The step `tinymnist train` runs on `device`: compiled where that is faster, in
    micro-batches where the batch is large for a CPU, replayed as a CUDA graph on CUDA.
    `data_parallel` (distributed.all_reduced under torchrun) wraps the gradient last:
    this process's slice of the batch is what gets micro-batched."""
    parallel = data_parallel or (lambda gradient: gradient)
    compile = use_compile(config, device)
    micro_batch = config.micro_batch if config.micro_batch is not None else default_micro_batch(device)
    gradient = make_gradient(config)
    if 0 < micro_batch < config.batch_size:  # compile the pieces; the chunk loop runs in Python
        if compile:
            gradient, optimizer = compiled(gradient), optim.Optimizer(optimizer.init, compiled(optimizer.update))
        step = make_step(parallel(micro_batched(gradient, micro_batch)), optimizer)
        compile = False
    else:
        step = make_step(parallel(gradient), optimizer)
    if device.type == "cuda" and config.cuda_graphs:
        return GraphedStep(step, compile)
    return compiled(step) if compile else step


def use_compile(config: TrainConfig, device: torch.device) -> bool:
    """--compile/--no-compile, else: compile on CUDA, and on the CPU where a C++ compiler is
    installed (`tinymnist bench` measured the compiled step faster than eager there). MPS
    support in torch.compile is young and unmeasured here, so MPS stays eager."""
    if config.compile is not None:
        return config.compile
    return device.type == "cuda" or (device.type == "cpu" and cpu_compiler() is not None)


def default_micro_batch(device: torch.device) -> int:
    """0 (the whole batch at once) but on the CPU."""
    return CPU_MICRO_BATCH if device.type == "cpu" else 0


def use_tf32_matmuls(device: torch.device) -> None:
    """On CUDA, let float32 matrix products use TF32 tensor cores, as cuDNN's convolutions
    already do by default (the cnn epoch measured faster on an H200, BENCHMARKS.md)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
