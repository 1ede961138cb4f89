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
There the compiled CPU steps took 0.77-0.78x the time for fast (whose first block is one product
since, polyphase.py, with no convolution to rewrite), 0.91-0.92x for lenet, 0.91-0.97x for cnn. On
a 2-core Intel Xeon oneDNN's own backward was the faster kernel, and the rewrite made the
steps 1.27x (fast), 1.38x (lenet) and 1.07x (cnn) slower (research/first_conv.py, BENCHMARKS.md).

So the choice is measured (`as_forward_is_faster`): for each convolution the pass could rewrite, both
kernels are timed on random tensors of the shapes and of the layout the compiled code will hand them
(inductor lays a CPU graph's convolutions out channels-last), in turns, and the rewrite is taken only where
it is clearly faster (MARGIN). Each choice is made once a process for its arguments and thread count, so
every graph a process compiles (a step, its k-step graph, each micro-batch size) agrees.

The timing happens before the compile starts, not inside the pass: `compile_with_choices`, the backend
speed.compiled hands torch.compile, runs the graph once on fake tensors to find the convolutions, times
them, and the pass's cache key (`uuid`) holds the choices. Inductor's caches keep compiled graphs for later
processes, and a choice made inside the compile could not be part of the key: a graph cached with a wrong
choice then served every later process (the timing is noisy near MARGIN: cnn's first layer measured
0.68-1.14x in eight processes on a 2-core AMD EPYC), and fast's step ran at 61-71 ms that way against
54-56 ms compiled anew (research/first_conv_choice.py, BENCHMARKS.md). Now a process that measures
otherwise compiles its own graph. `$TINYMNIST_FIRST_CONV=always|never` pins the kernel where bits must
match. The sums run in another order: the gradient agrees with autograd's to float rounding, not bit
for bit.
"""

from __future__ import annotations

import functools
import operator
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_leaves, tree_map_only

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
    """A convolution_backward that `rewritable_call` takes, traced with fake values of fixed sizes, whose
    used outputs are all asked for (else it is left as it is)."""
    grad_out, x, weight, *options = node.args
    values = [arg.meta.get("val") for arg in (grad_out, x, weight)]
    if not all(isinstance(v, FakeTensor) and all(isinstance(d, int) for d in v.shape) for v in values):
        return False
    mask = options[-1]
    return rewritable_call(*values, options) and all(
        user.target is operator.getitem and (mask[user.args[1]] or not user.users) for user in node.users
    )


def rewritable_call(grad_out, x, weight, options) -> bool:
    """convolution_backward's arguments on the CPU, of stride 1, one input channel per group, no input
    gradient asked."""
    _, stride, _, dilation, transposed, _, _, mask = options
    return (
        x.device.type == "cpu"
        and weight.shape[1] == 1  # (O, C_in / groups, k, k)
        and list(stride) == list(dilation) == [1, 1]
        and not transposed
        and not mask[0]  # the input's gradient: none asked
        and mask[1]
    )


def rewrite(graph: torch.fx.Graph, choose: Callable[[torch.fx.Node], bool]) -> None:
    """Each rewritable convolution_backward of `graph` that `choose` takes becomes weight_grad_as_forward."""
    for node in list(graph.nodes):
        if node.target is aten.convolution_backward.default and rewritable(node) and choose(node):
            replace(graph, node)


CHOSEN: dict[tuple, bool] = {}  # this process's measurements: choice_key -> whether as forward is faster
IN_FORCE: dict[tuple, bool] | None = None  # the choices of the graph being compiled, measured before its compile
# One compile at a time holds IN_FORCE: dynamo's own lock does not cover direct_call.py's compiles.
# Reentrant: a compile that compiles another graph in its thread keeps the outer one's choices for after.
COMPILING = threading.RLock()
UNCHOSEN: set[tuple] = set()  # keys the measured pass met with no choice in force (it kept oneDNN's backward)
MARGIN = 0.9  # as forward must be this much faster: near a tie, autograd's own kernel (and its sums) stays
ROUNDS = 5  # of the two kernels' timings, in turns, the order alternating; the medians are compared
WINDOW_SECONDS = 0.005  # the least time one timing spans: well above the clock's resolution


def compile_with_choices(graph_module: torch.fx.GraphModule, example_inputs: list, options: dict | None = None):
    """torch.compile's backend for tinymnist's compiles (and direct_call's compile): inductor with `options`,
    the measured pass's choices for this graph timed before the compile starts and in IN_FORCE while it
    runs, so that inductor's cache keys (the pass's uuid) hold them and a graph compiled in one process
    cannot hand its choice to another."""
    global IN_FORCE
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx

    options = options or {}
    measured = getattr(options.get("post_grad_custom_post_pass"), "measured", False)
    on_cpu = all(x.device.type == "cpu" for x in tree_leaves(example_inputs) if isinstance(x, torch.Tensor))
    with config.patch(options):  # the keys' layout as the compile will decide it: options may change it
        keys = first_convolutions(graph_module, example_inputs) if measured and on_cpu else []
    with COMPILING:
        IN_FORCE, outside = {key: as_forward_is_faster(key) for key in keys}, IN_FORCE
        try:
            return compile_fx(graph_module, example_inputs, config_patches=options)
        finally:
            IN_FORCE = outside


def first_convolutions(graph_module: torch.fx.GraphModule, example_inputs: list) -> list[tuple]:
    """The choice_key of each rewritable convolution_backward the graph computes: the graph run once on fake
    tensors (shapes only: no arithmetic, no random numbers drawn), its calls recorded. A graph torch.compile
    hands its backend computes the backward as autograd does it, with the arguments the traced graph gets."""
    from torch._guards import detect_fake_mode
    from torch.utils._python_dispatch import TorchDispatchMode

    keys = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is aten.convolution_backward.default and rewritable_call(*args[:3], args[3:]):
                keys.append(choice_key(*args[:3], args[3:]))
            return func(*args, **(kwargs or {}))

    fake_mode = detect_fake_mode(example_inputs) or FakeTensorMode()
    fakes = tree_map_only(
        torch.Tensor, lambda x: x if isinstance(x, FakeTensor) else fake_mode.from_tensor(x), example_inputs
    )
    with fake_mode, Recorder():
        graph_module(*fakes)
    return keys


def chosen_in_force(node: torch.fx.Node) -> bool:
    """The measured pass's choice: the one measured for this node's arguments before the compile, else
    (a compile outside compile_with_choices) oneDNN's backward, the key recorded in UNCHOSEN."""
    key = node_key(node)
    if IN_FORCE is None or key not in IN_FORCE:
        UNCHOSEN.add(key)
        return False
    return IN_FORCE[key]


def node_key(node: torch.fx.Node) -> tuple:
    """choice_key of a traced convolution_backward."""
    grad_out, x, weight, *options = node.args
    return choice_key(grad_out.meta["val"], x.meta["val"], weight.meta["val"], options)


def choice_key(grad_out, x, weight, options) -> tuple:
    """What a choice is measured for: the three tensors' specs in the layout the compiled code hands the
    kernel, the other arguments (lists as tuples) and this process's thread count."""
    # Inductor lays a CPU graph's convolutions out channels-last (its layout optimization, always taken
    # with oneDNN) and hands convolution_backward a channels-last gradient and input, whatever the traced
    # strides say (for one input channel the input's strides are the same either way; for N models' grouped
    # layer they are not).
    layout = torch.channels_last if lays_out_channels_last() else None
    arguments = (tensor_spec(grad_out, layout), tensor_spec(x, layout), tensor_spec(weight))
    others = tuple(tuple(o) if isinstance(o, list) else o for o in options)
    return arguments, others, torch.get_num_threads()


def as_forward_is_faster(key: tuple) -> bool:
    """Whether weight_grad_as_forward takes at most MARGIN of the time of convolution_backward for the
    arguments of `key` (a choice_key) on this machine, on this many threads: timed once per process for
    each key, so that all the graphs a run compiles (a step, its k-step graph, each micro-batch size)
    make the same choice."""
    if key not in CHOSEN:
        arguments, options, _ = key
        CHOSEN[key] = measured_as_forward_is_faster(arguments, options)
    return CHOSEN[key]


def measured_as_forward_is_faster(arguments: tuple, options: tuple) -> bool:
    padding, groups = list(options[2]), options[6]  # convolution_backward's padding and groups
    generator = torch.Generator().manual_seed(0)  # not the global one, which dropout draws from
    grad_out, x, weight = (random_tensor(*spec, generator) for spec in arguments)
    kernels = (
        lambda: aten.convolution_backward.default(grad_out, x, weight, *options),
        lambda: weight_grad_as_forward(x, grad_out, padding, groups),
    )
    backward, as_forward = timed_in_turns(kernels)
    return as_forward <= MARGIN * backward


def lays_out_channels_last() -> bool:
    """What inductor decides for a CPU graph's convolutions (GraphLowering.decide_layout_opt, whose CPU rule
    this is: channels-last wherever oneDNN is on, unless its layout optimization is turned off)."""
    from torch._inductor import config

    onednn = torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()
    return config.layout_optimization and (config.force_layout_optimization or onednn)


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


CHOICES = {"measured": chosen_in_force, "always": lambda node: True, "never": lambda node: False}
CHOICE_ENV = "TINYMNIST_FIRST_CONV"  # "always" or "never" pins the kernel: the same sums on every machine


@functools.cache
def inductor_pass(choice: str = "measured"):
    """`rewrite` as inductor's post-grad pass, taking the kernel CHOICES[choice] picks. Built on first use:
    importing inductor takes about 2 s, which `tinymnist info` and --help need not pay."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class FirstConvWeightGrad(CustomGraphPass):
        measured = choice == "measured"  # compile_with_choices times the choices before the compile for such a pass

        def __call__(self, graph: torch.fx.Graph) -> None:
            rewrite(graph, CHOICES[choice])

        def uuid(self) -> bytes:  # inductor's cache key: this file's and the splice's text, the choice and,
            # for a measured one, the choices in force for the graph being compiled
            measured = sorted(repr(item) for item in (IN_FORCE or {}).items())
            where = f"{choice} {measured}" if choice == "measured" else choice
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
