"""Data parallelism as a transform: the gradient all-reduced across torchrun's processes.

DDP wraps a stateful nn.Module and does not compose with torch.func, so tinymnist does
what DDP does by hand, in the open: every process holds the same parameters and draws
the same permutation (same seed), computes the gradient of its 1/N slice of each global
batch, and one all-reduce averages the gradients (and the loss) before the pure
optimizer update. Every process takes the same update, and the parameters stay
identical without ever being sent.

The all-reduce is a *functional* collective (torch.distributed._functional_collectives,
the API torch.compile traces; torch 2.x has no public successor yet): it returns a new
tensor instead of mutating one, so the step stays pure and can stay one compiled graph.
The process group itself is the tool's (tool/torchrun.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional

from tinymnist.algorithm.train import Gradient


def all_reduced(gradient: Gradient, rank: int, world_size: int) -> Gradient:
    """The global batch's gradient, each process computing only its 1/N slice of it.

    Each slice's mean-loss gradient, averaged over N equal slices, is the mean-loss
    gradient of the whole batch. The gradients and the loss travel as one flat tensor:
    one collective per step instead of one per parameter.
    """
    group = dist.group.WORLD

    def reduced_gradient(params, images, labels, batch_idx):
        share = len(batch_idx) // world_size  # the launcher checked that it divides
        mine = batch_idx[rank * share : (rank + 1) * share]  # (B/N,)
        grads, loss = gradient(params, images, labels, mine)
        flat = torch.cat([g.reshape(-1) for g in grads.values()] + [loss.reshape(1)])  # (P + 1,)
        summed = functional.all_reduce(flat, "sum", group)  # (P + 1,), the same on every rank
        mean = summed / world_size
        pieces = mean[:-1].split([g.numel() for g in grads.values()])
        return {k: p.view_as(g) for (k, g), p in zip(grads.items(), pieces, strict=True)}, mean[-1]

    return reduced_gradient
