"""Can max-pooling's compiled CPU kernels get faster? Other formulations and inductor settings, in the step.

In `fast`'s and `lenet`'s compiled CPU steps the kernels inductor generates around max-pooling (the
argmax forward of algorithm/cpu_pool.py, its backward fused with ReLU's and the bias gradient) run
as scalar C++ loops: the gradient of an input at (h, w) reads its window's values at (h // 2, w // 2),
which inductor's vectorizer does not take. This times `train`'s step (tool/floor.cpu_steps: compiled,
micro-batched, fixed threads, denormals flushed) against the same step compiled with:

    channels-last    cpu_pool.first_max_pool2d on the input made channels-last first (C innermost)
    separable        max over each row's pair, then over the two rows' maxima (first maximum on ties,
                     as F.max_pool2d), with torch.where: no argmax, no index tensor
    separable-cl     the same on a channels-last input
    byte-argmax      cpu_pool's argmax kept as uint8 rather than int64
    aten             F.max_pool2d's own forward and backward kernels (vectorized), as ops inductor calls as they are
    force-layout     inductor's force_layout_optimization: a control, as inductor already lays a CPU graph's
                     convolutions out channels-last with oneDNN
    no-tiling-limit  inductor's cpp.enable_tiling_heuristics off (vectorize despite strided loads)
    no-layout-opt    inductor's layout_optimization off: the convolutions in the graph's own layout (NCHW)

each swapped in while its step compiles and while it is timed (dynamo guards on the pool function: a
step called with train's pool back in place runs train's graph), the settings passed in the step's
compile options (a step compiled with options equal to train's reuses its graph); all timed in turns, windows of at
least `--seconds`, `--rounds` rounds; medians and the median of the rounds' ratios to train's step.

    python research/pool_variants.py --data-dir DIR [--models fast,lenet] [--rounds 5] [--seconds 0.5]
        [--variants a,b]
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from in_turns import print_against, steps_in_turns, turns_parser  # research/in_turns.py

from tinymnist.algorithm import cpu_pool
from tinymnist.tool.bench import bench_data
from tinymnist.transforms import speed
from tinymnist.transforms.denormals import flush_denormals

aten = torch.ops.aten
ARGMAX_POOL = cpu_pool.first_max_pool2d


def separable(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """2x2 max-pool as two pairwise maxima, the first of a pair kept on ties: row-major first maximum."""
    assert kernel == 2
    n, channels, height, width = x.shape
    pairs = x.view(n, channels, height, width // 2, 2)  # (N, C, H, W/2, 2): each row's pairs
    left, right = pairs[..., 0], pairs[..., 1]
    row_max = torch.where(left >= right, left, right)  # (N, C, H, W/2)
    rows = row_max.view(n, channels, height // 2, 2, width // 2)  # (N, C, H/2, 2, W/2)
    top, bottom = rows[:, :, :, 0], rows[:, :, :, 1]
    return torch.where(top >= bottom, top, bottom)  # (N, C, H/2, W/2)


def byte_argmax(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """cpu_pool.first_max_pool2d with the window's argmax kept as one byte, not eight: less memory traffic."""
    n, channels, height, width = x.shape
    rows, cols = height // kernel, width // kernel
    windows = x.view(n, channels, rows, kernel, cols, kernel).transpose(3, 4)  # (N, C, H', W', k, k)
    windows = windows.reshape(n, channels, rows, cols, kernel * kernel)  # (N, C, H', W', k*k)
    first_max = windows.argmax(dim=-1, keepdim=True).to(torch.uint8)  # (N, C, H', W', 1)
    picked = torch.arange(kernel * kernel, device=x.device, dtype=torch.uint8) == first_max
    return torch.where(picked, windows, 0).sum(dim=-1)  # (N, C, H', W')


@torch.library.custom_op("tinymnist_research::max_pool", mutates_args=())
def aten_max_pool(x: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """F.max_pool2d's own kernel, opaque to inductor: (values, flat indices), each (N, C, H', W')."""
    return aten.max_pool2d_with_indices(x, [kernel, kernel], [kernel, kernel])


@aten_max_pool.register_fake
def _(x, kernel):
    return aten.max_pool2d_with_indices(x, [kernel, kernel], [kernel, kernel])


@torch.library.custom_op("tinymnist_research::max_pool_backward", mutates_args=())
def aten_max_pool_backward(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, kernel: int) -> torch.Tensor:
    """F.max_pool2d's own backward kernel, opaque to inductor: (N, C, H, W), like x."""
    window = [kernel, kernel]
    return aten.max_pool2d_with_indices_backward(grad, x, window, window, [0, 0], [1, 1], False, indices)


@aten_max_pool_backward.register_fake
def _(grad, x, indices, kernel):
    return torch.empty_like(x)


class AtenMaxPool(torch.autograd.Function):
    """The two opaque ops as one differentiable pool (setup_context: torch.func.grad needs it)."""

    @staticmethod
    def forward(x, kernel):
        return aten_max_pool(x, kernel)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output[1])
        ctx.kernel = inputs[1]
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad, _):
        x, indices = ctx.saved_tensors
        return aten_max_pool_backward(grad, x, indices, ctx.kernel), None


def aten_pool(x: torch.Tensor, kernel: int) -> torch.Tensor:
    return AtenMaxPool.apply(x, kernel)[0]


def channels_last(pool):
    return lambda x, kernel: pool(x.contiguous(memory_format=torch.channels_last), kernel)


def swapped_pool(pool):
    return lambda: mock.patch.object(cpu_pool, "first_max_pool2d", pool)


def inductor_setting(**settings):
    """The settings in the step's compile options: a torch._inductor.config.patch around the compile alone
    would change nothing, as a torch.compile with options equal to train's step's shares its compiled graph."""
    options = speed.compile_options() | settings
    return lambda: mock.patch.object(speed, "compile_options", lambda: options)


VARIANTS = {
    "train's": contextlib.nullcontext,
    "channels-last": swapped_pool(channels_last(ARGMAX_POOL)),
    "separable": swapped_pool(separable),
    "separable-cl": swapped_pool(channels_last(separable)),
    "byte-argmax": swapped_pool(byte_argmax),
    "aten": swapped_pool(aten_pool),
    "force-layout": inductor_setting(force_layout_optimization=True),
    "no-tiling-limit": inductor_setting(**{"cpp.enable_tiling_heuristics": False}),
    "no-layout-opt": inductor_setting(layout_optimization=False),
}


def main() -> None:
    parser = turns_parser(__doc__, seconds=0.5)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which, comma-separated (train's always)")
    args = parser.parse_args()
    variants = {name: VARIANTS[name] for name in ["train's", *args.variants.split(",")]}
    flush_denormals()  # as `train` runs
    torch._dynamo.config.recompile_limit = 64  # one step function, compiled once per variant
    torch._inductor.config.fx_graph_cache = False  # a variant must not reuse another's cached graph
    images, labels, source = bench_data(args.data_dir, torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data: {source}")
    for model in args.models.split(","):
        print_against(model, steps_in_turns(model, images, labels, variants, args.rounds, args.seconds))


if __name__ == "__main__":
    main()
