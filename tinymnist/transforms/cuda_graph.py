"""A transform, CUDA only: replay the training step as one CUDA graph instead of launching its kernels.

A cnn step at batch 64 is a few dozen small kernels that a fast GPU finishes faster than the
CPU launches them; a graph replays them all with one launch. It replays fixed addresses, so
params and optimizer state live in buffers that the recorded step (`in_place`) overwrites,
and each call copies only the batch's indices and the learning rate in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tinymnist.algorithm.trees import copy_into, tree_map

WARMUP_STEPS = 3  # run before recording, on scratch copies: compiles, autotunes, allocates workspaces


def in_place(step: Callable) -> Callable:
    """`step(params, opt_state, ...) -> (params, opt_state, loss)` as `(...) -> loss` that
    overwrites the params and state it was given (torch.compile fuses the copies into the update)."""

    def step_in_place(params, opt_state, images, labels, batch_idx, lr):
        new_params, new_state, loss = step(params, opt_state, images, labels, batch_idx, lr)
        copy_into(params, new_params)
        copy_into(opt_state, new_state)
        return loss

    return step_in_place


class GraphedStep:
    """A drop-in for the compiled step on CUDA: same arguments, same results, one launch. The first call
    records the graph. It returns the graph's own buffers, overwritten by the next call
    (`returns_buffers`): copy what must outlive a step. Other params or state are copied in."""

    returns_buffers = True

    def __init__(self, step: Callable, compile: bool):
        update = in_place(step)
        self.step_in_place = torch.compile(update, fullgraph=True, dynamic=False) if compile else update
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, params, opt_state, images, labels, batch_idx, lr):
        if self.graph is None:
            self._record(params, opt_state, images, labels, batch_idx, lr)
        if images.data_ptr() != self.images.data_ptr() or labels.data_ptr() != self.labels.data_ptr():
            raise ValueError("a GraphedStep trains on the images and labels it was recorded with")
        if params is not self.params:
            copy_into(self.params, params)
        if opt_state is not self.opt_state:
            copy_into(self.opt_state, opt_state)
        self.batch_idx.copy_(batch_idx)  # (B,)
        self.lr.copy_(lr)
        self.graph.replay()
        return self.params, self.opt_state, self.loss

    def _record(self, params, opt_state, images, labels, batch_idx, lr) -> None:
        device = images.device
        self.images, self.labels = images, labels  # the dataset, held once: its address is fixed
        self.params, self.opt_state = tree_map(torch.clone, params), tree_map(torch.clone, opt_state)
        self.batch_idx, self.lr = batch_idx.clone(), lr.clone()
        # Warm-up draws dropout masks; the run's random stream must not notice it.
        rng = torch.cuda.get_rng_state(device)
        scratch_params, scratch_state = tree_map(torch.clone, params), tree_map(torch.clone, opt_state)
        side = torch.cuda.Stream(device)  # PyTorch's rule: warm up on a side stream before capture
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.step_in_place(scratch_params, scratch_state, images, labels, self.batch_idx, self.lr)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the kernels, runs none of them
            self.loss = self.step_in_place(self.params, self.opt_state, images, labels, self.batch_idx, self.lr)
        torch.cuda.set_rng_state(rng, device)
