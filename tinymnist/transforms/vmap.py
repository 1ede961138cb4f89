"""A wide transform: N models trained in one step over stacked parameters.

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

compute train.py's gradient and update for all N at once with torch.func.vmap: one
compiled graph, on CUDA one graph replay per step, where a batch of 64 leaves most of a
GPU idle. Dropout masks differ between models (randomness="different"). The gradient
and the update are mapped apart so that the micro-batch transform can sit between them,
as for one model.

The step device_step builds (speed.py) takes n_models_gradient and n_models_update: the
same results, by the route measured fastest. vmap turns a convolution of N models into
a grouped one; where N plain ones or another rule are faster, wide_conv.py's N-model
forward runs instead, and where N models at once overflow a CPU's caches, `one_by_one`
calls one model's compiled gradient for each in turn (wide_conv.CHOSEN says where). A run
of one model is not mapped at all.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tinymnist.algorithm import networks
from tinymnist.algorithm.config import TrainConfig
from tinymnist.algorithm.shapes import Conv2d
from tinymnist.algorithm.train import Evaluation, Evaluations, Gradient, make_gradient, scale_images
from tinymnist.algorithm.trees import Tree, tree_map
from tinymnist.transforms.wide_conv import CONV_RULES, ONE_BY_ONE, VMAP_GRADIENT, chosen_rule, wide_gradient


def vmapped(gradient: Gradient) -> Gradient:
    """train.py's gradient over N models: stacked params, (N, B) batch indices; the dataset
    is shared (in_dims None), so it sits on the device once."""
    return torch.func.vmap(gradient, in_dims=(0, None, None, 0), randomness="different")


def n_models_gradient(config: TrainConfig, device: torch.device) -> Gradient:
    """train.py's gradient over N stacked models: vmapped, by wide_conv.py's N-model forward, or
    one model at a time, whichever was measured fastest on `device` (wide_conv.CHOSEN; for the
    last, device_step compiles the one model's gradient apart). A run of one model is not mapped
    at all: its own gradient runs on its slices, the very ops of a single run (vmap of one model
    took 1.11x the single step's time for lenet and fast; research/wide_conv.py,
    results/bench/cpu-seeds/). The run's N decides, not the rows given: a torchrun share of one
    model of a sweep takes the sweep's route, so that its numbers are the one-process sweep's
    to the bit."""
    one = make_gradient(config)
    if config.n_models == 1:
        return functools.partial(unmapped, one)
    rule = chosen_rule(device, config.model)
    if rule == ONE_BY_ONE:
        return one_by_one(one)
    return vmapped(one) if rule == VMAP_GRADIENT else wide_gradient(config, CONV_RULES[rule])


def unmapped(gradient: Gradient, params, images, labels, batch_idx):  # batch_idx: (1, B)
    """The one model's gradient on its slices, with the model axis put back."""
    grads, loss = gradient(one_model(params, 0), images, labels, batch_idx[0])
    return with_model_axis(grads), loss[None]


def one_by_one(gradient: Gradient) -> Gradient:
    """train.py's gradient over N stacked models as N calls of one model's, each on its own
    slices, stacked: the very kernels of N single runs. Where `gradient` is compiled by
    itself, the Python loop runs outside the graph, and each model's activations are gone
    before the next model's are made."""

    def gradients(params, images, labels, batch_idx):  # params: leaves (N, ...), batch_idx: (N, B)
        each = [gradient(one_model(params, i), images, labels, idx) for i, idx in enumerate(batch_idx)]
        grads = {name: torch.stack([g[name] for g, _ in each]) for name in each[0][0]}  # leaves (N, ...)
        return grads, torch.stack([loss for _, loss in each])  # (N,)

    return gradients


def vmapped_update(update):
    """An optimizer's update over N models: stacked grads, state, params and (N,) rates."""
    return torch.func.vmap(update)


def n_models_update(update, n_models: int):
    """vmapped_update, but a run of one model updates unmapped on its slices, as n_models_gradient."""
    if n_models > 1:
        return vmapped_update(update)

    def one_model_update(grads, opt_state, params, lr):  # lr: (1,)
        new_params, new_state = update(one_model(grads, 0), one_model(opt_state, 0), one_model(params, 0), lr[0])
        return with_model_axis(new_params), with_model_axis(new_state)

    return one_model_update


def chunk_sharers(config: TrainConfig) -> int:
    """How many models share the images of one CPU micro-batch (speed.default_micro_batch).

    The chunk keeps a convolutional network's activations in cache, and N models at once hold
    N times as many: all N share it (`fast`, 8 models: 1.51x the time of 8 single runs in chunks
    of 256 images each, 1.10x in chunks of 32 each). An MLP's activations are small, and its
    chunks would only add calls: none share (`mlp`, 8 models: 1.01x whole, 1.26x in chunks of 32;
    research/wide_conv.py, results/bench/cpu-seeds/)."""
    convolutional = any(isinstance(layer, Conv2d) for layer in networks.ARCHITECTURES[config.model])
    return config.n_models if convolutional else 1


def one_model(tree: Tree, i: int) -> Tree:
    """Model i's own tree out of a stacked one (views, no copy)."""
    return tree_map(lambda leaf: leaf[i], tree)


def with_model_axis(tree: Tree) -> Tree:
    """One model's tree as a stacked one of N = 1 (views, no copy)."""
    return tree_map(lambda leaf: leaf.unsqueeze(0), tree)


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
