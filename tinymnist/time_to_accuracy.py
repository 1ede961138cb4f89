"""`tinymnist bench --time-to-accuracy A`: training seconds until the test accuracy reaches A.

Three runs on the same data and device, in one process: the `fast` recipe and the
`cnn` recipe through tinymnist's loop (`fit` with --target-accuracy), and the `cnn`
recipe through the tutorials' own loop (reference.py: DataLoader, nn.Module,
torch.optim). All three are evaluated on the whole test set every tenth of an epoch,
off the clock; the first step (the compile) is timed apart. Ratios come from the
same run, so a noisy shared machine slows all three alike.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from tinymnist import transforms
from tinymnist.config import make_optimizer, recipe_config
from tinymnist.data import MNIST
from tinymnist.devices import synchronize
from tinymnist.reference import reference_loop
from tinymnist.train import evaluate, fit, initial_state

EVALUATIONS_PER_EPOCH = 10


def ours(model: str, mnist: MNIST, device: torch.device, target: float, compile: bool) -> dict:
    """The recipe of `model` through `fit`, stopping at `target`."""
    config = recipe_config(model, device=str(device), compile=compile, target_accuracy=target, log_interval=10**9)
    config = dataclasses.replace(config, eval_every=max(1, len(mnist.train_images) // config.batch_size
                                                          // EVALUATIONS_PER_EPOCH))  # fmt: skip
    optimizer = make_optimizer(config)
    step = transforms.device_step(config, optimizer, device)
    result = fit(config, mnist, initial_state(config, optimizer, device), step)
    hit = result.reached
    return {"loop": f"tinymnist {model}", "model": model, "reached": hit is not None,
            "seconds": hit["train_seconds_total"] if hit else None, "images": hit["images_total"] if hit else None,
            "epochs": hit["epoch"] if hit else result.records[-1]["epoch"],
            "best_accuracy": max(r["test_accuracy"] for r in result.records),
            "first_step_seconds": result.first_step_seconds}  # fmt: skip


def reference(model: str, mnist: MNIST, device: torch.device, target: float) -> dict:
    """The tutorials' loop with the recipe of `model`, up to the recipe's epochs or `target`."""
    config = recipe_config(model)
    steps_per_epoch = len(mnist.train_images) // config.batch_size  # the DataLoader drops the ragged batch
    every = max(1, steps_per_epoch // EVALUATIONS_PER_EPOCH)
    params = initial_state(config, make_optimizer(config), device).params
    loop = reference_loop(config, params, mnist.train_images, mnist.train_labels, device)
    seconds, best, first_step = 0.0, 0.0, 0.0
    for done in range(1, config.epochs * steps_per_epoch + 1):
        started = time.perf_counter()
        net, _ = next(loop)
        synchronize(device)
        if done == 1:  # DataLoader workers start here
            first_step = time.perf_counter() - started
        else:
            seconds += time.perf_counter() - started
        if done % every == 0:
            weights = {k: v.detach() for k, v in net.named_parameters()}
            accuracy = evaluate(config, weights, mnist.test_images, mnist.test_labels).accuracy
            best = max(best, accuracy)
            if accuracy >= target:
                return {"loop": f"reference {model}", "model": model, "reached": True, "seconds": seconds,
                        "images": done * config.batch_size, "epochs": round(done / steps_per_epoch, 4),
                        "best_accuracy": best, "first_step_seconds": first_step}  # fmt: skip
    return {"loop": f"reference {model}", "model": model, "reached": False, "seconds": None, "images": None,
            "epochs": config.epochs, "best_accuracy": best, "first_step_seconds": first_step}  # fmt: skip


def run_time_to_accuracy(mnist: MNIST, device: torch.device, target: float, compile: bool, log) -> list[dict]:
    """fast and cnn through tinymnist, cnn through the tutorials' loop; ratios to the reference."""
    rows = []
    for name, run in (("fast", lambda: ours("fast", mnist, device, target, compile)),
                      ("cnn", lambda: ours("cnn", mnist, device, target, compile)),
                      ("reference cnn", lambda: reference("cnn", mnist, device, target))):  # fmt: skip
        log(f"time to {100 * target:g}%: {name}")
        rows.append(run())
    baseline = rows[-1]["seconds"]
    for row in rows:
        row["speedup_vs_reference"] = baseline / row["seconds"] if baseline and row["seconds"] else None
    return rows


def print_time_to_accuracy(rows: list[dict], target: float, device: torch.device, json_path) -> None:
    """The rows as a table (every digit when the output is a log file); the raw rows as JSON."""

    from rich.console import Console
    from rich.table import Table

    from tinymnist.bench import machine_description, write_json

    if json_path:
        report = {"target": target, "device": str(device), "machine": machine_description(device),
                  "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "results": rows}  # fmt: skip
        write_json(json_path, report)
    machine = f"{machine_description(device)}, torch {torch.__version__}"
    table = Table(title=f"time to {100 * target:g}% test accuracy, {machine}")
    for column in ("loop", "seconds", "images", "epochs", "best accuracy", "vs reference", "first step s"):
        table.add_column(column, justify="left" if column == "loop" else "right")
    for r in rows:
        table.add_row(r["loop"], f"{r['seconds']:.2f}" if r["reached"] else "not reached",
                      f"{r['images']:,}" if r["reached"] else "-", f"{r['epochs']:g}",
                      f"{100 * r['best_accuracy']:.2f}%",
                      f"{r['speedup_vs_reference']:.1f}x" if r["speedup_vs_reference"] else "-",
                      f"{r['first_step_seconds']:.1f}")  # fmt: skip
    console = Console()
    (console if console.is_terminal else Console(width=120)).print(table)
