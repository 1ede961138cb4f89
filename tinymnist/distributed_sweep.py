"""Sweeps across torchrun processes: each process trains its own share of the models.

`torchrun --nproc-per-node 2 -m tinymnist train --seeds 8` trains models 0-3 in rank 0
and models 4-7 in rank 1, each share in one vmapped step (ensemble.py) on the rank's own
device, as one process would train them (exactly so for networks without dropout: each
rank draws its own dropout masks). The models are independent, so no
gradient travels; the processes meet only where one process would look at all N models:

    each evaluation   every model's test result, and the share's summed test probabilities
                      (for the ensemble) → rank 0, which reports all N as one process would
    each epoch's end  with --save-model, the share's state → rank 0, which saves all N

So a checkpoint holds all N models whatever the number of processes: `tinymnist eval`
and `--resume` read it in one process, and torchrun resumes one process's checkpoint
with each rank taking its rows. Rank 0's "Train Epoch" lines show its own share's loss.
Records and states travel as pickled objects (gather_object): once per epoch, that
beats packing tensors by hand for simplicity; the probabilities are one tensor reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tinymnist import checkpoint, optim
from tinymnist.config import TrainConfig
from tinymnist.data import MNIST
from tinymnist.distributed import Cluster, own_dropout, share
from tinymnist.ensemble import EnsembleEvaluation, ensemble_evaluation, evaluate_many, initial_state, members
from tinymnist.ensemble_fit import evaluation_records
from tinymnist.train import TrainState
from tinymnist.trees import Tree, tree_map

LEADER = 0  # the rank that reports and saves (Cluster.leader)


class Sweep:
    """This process's part of an N-model run: its models, and the exchanges that bring all to rank 0."""

    def __init__(self, config: TrainConfig, cluster: Cluster, mnist: MNIST):
        self.config, self.cluster, self.mnist = config, cluster, mnist
        self.all_runs = members(config)
        self.rows = share(len(self.all_runs), cluster)
        self.runs = self.all_runs[self.rows]  # this process's models, in stacking order
        # Only rank 0 was given --save-model (distributed.launch): it tells the others whether to send.
        self.saving = broadcast(config.save_model is not None)
        self.train_seconds, self.images = 0.0, 0  # the slowest share's seconds; every share's images

    def start(self, optimizer: optim.Optimizer, device: torch.device, resumed: TrainState | None) -> TrainState:
        """The share's epoch 0, or its rows of a resumed checkpoint's N models; its own dropout masks."""
        if resumed is None:
            state = initial_state(self.config, optimizer, device, self.runs)
        else:
            state = checkpoint.to_device(rows_of(resumed, self.rows), device)
        return own_dropout(state, self.config.seed, self.cluster, device)

    def records(self, epoch: int, train_losses: list, params: Tree, lrs: list, seconds: float, images: int) -> list:
        """ensemble_fit.Records: every rank evaluates its share; rank 0 returns all N models' records
        and the ensemble's, the others nothing."""
        test_images, test_labels = self.mnist.test_images, self.mnist.test_labels
        evaluation = evaluate_many(self.config, params, test_images, test_labels)
        probabilities = evaluation.probabilities.clone()  # (T, 10) this share's sum; a clone leaves inference mode
        dist.reduce(probabilities, dst=LEADER, op=dist.ReduceOp.SUM)  # (T, 10) every model's sum, on rank 0
        shares = gather({"models": evaluation.models, "train_losses": train_losses, "lrs": lrs,
                         "seconds": seconds, "images": images})  # fmt: skip
        if shares is None:
            return []
        joined = lambda key: [x for s in shares for x in s[key]]  # noqa: E731 (rank order is stacking order)
        slowest, all_images = max(s["seconds"] for s in shares), sum(s["images"] for s in shares)
        self.train_seconds, self.images = self.train_seconds + slowest, self.images + all_images
        ensemble = ensemble_evaluation(probabilities, len(self.all_runs), test_labels)
        evaluation = EnsembleEvaluation(joined("models"), ensemble, probabilities)
        return evaluation_records(self.all_runs, epoch, joined("train_losses"), evaluation, joined("lrs"), slowest,
                                  all_images)  # fmt: skip

    def gathered(self, state: TrainState) -> TrainState | None:
        """All N models' state on rank 0 (None elsewhere, and when rank 0 saves nothing)."""
        if not self.saving:
            return None
        on_cpu = lambda tree: tree_map(checkpoint.on_cpu, tree)  # noqa: E731 (pickled, not sent by device)
        shares = gather(TrainState(on_cpu(state.params), on_cpu(state.opt_state), state.epoch, on_cpu(state.rng)))
        if shares is None:
            return None
        stacked = lambda *trees: tree_map(lambda *rows: torch.cat(rows), *trees)  # noqa: E731 (leaves (N, ...))
        # Rank 0's dropout generator is the run's (distributed.own_dropout): it goes in, as in one process.
        rng = {**shares[LEADER].rng, "shuffle": torch.cat([s.rng["shuffle"] for s in shares])}  # (N, L)
        return TrainState(stacked(*[s.params for s in shares]), stacked(*[s.opt_state for s in shares]), state.epoch,
                          rng)  # fmt: skip


def rows_of(state: TrainState, rows: slice) -> TrainState:
    """Some models' state out of N models': their params, optimizer state and shuffling generators."""
    take = lambda leaf: leaf[rows]  # noqa: E731
    # Rows of their own: Generator.set_state on a view into another tensor's storage crashed torch 2.13.
    rng = {**state.rng, "shuffle": state.rng["shuffle"][rows].clone()}
    return TrainState(tree_map(take, state.params), tree_map(take, state.opt_state), state.epoch, rng)


def gather(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0; None on the others."""
    received = [None] * dist.get_world_size() if dist.get_rank() == LEADER else None
    dist.gather_object(obj, received, dst=LEADER)
    return received


def broadcast(value):
    """Rank 0's `value` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=LEADER)
    return box[0]
