"""Sweeps across torchrun processes: each process trains its own share of the models.

`torchrun --nproc-per-node 2 -m tinymnist train --seeds 8` trains models 0-3 in rank 0 and
4-7 in rank 1, each share in one N-model step (transforms/vmap.py), as one process would
(except that each rank draws its own dropout masks). No gradient travels: the ranks meet at
each evaluation (every model's records and the summed test probabilities, on every rank) and,
with --save-model, at each epoch's end, where rank 0 gathers and saves all N models. So a
checkpoint holds all N whatever the number of processes, and resumes in any of them.
Rank 0's "Train Epoch" lines show its own share's loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tinymnist.algorithm import optim
from tinymnist.algorithm.config import TrainConfig, model_configs
from tinymnist.algorithm.train import Dataset, Evaluations, Progress, TrainState, evaluation_records, initial_state
from tinymnist.algorithm.trees import Tree, tree_map
from tinymnist.tool import checkpoint
from tinymnist.tool.torchrun import Cluster, own_dropout, share
from tinymnist.transforms.vmap import ensemble_evaluation, evaluate_many

LEADER = 0  # the rank that reports and saves (Cluster.leader)


class Sweep:
    """This process's part of an N-model run: its models, and the exchanges that bring all together.
    Also the loop's evaluation (train.Training.evaluate): every model's records on every rank."""

    def __init__(self, config: TrainConfig, cluster: Cluster, mnist: Dataset):
        self.config, self.cluster, self.mnist = config, cluster, mnist
        self.all_models = model_configs(config)
        self.rows = share(len(self.all_models), cluster)
        self.models = self.all_models[self.rows]  # this process's models, in stacking order
        # Only rank 0 was given --save-model (torchrun.this_process): it tells the others whether to send.
        saving = [config.save_model is not None]
        dist.broadcast_object_list(saving, src=LEADER)
        self.saving = saving[0]

    def start(self, optimizer: optim.Optimizer, device: torch.device, resumed: TrainState | None) -> TrainState:
        """The share's epoch 0, or its rows of a resumed checkpoint's N models; its own dropout masks."""
        if resumed is None:
            state = initial_state(self.config, optimizer, device, self.models)
        else:
            state = checkpoint.to_device(rows_of(resumed, self.rows), device)
        return own_dropout(state, self.config.seed, self.cluster, device)

    def __call__(self, params: Tree, progress: Progress) -> list[dict]:
        """Every rank evaluates its share; every rank gets all N models' records and the ensemble's."""
        test_images, test_labels = self.mnist.test_images, self.mnist.test_labels
        evaluation = evaluate_many(self.config, params, test_images, test_labels)
        probabilities = evaluation.probabilities.clone()  # (T, 10) this share's sum; a clone leaves inference mode
        dist.all_reduce(probabilities)  # (T, 10) every model's sum
        shares = all_gather({"models": evaluation.models, "progress": progress})
        joined = lambda key: [x for s in shares for x in getattr(s["progress"], key)]  # noqa: E731 (rank order)
        seconds = max(s["progress"].seconds for s in shares)  # the slowest share's
        images = sum(s["progress"].images for s in shares)
        everyone = Progress(progress.epoch, joined("train_losses"), joined("lrs"), seconds, images)
        ensemble = ensemble_evaluation(probabilities, len(self.all_models), test_labels)
        evaluations = Evaluations([m for s in shares for m in s["models"]], ensemble, probabilities)
        return evaluation_records(self.all_models, everyone, evaluations)

    def totals(self, train_seconds: float, images: int) -> tuple[float, int]:
        """The whole sweep's training time (the slowest share's) and images (every share's)."""
        shares = all_gather((train_seconds, images))
        return max(s for s, _ in shares), sum(i for _, i in shares)

    def gathered(self, state: TrainState) -> TrainState | None:
        """All N models' state on rank 0 (None elsewhere, and when rank 0 saves nothing)."""
        if not self.saving:
            return None
        on_cpu = lambda tree: tree_map(checkpoint.on_cpu, tree)  # noqa: E731 (pickled, not sent by device)
        shares = [None] * dist.get_world_size() if dist.get_rank() == LEADER else None
        mine = TrainState(on_cpu(state.params), on_cpu(state.opt_state), state.epoch, on_cpu(state.rng))
        dist.gather_object(mine, shares, dst=LEADER)
        if shares is None:
            return None
        stacked = lambda *trees: tree_map(lambda *rows: torch.cat(rows), *trees)  # noqa: E731 (leaves (N, ...))
        # Rank 0's dropout generator is the run's (torchrun.own_dropout): it goes in, as in one process.
        rng = {**shares[LEADER].rng, "shuffle": torch.cat([s.rng["shuffle"] for s in shares])}  # (N, L)
        return TrainState(
            stacked(*[s.params for s in shares]), stacked(*[s.opt_state for s in shares]), state.epoch, rng
        )


def rows_of(state: TrainState, rows: slice) -> TrainState:
    """Some models' state out of N models': their params, optimizer state and shuffling generators."""
    take = lambda leaf: leaf[rows]  # noqa: E731
    # Rows of their own: Generator.set_state on a view into another tensor's storage crashed torch 2.13.
    rng = {**state.rng, "shuffle": state.rng["shuffle"][rows].clone()}
    return TrainState(tree_map(take, state.params), tree_map(take, state.opt_state), state.epoch, rng)


def all_gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    received = [None] * dist.get_world_size()
    dist.all_gather_object(received, obj)
    return received
