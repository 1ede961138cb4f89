"""A wide transform: N models trained in one step by torch.func.vmap over stacked parameters.

`tinymnist train --seeds 4 --lr 0.5,1` trains 8 models, one per (lr, seed) pair. Each is
the same run as `tinymnist train --seed s --lr l` alone: it starts from
`init_params(model, s)` and draws its data order from its own shuffling generator
seeded s. What changes is how the work is done: their parameter and optimizer-state
dicts are stacked along a new leading dim N, and

    vmap(step)(params, opt_state, images, labels, batch_idx, lr)
        params, opt_state: leaves (N, ...)    images, labels: the dataset, once
        batch_idx: (N, B), each model's own batch     lr: (N,)

runs train.py's pure step for all N at once: one compiled graph, on CUDA one graph
replay per step, where a batch of 64 leaves most of a GPU idle. Dropout masks differ
between models (randomness="different"). Read train.py first; ensemble_fit.py is the
epoch loop around this step.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tinymnist import models, optim
from tinymnist.config import TrainConfig, model_grid
from tinymnist.cuda_graph import GraphedStep
from tinymnist.train import (
    Evaluation,
    Step,
    TrainState,
    capture_rng,
    make_gradient,
    make_step,
    restore_rng,
    scale_images,
)
from tinymnist.transforms import compiled, use_compile
from tinymnist.trees import Tree, tree_map

# ---- N models as one tree -----------------------------------------------------------------


def members(config: TrainConfig) -> list[TrainConfig]:
    """The single-run config of each model, in the order they are stacked (rate-major)."""
    return [dataclasses.replace(config, lr=lr, seed=seed, seeds=1, lrs=None) for lr, seed in model_grid(config)]


def stack(trees: list[Tree]) -> Tree:
    """N trees of the same shape as one tree whose leaves have a leading dim N."""
    return tree_map(lambda *leaves: torch.stack(leaves), *trees)


def unstack(tree: Tree, i: int) -> Tree:
    """Model i's own tree out of a stacked one (views, no copy)."""
    return tree_map(lambda leaf: leaf[i], tree)


# ---- the step -----------------------------------------------------------------------------


def vmapped(step: Step) -> Step:
    """train.py's step over N models: stacked params/state, (N, B) batch indices, (N,) rates;
    the dataset is shared (in_dims None), so it sits on the device once."""
    return torch.func.vmap(step, in_dims=(0, 0, None, None, 0, 0), randomness="different")


def ensemble_step(config: TrainConfig, optimizer: optim.Optimizer, device: torch.device) -> Step:
    """The N-model step `tinymnist train` runs: compiled once for all N, on CUDA replayed as one
    CUDA graph. No micro-batches: they pay off for lenet's 8192-image batch on a CPU, and N
    models of that batch are better trained one after another there."""
    step = vmapped(make_step(make_gradient(config), optimizer))
    compile = use_compile(config, device)
    if device.type == "cuda" and config.cuda_graphs:
        return GraphedStep(step, compile)
    return compiled(step) if compile else step


# ---- the state ----------------------------------------------------------------------------


def initial_state(config: TrainConfig, optimizer: optim.Optimizer, device,
                  runs: list[TrainConfig] | None = None) -> TrainState:  # fmt: skip
    """Epoch 0 of every model (or of `runs`, a torchrun process's share of them): train.initial_state's
    params and shuffling generator per seed. The global generator (dropout, shared by the N
    models' different masks) is seeded with the first seed, as a single run with that seed seeds it."""
    runs = members(config) if runs is None else runs
    params = stack([models.init_params(run.model, run.seed, device) for run in runs])
    torch.manual_seed(config.seed)
    shuffles = [torch.Generator().manual_seed(run.seed) for run in runs]
    return TrainState(params, init_opt_state(optimizer, params), 0, capture_rngs(shuffles, device))


def capture_rngs(shuffles: list[torch.Generator], device) -> dict:
    """train.capture_rng with one shuffling state per model: "shuffle" is (N, state bytes)."""
    rng = capture_rng(shuffles[0], device)
    rng["shuffle"] = torch.stack([g.get_state() for g in shuffles])  # (N, L) uint8
    return rng


def restore_rngs(rng: dict, device) -> list[torch.Generator]:
    """Set the global generators as they were; return each model's shuffling generator."""
    restore_rng({**rng, "shuffle": rng["shuffle"][0]}, device)
    shuffles = [torch.Generator() for _ in rng["shuffle"]]
    for generator, state in zip(shuffles, rng["shuffle"], strict=True):
        generator.set_state(state.clone())  # a row of its own: set_state on a view crashed torch 2.13
    return shuffles


def init_opt_state(optimizer: optim.Optimizer, stacked_params: Tree) -> Tree:
    """Each model's fresh optimizer state, stacked (the step counter becomes (N,))."""
    n = len(next(iter(stacked_params.values())))
    return stack([optimizer.init(unstack(stacked_params, i)) for i in range(n)])


# ---- evaluation ---------------------------------------------------------------------------


class EnsembleEvaluation(NamedTuple):
    models: list[Evaluation]  # each model's, in stacking order
    ensemble: Evaluation  # the prediction of the N models' averaged probabilities
    probabilities: torch.Tensor  # (T, 10) the N models' probabilities of each test image, summed


@torch.inference_mode()
def evaluate_many(config: TrainConfig, params: Tree, images: torch.Tensor, labels: torch.Tensor) -> EnsembleEvaluation:
    """train.evaluate for all N models in one vmapped pass per test chunk, and their ensemble.

    Summed losses and integer counts, read once at the end, as train.evaluate does."""
    recipe, model = config.recipe, config.model
    n = len(next(iter(params.values())))
    forward = torch.func.vmap(lambda p, x: models.apply(model, p, x), in_dims=(0, None))
    loss_sums = torch.zeros(n, device=images.device, dtype=torch.float64)
    correct = torch.zeros(n, device=images.device, dtype=torch.int64)
    probabilities = []
    for start in range(0, len(images), config.test_batch_size):
        x = scale_images(images[start : start + config.test_batch_size], recipe.mean, recipe.std)  # (C, 1, 28, 28)
        y = labels[start : start + config.test_batch_size]  # (C,)
        out = forward(params, x)  # (N, C, 10)
        log_probs = out if models.OUTPUTS_LOG_PROBS[model] else out.log_softmax(dim=-1)  # (N, C, 10)
        losses = F.nll_loss(log_probs.flatten(0, 1), y.repeat(n), reduction="none")  # (N*C,), model-major
        loss_sums += losses.view(n, -1).sum(dim=1)
        correct += (out.argmax(dim=-1) == y).sum(dim=1)
        probabilities.append(log_probs.exp().sum(dim=0))  # (C, 10)
    summed = torch.cat(probabilities)  # (T, 10)
    total = len(images)
    each = [
        Evaluation(loss / total, int(c), total) for loss, c in zip(loss_sums.tolist(), correct.tolist(), strict=True)
    ]
    return EnsembleEvaluation(each, ensemble_evaluation(summed, n, labels), summed)


def ensemble_evaluation(summed_probabilities: torch.Tensor, n: int, labels: torch.Tensor) -> Evaluation:
    """The ensemble's test result from its n models' probabilities summed, (T, 10): the
    prediction of their average. Apart so that sums from several processes can be added first."""
    averaged = summed_probabilities.double() / n  # (T, 10)
    loss = F.nll_loss(averaged.log(), labels, reduction="sum").item()
    correct = int((averaged.argmax(dim=1) == labels).sum())
    return Evaluation(loss / len(labels), correct, len(labels))
