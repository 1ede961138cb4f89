"""A wide transform: N models trained in one step over stacked parameters.

`train --seeds 4 --lr 0.5,1` trains 8 models, each the same run as `train --seed s --lr l` alone.
Their params and optimizer state are stacked along a leading dim N; the dataset is shared:

    vmapped(gradient)(params, images, labels, batch_idx)   params: leaves (N, ...), batch_idx: (N, B)
    vmapped_update(update)(grads, opt_state, params, lr)   lr: (N,)

They are mapped apart so that micro-batching can sit between them. `n_models_gradient` takes the
route wide_conv.CHOSEN measured fastest: vmap, wide_conv.py's N-model forward, or `one_by_one`
(and, compiled on a CPU, side_by_side.py's models_on_cores: speed.device_step). Where that route
runs the models apart, one model's run is its single step on its slices (`on_model_axis`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tinymnist.algorithm import networks
from tinymnist.algorithm.config import TrainConfig
from tinymnist.algorithm.shapes import Conv2d
from tinymnist.algorithm.train import Evaluation, Evaluations, Gradient, Step, make_gradient, scale_images
from tinymnist.algorithm.trees import Tree, tree_map
from tinymnist.transforms.wide_conv import (
    CONV_RULES,
    ONE_BY_ONE,
    SIDE_BY_SIDE,
    VMAP_GRADIENT,
    chosen_rule,
    wide_gradient,
)


def vmapped(gradient: Gradient) -> Gradient:
    """train.py's gradient over N stacked models and (N, B) indices; the dataset is shared, once on the device."""
    return torch.func.vmap(gradient, in_dims=(0, None, None, 0), randomness="different")


def n_models_gradient(
    config: TrainConfig, device: torch.device, apply: Callable[..., torch.Tensor] = networks.apply
) -> Gradient:
    """train.py's gradient over N stacked models by the route wide_conv.CHOSEN measured fastest on `device`;
    `apply`: one model's forward (speed.network_apply's), but for wide_conv's rules, which write their own.

    One model runs unmapped, the ops of a single run (vmap of one model took 1.11x the single step's
    time for lenet and fast; research/wide_conv.py, results/bench/cpu-seeds/). The run's N decides, not
    the rows given, so a torchrun share of a sweep matches the one-process sweep to the bit."""
    one = make_gradient(config, apply)
    if config.n_models == 1:
        return functools.partial(unmapped, one)
    rule = chosen_rule(device, config.model)
    if rule in (ONE_BY_ONE, SIDE_BY_SIDE):  # side by side needs a compiled gradient: speed.device_step
        return one_by_one(one)
    return vmapped(one) if rule == VMAP_GRADIENT else wide_gradient(config, CONV_RULES[rule])


def unmapped(gradient: Gradient, params, images, labels, batch_idx):  # batch_idx: (1, B)
    """The one model's gradient on its slices, with the model axis put back."""
    grads, loss = gradient(one_model(params, 0), images, labels, batch_idx[0])
    return with_model_axis(grads), loss[None]


def on_model_axis(step: Step) -> Step:
    """One model's whole step (compiled as a single run's, with its transforms) for a stacked state
    of N = 1: called on the model's slices, the model axis put back on what it returns (views)."""

    def stacked_step(params, opt_state, images, labels, batch_idx, lr):  # leaves (1, ...), batch_idx (1, B), lr (1,)
        params, opt_state, loss = step(
            one_model(params, 0), one_model(opt_state, 0), images, labels, batch_idx[0], lr[0]
        )
        return with_model_axis(params), with_model_axis(opt_state), loss[None]

    stacked_step.returns_buffers = getattr(step, "returns_buffers", False)  # a CUDA graph's (train.completed)
    if hasattr(step, "untimed_seconds"):  # AdaptiveThreads' compiles at a new thread count (train.Clock)
        stacked_step.untimed_seconds = step.untimed_seconds
    return stacked_step


def one_by_one(gradient: Gradient) -> Gradient:
    """train.py's gradient over N stacked models as N calls of one model's, stacked: the kernels of N
    single runs, and each model's activations are gone before the next model's are made."""

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

    A convnet's N models share it, to keep N models' activations in cache (`fast`, 8 models: 1.51x
    8 single runs in chunks of 256 each, 1.10x in chunks of 32 each); an MLP's do not (`mlp`, 8 models:
    1.01x whole, 1.26x in chunks of 32; research/wide_conv.py, results/bench/cpu-seeds/). Today every
    convnet's CPU rule runs the models apart (wide_conv.CHOSEN), so only the research scripts, which
    time the vmapped rules against those, reach the convnet case."""
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
    """train.evaluate for all N models in one vmapped pass per test chunk, and their ensemble."""
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
    """The ensemble's result, the average of its n models' summed probabilities (T, 10); apart so
    that sums from several processes can be added first."""
    averaged = summed_probabilities.double() / n  # (T, 10)
    loss = F.nll_loss(averaged.log(), labels, reduction="sum").item()
    correct = int((averaged.argmax(dim=1) == labels).sum())
    return Evaluation(loss / len(labels), correct, len(labels))
