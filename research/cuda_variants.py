"""Time one cnn-recipe epoch (60,000 random images, batch 64, 938 steps) on CUDA, several ways.

This is the measurement behind BENCHMARKS.md's GPU choices (CUDA graphs, compile,
TF32, host syncs for logging); `tinymnist bench` compares against the tutorials'
loop. Run on a CUDA machine from the repository root:

    python research/cuda_variants.py --json results/bench/cuda_variants.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import epoch_batches, initial_state, make_gradient, make_step
from tinymnist.tool.bench import bench_data
from tinymnist.transforms.cuda_graph import GraphedStep
from tinymnist.transforms.speed import compiled

VARIANTS = {  # name: (compile, cuda_graph, tf32 matmuls, host sync every N steps or 0)
    "eager": (False, False, False, 0),
    "compiled": (True, False, False, 0),
    "eager + graph": (False, True, False, 0),
    "compiled + graph": (True, True, False, 0),
    "compiled + graph, .item() every 10 steps": (True, True, False, 10),
    "compiled + graph + TF32 matmul": (True, True, True, 0),
}


def time_epochs(name, images, labels, device, epochs: int) -> dict:
    compile, cuda_graph, tf32, sync_every = VARIANTS[name]
    torch._dynamo.reset()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    config = recipe_config("cnn")
    optimizer = make_optimizer(config)
    state = initial_state(config, optimizer, device)
    step = make_step(make_gradient(config), optimizer)
    step = GraphedStep(step, compile) if cuda_graph else compiled(step) if compile else step
    params, opt_state = state.params, state.opt_state
    shuffle = torch.Generator().manual_seed(config.seed)
    lr = torch.tensor(config.lr, device=device)
    started = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, images, labels, torch.arange(64, device=device), lr)
    torch.cuda.synchronize(device)
    first_step = time.perf_counter() - started
    seconds = []
    for _ in range(epochs):
        batches = epoch_batches(len(images), config.batch_size, shuffle, device)  # (938, 64)
        running = torch.zeros((), device=device)
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        for i, batch_idx in enumerate(batches):
            params, opt_state, loss = step(params, opt_state, images, labels, batch_idx, lr)
            running += loss
            if sync_every and (i + 1) % sync_every == 0:
                running.item()
        torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    torch.backends.cuda.matmul.allow_tf32 = False
    return {
        "variant": name,
        "first_step_seconds": first_step,
        "epoch_seconds": seconds,
        "median_epoch_seconds": statistics.median(seconds),
        "final_loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per variant; the median counts")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device("cuda")
    images, labels, source = bench_data(
        Path("/nonexistent"), device
    )  # random 60,000 images: speed does not need digits
    results = []
    for name in args.variants:
        try:
            results.append(time_epochs(name, images, labels, device, args.epochs))
        except Exception as error:  # record and go on: one device call must measure them all
            results.append({"variant": name, "error": f"{type(error).__name__}: {error}"[:2000]})
        print(json.dumps(results[-1]), flush=True)
    report = {
        "machine": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "data": source,
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\n{report['machine']}, torch {report['torch']}: cnn recipe, 938 steps of 64")
    for r in results:
        print(
            f"{r['variant']:45s}", f"{r['median_epoch_seconds']:.3f} s/epoch" if "error" not in r else r["error"][:200]
        )


if __name__ == "__main__":
    main()
