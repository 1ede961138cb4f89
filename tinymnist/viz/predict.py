"""`tinymnist predict`: what a checkpoint says about test digits, or about your own images."""

from __future__ import annotations

from pathlib import Path

import torch

from tinymnist.algorithm import networks
from tinymnist.algorithm.config import RECIPES
from tinymnist.viz.digits import Digit
from tinymnist.viz.preprocess import mnist_digit, read_grey

CHUNK = 1000  # images per forward pass, the recipes' test batch: cnn's largest activation is then 147 MB
TOP = 3  # alternatives printed for an image of your own


def model_inputs(model: str, images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (B, 28, 28) -> (B, 1, 28, 28) float, scaled as the model's recipe trains it."""
    recipe = RECIPES[model]
    x = images_u8.unsqueeze(1).float() / 255  # (B, 1, 28, 28) in 0..1
    return (x - recipe.mean) / recipe.std


@torch.no_grad()
def probabilities(model: str, params: dict, images_u8: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 10): each digit's probability, in chunks of CHUNK images.
    softmax serves logits and log-probabilities (a network ending in log_softmax) alike."""
    chunks = [
        torch.softmax(networks.apply(model, params, model_inputs(model, images_u8[start : start + CHUNK])), dim=1)
        for start in range(0, len(images_u8), CHUNK)
    ]  # each (C, 10)
    return torch.cat(chunks)


def pick(probs: torch.Tensor, labels: torch.Tensor, count: int, wrong_only: bool) -> torch.Tensor:
    """Indices of the digits to show: the first `count`, or the `count` most confident mistakes."""
    if not wrong_only:
        return torch.arange(min(count, len(labels)), device=labels.device)
    confidence, predicted = probs.max(dim=1)  # (N,), (N,)
    wrong = (predicted != labels).nonzero().squeeze(1)  # (W,)
    order = confidence[wrong].argsort(descending=True, stable=True)  # the surest mistake first
    return wrong[order][:count]


def labelled_digits(
    probs: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
) -> list[Digit]:
    """The test digits at `indices`, each with its prediction, probability and true label."""
    confidence, predicted = probs.max(dim=1)
    return [
        Digit(images[i].cpu(), f"#{i}", int(predicted[i]), float(confidence[i]), int(labels[i]))
        for i in indices.tolist()
    ]


def predict_images(model: str, params: dict, paths: list[Path], device: torch.device) -> list[tuple[Digit, list]]:
    """Each image as the network saw it, with its prediction and the TOP (digit, probability) pairs."""
    images = torch.stack([mnist_digit(read_grey(path), str(path)) for path in paths])  # (N, 28, 28) uint8
    probs = probabilities(model, params, images.to(device)).cpu()  # (N, 10)
    results = []
    for path, image, p in zip(paths, images, probs, strict=True):
        top = p.topk(TOP)
        best = [(int(d), float(q)) for q, d in zip(top.values, top.indices, strict=True)]
        results.append((Digit(image, Path(path).name, best[0][0], best[0][1]), best))
    return results
