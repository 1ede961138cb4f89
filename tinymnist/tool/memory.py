"""Will N models fit? Estimated before training, so a run that cannot fit says so in a second
instead of failing (or swapping) an epoch in. The dataset, shared and already on the device, is not counted.
"""

from __future__ import annotations

import math
import os

import torch

from tinymnist.algorithm import networks, optim
from tinymnist.algorithm.config import TrainConfig
from tinymnist.algorithm.trees import Tree
from tinymnist.errors import TinyMnistError

FLOAT32_BYTES = 4
PARAM_COPIES = 3  # the parameters, their gradient, the step's new parameters
STATE_COPIES = 2  # the optimizer state going in and the one coming out
ACTIVATION_COPIES = 2  # each layer's output, kept for the backward pass, and its gradient


def tree_bytes(tree: Tree) -> int:
    return sum(tree_bytes(v) if isinstance(v, dict) else v.numel() * v.element_size() for v in tree.values())


def model_bytes(config: TrainConfig, optimizer: optim.Optimizer) -> int:
    """One model's bytes at its peak: the larger of a training step and an evaluation chunk."""
    params = networks.init_params(config.model, 0, "meta")  # shapes only, no memory
    image_floats = math.prod(networks.shapes.MNIST_IMAGE)  # the scaled input
    floats_per_image = image_floats + sum(math.prod(row.shape) for row in networks.trace(config.model))
    training = (
        PARAM_COPIES * tree_bytes(params)
        + STATE_COPIES * tree_bytes(optimizer.init(params))
        + ACTIVATION_COPIES * FLOAT32_BYTES * floats_per_image * config.batch_size
    )
    evaluation = tree_bytes(params) + FLOAT32_BYTES * floats_per_image * config.test_batch_size
    return max(training, evaluation)


def free_bytes(device: torch.device) -> int | None:
    """Memory the run can still take on `device`, or None where this cannot be asked (MPS)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:  # Linux: what the kernel says can be allocated without swapping
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:  # other Unixes: free pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(
    config: TrainConfig, optimizer: optim.Optimizer, device: torch.device, n_models: int, flag: str = "--seeds/--lr"
) -> int:
    """The bytes N models need, or a one-line TinyMnistError naming `flag` when they do not fit."""
    each = model_bytes(config, optimizer)
    need, free = each * n_models, free_bytes(device)
    if free is not None and need > free:
        raise TinyMnistError(
            f"{flag}: {n_models} {config.model} models need about {need / 2**30:.2f} GiB "
            f"({each / 2**20:.1f} MiB each: parameters, optimizer state, activations of a batch of "
            f"{config.batch_size}) but {device} has {free / 2**30:.2f} GiB free; run fewer models at once"
        )
    return need
