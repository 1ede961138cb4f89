"""A speed trick for the CPU: a first convolution's weight gradient as one forward convolution.

oneDNN computes the weight gradient of a convolution whose groups have one input channel each
(a network's first layer: the image; N models' under vmap) slowly on the channels-last tensors
inductor hands it: in fast's compiled step, conv1's (256 images, 1 -> 24 channels, 5x5) took 28 ms a
step, its forward 6 ms. The same sums are a forward convolution with the batch as the channels:

    dW[o, 0, i, j] = sum over b, y, x of dY[b, o, y, x] * X[b, 0, y + i, x + j]   (X zero-padded)
                   = conv2d(X as (1, B, H, W), weight=dY as (O, B, H', W'))[0, o, i, j]

which took 8.8 ms there (`python research/first_conv.py --profile fast`). `rewrite` makes that
change in the graph inductor compiles, after autograd has written the backward, so the networks and
the pure step keep their plain F.conv2d; speed.compiled hands `inductor_pass()` to each compile it
makes. The compiled CPU steps took 0.77-0.78x the time for fast, 0.91-0.92x for lenet, 0.91-0.97x
for cnn, in two runs of research/first_conv.py. The sums run in another order: the gradient agrees
with autograd's to float rounding, not bit for bit.
"""

from __future__ import annotations

import functools
import operator

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten


def weight_grad_as_forward(x, grad_out, padding: list[int], groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, G, H, W), grad_out (B, G*O, H', W') -> the weight's gradient (G*O, 1, k, k) and the bias's (G*O,),
    for a convolution of stride 1 whose G groups have one input channel each."""
    batch, _, height, width = x.shape
    channels = x.permute(1, 0, 2, 3).reshape(1, groups * batch, height, width)  # (1, G*B, H, W): images as channels
    kernels = grad_out.permute(1, 0, 2, 3)  # (G*O, B, H', W'): one kernel per output channel
    weight_grad = aten.convolution(channels, kernels, None, [1, 1], padding, [1, 1], False, [0, 0], groups)
    # (1, G*O, k, k) -> (G*O, 1, k, k) with a weight's own strides: a scan's carried parameters must keep theirs
    weight_grad = weight_grad.flatten().view(kernels.shape[0], 1, *weight_grad.shape[-2:])
    return weight_grad, grad_out.sum(dim=(0, 2, 3))  # (G*O, 1, k, k), (G*O,)


def rewritable(node: torch.fx.Node) -> bool:
    """A CPU convolution_backward that needs no input gradient, of stride 1, one input channel per group,
    traced with fake values of fixed sizes (else it is left as it is)."""
    grad_out, x, weight, _, stride, _, dilation, transposed, _, _, mask = node.args
    values = [arg.meta.get("val") for arg in (grad_out, x, weight)]
    if not all(isinstance(v, FakeTensor) and all(isinstance(d, int) for d in v.shape) for v in values):
        return False
    return (
        values[1].device.type == "cpu"
        and values[2].shape[1] == 1  # (O, C_in / groups, k, k)
        and list(stride) == list(dilation) == [1, 1]
        and not transposed
        and not mask[0]  # the input's gradient: none asked
        and mask[1]
        and all(user.target is operator.getitem and (mask[user.args[1]] or not user.users) for user in node.users)
    )


def rewrite(graph: torch.fx.Graph) -> None:
    """Each rewritable convolution_backward of `graph` becomes weight_grad_as_forward."""
    for node in list(graph.nodes):
        if node.target is aten.convolution_backward.default and rewritable(node):
            replace(graph, node)


def replace(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """weight_grad_as_forward, traced on the node's fake values, in the node's place."""
    grad_out, x, _, _, _, padding, _, _, _, groups, _ = node.args
    rule = functools.partial(weight_grad_as_forward, padding=list(padding), groups=groups)
    with detect_fake_mode([x.meta["val"]]):  # the values inductor traced the graph with
        traced = make_fx(rule)(x.meta["val"], grad_out.meta["val"])
    inputs = [n for n in traced.graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(node):
        outputs = graph.graph_copy(traced.graph, dict(zip(inputs, (x, grad_out), strict=True)))
    for user in list(node.users):  # getitem 1 (the weight's gradient), 2 (the bias's); 0 (None) unused
        if user.args[1] > 0:
            user.replace_all_uses_with(outputs[user.args[1] - 1])
        graph.erase_node(user)
    graph.erase_node(node)
    if not outputs[1].users:  # a bias gradient nobody asked for (mask[2] False)
        graph.erase_node(outputs[1])


@functools.cache
def inductor_pass():
    """`rewrite` as inductor's post-grad pass. Built on first use: importing inductor takes about 2 s,
    which `tinymnist info` and --help need not pay."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class FirstConvWeightGrad(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            rewrite(graph)

        def uuid(self) -> bytes:  # inductor's cache key: this file's text
            return get_hash_for_files((__file__,))

    return FirstConvWeightGrad()
