"""A speed trick for the CPU: a first convolution's weight gradient as one forward convolution.

On a 2-core AMD EPYC, oneDNN computed the weight gradient of a convolution whose groups have one
input channel each (a network's first layer: the image; N models' under vmap) slowly on the
channels-last tensors inductor hands it: in fast's compiled step, conv1's (256 images, 1 -> 24
channels, 5x5) took 28 ms a step, its forward 6 ms. The same sums are a forward convolution with the
batch as the channels:

    dW[o, 0, i, j] = sum over b, y, x of dY[b, o, y, x] * X[b, 0, y + i, x + j]   (X zero-padded)
                   = conv2d(X as (1, B, H, W), weight=dY as (O, B, H', W'))[0, o, i, j]

which took 8.8 ms there (`python research/first_conv.py --profile fast`). `rewrite` makes that
change in the graph inductor compiles, after autograd has written the backward, so the networks and
the pure step keep their plain F.conv2d; speed.compiled hands the pass to each compile it makes.
There the compiled CPU steps took 0.77-0.78x the time for fast, 0.91-0.92x for lenet, 0.91-0.97x for
cnn. On a 2-core Intel Xeon oneDNN's own backward was the faster kernel, and the rewrite made the
steps 1.27x (fast), 1.38x (lenet) and 1.07x (cnn) slower (research/first_conv.py, BENCHMARKS.md).

So the pass measures (`as_forward_is_faster`): for each convolution it could rewrite, it times both
kernels on random tensors of the shapes and of the layout the compiled code will hand them (inductor
lays a CPU graph's convolutions out channels-last), in turns, and takes the rewrite only where it is
clearly faster (MARGIN). Each choice is made once a process for its arguments and thread count, so
every graph a process compiles (a step, its k-step graph, each micro-batch size) agrees. Inductor's cache
keeps each compiled graph, and with it its choice, for later processes on the same processor; a graph
compiled in a later process (another --steps-per-call, another thread count) measures anew and may
choose otherwise, in the last bits of its sums. The timing is noisy near MARGIN (cnn's first layer
measured 0.68-1.14x in eight processes on a 2-core AMD EPYC), and a graph cached with a wrong choice
serves every later process: fast's step ran at 61-71 ms that way against 54-56 ms compiled anew
(research/first_conv_choice.py, BENCHMARKS.md). `$TINYMNIST_FIRST_CONV=always|never` pins the kernel
where bits must match or a cached choice is suspect. The sums run in another order: the gradient
agrees with autograd's to float rounding, not bit for bit.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from tinymnist.errors import TinyMnistError
from tinymnist.transforms import graph_splice
from tinymnist.transforms.graph_splice import spliced

aten = torch.ops.aten


def weight_grad_as_forward(x, grad_out, padding: list[int], groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, G, H, W), grad_out (B, G*O, H', W') -> the weight's gradient (G*O, 1, k, k) and the bias's (G*O,),
    for a convolution of stride 1 whose G groups have one input channel each."""
    batch, _, height, width = x.shape
    channels = x.permute(1, 0, 2, 3).reshape(1, groups * batch, height, width)  # (1, G*B, H, W): images as channels
    kernels = grad_out.permute(1, 0, 2, 3)  # (G*O, B, H', W'): one kernel per output channel
    weight_grad = aten.convolution(channels, kernels, None, [1, 1], padding, [1, 1], False, [0, 0], groups)
    # (1, G*O, k, k) -> (G*O, 1, k, k) with a weight's own strides: the step's new weight is the next call's
    # argument, and direct_call.py compiles anew for new strides
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


def rewrite(graph: torch.fx.Graph, choose: Callable[[torch.fx.Node], bool]) -> None:
    """Each rewritable convolution_backward of `graph` that `choose` takes becomes weight_grad_as_forward."""
    for node in list(graph.nodes):
        if node.target is aten.convolution_backward.default and rewritable(node) and choose(node):
            replace(graph, node)


CHOSEN: dict[tuple, bool] = {}  # this process's measured choices: (tensor specs, other arguments, threads) -> bool
MARGIN = 0.9  # as forward must be this much faster: near a tie, autograd's own kernel (and its sums) stays
ROUNDS = 5  # of the two kernels' timings, in turns, the order alternating; the medians are compared
WINDOW_SECONDS = 0.005  # the least time one timing spans: well above the clock's resolution


def as_forward_is_faster(node: torch.fx.Node) -> bool:
    """Whether weight_grad_as_forward takes at most MARGIN of the time of the node's own convolution_backward
    on this machine, on this many threads: timed once per process for each kernel's arguments, so that all
    the graphs a run compiles (a step, its k-step graph, each micro-batch size) make the same choice."""
    grad_out, x, weight, *options = node.args
    # Inductor lays a CPU graph's convolutions out channels-last (its layout optimization, always taken
    # with oneDNN) and hands convolution_backward a channels-last gradient and input, whatever the traced
    # strides say (for one input channel the input's strides are the same either way; for N models' grouped
    # layer they are not).
    layout = torch.channels_last if lays_out_channels_last(node.graph) else None
    arguments = (
        tensor_spec(grad_out.meta["val"], layout),
        tensor_spec(x.meta["val"], layout),
        tensor_spec(weight.meta["val"]),
    )
    key = (arguments, repr(options), torch.get_num_threads())
    if key not in CHOSEN:
        CHOSEN[key] = measured_as_forward_is_faster(arguments, options)
    return CHOSEN[key]


def measured_as_forward_is_faster(arguments: tuple, options: list) -> bool:
    padding, groups = list(options[2]), options[6]  # convolution_backward's padding and groups
    with unset_fake_temporarily():  # real tensors, inside the compile's fake mode
        generator = torch.Generator().manual_seed(0)  # not the global one, which dropout draws from
        grad_out, x, weight = (random_tensor(*spec, generator) for spec in arguments)
        kernels = (
            lambda: aten.convolution_backward.default(grad_out, x, weight, *options),
            lambda: weight_grad_as_forward(x, grad_out, padding, groups),
        )
        backward, as_forward = timed_in_turns(kernels)
    return as_forward <= MARGIN * backward


def lays_out_channels_last(graph: torch.fx.Graph) -> bool:
    """What inductor's lowering will decide for this graph's convolutions (False where it cannot tell)."""
    from torch._inductor.graph import GraphLowering

    module = graph.owning_module  # a step with torch.func.grad inside compiles as an inference graph
    return module is not None and GraphLowering.decide_layout_opt(module, is_inference=True)


def tensor_spec(fake: torch.Tensor, layout: torch.memory_format | None = None) -> tuple:
    """(shape, strides, dtype) of `fake`, or of it in `layout` (a 4-d tensor's memory format)."""
    if layout is not None and fake.dim() == 4:
        fake = fake.contiguous(memory_format=layout)
    return tuple(fake.shape), fake.stride(), fake.dtype


def random_tensor(shape: tuple, strides: tuple, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A real CPU tensor of this shape, strides (the layout decides oneDNN's speed) and dtype."""
    return torch.empty_strided(shape, strides, dtype=dtype).normal_(generator=generator)


def timed_in_turns(kernels) -> list[float]:
    """Each kernel's median seconds per call over ROUNDS windows, taken in turns so load hits all alike."""
    for kernel in kernels:  # the first call of a shape sets oneDNN up
        kernel()
    samples = [[] for _ in kernels]
    for round_ in range(ROUNDS):
        turns = list(zip(kernels, samples, strict=True))
        for kernel, times in turns if round_ % 2 == 0 else reversed(turns):
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
    outputs = spliced(graph, node, rule, [x, grad_out])
    for user in list(node.users):  # getitem 1 (the weight's gradient), 2 (the bias's); 0 (None) unused
        if user.args[1] > 0:
            user.replace_all_uses_with(outputs[user.args[1] - 1])
        graph.erase_node(user)
    graph.erase_node(node)
    if not outputs[1].users:  # a bias gradient nobody asked for (mask[2] False)
        graph.erase_node(outputs[1])


CHOICES = {"measured": as_forward_is_faster, "always": lambda node: True, "never": lambda node: False}
CHOICE_ENV = "TINYMNIST_FIRST_CONV"  # "always" or "never" pins the kernel: the same sums on every machine


@functools.cache
def inductor_pass(choice: str = "measured"):
    """`rewrite` as inductor's post-grad pass, taking the kernel CHOICES[choice] picks. Built on first use:
    importing inductor takes about 2 s, which `tinymnist info` and --help need not pay."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class FirstConvWeightGrad(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            rewrite(graph, CHOICES[choice])

        def uuid(self) -> bytes:  # inductor's cache key: this file's and the splice's text, the choice and,
            # for a measured one, the processor, so that a cache shared between machines keeps choices apart
            where = f"{choice} {processor()}" if choice == "measured" else choice
            return get_hash_for_files((__file__, graph_splice.__file__)) + where.encode()

    return FirstConvWeightGrad()


def chosen_pass():
    """inductor_pass for $TINYMNIST_FIRST_CONV."""
    return inductor_pass(environment_choice())


def environment_choice() -> str:
    """$TINYMNIST_FIRST_CONV: measured (the default, also when empty), always or never; else a one-line error."""
    choice = os.environ.get(CHOICE_ENV) or "measured"
    if choice not in CHOICES:
        raise TinyMnistError(f"${CHOICE_ENV} is {choice!r}; set it to one of {', '.join(CHOICES)}, or unset it")
    return choice


def processor() -> str:
    """The CPU as exactly as Linux tells it (vendor, family, model, stepping, name, a hash of its feature
    flags: a VM's model name alone may be a generic "Intel Xeon Processor"), else platform's words."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            first_cpu = cpuinfo.read().split("\n\n")[0]
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    fields = dict(line.split(":", 1) for line in first_cpu.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = hashlib.sha256(fields.get("flags", "").encode()).hexdigest()[:16]
    described = [fields.get(k, "") for k in ("vendor_id", "cpu family", "model", "stepping", "model name")]
    return f"{platform.machine()} {' '.join(described)} flags {flags}"
