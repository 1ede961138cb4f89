"""What a run prints: log lines or a progress bar, the --metrics file, the last lines.

A pipe gets pytorch/examples' exact lines, so scripts that parse them keep working; a terminal
gets a progress bar. Each class implements train.Reporter. N models print one summary per
evaluation: mean ± std (n-1) and range, as papers report MNIST, and the ensemble's accuracy.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def test_line(record: dict) -> str:
    """pytorch/examples' evaluation line."""
    return (
        f"Test set: Average loss: {record['test_loss']:.4f}, "
        f"Accuracy: {record['correct']}/{record['total']} ({100 * record['test_accuracy']:.0f}%)"
    )


def summary_line(ensemble: dict) -> str:
    """One evaluation of N models: 'Test set (8 models): accuracy 97.31% ± 0.12 (97.10-97.52%), ensemble ...'."""
    return (
        f"Test set ({ensemble['models']} models): accuracy {100 * ensemble['mean_accuracy']:.2f}% "
        f"± {100 * ensemble['std_accuracy']:.2f} ({100 * ensemble['min_accuracy']:.2f}-"
        f"{100 * ensemble['max_accuracy']:.2f}%), ensemble {100 * ensemble['test_accuracy']:.2f}% "
        f"({ensemble['correct']}/{ensemble['total']})"
    )


def evaluation_line(record: dict) -> str | None:
    """A single run's test line; N models' summary on the ensemble's record, nothing on each model's."""
    if record.get("ensemble"):
        return summary_line(record)
    return None if "seed" in record else test_line(record)


def counted(count: int, noun: str) -> str:
    """ "1 epoch", "2 epochs"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def model_test_line(record: dict) -> str:
    """`tinymnist eval`'s line for a record: a single model's test line; one model of N, or the ensemble, named."""
    if "seed" not in record and not record.get("ensemble"):
        return test_line(record)
    who = "ensemble" if record.get("ensemble") else f"seed {record['seed']}, lr {record['initial_lr']:g}"
    return f"{who}: {test_line(record)}"


def off_the_clock(result, compiled: bool) -> str:
    """What the training time leaves out, in parentheses: the first step (compiling, when compiled),
    and any call that compiled again mid-run (AdaptiveThreads at another thread count)."""
    note = f"(+ {result.first_step_seconds:.1f} s {'compiling' if compiled else 'first step'}"
    if result.untimed_seconds:
        note += f", + {result.untimed_seconds:.1f} s compiling for another thread count"
    return note + ")"


def final_line(result, device, compiled: bool) -> str:
    """The run's last line: final accuracy (N models: spread, best, ensemble), time without the compile, speed."""
    last = result.records[-1]
    speed = f"training {result.train_seconds:.1f} s {off_the_clock(result, compiled)}, "
    speed += f"{result.images_per_second:,.0f} images/s" + (" over all models" if last.get("ensemble") else "")
    when = f"after {last['epoch']:g} epoch{'' if last['epoch'] == 1 else 's'}"
    if last.get("ensemble"):
        when = f"after {counted(result.state.epoch, 'epoch')}"
    if not result.images:  # a dry run's one step is the first, kept off the clock: no speed to give
        took = f"{result.first_step_seconds:.1f} s" + (", compiling included" if compiled else "")
        speed, when = f"its one step took {took}; no speed measured", "after one step (a dry run)"
    if not last.get("ensemble"):
        return (
            f"Final test accuracy: {100 * last['test_accuracy']:.2f}% ({last['correct']}/{last['total']}) "
            f"{when} on {device}; {speed}"
        )
    return (
        f"Final test accuracy over {last['models']} models: {100 * last['mean_accuracy']:.2f}% "
        f"± {100 * last['std_accuracy']:.2f} (min {100 * last['min_accuracy']:.2f}%, "
        f"max {100 * last['max_accuracy']:.2f}% with seed {last['best_seed']}, lr {last['best_lr']:g}); "
        f"ensemble {100 * last['test_accuracy']:.2f}% ({last['correct']}/{last['total']}) "
        f"{when} on {device}; {speed}"
    )


def target_line(target: float, result, compiled: bool, resumed_at: int | None = None) -> str:
    """--target-accuracy: when it was reached (time, images) or that it was not; N models: when the last did,
    and how many. A resumed run counts its own time and images, and says so."""
    reached = [r for r in result.reached if r is not None]
    goal = f"target {100 * target:.2f}%"
    compile_note = off_the_clock(result, compiled)
    if resumed_at is not None:
        compile_note += f" in this run, resumed after epoch {resumed_at}"
    if not reached:
        best = max(r["test_accuracy"] for r in result.records if not r.get("ensemble"))
        epochs = counted(result.state.epoch, "epoch")
        return f"Target {100 * target:.2f}% not reached: best {100 * best:.2f}% in {epochs}"
    last = max(reached, key=lambda r: r["train_seconds_total"])
    if len(result.reached) == 1:
        return (
            f"Reached {100 * last['test_accuracy']:.2f}% ({goal}) at epoch {last['epoch']:g}: "
            f"{last['train_seconds_total']:.2f} s of training {compile_note}, "
            f"{last['images_total']:,} images"
        )
    seconds = [r["train_seconds_total"] for r in reached]
    return (
        f"{len(reached)} of {len(result.reached)} models reached the {goal}; the last at epoch {last['epoch']:g}: "
        f"{max(seconds):.2f} s of training {compile_note}, {last['images_total']:,} images per model "
        f"(first {min(seconds):.2f} s)"
    )


def json_line(record: dict) -> str:
    """`record` as one line of strict JSON: a NaN or infinite number becomes null (JSON has no NaN)."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(finite, allow_nan=False)


class LineReporter:
    """The log lines of pytorch/examples mnist/main.py, for logs and pipes."""

    def __init__(self, out=None):
        self.out = out or sys.stdout

    def epoch_started(self, epoch: int, steps: int, lr: float, compiling: bool) -> None: ...

    def logged(self, epoch: int, step: int, images_seen: int, n_train: int, loss: float) -> None:
        # the percentage is of the epoch, as the brackets say (a dry run's one step: 0%)
        seen = min(images_seen, n_train)
        print(
            f"Train Epoch: {epoch} [{seen}/{n_train} ({100 * seen / n_train:.0f}%)]\tLoss: {loss:.6f}",
            file=self.out,
            flush=True,
        )

    def evaluated(self, record: dict) -> None:
        if line := evaluation_line(record):
            print(f"\n{line}\n", file=self.out, flush=True)

    def close(self) -> None: ...


class ProgressReporter:
    """A rich progress bar per epoch with the loss and images/s ("compiling" until the first step is done).
    The speed leaves the compile out, as the run's last line does: an epoch that compiles counts it from
    its first log line on."""

    def __init__(self, console: Console, clock: Callable[[], float] = time.perf_counter):
        self.console, self.clock = console, clock
        self.progress: Progress | None = None
        self.counted_from: tuple[int, float] | None = None  # (images seen, time) the epoch's speed counts from

    def epoch_started(self, epoch: int, steps: int, lr: float, compiling: bool) -> None:
        self.close()  # the previous epoch's bar stays on screen, finished
        self.progress = Progress(
            TextColumn(f"epoch {epoch}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task("train", total=steps, status="compiling" if compiling else "")
        self.counted_from = None if compiling else (0, self.clock())
        self.progress.start()

    def logged(self, epoch: int, step: int, images_seen: int, n_train: int, loss: float) -> None:
        now = self.clock()
        if self.counted_from is None:  # the first log line after the compile
            self.counted_from = (images_seen, now)
        images, since = self.counted_from
        speed = f"  {(images_seen - images) / (now - since):,.0f} img/s" if images_seen > images and now > since else ""
        self.progress.update(self.task, completed=step, status=f"loss {loss:.4f}{speed}")

    def evaluated(self, record: dict) -> None:
        line = evaluation_line(record)
        if line is None:
            return
        line += f"  lr {record['lr']:g}" if "lr" in record else ""
        if self.progress is not None and not self.progress.finished:  # mid-epoch (--eval-every): above the bar
            self.progress.console.print(line)
        else:
            self.close()
            self.console.print(line)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class MetricsFile:
    """--metrics: one JSON object per evaluation, flushed as it happens; a resumed run appends."""

    def __init__(self, path: Path, append: bool):
        self.path = path
        self.file = path.open("a" if append else "w")

    def epoch_started(self, *args, **kwargs) -> None: ...
    def logged(self, *args) -> None: ...

    def evaluated(self, record: dict) -> None:
        self.file.write(json_line(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def discard(self) -> None:
        """Remove the file (closed): a run that keeps nothing."""
        self.path.unlink(missing_ok=True)


class Reporters:
    """Every event to each of several reporters, in order."""

    def __init__(self, *reporters):
        self.reporters = reporters

    def epoch_started(self, *args, **kwargs) -> None:
        for r in self.reporters:
            r.epoch_started(*args, **kwargs)

    def logged(self, *args) -> None:
        for r in self.reporters:
            r.logged(*args)

    def evaluated(self, record: dict) -> None:
        for r in self.reporters:
            r.evaluated(record)

    def close(self) -> None:
        for r in self.reporters:
            r.close()
