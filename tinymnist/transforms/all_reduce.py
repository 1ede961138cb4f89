"""Data parallelism as a transform: the gradient all-reduced across torchrun's processes.

DDP wraps a stateful nn.Module and does not compose with torch.func, so this does its work
by hand: every process holds the same parameters and permutation (same seed), computes the
gradient of its 1/N slice of each batch, and one all-reduce averages gradients and loss, so
every process takes the same update. The collective is the functional one (the API
torch.compile traces): it returns a new tensor, so the step stays pure and one graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional

from tinymnist.algorithm.train import Gradient


def all_reduced(gradient: Gradient, rank: int, world_size: int) -> Gradient:
    """The global batch's mean-loss gradient as the average of N equal slices' gradients, one per process;
    gradients and loss travel as one flat tensor: one collective per step, not one per parameter."""
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
