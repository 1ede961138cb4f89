"""The training loop: one compiled pure step, on-device batching, exact evaluation.

Everything the loop carries from step to step is data, `(params, opt_state)`: plain
tensor dicts that the step consumes and returns anew. Nothing is mutated, so a
checkpoint is those dicts plus the RNG state, and a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from tinymnist import graphs, models, optim
from tinymnist.config import TrainConfig
from tinymnist.data import MNIST
from tinymnist.devices import cpu_compiler, synchronize
from tinymnist.errors import TinyMnistError

Params = dict[str, torch.Tensor]
OptState = dict  # the optimizer's nested dict of tensors (see optim.py)
Step = Callable[..., tuple[Params, OptState, torch.Tensor]]


def scale_images(images_u8: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 pixels (B, 28, 28) -> the float input the recipe trains on, (B, 1, 28, 28)."""
    x = images_u8.unsqueeze(1).float() / 255  # (B, 1, 28, 28) in 0..1
    return (x - mean) / std


def recipe_loss(model: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The recipe's loss: NLL where the network ends in log_softmax, else cross-entropy."""
    return F.nll_loss if models.OUTPUTS_LOG_PROBS[model] else F.cross_entropy


def make_step(
    config: TrainConfig, optimizer: optim.Optimizer, compile: bool, cuda_graph: bool = False, micro_batch: int = 0
) -> Step:
    """Build `step(params, opt_state, images, labels, batch_idx, lr) -> (params, opt_state, loss)`.

    The batch gather `images[batch_idx]` happens inside the step so that, compiled,
    it fuses with the uint8 -> float scaling and no float copy of a batch is made.
    `lr` is a 0-d tensor: a Python float would be baked into the compiled graph and
    every StepLR change would recompile it. A `micro_batch` smaller than the batch
    computes the gradient in chunks of that many images (see accumulated_step).
    """
    model, recipe = config.model, config.recipe
    loss_fn = recipe_loss(model)

    def batch_loss(params: Params, images_u8: torch.Tensor, labels: torch.Tensor, share: float) -> torch.Tensor:
        x = scale_images(images_u8, recipe.mean, recipe.std)  # (B, 1, 28, 28)
        out = models.apply(model, params, x, train=True)  # (B, 10)
        return loss_fn(out, labels) * share  # share: these images' fraction of the batch

    grad_and_loss = torch.func.grad_and_value(batch_loss)

    def gradient(params, images, labels, batch_idx, share=1.0):
        return grad_and_loss(params, images[batch_idx], labels[batch_idx], share)

    def step(params, opt_state, images, labels, batch_idx, lr):
        grads, loss = gradient(params, images, labels, batch_idx)
        params, opt_state = optimizer.update(grads, opt_state, params, lr)
        return params, opt_state, loss

    def compiled(fn):
        # dynamic=False: every call has the same shapes, and a second model compiled in the
        # same process (tinymnist bench) must not turn its sizes symbolic.
        return torch.compile(fn, fullgraph=True, dynamic=False) if compile else fn

    if 0 < micro_batch < config.batch_size:
        chunk_gradient, update = compiled(gradient), compiled(optimizer.update)

        def accumulated_step(params, opt_state, images, labels, batch_idx, lr):
            """The batch's gradient as the sum of its chunks' gradients, each chunk's mean
            loss weighted by its share of the batch: the same gradient as one pass, but
            each chunk's activations fit in a CPU's cache (lenet's batch of 8192 does not)."""
            grads, loss = None, 0.0
            for chunk in batch_idx.split(micro_batch):  # (micro_batch,) each, the last maybe shorter
                chunk_grads, chunk_loss = chunk_gradient(params, images, labels, chunk, len(chunk) / len(batch_idx))
                grads = chunk_grads if grads is None else {k: grads[k] + g for k, g in chunk_grads.items()}
                loss = loss + chunk_loss
            params, opt_state = update(grads, opt_state, params, lr)
            return params, opt_state, loss

        return graphs.GraphedStep(accumulated_step, compile=False) if cuda_graph else accumulated_step
    if cuda_graph:  # CUDA: the same step, replayed as one graph (graphs.py)
        return graphs.GraphedStep(step, compile)
    return compiled(step)


def device_step(config: TrainConfig, optimizer: optim.Optimizer, device: torch.device, compile: bool) -> Step:
    """The step `train` runs on `device`: a CUDA graph on CUDA (unless --no-cuda-graphs),
    micro-batches as --micro-batch says or as suits the device."""
    cuda_graph = device.type == "cuda" and config.cuda_graphs
    micro_batch = config.micro_batch if config.micro_batch is not None else default_micro_batch(device)
    return make_step(config, optimizer, compile, cuda_graph, micro_batch)


def default_micro_batch(device: torch.device) -> int:
    """0 (the whole batch at once) but on the CPU, where `tinymnist bench` measured
    lenet's 8192-image step about twice as fast in chunks of 256 (BENCHMARKS.md)."""
    return 256 if device.type == "cpu" else 0


def epoch_batches(n_images: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """This epoch's shuffled image indices as (steps, batch_size), from torch's generator.

    Every image appears once; when batch_size does not divide n_images, the last row
    is topped up with images from a second permutation, so every step has the same
    shape and the compiled step never sees a second one.
    """
    order = torch.randperm(n_images, device=device)  # (N,)
    steps = math.ceil(n_images / batch_size)
    shortfall = steps * batch_size - n_images
    if shortfall:
        top_up = torch.randperm(n_images, device=device)[:shortfall]  # (shortfall,)
        order = torch.cat([order, top_up])
    return order.view(steps, batch_size)  # (steps, B)


class Evaluation(NamedTuple):
    loss: float  # mean loss per test image
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


@torch.inference_mode()
def evaluate(config: TrainConfig, params: Params, images: torch.Tensor, labels: torch.Tensor) -> Evaluation:
    """Loss and correct count over the whole test set, in test_batch_size chunks.

    Losses are summed and correct predictions counted as integers on the device,
    then read once: no per-chunk averaging, so the result is exact for any chunk size.
    """
    recipe = config.recipe
    loss_fn = recipe_loss(config.model)
    loss_sum = torch.zeros((), device=images.device, dtype=torch.float64)
    correct = torch.zeros((), device=images.device, dtype=torch.int64)
    for start in range(0, len(images), config.test_batch_size):
        x = scale_images(images[start : start + config.test_batch_size], recipe.mean, recipe.std)
        y = labels[start : start + config.test_batch_size]  # (C,)
        out = models.apply(config.model, params, x)  # (C, 10)
        loss_sum += loss_fn(out, y, reduction="sum")
        correct += (out.argmax(dim=1) == y).sum()
    total = len(images)
    return Evaluation(loss_sum.item() / total, int(correct.item()), total)


@dataclass(frozen=True)
class TrainState:
    """What a checkpoint holds: the run's data after `epoch` completed epochs."""

    params: Params
    opt_state: OptState
    epoch: int
    rng: dict  # torch generator states, see capture_rng


def capture_rng(device: torch.device) -> dict:
    """The generators' states: shuffling and dropout continue exactly from here."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def initial_state(config: TrainConfig, optimizer: optim.Optimizer, device: torch.device) -> TrainState:
    """Epoch 0: fresh parameters from the seed, fresh optimizer state, seeded generators."""
    torch.manual_seed(config.seed)
    params = models.init_params(config.model, config.seed, device)
    return TrainState(params, optimizer.init(params), 0, capture_rng(device))


def make_optimizer(config: TrainConfig) -> optim.Optimizer:
    return optim.OPTIMIZERS[config.optimizer]()


class Reporter(Protocol):
    """Where the loop's progress goes: log lines, a progress bar, a metrics file."""

    def epoch_started(self, epoch: int, steps: int, lr: float) -> None: ...
    def logged(self, epoch: int, step: int, images_seen: int, n_train: int, loss: float) -> None: ...
    def evaluated(self, record: dict) -> None: ...
    def epoch_ended(self, state: TrainState) -> None: ...


class NonFiniteLoss(TinyMnistError):
    pass


def fit(config: TrainConfig, data: MNIST, device: torch.device, reporter: Reporter, state: TrainState) -> dict:
    """Train from `state` up to config.epochs; return the final state and timing totals.

    The first step compiles (when compiling), so it is timed apart from training.
    """
    optimizer = make_optimizer(config)
    compile = config.compile if config.compile is not None else default_compile(device)
    step = device_step(config, optimizer, device, compile)
    cuda_graph = isinstance(step, graphs.GraphedStep)
    restore_rng(state.rng, device)
    totals = {"compile_seconds": 0.0, "train_seconds": 0.0, "images": 0}

    if state.epoch == 0 and not config.dry_run:  # the untrained network, as seed 002 shows
        untrained = evaluate(config, state.params, data.test_images, data.test_labels)
        reporter.evaluated(evaluation_record(0, None, untrained, config.lr, 0.0, 0))

    first_epoch = state.epoch + 1
    for epoch in range(first_epoch, config.epochs + 1):
        lr = optim.step_lr(config.lr, epoch - 1, step_size=1, gamma=config.gamma)
        time_first_step = epoch == first_epoch  # the step compiles on its first call
        params, opt_state, train_loss, timing = train_epoch(
            config, step, state, data, device, epoch, lr, reporter, time_first_step
        )
        totals["compile_seconds"] += timing["first_step_seconds"]
        totals["train_seconds"] += timing["seconds"]
        totals["images"] += timing["images"]
        result = evaluate(config, params, data.test_images, data.test_labels)
        reporter.evaluated(evaluation_record(epoch, train_loss, result, lr, timing["seconds"], timing["images"]))
        if cuda_graph:  # the graph's buffers change with its next step: keep this epoch's values
            params, opt_state = graphs.clone_tree(params), graphs.clone_tree(opt_state)
        state = TrainState(params, opt_state, epoch, capture_rng(device))
        reporter.epoch_ended(state)
        if config.dry_run:
            break
    seconds = totals["train_seconds"]
    return {
        **totals,
        "images_per_second": totals["images"] / seconds if seconds else 0.0,
        "compiled": compile,
        "cuda_graph": cuda_graph,
        "state": state,
    }


def train_epoch(config, step, state, data, device, epoch, lr, reporter, time_first_step: bool):
    """One pass over the shuffled training set; returns (params, opt_state, mean loss, timing).

    The host reads the device only every log_interval steps (the running loss): no
    per-step .item(), so the CPU can queue steps ahead of a GPU.
    """
    params, opt_state = state.params, state.opt_state
    lr_tensor = torch.tensor(lr, device=device)  # 0-d: a new value never recompiles
    batches = epoch_batches(len(data.train_images), config.batch_size, device)  # (steps, B)
    steps = 1 if config.dry_run else len(batches)
    reporter.epoch_started(epoch, steps, lr)
    running = torch.zeros((), device=device)  # loss summed since the last log line
    epoch_loss = 0.0
    first_step_seconds, timed_from = 0.0, 0
    synchronize(device)
    started = time.perf_counter()
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, data.train_images, data.train_labels, batches[i], lr_tensor)
        running += loss
        if i == 0 and time_first_step:  # compilation happens here: keep it out of the speed
            synchronize(device)
            first_step_seconds = time.perf_counter() - started
            started, timed_from = time.perf_counter(), 1
        if (i + 1) % config.log_interval == 0 or i + 1 == steps:
            since_last = (i + 1) % config.log_interval or config.log_interval
            summed = running.item()  # the only host sync inside the epoch
            if not math.isfinite(summed):
                raise NonFiniteLoss(
                    f"loss became {summed} in epoch {epoch} by step {i + 1}; "
                    f"lower --lr (it was {lr:g}); the last good checkpoint is kept"
                )
            reporter.logged(epoch, i + 1, (i + 1) * config.batch_size, len(data.train_images), summed / since_last)
            epoch_loss += summed
            running.zero_()
    synchronize(device)
    timing = {
        "first_step_seconds": first_step_seconds,
        "seconds": time.perf_counter() - started,
        "images": (steps - timed_from) * config.batch_size,
    }
    return params, opt_state, epoch_loss / steps, timing


def evaluation_record(
    epoch: int, train_loss: float | None, result: Evaluation, lr: float, seconds: float, images: int
) -> dict:
    """One line of --metrics: what the run looked like after `epoch` epochs."""
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "test_loss": result.loss,
        "test_accuracy": result.accuracy,
        "correct": result.correct,
        "total": result.total,
        "lr": lr,
        "seconds": seconds,
        "images_per_second": images / seconds if seconds else 0.0,
    }


def default_compile(device: torch.device) -> bool:
    """Compile on CUDA, and on the CPU where a C++ compiler is installed: `tinymnist bench`
    measured the compiled step faster than eager there (BENCHMARKS.md). MPS support in
    torch.compile is young and unmeasured here, so MPS stays eager."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_compiler() is not None)
