"""train --target-accuracy [--eval-every]: stop at the first evaluation that reaches the target."""

import json
import re

from tests.support import run, train_args

TIMINGS = ("seconds", "images_per_second", "train_seconds_total", "images_total")


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timings(rows):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def test_the_run_stops_at_the_first_evaluation_that_reaches_the_target(real_split, tmp_path):
    """Oracle: the same run without a target, evaluated as often. Evaluations are off the
    clock and change nothing, so its records are the stopped run's, then more; the first
    of them at or above the target is where the stopped run ends. On fixed threads: two runs
    agree to the bit only so (an adaptive step that met a busy core sums in another order)."""
    common = ("--model", "mlp", "--epochs", 2, "--eval-every", 20, "--batch-size", 64, "--threads", 1)
    full, stopped = tmp_path / "full.jsonl", tmp_path / "stopped.jsonl"
    assert run(*train_args(real_split, *common, "--metrics", full)).exit_code == 0
    result = run(*train_args(real_split, *common, "--target-accuracy", 0.85, "--metrics", stopped))
    assert result.exit_code == 0, result.output
    every, kept = records(full), records(stopped)
    first_hit = next(i for i, r in enumerate(every) if r["test_accuracy"] >= 0.85)
    assert 0 < first_hit < len(every) - 1  # the target is reached after training began, before the end
    hit = kept[-1]
    assert hit.pop("reached_target") is True and not any("reached_target" in r for r in kept)
    assert without_timings(kept) == without_timings(every[: first_hit + 1])
    steps = round(hit["epoch"] * (8000 // 64 + 1))  # 125 steps and a topped-up 126th per epoch
    assert hit["images_total"] == steps * 64  # every trained image counted (the first step's too: compile apart)
    assert f"Reached {100 * hit['test_accuracy']:.2f}% (target 85.00%) at epoch {hit['epoch']:g}" in result.stdout


def test_a_target_not_reached_says_so_and_exits_0(tiny_split):
    result = run(*train_args(tiny_split, "--model", "mlp", "--epochs", 1, "--target-accuracy", 0.99))
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("Target"))
    assert re.fullmatch(r"Target 99\.00% not reached: best \d+\.\d\d% in 1 epoch", line), line


def test_a_target_the_untrained_network_meets_trains_nothing_and_saves_nothing(tiny_split, tmp_path):
    ckpt = tmp_path / "m.pt"
    result = run(*train_args(tiny_split, "--model", "mlp", "--target-accuracy", 0.01, "--save-model", ckpt))
    assert result.exit_code == 0, result.output
    assert "Train Epoch" not in result.stdout and "at epoch 0:" in result.stdout
    assert f"no epoch completed, so nothing was saved to {ckpt}" in result.stdout and not ckpt.exists()


def test_a_target_reached_inside_an_epoch_says_what_the_checkpoint_holds(real_split, tmp_path):
    """Checkpoints hold whole epochs: the one saved is epoch 1's, and the run says so."""
    ckpt, metrics = tmp_path / "m.pt", tmp_path / "m.jsonl"
    args = ("--model", "mlp", "--epochs", 3, "--eval-every", 20, "--save-model", ckpt, "--metrics", metrics)
    result = run(*train_args(real_split, *args, "--target-accuracy", 0.9))
    assert result.exit_code == 0, result.output
    reached = records(metrics)[-1]["epoch"]
    assert 1 < reached < 2  # inside epoch 2 (mlp passes 90% there on this split)
    assert f"the target was reached at epoch {reached:g}; {ckpt} holds epoch 1, the last completed one" in result.stdout
    evaluated = run("eval", ckpt, "--json", "--device", "cpu", "--data-dir", real_split, "--no-download")
    assert json.loads(evaluated.stdout)["epoch"] == 1
