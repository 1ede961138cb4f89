"""A speed trick for N models: their forward pass layer by layer, with a convolution rule of its own.

vmap.py maps one model's gradient over N stacked models with torch.func.vmap, and vmap
turns each convolution of N models into one *grouped* convolution (the models folded into
the channels, groups=N), reported slow on GPUs and CPUs (functorch#365, pytorch#70954).
Here the N models' forward pass is written out instead, one rule per layer kind over a
leading model axis:

    x: (N, B, C, H, W), each model's own batch        params: leaves (N, ...), the networks' own names

    Conv2d     a CONV_RULES rule: vmap's grouped convolution, N plain ones in a loop, the loop
               for the first layer only, or im2col and one batched matrix product
    Linear     one batched matrix product over the models: (N, B, F) @ (N, F, O)
    ReLU, MaxPool2d, Flatten, LogSoftmax    the same op, the models folded into the batch
    Dropout    one mask over the whole (N, B, ...) tensor: each model's its own

Which route a step takes, this forward with which rule, plain vmap or the models one by one
(vmap.one_by_one), is a table of measurements per device kind and network, CHOSEN: on a
2-core CPU one by one is the fastest for `cnn` and `fast`, and vmap for `lenet`; on an
H200, vmap for `cnn`.

The layers are networks.py's own tuples (networks.ARCHITECTURES); parameters keep the
networks' names (`conv1.weight`, ...), so checkpoints, the optimizers and evaluation do not
know which forward trained them. `wide_gradient` is the gradient of the sum over models
of each model's mean loss: models share no parameter, so model i's slice of it is model i's
own gradient, what vmap(gradient) gives (tests/transforms/test_wide_conv.py checks one
against the other).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinymnist.algorithm import networks, shapes
from tinymnist.algorithm.config import TrainConfig
from tinymnist.algorithm.cpu_pool import max_pool2d
from tinymnist.algorithm.shapes import Conv2d, Dropout, Flatten, Layer, Linear, LogSoftmax, MaxPool2d, ReLU
from tinymnist.algorithm.train import Gradient, Params, scale_images, training_loss

# ---- the convolution rules: x (N, B, C, H, W), weight (N, O, C, k, k), bias (N, O) -> (N, B, O, H', W')


def vmap_conv(x, weight, bias, stride: int, padding: int) -> torch.Tensor:
    """What vmap(gradient) does today: one grouped convolution, the models folded into the channels."""
    return torch.func.vmap(F.conv2d, in_dims=(0, 0, 0, None, None))(x, weight, bias, stride, padding)


def loop_conv(x, weight, bias, stride: int, padding: int) -> torch.Tensor:
    """N plain convolutions, one per model, unrolled into the one compiled graph."""
    each = zip(x.unbind(), weight.unbind(), bias.unbind(), strict=True)  # unbind: its backward is one stack
    return torch.stack([F.conv2d(xi, wi, bi, stride, padding) for xi, wi, bi in each])


def unfold_conv(x, weight, bias, stride: int, padding: int) -> torch.Tensor:
    """im2col: every k x k patch of every image as a column (F.unfold), then one batched
    matrix product over the models, (N, O, C*k*k) @ (N, C*k*k, B*L)."""
    n, batch, channels, side, _ = x.shape
    out_channels, kernel = weight.shape[1], weight.shape[-1]
    out_side = shapes.conv2d_out(side, kernel, stride, padding)
    columns = F.unfold(x.flatten(0, 1), kernel, padding=padding, stride=stride)  # (N*B, C*k*k, L), L = H'*W'
    columns = columns.view(n, batch, channels * kernel * kernel, -1).transpose(1, 2).flatten(2)  # (N, C*k*k, B*L)
    out = torch.baddbmm(bias.unsqueeze(-1), weight.flatten(2), columns)  # (N, O, B*L)
    return out.view(n, out_channels, batch, out_side, out_side).transpose(1, 2)  # (N, B, O, H', W')


def first_loop_conv(x, weight, bias, stride: int, padding: int) -> torch.Tensor:
    """loop_conv for a first layer (one input channel), where vmap's grouped convolution is slowest;
    vmap_conv for the others."""
    rule = loop_conv if x.shape[2] == 1 else vmap_conv
    return rule(x, weight, bias, stride, padding)


CONV_RULES = {"vmap": vmap_conv, "loop": loop_conv, "unfold": unfold_conv, "first-loop": first_loop_conv}

# The N-model gradient measured fastest per (device kind, network): a CONV_RULES rule in
# wide_gradient, VMAP_GRADIENT (vmap of the one-model gradient, vmap.py) or ONE_BY_ONE (the
# one-model gradient compiled alone and called once per model, vmap.one_by_one); a device or
# network not listed keeps VMAP_GRADIENT, the path that was there first. Measured with
# research/wide_conv.py, 8 models, in turns in one process (results/bench/cpu-seeds/):
#   cpu, cnn:   one-by-one 1.08x the time of 8 single runs, vmap-gradient 1.36x, loop 1.69x:
#               8 models' activations and 9.4M parameters at once overflow the caches
#   cpu, fast:  one-by-one 0.99x, the loop 1.17x (both 2 threads); vmap-gradient 1.10x on 2 threads
#               with a shared chunk, 1.30x on 1 thread (the session before)
#   cpu, lenet: vmap-gradient 0.84x, one-by-one 0.89x: oneDNN's grouped convolution is not
#               slow on a CPU, and lenet stays vmapped
#   cuda, cnn (H200, N = 16, each step one CUDA graph): vmap-gradient 0.67x, one-by-one 0.93x,
#               unfold 1.20x (results/bench/cuda-h200/issue20/): vmap stays on CUDA
VMAP_GRADIENT, ONE_BY_ONE = "vmap-gradient", "one-by-one"
CHOSEN = {("cpu", "cnn"): ONE_BY_ONE, ("cpu", "fast"): ONE_BY_ONE}


def chosen_rule(device: torch.device, model: str) -> str:
    """The N-model gradient's rule for `model` on `device`: a CONV_RULES name, VMAP_GRADIENT or ONE_BY_ONE."""
    return CHOSEN.get((device.type, model), VMAP_GRADIENT)


# ---- the N-model forward ------------------------------------------------------------------


def wide_forward(model: str, params: Params, x: torch.Tensor, conv=loop_conv, train: bool = False) -> torch.Tensor:
    """networks.apply for N models at once: x (N, B, 1, 28, 28) -> (N, B, 10)."""
    for layer in networks.ARCHITECTURES[model]:
        x = wide_layer(layer, params, x, conv, train)
    return x


def wide_layer(layer: Layer, params: Params, x: torch.Tensor, conv, train: bool) -> torch.Tensor:
    if isinstance(layer, Conv2d):
        weight, bias = params[f"{layer.name}.weight"], params[f"{layer.name}.bias"]  # (N, O, C, k, k), (N, O)
        return conv(x, weight, bias, layer.stride, layer.padding)  # (N, B, O, H', W')
    if isinstance(layer, Linear):
        weight, bias = params[f"{layer.name}.weight"], params[f"{layer.name}.bias"]  # (N, O, F), (N, O)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))  # (N, B, F) -> (N, B, O)
    if isinstance(layer, ReLU):
        return F.relu(x)
    if isinstance(layer, MaxPool2d):  # cpu_pool's max-pool, as networks.py runs it, over N*B images
        return max_pool2d(x.flatten(0, 1), layer.kernel, layer.stride).unflatten(0, x.shape[:2])  # (N, B, C, H', W')
    if isinstance(layer, Dropout):
        return F.dropout(x, layer.p, training=train)  # a mask drawn for every model's every value
    if isinstance(layer, Flatten):
        return x.flatten(2)  # (N, B, C, H, W) -> (N, B, C*H*W)
    if isinstance(layer, LogSoftmax):
        return F.log_softmax(x, dim=-1)  # over the classes
    raise TypeError(f"no N-model rule for layer {layer!r}")


def wide_gradient(config: TrainConfig, conv=loop_conv) -> Gradient:
    """train.make_gradient for N models: (params (N, ...), images, labels, batch_idx (N, B))
    -> (grads (N, ...), losses (N,)), each model's mean loss and its gradient."""
    model, recipe, loss_fn = config.model, config.recipe, training_loss(config)

    def summed_loss(params: Params, images_u8: torch.Tensor, labels: torch.Tensor):
        n, batch = labels.shape
        x = scale_images(images_u8.flatten(0, 1), recipe.mean, recipe.std).unflatten(0, (n, batch))  # (N, B, 1, 28, 28)
        out = wide_forward(model, params, x, conv, train=True)  # (N, B, 10), dropout on
        losses = loss_fn(out.flatten(0, 1), labels.flatten(), reduction="none").view(n, batch).mean(dim=1)  # (N,)
        return losses.sum(), losses.detach()  # d(sum)/d(model i's params) = d(loss i)/d(model i's params)

    grad_and_loss = torch.func.grad_and_value(summed_loss, has_aux=True)

    def gradient(params: Params, images: torch.Tensor, labels: torch.Tensor, batch_idx: torch.Tensor):
        grads, (_, losses) = grad_and_loss(params, images[batch_idx], labels[batch_idx])  # (N, B, 28, 28), (N, B)
        return grads, losses

    return gradient
