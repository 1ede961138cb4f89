"""The networks as pure functions: `init_params` makes a dict of numbers, `apply` runs it.

Each network is a tuple of layer descriptions (shapes.py). It becomes an `nn.Module`
*template* once, on the `meta` device: structure, no numbers. The numbers are a plain
`dict[str, Tensor]` keyed by the template's parameter names (`conv1.weight`, ... as in the
tutorials, so their state_dicts load), and `torch.func.functional_call` runs the template
with them. Nothing is mutated, so a forward pass, or K under vmap, compiles as one graph.
Dropout is an argument, `apply(..., train=True)`, not `module.train()`, which would mutate
the template; its randomness is torch's global generator, which a checkpoint saves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinymnist.algorithm import shapes
from tinymnist.algorithm.cpu_pool import max_pool2d
from tinymnist.algorithm.shapes import Conv2d, Dropout, Flatten, Layer, Linear, LogSoftmax, MaxPool2d, ReLU
from tinymnist.errors import TinyMnistError

Params = dict[str, torch.Tensor]

NUM_CLASSES = shapes.NUM_CLASSES

ARCHITECTURES = {
    # seed 000, SimpleNN: 784-128-10, logits for cross-entropy.
    "mlp": (
        Flatten(),
        Linear("fc1", 128),
        ReLU(),
        Linear("fc2", NUM_CLASSES),
    ),
    # seed 002, Net: 784-64-64-64-10, log-probabilities for NLL.
    "mlp3": (
        Flatten(),
        Linear("fc1", 64),
        ReLU(),
        Linear("fc2", 64),
        ReLU(),
        Linear("fc3", 64),
        ReLU(),
        Linear("fc4", NUM_CLASSES),
        LogSoftmax(),
    ),
    # seed 001, pytorch/examples mnist/main.py Net: two 3x3 convolutions, a 2x2 max-pool,
    # dropout, and fc1's 9216 inputs traced rather than typed; log-probabilities for NLL.
    "cnn": (
        Conv2d("conv1", 32, kernel=3),
        ReLU(),
        Conv2d("conv2", 64, kernel=3),
        ReLU(),
        MaxPool2d("pool", kernel=2),
        Dropout("dropout1", p=0.25),
        Flatten(),
        Linear("fc1", 128),
        ReLU(),
        Dropout("dropout2", p=0.5),
        Linear("fc2", NUM_CLASSES),
        LogSoftmax(),
    ),
    # seed 003, LeNet: conv1's padding 2 gives MNIST's 28x28 the 32x32 border LeNet-5 was
    # designed for; fc1's 400 inputs traced rather than typed; logits for cross-entropy.
    "lenet": (
        Conv2d("conv1", 6, kernel=5, padding=2),
        ReLU(),
        MaxPool2d("pool1", kernel=2),
        Conv2d("conv2", 16, kernel=5),
        ReLU(),
        MaxPool2d("pool2", kernel=2),
        Flatten(),
        Linear("fc1", 120),
        ReLU(),
        Linear("fc2", 84),
        ReLU(),
        Linear("fc3", NUM_CLASSES),
    ),
    # tuomaso/train_mnist_fast: built for time to accuracy; fc1's 800 inputs traced rather
    # than typed; logits for cross-entropy. It pools before each ReLU; ReLU first gives the
    # same values and gradients (max and ReLU commute) and a faster compiled CPU step
    # with cpu_pool's max-pool (results/fast-recipe/pool-order.txt).
    "fast": (
        Conv2d("conv1", 24, kernel=5),
        ReLU(),
        MaxPool2d("pool1", kernel=2),
        Conv2d("conv2", 32, kernel=3),
        ReLU(),
        MaxPool2d("pool2", kernel=2),
        Flatten(),
        Linear("fc1", 256),
        ReLU(),
        Linear("fc2", NUM_CLASSES),
    ),
}

MODEL_NAMES = tuple(ARCHITECTURES)  # ("mlp", "mlp3", "cnn", "lenet", "fast")

# The loss each network is trained with: NLL where it ends in log_softmax, else
# cross-entropy on its logits (which applies log_softmax itself).
OUTPUTS_LOG_PROBS = {name: isinstance(layers[-1], LogSoftmax) for name, layers in ARCHITECTURES.items()}


class Network(nn.Module):
    """A stateless template on the meta device: conv and linear layers are submodules named
    as in the table, sized by the shape trace; every other layer is a function in `forward`."""

    def __init__(self, layers: tuple[Layer, ...]):
        super().__init__()
        self.layers = layers
        rows = shapes.trace_layers(layers)
        inputs = [shapes.MNIST_IMAGE] + [row.shape for row in rows[:-1]]  # a layer sees the output before it
        for layer, shape_in in zip(layers, inputs, strict=True):
            if isinstance(layer, Conv2d):  # shape_in: (C, H, W)
                conv = nn.Conv2d(
                    shape_in[0], layer.out_channels, layer.kernel, layer.stride, layer.padding, device="meta"
                )
                self.add_module(layer.name, conv)
            elif isinstance(layer, Linear):  # shape_in: (F,), for cnn's fc1 (9216,)
                self.add_module(layer.name, nn.Linear(shape_in[0], layer.out_features, device="meta"))

    def forward(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        for layer in self.layers:  # x: (B, 1, 28, 28) -> (B, 10)
            x = self.layer_forward(layer, x, train)
        return x

    def layer_forward(self, layer: Layer, x: torch.Tensor, train: bool) -> torch.Tensor:
        if isinstance(layer, (Conv2d, Linear)):
            return getattr(self, layer.name)(x)  # with the weights functional_call passed in
        if isinstance(layer, ReLU):
            return F.relu(x)
        if isinstance(layer, MaxPool2d):
            return max_pool2d(x, layer.kernel, layer.stride)  # (B, C, H, W) -> (B, C, H', W'), cpu_pool.py
        if isinstance(layer, Dropout):
            return F.dropout(x, layer.p, training=train)
        if isinstance(layer, Flatten):
            return torch.flatten(x, 1)  # (B, C, H, W) -> (B, C*H*W): the batch dim stays
        if isinstance(layer, LogSoftmax):
            return F.log_softmax(x, dim=1)  # over the classes of each example
        raise TypeError(f"no forward rule for layer {layer!r}")


# Built once, here: building a module inside a compiled function breaks its graph. A plain
# dict, as reading a types.MappingProxyType inside torch.compile breaks the graph too.
TEMPLATES = {name: Network(layers) for name, layers in ARCHITECTURES.items()}


def check_model(name: str, flag: str = "--model") -> None:
    """The one check of a model name: a one-line error naming `flag` unless it is one of MODEL_NAMES."""
    if name not in ARCHITECTURES:
        raise TinyMnistError(f"{flag} {name!r} is unknown; choose one of {', '.join(MODEL_NAMES)}")


def trace(name: str) -> list[shapes.TraceRow]:
    """`tinymnist shapes NAME`: the network layer by layer, from a (1, 28, 28) image."""
    check_model(name)
    return shapes.trace_layers(ARCHITECTURES[name])


def init_params(name: str, seed: int, device: torch.device | str = "cpu") -> Params:
    """Fresh parameters for `name`, the same for the same seed on every device.

    nn.Linear's and nn.Conv2d's default init (kaiming-uniform, a=sqrt(5): U(+-1/sqrt(fan_in)),
    the bias too), drawn on the CPU in the template's order from a generator of their own: the
    global one is untouched, and `torch.manual_seed(seed)` then the tutorial's module gives these.
    """
    check_model(name)
    generator = torch.Generator().manual_seed(seed)
    params = {}
    for layer_name, layer in TEMPLATES[name].named_children():  # conv and linear layers, in order
        weight = nn.init.kaiming_uniform_(torch.empty(layer.weight.shape), a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(weight[0].numel())  # fan_in: in_features, or in_channels * k * k
        bias = nn.init.uniform_(torch.empty(layer.bias.shape), -bound, bound, generator=generator)
        params[f"{layer_name}.weight"] = weight.to(device)
        params[f"{layer_name}.bias"] = bias.to(device)
    return params


def apply(name: str, params: Params, x: torch.Tensor, train: bool = False) -> torch.Tensor:
    """Run network `name` on a batch: x (B, 1, 28, 28), scaled as its recipe says -> (B, 10),
    log-probabilities where OUTPUTS_LOG_PROBS[name] says so, else logits. `train=True`: dropout on."""
    check_model(name)
    return torch.func.functional_call(TEMPLATES[name], params, (x,), {"train": train}, strict=True)
