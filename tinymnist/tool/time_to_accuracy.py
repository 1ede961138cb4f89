"""`tinymnist bench --time-to-accuracy A`: training seconds until the test accuracy reaches A.

Three runs on the same data and device, in one process: the `fast` recipe and the
`cnn` recipe through tinymnist's loop (`fit` with --target-accuracy), and the `cnn`
recipe through the tutorials' own loop (reference.py: DataLoader, nn.Module,
torch.optim). All three are evaluated on the whole test set every tenth of an epoch,
off the clock; the first step (the compile) is timed apart. Ratios come from the
same run, so a noisy shared machine slows all three alike. With --repeats R the three
run R times in turn: each loop's seconds are the median of its rounds', its ratio the median
of the rounds' own ratios, and every round's rows are kept in the JSON.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from tinymnist.algorithm.config import make_optimizer, model_configs, recipe_config
from tinymnist.algorithm.train import TestSet, Training, evaluate, evaluate_one, fit, initial_state, synchronize
from tinymnist.data import MNIST
from tinymnist.tool.bench import machine_description, new_table, on_threads, print_table, report_head, write_json
from tinymnist.tool.reference import reference_loop
from tinymnist.transforms import speed
from tinymnist.transforms.vmap import evaluate_many

EVALUATIONS_PER_EPOCH = 10
MODELS = ("fast", "cnn")  # through tinymnist's loop; the reference runs cnn


def ours(model: str, mnist: MNIST, device: torch.device, target: float, compile: bool, seeds: int = 1) -> dict:
    """The recipe of `model` through `fit`, `seeds` models at once, stopping when all reach `target`.
    Each model's time is the run's training clock when it first reached the target."""
    config = recipe_config(
        model, device=str(device), compile=compile, target_accuracy=target, log_interval=10**9, seeds=seeds
    )
    config = dataclasses.replace(
        config, eval_every=max(1, len(mnist.train_images) // config.batch_size // EVALUATIONS_PER_EPOCH)
    )
    optimizer, models = make_optimizer(config), model_configs(config)
    evaluate = TestSet(config, models, mnist, evaluate_many if seeds > 1 else evaluate_one)
    training = Training(config, models, speed.device_step(config, optimizer, device), evaluate)
    result = fit(training, mnist, initial_state(config, optimizer, device))
    hits = [r for r in result.reached if r is not None]
    seconds = [h["train_seconds_total"] for h in hits]
    return {
        "loop": f"tinymnist {model}",
        "model": model,
        "models": seeds,
        "reached": len(hits),
        "seconds": statistics.fmean(seconds) if hits else None,
        "min_seconds": min(seconds, default=None),
        "max_seconds": max(seconds, default=None),
        "images": round(statistics.fmean(h["images_total"] for h in hits)) if hits else None,
        "epochs": max(h["epoch"] for h in hits) if len(hits) == seeds else result.records[-1]["epoch"],
        "best_accuracy": max(r["test_accuracy"] for r in result.records if not r.get("ensemble")),
        "first_step_seconds": result.first_step_seconds,
        "untimed_seconds": result.untimed_seconds,  # compiling again for a new thread count, off the clock
    }


def reference(model: str, mnist: MNIST, device: torch.device, target: float) -> dict:
    """The tutorials' loop with the recipe of `model`, up to the recipe's epochs or `target`."""
    config = recipe_config(model)
    steps_per_epoch = len(mnist.train_images) // config.batch_size  # the DataLoader drops the ragged batch
    every = max(1, steps_per_epoch // EVALUATIONS_PER_EPOCH)
    params = initial_state(config, make_optimizer(config), device).params
    loop = reference_loop(config, params, mnist.train_images, mnist.train_labels, device)
    seconds, best, first_step, reached = 0.0, 0.0, 0.0, None
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
                reached = done
                break
    return {
        "loop": f"reference {model}",
        "model": model,
        "models": 1,
        "reached": 1 if reached else 0,
        "seconds": seconds if reached else None,
        "images": reached * config.batch_size if reached else None,
        "epochs": round(reached / steps_per_epoch, 4) if reached else config.epochs,
        "best_accuracy": best,
        "first_step_seconds": first_step,
    }


def run_time_to_accuracy(
    mnist: MNIST, device: torch.device, target: float, compile: bool, log, seeds: int = 1, rounds: int = 1
) -> tuple[list[dict], list[list[dict]]]:
    """fast and cnn through tinymnist (`seeds` models of each at once), cnn through the tutorials'
    loop, `rounds` times in turn; ratios to the reference. -> each loop's row over the rounds, and
    every round's rows."""
    threads = torch.get_num_threads()  # each run starts on it, whatever count the run before left
    every_round = []
    for n in range(rounds):
        rows, of = [], f" (round {n + 1} of {rounds})" if rounds > 1 else ""
        for model in MODELS:
            log(f"time to {100 * target:g}%: {model}" + (f", {seeds} models at once" if seeds > 1 else "") + of)
            with on_threads(threads):
                rows.append(ours(model, mnist, device, target, compile, seeds))
        log(f"time to {100 * target:g}%: reference cnn{of}")
        with on_threads(threads):
            rows.append(reference("cnn", mnist, device, target))
        baseline = rows[-1]["seconds"]
        for row in rows:
            row["speedup_vs_reference"] = baseline / row["seconds"] if baseline and row["seconds"] else None
        every_round.append(rows)
        if rounds > 1:  # said now, so that a stop in a later round loses none of it
            log(f"round {n + 1} of {rounds}: " + ", ".join(map(round_summary, rows)))
    return [over_rounds(list(runs)) for runs in zip(*every_round, strict=True)], every_round


def round_summary(row: dict) -> str:
    """One loop's result in one round, for the log: `tinymnist fast 6.08 s (20.8x)`."""
    if row["seconds"] is None:
        return f"{row['loop']} not reached"
    ratio = f" ({row['speedup_vs_reference']:.1f}x)" if row["speedup_vs_reference"] else ""
    return f"{row['loop']} {row['seconds']:.2f} s{ratio}"


def over_rounds(runs: list[dict]) -> dict:
    """One loop's row from its rounds: the medians of the seconds, images and epochs of the rounds in
    which every model reached the target, the median of the ratios those rounds have, how many rounds
    reached it and every round's seconds; min and max over every model of every round. One round: as it is."""
    if len(runs) == 1:
        return runs[0]
    reached = [r for r in runs if r["reached"] == r["models"]]
    median = lambda key: statistics.median(r[key] for r in reached) if reached else None  # noqa: E731
    ratios = [r["speedup_vs_reference"] for r in runs if r["speedup_vs_reference"] is not None]
    row = runs[0] | {
        "reached": min(r["reached"] for r in runs),  # models: the fewest of any round
        "rounds_reached": len(reached),
        "seconds": median("seconds"),
        "round_seconds": [r["seconds"] for r in runs],
        "images": round(median("images")) if reached else None,
        "epochs": median("epochs") if reached else max(r["epochs"] for r in runs),
        "best_accuracy": max(r["best_accuracy"] for r in runs),
        "speedup_vs_reference": statistics.median(ratios) if ratios else None,
        "first_step_seconds": runs[0]["first_step_seconds"],  # later rounds may compile from inductor's cache
    }
    if "min_seconds" in row:  # tinymnist's loops: the spread over models, here over rounds too
        row["min_seconds"] = min((r["min_seconds"] for r in runs if r["min_seconds"] is not None), default=None)
        row["max_seconds"] = max((r["max_seconds"] for r in runs if r["max_seconds"] is not None), default=None)
    if "untimed_seconds" in row:
        row["untimed_seconds"] = max(r["untimed_seconds"] for r in runs)
    return row


def print_time_to_accuracy(
    rows: list[dict], target: float, device: torch.device, json_path, every_round: list[list[dict]] | None = None
) -> None:
    """The rows as a table (every digit when the output is a log file); the raw rows, and every round's, as JSON."""
    if json_path:
        rounds = {"rounds": every_round} if every_round and len(every_round) > 1 else {}
        write_json(json_path, {"target": target, **report_head(device), "results": rows, **rounds})
    title = f"time to {100 * target:g}% test accuracy, {machine_description(device)}, torch {torch.__version__}"
    several = any("round_seconds" in r for r in rows)
    models = any(r["models"] > 1 for r in rows)  # the spread of their times: min-max
    if several:
        title += f"; medians of {len(rows[0]['round_seconds'])} rounds"
    columns = ("loop", "reached", "seconds", *(("min-max s",) if models else ()), "images", "epochs")
    columns += ("best accuracy", "vs reference", *(("each round s",) if several else ()), "first step s")
    table = new_table(title, columns)
    for r in rows:
        spread = f"{r['min_seconds']:.2f}-{r['max_seconds']:.2f}" if r.get("min_seconds") is not None else "-"
        first_step = f"{r['first_step_seconds']:.1f}"
        if r.get("untimed_seconds"):  # compiled again mid-run for another thread count, off the clock
            first_step += f" + {r['untimed_seconds']:.1f} later"
        reached = f"{r['reached']}/{r['models']}"
        if several:  # rounds in which every model reached the target
            reached = f"{r['rounds_reached']}/{len(r['round_seconds'])} rounds"
        table.add_row(
            r["loop"],
            reached,
            f"{r['seconds']:.2f}" if r["seconds"] is not None else "not reached",
            *((spread,) if models else ()),
            f"{r['images']:,}" if r["images"] is not None else "-",
            f"{r['epochs']:g}",
            f"{100 * r['best_accuracy']:.2f}%",
            f"{r['speedup_vs_reference']:.1f}x" if r["speedup_vs_reference"] else "-",
            *(("/".join("-" if t is None else f"{t:.2f}" for t in r["round_seconds"]),) if several else ()),
            first_step,
        )
    print_table(table, width=150 if several else 120)  # every round's seconds in full
