"""Would a convolution's backward run faster split by its outputs, each in the layout it is fastest in?

Inductor lays a CPU graph's convolutions out channels-last and computes a convolution's input, weight
and bias gradients in one oneDNN call. Timed alone (eager, random tensors of the recipes' shapes, at the
micro-batch the step runs), lenet's conv2 (6 -> 16 channels, 5x5, 256 images) took longer that way than
its input gradient in NCHW plus its weight gradient channels-last plus the bias gradient as a sum. This
prints those kernel times, then times train's step (tool/floor.cpu_steps) against the same step compiled
with a post-grad pass that splits the input gradient off (an opaque op that runs NCHW; the weight and
bias gradients stay one call, as inductor lays it out), in turns in one process, `--rounds` windows of
at least `--seconds` each: medians and the range of the rounds' ratios to train's step (below 1: faster).

    python research/conv_backward_split.py --data-dir DIR [--models lenet,cnn,fast] [--rounds 9] [--seconds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
from in_turns import print_against, steps_in_turns  # research/in_turns.py
from torch._inductor.custom_graph_pass import CustomGraphPass

from tinymnist.tool.bench import bench_data
from tinymnist.transforms import speed
from tinymnist.transforms.denormals import flush_denormals

aten = torch.ops.aten

# (images a call, in channels, out channels, kernel, input height and width) of each conv2, as the step runs it
CONV2 = {"lenet": (256, 6, 16, 5, 14), "cnn": (64, 32, 64, 3, 26), "fast": (64, 24, 32, 3, 12)}
LAYOUTS = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}
MASKS = {"all three": [True, True, True], "input": [True, False, False], "weight": [False, True, False]}


@torch.library.custom_op("tinymnist_research::conv_input_grad", mutates_args=())
def conv_input_grad(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int], groups: int
) -> torch.Tensor:
    """The input gradient alone, on NCHW tensors: inductor calls an opaque op as it is."""
    mask = [True, False, False]
    args = (stride, padding, [1, 1], False, [0, 0], groups, mask)
    return aten.convolution_backward(grad_out.contiguous(), x.contiguous(), weight.contiguous(), None, *args)[0]


@conv_input_grad.register_fake
def _(grad_out, x, weight, stride, padding, groups):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)  # NCHW


def split(graph: torch.fx.Graph) -> None:
    """Each CPU convolution_backward with an input gradient becomes conv_input_grad plus a
    convolution_backward of the weight and bias gradients alone."""
    for node in list(graph.nodes):
        if node.target is not aten.convolution_backward.default:
            continue
        grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed, out_pad, groups, mask = node.args
        plain = list(dilation) == [1, 1] and not transposed and list(out_pad) == [0, 0]  # what conv_input_grad runs
        if not mask[0] or not plain or x.meta["val"].device.type != "cpu":
            continue
        with graph.inserting_before(node):
            args = (grad_out, x, weight, list(stride), list(padding), groups)
            input_grad = graph.call_function(torch.ops.tinymnist_research.conv_input_grad.default, args)
            input_grad.meta["val"] = torch.empty_like(x.meta["val"], memory_format=torch.contiguous_format)
            rest = None
            if mask[1] or mask[2]:
                args = (grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed, out_pad, groups)
                rest = graph.call_function(aten.convolution_backward.default, (*args, [False, mask[1], mask[2]]))
                rest.meta = dict(node.meta)
        for user in list(node.users):  # getitem 0, 1, 2
            if user.args[1] == 0:
                user.replace_all_uses_with(input_grad)
                graph.erase_node(user)
            else:
                user.args = (rest, user.args[1])
        graph.erase_node(node)


class SplitPass(CustomGraphPass):
    def __call__(self, graph: torch.fx.Graph) -> None:
        split(graph)

    def uuid(self) -> bytes:  # inductor's cache key: this file's text, so an edited pass compiles anew
        return hashlib.sha256(Path(__file__).read_bytes()).digest()


def with_split():
    """The step's compile options plus the split (other options than train's: a graph of its own)."""
    options = speed.compile_options() | {"post_grad_custom_pre_pass": SplitPass()}
    return mock.patch.object(speed, "compile_options", lambda: options)


def ms_per_call(fn, rounds: int = 7) -> float:
    fn()
    times = []
    for _ in range(rounds):
        started, calls = time.perf_counter(), 0
        while time.perf_counter() - started < 0.05:
            fn()
            calls += 1
        times.append((time.perf_counter() - started) / calls * 1e3)
    return statistics.median(times)


def print_kernels(model: str) -> None:
    batch, c_in, c_out, k, size = CONV2[model]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, size, size, generator=g)  # (B, C_in, H, W)
    grad_out = torch.randn(batch, c_out, size - k + 1, size - k + 1, generator=g)  # (B, C_out, H', W')
    weight = torch.randn(c_out, c_in, k, k, generator=g)
    row = []
    for layout_name, layout in LAYOUTS.items():
        args = [t.contiguous(memory_format=layout) for t in (grad_out, x, weight)]
        for mask_name, mask in MASKS.items():
            rest = ([c_out], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, mask)
            ms = ms_per_call(lambda: aten.convolution_backward(*args, *rest))  # noqa: B023
            row.append(f"{layout_name} {mask_name} {ms:.2f}")
    row.append(f"bias as a sum {ms_per_call(lambda: grad_out.sum((0, 2, 3))):.2f}")
    print(f"{model} conv2 backward, ms a call: " + ", ".join(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--models", default="lenet,cnn,fast")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=3.0, help="the least time of one timing window")
    args = parser.parse_args()
    flush_denormals()  # as `train` runs
    images, labels, source = bench_data(args.data_dir, torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data: {source}")
    ways = {"train's": contextlib.nullcontext, "split": with_split}
    for model in args.models.split(","):
        print_kernels(model)
        print_against(model, steps_in_turns(model, images, labels, ways, args.rounds, args.seconds))


if __name__ == "__main__":
    main()
