"""Time to a test accuracy over several seeds, in one process: one compiled step, fresh states.

    python research/time_to_99.py --model fast --seeds 1-10 --target 0.99 --data-dir DIR --device cuda

Each seed starts from `initial_state` (its own parameters and data order) and runs `fit`
with --target-accuracy; the step is built once, so only the first seed pays the compile.
Prints one JSON line per seed and a summary line (mean training seconds to the target).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from tinymnist import data
from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import TestSet, Training, fit, initial_state
from tinymnist.tool.devices import resolve_device
from tinymnist.transforms import speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fast")
    parser.add_argument("--seeds", default="1-10", help="first-last, inclusive")
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--eval-every", type=int, default=10, help="steps between evaluations")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    first, last = map(int, args.seeds.split("-"))
    device = resolve_device(args.device)
    speed.use_tf32_matmuls(device)
    mnist = data.load_mnist(args.data_dir, device)
    base = recipe_config(
        args.model, device=str(device), target_accuracy=args.target, eval_every=args.eval_every, log_interval=10**9
    )
    optimizer = make_optimizer(base)
    step = speed.device_step(base, optimizer, device)  # compiled once, reused by every seed
    rows = []
    for seed in range(first, last + 1):
        config = recipe_config(
            args.model,
            device=str(device),
            target_accuracy=args.target,
            eval_every=args.eval_every,
            log_interval=10**9,
            seed=seed,
        )
        training = Training(config, [config], step, TestSet(config, [config], mnist))
        result = fit(training, mnist, initial_state(config, optimizer, device))
        hit = result.reached[0] or {}
        row = {
            "model": args.model,
            "seed": seed,
            "target": args.target,
            "reached": bool(hit),
            "seconds": hit.get("train_seconds_total"),
            "images": hit.get("images_total"),
            "epochs": hit.get("epoch"),
            "accuracy": hit.get("test_accuracy"),
            "first_step_seconds": result.first_step_seconds,
            "device": str(device),
            "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    reached = [r["seconds"] for r in rows if r["reached"]]
    summary = {
        "reached": f"{len(reached)}/{len(rows)}",
        "mean_seconds": statistics.mean(reached) if reached else None,
        "max_seconds": max(reached) if reached else None,
    }
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
