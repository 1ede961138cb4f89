"""A wide transform: N models trained in one step by torch.func.vmap over stacked parameters.

`tinymnist train --seeds 4 --lr 0.5,1` trains 8 models, one per (lr, seed) pair. Each is
the same run as `tinymnist train --seed s --lr l` alone: it starts from
`init_params(model, s)` and draws its data order from its own shuffling generator
seeded s (algorithm/train.py's initial_state and loop do that for any N). What changes
is how the work is done: their parameter and optimizer-state dicts are stacked along a
new leading dim N, and

    vmapped(gradient)(params, images, labels, batch_idx)
        params: leaves (N, ...)    images, labels: the dataset, once
        batch_idx: (N, B), each model's own batch
    vmapped_update(update)(grads, opt_state, params, lr)     lr: (N,)

compute train.py's gradient and update for all N at once: one compiled graph, on CUDA
one graph replay per step, where a batch of 64 leaves most of a GPU idle. Dropout masks
differ between models (randomness="different"). The gradient and the update are mapped
apart so that the micro-batch transform can sit between them, as for one model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinymnist.algorithm import networks
from tinymnist.algorithm.config import TrainConfig
from tinymnist.algorithm.train import Evaluation, Evaluations, Gradient, scale_images
from tinymnist.algorithm.trees import Tree, tree_map


def vmapped(gradient: Gradient) -> Gradient:
    """train.py's gradient over N models: stacked params, (N, B) batch indices; the dataset
    is shared (in_dims None), so it sits on the device once."""
    return torch.func.vmap(gradient, in_dims=(0, None, None, 0), randomness="different")


def vmapped_update(update):
    """An optimizer's update over N models: stacked grads, state, params and (N,) rates."""
    return torch.func.vmap(update)


def one_model(tree: Tree, i: int) -> Tree:
    """Model i's own tree out of a stacked one (views, no copy)."""
    return tree_map(lambda leaf: leaf[i], tree)


@torch.inference_mode()
def evaluate_many(config: TrainConfig, params: Tree, images: torch.Tensor, labels: torch.Tensor) -> Evaluations:
    """train.evaluate for all N models in one vmapped pass per test chunk, and their ensemble.

    Summed losses and integer counts, read once at the end, as train.evaluate does."""
    recipe, network = config.recipe, config.model
    n = len(next(iter(params.values())))
    forward = torch.func.vmap(networks.apply, in_dims=(None, 0, None))
    loss_sums = torch.zeros(n, device=images.device, dtype=torch.float64)
    correct = torch.zeros(n, device=images.device, dtype=torch.int64)
    probabilities = []
    for start in range(0, len(images), config.test_batch_size):
        x = scale_images(images[start : start + config.test_batch_size], recipe.mean, recipe.std)  # (C, 1, 28, 28)
        y = labels[start : start + config.test_batch_size]  # (C,)
        out = forward(network, params, x)  # (N, C, 10)
        log_probs = out if networks.OUTPUTS_LOG_PROBS[network] else out.log_softmax(dim=-1)  # (N, C, 10)
        losses = F.nll_loss(log_probs.flatten(0, 1), y.repeat(n), reduction="none")  # (N*C,), model-major
        loss_sums += losses.view(n, -1).sum(dim=1)
        correct += (out.argmax(dim=-1) == y).sum(dim=1)
        probabilities.append(log_probs.exp().sum(dim=0))  # (C, 10)
    summed = torch.cat(probabilities)  # (T, 10)
    total = len(images)
    each = [
        Evaluation(loss / total, int(c), total) for loss, c in zip(loss_sums.tolist(), correct.tolist(), strict=True)
    ]
    return Evaluations(each, ensemble_evaluation(summed, n, labels), summed)


def ensemble_evaluation(summed_probabilities: torch.Tensor, n: int, labels: torch.Tensor) -> Evaluation:
    """The ensemble's test result from its n models' probabilities summed, (T, 10): the
    prediction of their average. Apart so that sums from several processes can be added first."""
    averaged = summed_probabilities.double() / n  # (T, 10)
    loss = F.nll_loss(averaged.log(), labels, reduction="sum").item()
    correct = int((averaged.argmax(dim=1) == labels).sum())
    return Evaluation(loss / len(labels), correct, len(labels))
