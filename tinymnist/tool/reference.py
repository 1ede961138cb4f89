"""The tutorials' loop, kept only as the benchmark's baseline; nothing in training uses it.

torchvision's MNIST + DataLoader + nn.Module + torch.optim + loss.backward(), without
torchvision: each sample goes uint8 -> PIL image -> float / 255 -> normalized on the CPU,
the DataLoader collates a batch, the batch is copied to the device.
"""

from __future__ import annotations

import copy
from types import ModuleType

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tinymnist.algorithm import networks
from tinymnist.algorithm.config import TrainConfig
from tinymnist.algorithm.train import loss_function
from tinymnist.tool.extras import require

TORCH_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adadelta": torch.optim.Adadelta,
    "rmsprop": torch.optim.RMSprop,
}


def require_pillow() -> ModuleType:
    """PIL.Image, or a one-line error naming the extra: bench checks it before it times anything."""
    return require("PIL.Image", "bench's reference loop", extra="bench")


class TutorialMNIST(Dataset):
    """torchvision's MNIST with transforms.Compose([ToTensor(), Normalize((mean,), (std,))])."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float):
        self.to_pil = require_pillow().fromarray
        self.images, self.labels = images.cpu(), labels.cpu()  # the tutorials keep data on the host
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.to_pil(self.images[i].numpy(), mode="L")  # as torchvision's __getitem__ does
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).float().div(255).unsqueeze(0)  # ToTensor: (1, 28, 28)
        return (x - self.mean) / self.std, int(self.labels[i])  # Normalize


def reference_loop(config: TrainConfig, params: dict, images, labels, device: torch.device):
    """Yield after each tutorial-style training step, forever: (nn.Module, loss)."""
    recipe = config.recipe
    # The cnn tutorial's settings: on an accelerator, one persistent worker process
    # prepares batches into pinned memory while the device trains; on the CPU, no worker.
    accel = {"num_workers": 1, "persistent_workers": True, "pin_memory": True} if device.type != "cpu" else {}
    loader = DataLoader(
        TutorialMNIST(images, labels, recipe.mean, recipe.std),
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        **accel,
    )
    net = copy.deepcopy(networks.TEMPLATES[config.model]).to_empty(device=device)  # a stateful module
    net.load_state_dict(params)
    optimizer = TORCH_OPTIMIZERS[config.optimizer](net.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=config.gamma)
    loss_fn = loss_function(config.model)
    while True:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = loss_fn(net(x, train=True), y)
            loss.backward()
            optimizer.step()
            yield net, loss
        scheduler.step()  # once per epoch, as pytorch/examples does
