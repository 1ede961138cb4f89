"""The tutorials' own nn.Modules, as they write them: the oracles tests hold tinymnist to.

Copied from the seed tutorials (000: mlp, 001: pytorch/examples' cnn, 002: mlp3, 003:
LeNet) and tuomaso/train_mnist_fast (fast), their quirks kept: LeNet's nn.Sequential
blocks name its weights conv1.0.weight, ...; mlp3's caller flattens the images.
"""

import torch
import torch.nn.functional as F
from torch import nn

from tinymnist.algorithm.config import RECIPES


class SimpleNN(nn.Module):  # seed 000
    def __init__(self):
        super(SimpleNN, self).__init__()  # noqa: UP008  (the tutorial's own words)
        self.fc1 = nn.Linear(28 * 28, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = x.view(-1, 28 * 28)
        x = self.fc1(x)
        x = torch.relu(x)
        x = self.fc2(x)
        return x


class Mlp3Net(torch.nn.Module):  # seed 002's Net; its caller flattens: net.forward(x.view(-1, 28*28))
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(28 * 28, 64)
        self.fc2 = torch.nn.Linear(64, 64)
        self.fc3 = torch.nn.Linear(64, 64)
        self.fc4 = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.nn.functional.relu(self.fc1(x))
        x = torch.nn.functional.relu(self.fc2(x))
        x = torch.nn.functional.relu(self.fc3(x))
        x = torch.nn.functional.log_softmax(self.fc4(x), dim=1)
        return x


class Net(nn.Module):  # seed 001: pytorch/examples mnist/main.py
    def __init__(self):
        super(Net, self).__init__()  # noqa: UP008  (the tutorial's own words)
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


class LeNet(nn.Module):  # seed 003
    def __init__(self):
        super(LeNet, self).__init__()  # noqa: UP008  (the tutorial's own words)
        self.conv1 = nn.Sequential(nn.Conv2d(1, 6, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(kernel_size=2, stride=2))
        self.conv2 = nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2))
        self.fc1 = nn.Sequential(nn.Linear(16 * 5 * 5, 120), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(120, 84), nn.ReLU())
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = self.conv2(x)
        x = x.view(x.size(0), -1)
        x = self.fc1(x)
        x = self.fc2(x)
        output = self.fc3(x)
        return output


class TrainMnistFastNet(nn.Module):  # tuomaso/train_mnist_fast, 8_Final; logits: its log_softmax left out
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 24, 5, 1)
        self.conv2 = nn.Conv2d(24, 32, 3, 1)
        self.fc1 = nn.Linear(800, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


TUTORIALS = {"mlp": SimpleNN, "mlp3": Mlp3Net, "cnn": Net, "lenet": LeNet, "fast": TrainMnistFastNet}


def tutorial_input(model_name: str, x: torch.Tensor) -> torch.Tensor:
    """x (B, 1, 28, 28) as the tutorial hands it to its module: mlp3's caller flattens it."""
    return x.view(-1, 28 * 28) if model_name == "mlp3" else x


def tutorial_forward(model_name: str, module: nn.Module, images_u8: torch.Tensor) -> torch.Tensor:
    """What the tutorial does: ToTensor (pixels / 255), Normalize(mean, std), its own flattening."""
    recipe = RECIPES[model_name]
    x = (images_u8.unsqueeze(1).float() / 255 - recipe.mean) / recipe.std  # (B, 1, 28, 28)
    return module(tutorial_input(model_name, x))
