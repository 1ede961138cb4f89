"""A speed trick for N models: their forward pass layer by layer, with a convolution rule of its own.

vmap turns a convolution of N models into one grouped convolution (groups=N), reported slow
on GPUs and CPUs (functorch#365, pytorch#70954). Here the N-model forward is written out,
one rule per layer kind over a leading model axis, x: (N, B, C, H, W), params: leaves (N, ...):
Conv2d by a CONV_RULES rule, Linear as one batched matmul, the others with the models folded
into the batch. CHOSEN picks, per device and network, this forward, plain vmap, or the models
one by one (vmap.one_by_one) or side by side (side_by_side.py). Parameters keep networks.py's
names, so checkpoints, optimizers and evaluation do not know which forward trained them.
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
    """What vmap(gradient) does: one grouped convolution, the models folded into the channels."""
    return torch.func.vmap(F.conv2d, in_dims=(0, 0, 0, None, None))(x, weight, bias, stride, padding)


def loop_conv(x, weight, bias, stride: int, padding: int) -> torch.Tensor:
    """N plain convolutions, one per model, unrolled into the one compiled graph."""
    each = zip(x.unbind(), weight.unbind(), bias.unbind(), strict=True)  # unbind: its backward is one stack
    return torch.stack([F.conv2d(xi, wi, bi, stride, padding) for xi, wi, bi in each])


def unfold_conv(x, weight, bias, stride: int, padding: int) -> torch.Tensor:
    """im2col: every k x k patch as a column (F.unfold), then (N, O, C*k*k) @ (N, C*k*k, B*L)."""
    n, batch, channels, side, _ = x.shape
    out_channels, kernel = weight.shape[1], weight.shape[-1]
    out_side = shapes.conv2d_out(side, kernel, stride, padding)
    columns = F.unfold(x.flatten(0, 1), kernel, padding=padding, stride=stride)  # (N*B, C*k*k, L), L = H'*W'
    columns = columns.view(n, batch, channels * kernel * kernel, -1).transpose(1, 2).flatten(2)  # (N, C*k*k, B*L)
    out = torch.baddbmm(bias.unsqueeze(-1), weight.flatten(2), columns)  # (N, O, B*L)
    return out.view(n, out_channels, batch, out_side, out_side).transpose(1, 2)  # (N, B, O, H', W')


def first_loop_conv(x, weight, bias, stride: int, padding: int) -> torch.Tensor:
    """loop_conv for a first layer (one input channel), where vmap's grouped convolution is slowest; else vmap_conv."""
    rule = loop_conv if x.shape[2] == 1 else vmap_conv
    return rule(x, weight, bias, stride, padding)


CONV_RULES = {"vmap": vmap_conv, "loop": loop_conv, "unfold": unfold_conv, "first-loop": first_loop_conv}

# The N-model gradient measured fastest per (device kind, network): a CONV_RULES name, VMAP_GRADIENT,
# ONE_BY_ONE or SIDE_BY_SIDE (side_by_side.py: only for networks without dropout); unlisted ones keep
# VMAP_GRADIENT. Time of 8 models over 8 single runs (research/wide_conv.py, results/bench/cpu-seeds/):
#   cpu, cnn:   one-by-one 1.08x, vmap-gradient 1.36x, loop 1.69x (8 models at once overflow the caches)
#   cpu, fast:  side-by-side 0.89x, one-by-one 1.07x, vmap-gradient 1.18x (side-by-side-fast.txt; N a
#               multiple of the threads only: speed.device_step)
#   cpu, lenet: side-by-side 0.81x, vmap-gradient 1.00x, one-by-one 1.02x (side-by-side-lenet.txt)
#   (an Intel Xeon, 2026-12-06: side-by-side 0.94x (fast), 0.91x (lenet); one-by-one 1.03x, 0.96x;
#   results/bench/cpu-seeds-xeon-2/rules-each.txt)
#   cuda, cnn (H200, 16 models, CUDA graphs): vmap-gradient 0.67x, one-by-one 0.93x, unfold 1.20x
#               (results/bench/cuda-h200/issue20/)
VMAP_GRADIENT, ONE_BY_ONE, SIDE_BY_SIDE = "vmap-gradient", "one-by-one", "side-by-side"
CHOSEN = {("cpu", "cnn"): ONE_BY_ONE, ("cpu", "fast"): SIDE_BY_SIDE, ("cpu", "lenet"): SIDE_BY_SIDE}


def chosen_rule(device: torch.device, model: str) -> str:
    """The N-model gradient's rule for `model` on `device`: a CONV_RULES name or one of the three above."""
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
    -> (grads (N, ...), losses (N,)); models share no parameter, so the sum's gradient is each one's."""
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
