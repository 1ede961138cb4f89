"""Transforms that make the pure step fast while keeping its signature and its result.

    compiled(step)                 torch.compile: one fused graph, compiled once (first_conv.py's and
                                   dropout_mask.py's rewrites in it)
    compiled(step, direct=True)    CPU: the same kernels, called without dynamo's entry (direct_call.py)
    micro_batched(gradient, n)     the batch's gradient as the sum of n-image chunks
    polyphase.apply                CPU: the first conv, ReLU and max-pool as one product (polyphase.py)
    GraphedStep(step)              CUDA: the step recorded once, replayed with one launch (cuda_graph.py)
    SeveralSteps(...)              CPU: up to k steps in one compiled call (several_steps.py)
    AdaptiveThreads(step, n)       CPU: the step on the thread count fastest now (cpu_threads.py)
    models_on_cores(gradient, n)   CPU: N models' gradients side by side, one per core (side_by_side.py)

`device_step` composes them as `tinymnist train` runs them; what each is worth is in BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from tinymnist.algorithm import networks, optim
from tinymnist.algorithm.config import TrainConfig
from tinymnist.algorithm.networks import MODEL_NAMES
from tinymnist.algorithm.train import Gradient, Step, make_gradient, make_step
from tinymnist.errors import TinyMnistError
from tinymnist.transforms import dropout_mask, first_conv, polyphase
from tinymnist.transforms.cpu_threads import AdaptiveThreads
from tinymnist.transforms.cuda_graph import GraphedStep
from tinymnist.transforms.direct_call import called_directly
from tinymnist.transforms.several_steps import SeveralSteps, unrolled
from tinymnist.transforms.side_by_side import models_on_cores
from tinymnist.transforms.vmap import chunk_sharers, n_models_gradient, n_models_update, on_model_axis, one_by_one
from tinymnist.transforms.wide_conv import ONE_BY_ONE, SIDE_BY_SIDE, chosen_rule

# One model's step takes its batch in one piece: on 2 cores of an AMD EPYC, lenet's 8192 images took 0.81x the time
# of chunks of 256 compiled (0.93-0.99x in shorter runs, and eager), fast's 256 images 0.78-0.87x the time of chunks
# of 64 (2026-12-07, research/micro_batch.py and polyphase_first_block.py). Chunks of 256 were ~2x faster for lenet
# when first measured, before freed_memory.py and the CPU max-pool; fast's of 64 0.71x on 2026-12-05. N models keep
# CPU_MICRO_BATCH images a chunk: 8 lenet models side by side, one per core, took 2.07x the time of 8 single runs
# with whole batches, 1.00-1.11x in chunks of 256 (tinymnist bench --seeds 1,8 and research/wide_conv.py, both
# against single runs in one piece). N convolutional models that share one chunk (vmap.chunk_sharers) split it
# between them, so that their activations stay in cache: fast's 8 in chunks of 32 each took 1.10x, of 256 each 1.51x
# (research/wide_conv.py).
CPU_MICRO_BATCH = 256
# The compiled CPU step's first block as one product (polyphase.py) where measured faster: fast's step
# 0.92-0.98x the time through the layers, lenet's 1.45-1.47x (research/polyphase_first_block.py).
CPU_POLYPHASE = {"fast"}
# Compiled graphs called directly on the CPU, without dynamo's entry on each call: mlp3's step 0.78x the time, mlp's
# 0.86x, in every round (research/direct_call.py). lenet's step in chunks (32 compiled gradients a step, its default
# until 2026-12-07, and fast's 4 before polyphase.py): 0.977x and 0.956x (fast 0.955x and 0.966x), medians of 40
# paired rounds in two runs, a few percent at most, as single rounds swing by 15% (research/one_graph_micro.py);
# cnn's one call a step 0.975x and 1.006x, noise. All are called directly: the same kernels, bit for bit (tested).
CPU_DIRECT_CALL = set(MODEL_NAMES)


def compiled(fn, direct: bool = False, cpp_wrapper: bool = False):
    """torch.compile as one graph (a graph break is a bug here); dynamic=False so that a second
    model compiled in the same process does not turn its sizes symbolic. `direct`: the same
    compile by hand, called without dynamo (direct_call.py: CPU, one process). `cpp_wrapper`:
    inductor's C++ wrapper calls the kernels, not Python, and the graph runs without the GIL
    (side_by_side.py's lanes need that; seconds more compile)."""
    options = compile_options() | ({"cpp_wrapper": True} if cpp_wrapper else {})
    if direct:
        return called_directly(fn, options)
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=first_conv.compile_with_choices, options=options)


def compile_options() -> dict:
    """inductor's options for every compile, each changing CPU graphs only: first_conv.py's rewrite of a
    first convolution's weight gradient where it measures faster (on an AMD EPYC lenet's compiled step took
    0.91x the time with it, on an Intel Xeon 1.38x, so it is measured on the machine that compiles), and
    dropout_mask.py's masks drawn by a compiled kernel (cnn's step 0.91-0.93x the time)."""
    return {
        "post_grad_custom_post_pass": first_conv.chosen_pass(),
        "joint_custom_pre_pass": dropout_mask.inductor_pass(),
    }


def micro_batched(gradient: Gradient, micro_batch: int) -> Gradient:
    """The same gradient over chunks of `micro_batch` images, each weighted by its share of the batch,
    so that each chunk's activations fit in a CPU's cache. `gradient` is compiled once per chunk shape;
    the loop stays in Python. Splitting the last dim splits N models' (N, B) indices as one's (B,)."""

    def chunked_gradient(params, images, labels, batch_idx):
        grads, loss = None, 0.0
        for chunk in batch_idx.split(micro_batch, dim=-1):  # ([N,] micro_batch) each, the last maybe shorter
            share = chunk.shape[-1] / batch_idx.shape[-1]
            chunk_grads, chunk_loss = gradient(params, images, labels, chunk)
            chunk_grads = {k: g * share for k, g in chunk_grads.items()}
            grads = chunk_grads if grads is None else {k: grads[k] + g for k, g in chunk_grads.items()}
            loss = loss + chunk_loss * share
        return grads, loss

    return chunked_gradient


def device_step(
    config: TrainConfig,
    optimizer: optim.Optimizer,
    device: torch.device,
    data_parallel: Callable[[Gradient], Gradient] | None = None,
    stacked: bool | None = None,
    adaptive_threads: bool = True,
) -> Step:
    """The step `tinymnist train` runs on `device`, with the transforms above that pay off there.

    `data_parallel` (all_reduce.all_reduced) wraps the gradient last, so this process's slice is
    micro-batched; `stacked` (default: N > 1) maps over a leading model axis; `adaptive_threads=False`
    or config.threads keeps a CPU step on the threads it finds."""
    device = torch.device(device)  # "cpu" too
    compile = use_compile(config, device)
    apply = network_apply(config, device, compile)
    gradient, update, sharers = make_gradient(config, apply), optimizer.update, 1
    stacked = config.n_models > 1 if stacked is None else stacked
    rule = chosen_rule(device, config.model) if stacked else None
    models_apart = rule in (ONE_BY_ONE, SIDE_BY_SIDE)  # one model's gradient, called per model
    if models_apart and config.n_models == 1:
        # Where N models run apart, one model runs as a single run does, on its slices: fast's step took
        # 1.01x the single step's time this way, 1.03-1.05x with the slices taken inside the compiled
        # graphs (vmap.n_models_gradient's N = 1); mlp3's 1.48x this way (a small step pays for the
        # slicing in Python), 1.11x inside. `train` never stacks one model: this is bench --seeds 1's.
        single = dataclasses.replace(config, steps_per_call=1)  # the loop gives a stacked step one batch a call
        return on_model_axis(device_step(single, optimizer, device, data_parallel, False, adaptive_threads))
    if stacked:
        update = n_models_update(update, config.n_models)
    if stacked and not models_apart:
        gradient, sharers = n_models_gradient(config, device, apply), chunk_sharers(config)  # sharers: of one chunk
    # Side by side needs the compiled graph without the GIL, and whole rounds of a model per thread:
    # fast, 3 models on 2 threads, ran 0.85x the speed of one at a time (BENCHMARKS.md).
    threads = torch.get_num_threads()
    side_by_side = rule == SIDE_BY_SIDE and compile and threads > 1 and config.n_models % threads == 0
    # Not with data parallelism: direct_call traces the step on fake tensors, and the all-reduce is untried there.
    direct = device.type == "cpu" and config.model in CPU_DIRECT_CALL and data_parallel is None
    micro_batch = config.micro_batch
    if micro_batch is None:
        micro_batch = default_micro_batch(device, config.n_models, sharers)
    split = 0 < micro_batch < config.batch_size
    if models_apart or split:  # compile the pieces; the loops run in Python
        if compile:
            gradient = compiled(gradient, direct, cpp_wrapper=side_by_side)  # side by side: without the GIL
            update = compiled(update, direct)
        if split:
            gradient = micro_batched(gradient, micro_batch)
        compile = False
    if side_by_side:  # one model's compiled gradient, a model per core at a time
        gradient = models_on_cores(gradient, workers=threads)
    elif models_apart:  # one model's compiled gradient, called for each model in turn
        gradient = one_by_one(gradient)
    if data_parallel:
        gradient = data_parallel(gradient)
    step = make_step(gradient, optim.Optimizer(optimizer.init, update))
    if device.type == "cuda" and config.cuda_graphs:
        return GraphedStep(step, compile)
    k = 1 if stacked else steps_per_call(config, device, data_parallel is None)
    if compile and k > 1:
        # k steps' kernels called from C++, not Python: research/several_steps.py measures both
        step = SeveralSteps(compiled(step, direct), compiled(unrolled(step, k), direct, cpp_wrapper=True), k)
    elif compile:
        step = compiled(step, direct)
    # Not with k steps a call: each thread count compiles its own k-step graph, up to a minute, mid-run.
    adaptive = adaptive_threads and config.threads is None and k == 1
    if adaptive and device.type == "cpu" and torch.get_num_threads() > 1:
        return AdaptiveThreads(step, most=torch.get_num_threads(), compiles=use_compile(config, device))
    return step


def network_apply(config: TrainConfig, device: torch.device, compile: bool) -> Callable[..., torch.Tensor]:
    """The network's forward for the step: polyphase.apply where CPU_POLYPHASE takes it, compiled on the
    CPU, where it was measured; else networks.apply."""
    if compile and device.type == "cpu" and config.model in CPU_POLYPHASE:
        return polyphase.apply
    return networks.apply


def steps_per_call(config: TrainConfig, device: torch.device, one_process: bool = True) -> int:
    """--steps-per-call, unless several_steps_refused or a dry run (one step: the k-step graph would be
    compiled for nothing); else 1. Default 1: k = 10 ran mlp 1.34x and mlp3 2.01x as fast on 2 cores, but
    its graph compiles for 33-49 s the first time, more than it saves in the recipes' runs (BENCHMARKS.md,
    "Several steps per call")."""
    if config.steps_per_call == 1 or config.dry_run or several_steps_refused(config, device, one_process):
        return 1
    return config.steps_per_call


def several_steps_cut_short(config: TrainConfig, batches_per_epoch: int | None = None) -> str | None:
    """Why no call could take --steps-per-call steps, as an error, or None: a call ends at every log line,
    evaluation and epoch end (the loop reads the device there), so k steps would be compiled and never run.
    Without `batches_per_epoch` (before the data is loaded) the flags alone are checked."""
    k = config.steps_per_call
    for what, steps, or_else in (
        (f"--log-interval {config.log_interval}", config.log_interval, "a larger --log-interval"),
        (f"--eval-every {config.eval_every}", config.eval_every, "a larger --eval-every"),
        (f"an epoch of {batches_per_epoch} batches", batches_per_epoch, "a smaller --batch-size"),
    ):
        if steps and steps < k:
            return (
                f"--steps-per-call {k}: a call ends at every log line, evaluation and epoch end, and {what} "
                f"ends it after {steps} steps; pass --steps-per-call {steps} or fewer, or {or_else}"
            )
    return None


def several_steps_refused(config: TrainConfig, device: torch.device, one_process: bool = True) -> str | None:
    """Why several steps per call cannot run here (one model, compiled, CPU, one process), or None."""
    micro_batch = config.micro_batch if config.micro_batch is not None else default_micro_batch(device)
    if device.type != "cpu":
        return "it runs on the CPU only (--device cpu)"
    if not use_compile(config, device):
        return "it needs the compiled step (--compile, and a C++ compiler)"
    if 0 < micro_batch < config.batch_size:
        return f"the batch of {config.batch_size} is split into micro-batches of {micro_batch} (pass --micro-batch 0)"
    if config.n_models > 1:
        return "it is for a single model's run (no --seeds or --lr list)"
    if not one_process:
        return "it runs in one process, not under torchrun"
    return None


def use_compile(config: TrainConfig, device: torch.device) -> bool:
    """--compile/--no-compile, else compile on CUDA and on a CPU with a C++ compiler (faster than eager
    in `tinymnist bench`); MPS stays eager, unmeasured."""
    if config.compile is not None:
        return config.compile
    return device.type == "cuda" or (device.type == "cpu" and cpu_compiler() is not None)


def default_micro_batch(device: torch.device, models: int = 1, sharers: int = 1) -> int:
    """Images per model and chunk, 0 for the whole batch: one model's step takes it whole; on the CPU,
    N models' steps take chunks of CPU_MICRO_BATCH, split between the `sharers` models that share
    one chunk (vmap.chunk_sharers)."""
    return max(1, CPU_MICRO_BATCH // sharers) if device.type == "cpu" and models > 1 else 0


def use_tf32_matmuls(device: torch.device) -> None:
    """On CUDA, float32 matmuls on TF32 tensor cores, as cuDNN's convolutions already are
    (cnn's epoch measured faster on an H200, BENCHMARKS.md)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True


def cpu_compiler() -> str | None:
    """The C++ compiler inductor builds CPU kernels with, or None (else it fails with a long traceback).
    Imported here: inductor takes most of a second to import, and `tinymnist info` never needs it."""
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return None


def check_compilable(device: torch.device, eager_too: bool = True) -> None:
    """Raise a one-line error for compiling on a CPU without a C++ compiler; `eager_too`: suggest eager."""
    if device.type == "cpu" and cpu_compiler() is None:
        raise TinyMnistError(
            "torch.compile on the CPU needs a C++ compiler ($CXX, g++ or clang++) and finds none; install one"
            + (" or pass --no-compile" if eager_too else "")
        )
