"""The terminal display: a progress bar per epoch, and test lines under or above it."""

import io

import torch
from rich.console import Console

from tinymnist.algorithm.train import FitResult
from tinymnist.tool.report import ProgressReporter, off_the_clock
from tinymnist.tool.time_to_accuracy import print_time_to_accuracy


def record(epoch, correct):
    return {
        "epoch": epoch,
        "test_loss": 0.5,
        "test_accuracy": correct / 100,
        "correct": correct,
        "total": 100,
        "lr": 0.01,
    }


def test_an_evaluation_inside_an_epoch_keeps_the_bar_going_and_prints_every_test_line():
    """--eval-every on a terminal: the bar goes on after a mid-epoch evaluation (it was
    closed there, and the next log line failed on the missing bar)."""
    screen = io.StringIO()
    reporter = ProgressReporter(Console(file=screen, force_terminal=True, width=120, color_system=None))
    reporter.evaluated(record(0, 10))  # the untrained network, before any bar
    reporter.epoch_started(1, steps=4, lr=0.01, compiling=True)
    reporter.logged(1, 1, 64, 256, 2.0)
    reporter.evaluated(record(0.5, 71))  # mid-epoch: above the running bar
    reporter.logged(1, 3, 192, 256, 1.0)
    reporter.logged(1, 4, 256, 256, 0.9)
    reporter.evaluated(record(1, 93))  # the epoch's end: under its finished bar
    reporter.close()
    shown = screen.getvalue()
    lines = [f"Accuracy: {n}/100 ({n}%)  lr 0.01" for n in (10, 71, 93)]
    assert all(line in shown for line in lines), shown
    assert [shown.index(line) for line in lines] == sorted(shown.index(line) for line in lines)
    assert "4/4" in shown  # the bar reached the epoch's end


def test_the_speed_on_the_bar_leaves_the_compile_out():
    """It counted from the epoch's start, the first step's compile included: 2,483 img/s on the bar against
    17,746 on the run's last line. Now an epoch that compiles counts from its first log line."""
    screen, now = io.StringIO(), [0.0]
    reporter = ProgressReporter(
        Console(file=screen, force_terminal=True, width=120, color_system=None), clock=lambda: now[0]
    )
    reporter.epoch_started(1, steps=30, lr=0.01, compiling=True)
    now[0] = 10.0  # a 10 s compile, then 10 steps of 64 images
    reporter.logged(1, 10, 640, 1920, 2.0)
    now[0] = 10.5  # 10 steps more in 0.5 s: 1,280 images/s
    reporter.logged(1, 20, 1280, 1920, 1.0)
    reporter.epoch_started(2, steps=30, lr=0.01, compiling=False)  # compiled: from the epoch's start
    now[0] = 11.0
    reporter.logged(2, 10, 640, 1920, 0.5)
    reporter.close()
    shown = screen.getvalue()
    assert "loss 1.0000  1,280 img/s" in shown and "loss 0.5000  1,280 img/s" in shown, shown
    assert "64 img/s" not in shown  # the compile counted: 640 images in 10 s


def test_the_time_left_out_names_a_mid_run_compile_when_there_was_one(capsys):
    """train's last line and bench --time-to-accuracy's table say what the training clock left out."""
    quiet = FitResult(state=None, first_step_seconds=3.04)
    probed = FitResult(state=None, first_step_seconds=3.04, untimed_seconds=2.5)
    assert off_the_clock(quiet, compiled=True) == "(+ 3.0 s compiling)"
    assert off_the_clock(quiet, compiled=False) == "(+ 3.0 s first step)"
    assert off_the_clock(probed, compiled=True) == "(+ 3.0 s compiling, + 2.5 s compiling for another thread count)"
    row = {"loop": "tinymnist fast", "reached": 1, "models": 1, "seconds": 7.4, "images": 58880, "epochs": 0.98}
    row |= {"best_accuracy": 0.9901, "speedup_vs_reference": None, "first_step_seconds": 4.3, "untimed_seconds": 2.5}
    print_time_to_accuracy([row], 0.99, torch.device("cpu"), None)
    assert "4.3 + 2.5 later" in capsys.readouterr().out
