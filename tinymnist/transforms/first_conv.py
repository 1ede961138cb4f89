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
makes. On that host (a 2-core AMD EPYC) the compiled CPU steps took 0.77-0.78x the time for fast,
0.91-0.92x for lenet, 0.91-0.97x for cnn, in two runs of research/first_conv.py. On a 2-core Intel
Xeon oneDNN's own backward was the faster kernel, and the rewrite made the steps 1.27x
(fast), 1.38x (lenet) and 1.07x (cnn) slower. So the pass measures: for each convolution it would
rewrite, it times both kernels on random tensors of the graph's shapes and strides, in turns, and
keeps the faster (`as_forward_is_faster`). Inductor's cache keeps the compiled graph, and with it
the choice, for the next process on the same machine. The sums run in another order: the gradient
agrees with autograd's to float rounding, not bit for bit.
"""

from __future__ import annotations

import functools
import operator
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten

ROUNDS = 5  # of the two kernels' timings, in turns; the medians are compared
WINDOW_SECONDS = 0.005  # the least time one timing spans: well above the clock's resolution


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


def rewrite(graph: torch.fx.Graph, choose: Callable[[torch.fx.Node], bool] = lambda node: True) -> None:
    """Each rewritable convolution_backward of `graph` that `choose` takes becomes weight_grad_as_forward."""
    for node in list(graph.nodes):
        if node.target is aten.convolution_backward.default and rewritable(node) and choose(node):
            replace(graph, node)


def as_forward_is_faster(node: torch.fx.Node) -> bool:
    """Whether weight_grad_as_forward beats the node's own convolution_backward on this machine, now:
    both timed in turns on random tensors with the shapes and strides of the node's fake values."""
    grad_out, x, weight, *_ = node.args
    padding, groups = list(node.args[5]), node.args[9]
    with unset_fake_temporarily():  # real tensors, inside the compile's fake mode
        g, image, w = (random_like(arg.meta["val"]) for arg in (grad_out, x, weight))
        kernels = (
            lambda: node.target(g, image, w, *node.args[3:]),
            lambda: weight_grad_as_forward(image, g, padding, groups),
        )
        backward, as_forward = timed_in_turns(kernels)
    return as_forward < backward


def random_like(fake: torch.Tensor) -> torch.Tensor:
    """A real tensor with `fake`'s shape, strides and dtype (the layout decides oneDNN's speed), on the CPU."""
    return torch.empty_strided(fake.shape, fake.stride(), dtype=fake.dtype).normal_()


def timed_in_turns(kernels) -> list[float]:
    """Each kernel's median seconds per call over ROUNDS windows, taken in turns so load hits all alike."""
    for kernel in kernels:  # the first call of a shape sets oneDNN up
        kernel()
    samples = [[] for _ in kernels]
    for _ in range(ROUNDS):
        for kernel, times in zip(kernels, samples, strict=True):
            started, calls = time.perf_counter(), 0
            while (elapsed := time.perf_counter() - started) < WINDOW_SECONDS or calls == 0:
                kernel()
                calls += 1
            times.append(elapsed / calls)
    return [statistics.median(times) for times in samples]


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


CHOICES = {"measured": as_forward_is_faster, "always": lambda node: True}


@functools.cache
def inductor_pass(choice: str = "measured"):
    """`rewrite` as inductor's post-grad pass, taking the kernel CHOICES[choice] picks. Built on first use:
    importing inductor takes about 2 s, which `tinymnist info` and --help need not pay."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class FirstConvWeightGrad(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            rewrite(graph, CHOICES[choice])

        def uuid(self) -> bytes:  # inductor's cache key: this file's text, the choice and, for a measured
            # one, the processor, so that a cache shared between machines does not carry one's choice to another
            where = f"{choice} {platform.machine()} {processor_name()}" if choice == "measured" else choice
            return get_hash_for_files((__file__,)) + where.encode()

    return FirstConvWeightGrad()


def processor_name() -> str:
    """The CPU's model name as Linux reports it, else platform's (often empty)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        return platform.processor()
