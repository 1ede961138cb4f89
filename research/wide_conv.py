"""Which convolution rule makes the N-model step fastest: the candidates of transforms/wide_conv.py, timed.

    python research/wide_conv.py --device cpu [--models cnn,lenet,fast] [--counts 1,8]
        [--rules vmap-gradient,vmap,loop,unfold] [--rounds 5] [--json FILE] > results/bench/cpu-seeds/rules.txt

For each network and each N, the N-model step (gradient and optimizer update, compiled,
micro-batched as `device_step` does on the device) is built once per candidate:

    single          the single-model step `train` runs (N = 1 only: one model's own step)
    chosen          the N-model step `train --seeds N` runs: device_step's, wide_conv.CHOSEN's rule
    vmap-gradient   today's path: vmap.vmapped(make_gradient), vmap's grouped convolutions
    vmap, loop, unfold   wide_conv.wide_gradient with that convolution rule
    one-by-one      vmap.one_by_one: one model's compiled gradient for each model in turn
    side-by-side    side_by_side.py: one model's gradient, compiled without the GIL, a model per core
                    (side-by-side-gil: compiled as usual, with the GIL held in every kernel)

then all of them are timed in turns, `--rounds` windows each, so that a shared machine's
changing load slows every candidate alike; the median window counts. Random images:
speed does not depend on what the digits are. The fastest rule per network and device goes
into wide_conv.CHOSEN by hand, with this file's output as its evidence.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

from tinymnist.algorithm import optim
from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import initial_state, make_gradient, make_step, synchronize
from tinymnist.transforms.cuda_graph import GraphedStep
from tinymnist.transforms.freed_memory import reuse_freed_memory
from tinymnist.transforms.side_by_side import models_on_cores
from tinymnist.transforms.speed import compiled, default_micro_batch, device_step, micro_batched, network_apply
from tinymnist.transforms.vmap import one_by_one, vmapped, vmapped_update
from tinymnist.transforms.wide_conv import CONV_RULES, wide_gradient

N_IMAGES = 60_000


def per_model_chunk(chunks: str, model: str, n: int, device) -> int:
    """Images per model in one micro-batch. "shared": the device's chunk shared by the N models
    (speed.default_micro_batch: as many images in flight as one model's chunk); "each": the
    device's chunk for each model, N times as many (device_step before wide_conv.py); a number."""
    if chunks == "shared":
        return default_micro_batch(device, n, sharers=n)
    return default_micro_batch(device, n) if chunks == "each" else int(chunks)


def build_step(config, optimizer, device, rule: str, micro_batch: int):
    """The N-model step with `rule`, composed as speed.device_step composes it: on a CPU,
    compiled pieces around micro-batches, else one compiled step; on CUDA, one graph."""
    if rule in ("single", "chosen"):  # what `train` runs: one model's step, or N models' as chosen
        micro = dataclasses.replace(config, micro_batch=micro_batch)
        return device_step(micro, optimizer, device, stacked=rule == "chosen")
    update = vmapped_update(optimizer.update)
    one_gradient = make_gradient(config, network_apply(config, device, compile=True))  # one model's, as train's
    if device.type == "cuda":  # as device_step runs a step there: compiled, replayed as one CUDA graph
        if rule.startswith("one-by-one"):
            gradient = one_by_one(one_gradient)
        elif rule == "vmap-gradient":
            gradient = vmapped(one_gradient)
        else:
            gradient = wide_gradient(config, CONV_RULES[rule])
        return GraphedStep(make_step(gradient, optim.Optimizer(optimizer.init, update)), compile=True)
    if rule == "one-by-one":  # one model's compiled gradient, called once per model from Python
        gradient = one_gradient
        if 0 < micro_batch < config.batch_size:
            gradient = micro_batched(compiled(gradient), micro_batch)
        else:
            gradient = compiled(gradient)
        return make_step(one_by_one(gradient), optim.Optimizer(optimizer.init, compiled(update)))
    if rule.startswith("side-by-side"):  # a model per core, each its compiled gradient (transforms/side_by_side.py)
        without_gil = rule == "side-by-side"  # "side-by-side-gil": inductor's Python wrapper, which holds the GIL
        gradient = compiled(one_gradient, cpp_wrapper=without_gil)
        if 0 < micro_batch < config.batch_size:
            gradient = micro_batched(gradient, micro_batch)
        gradients = models_on_cores(gradient, workers=torch.get_num_threads())
        return make_step(gradients, optim.Optimizer(optimizer.init, compiled(update)))
    if rule == "one-by-one-graph":  # the same loop, unrolled into one compiled step
        return compiled(make_step(one_by_one(one_gradient), optim.Optimizer(optimizer.init, update)))
    gradient = vmapped(one_gradient) if rule == "vmap-gradient" else wide_gradient(config, CONV_RULES[rule])
    if 0 < micro_batch < config.batch_size:
        gradient = micro_batched(compiled(gradient), micro_batch)
        return make_step(gradient, optim.Optimizer(optimizer.init, compiled(update)))
    return compiled(make_step(gradient, optim.Optimizer(optimizer.init, update)))


class Candidate:
    """One step and its state, advanced `steps` at a time on random batches."""

    def __init__(self, config, device, rule: str, n: int, micro_batch: int, images, labels):
        self.config, self.device, self.rule, self.n, self.micro_batch = config, device, rule, n, micro_batch
        self.images, self.labels = images, labels
        stacked = rule != "single"
        optimizer = make_optimizer(config)
        state = initial_state(config, optimizer, device, stacked=stacked)
        self.params, self.opt_state = state.params, state.opt_state
        self.step = build_step(config, optimizer, device, rule, micro_batch)
        shape = (n, config.batch_size) if stacked else (config.batch_size,)
        self.batch_idx = torch.randint(0, N_IMAGES, shape, device=device)
        self.lr = torch.full(shape[:-1], config.lr, device=device)
        self.rates: list[float] = []
        started = time.perf_counter()
        self.run(2)  # the compile, then one more
        self.first_seconds = time.perf_counter() - started

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.params, self.opt_state, _ = self.step(
                self.params, self.opt_state, self.images, self.labels, self.batch_idx, self.lr
            )
        synchronize(self.device)

    def window(self, steps: int) -> None:
        started = time.perf_counter()
        self.run(steps)
        self.rates.append(steps * self.n * self.config.batch_size / (time.perf_counter() - started))
        print(f"  N={self.n} {self.name}: {self.rates[-1]:,.0f} img/s", file=sys.stderr, flush=True)

    @property
    def name(self) -> str:
        return f"{self.rule}, chunks of {self.micro_batch}" if self.micro_batch < self.config.batch_size else self.rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="cnn,lenet,fast")
    parser.add_argument("--counts", default="1,8")
    parser.add_argument("--rules", default="vmap-gradient," + ",".join(CONV_RULES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window-images", type=int, default=4096, help="per model and window")
    parser.add_argument("--chunks", default="shared", help="shared, each or a number, comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="torch's threads (default: torch's own choice)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # train.py's one `step` is compiled once per candidate
    reuse_freed_memory()  # as the command line does
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N_IMAGES, 28, 28), dtype=torch.uint8, generator=g).to(device)  # (60000, 28, 28)
    labels = torch.randint(0, 10, (N_IMAGES,), generator=g).to(device)  # (60000,)
    print(f"# {' '.join(sys.argv)}\n# torch {torch.__version__}, {torch.get_num_threads()} threads, {device}")
    counts, rules = list(map(int, args.counts.split(","))), args.rules.split(",")
    chunks = args.chunks.split(",")
    results = []
    for model in args.models.split(","):
        config = recipe_config(model)
        steps = max(1, args.window_images // config.batch_size)
        stacked = {(n, rule, per_model_chunk(c, model, n, device)) for n in counts for rule in rules for c in chunks}
        stacked = sorted(stacked, key=lambda w: (w[0], rules.index(w[1]), -w[2]))
        wanted = [(1, "single", default_micro_batch(device)), *stacked]
        candidates = []
        for n, rule, micro_batch in wanted:
            print(f"{model}: compiling {rule} for N={n}, chunks of {micro_batch}", file=sys.stderr)
            config = recipe_config(model, seeds=n)
            candidates.append(Candidate(config, device, rule, n, micro_batch, images, labels))
        for _ in range(args.rounds):  # in turns: a load that drifts slows every candidate alike
            for candidate in candidates:
                candidate.window(steps)
        single = statistics.median(candidates[0].rates)
        for c in candidates:
            rate = statistics.median(c.rates)
            row = {"model": model, "n": c.n, "rule": c.rule, "micro_batch": c.micro_batch, "images_per_second": rate}
            row["rates"] = c.rates
            row |= {"time_vs_n_single_runs": single / rate, "compile_and_one_step_seconds": c.first_seconds}
            results.append(row)
            print(
                f"{model:6} N={c.n:<3} {c.name:30} {rate:10,.0f} img/s  {single / rate:5.2f}x the time of N singles"
                f"   compile+1 step {c.first_seconds:5.1f} s",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "torch": torch.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
