"""Where a run's progress goes: log lines or a progress bar, and the --metrics file.

Piped or redirected output gets the exact lines pytorch/examples prints, so scripts
that parse them keep working; a terminal gets a progress bar with loss and speed.
Each class here implements train.Reporter; `Reporters` sends every event to several.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def test_line(record: dict) -> str:
    """pytorch/examples' evaluation line."""
    return (
        f"Test set: Average loss: {record['test_loss']:.4f}, "
        f"Accuracy: {record['correct']}/{record['total']} ({100 * record['test_accuracy']:.0f}%)"
    )


def json_line(record: dict) -> str:
    """`record` as one line of strict JSON: a NaN or infinite number becomes null (JSON has no NaN)."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(finite, allow_nan=False)


class LineReporter:
    """The log lines of pytorch/examples mnist/main.py, for logs and pipes."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.steps = 1

    def epoch_started(self, epoch: int, steps: int, lr: float, compiling: bool) -> None:
        self.steps = steps

    def logged(self, epoch: int, step: int, images_seen: int, n_train: int, loss: float) -> None:
        seen = min(images_seen, n_train)
        print(f"Train Epoch: {epoch} [{seen}/{n_train} ({100 * step / self.steps:.0f}%)]\tLoss: {loss:.6f}",
              file=self.out, flush=True)  # fmt: skip

    def evaluated(self, record: dict) -> None:
        print(f"\n{test_line(record)}\n", file=self.out, flush=True)

    def close(self) -> None:
        pass


class ProgressReporter:
    """A rich progress bar per epoch with the running loss and images/s ("compiling" until
    the first step is done); each epoch's test line printed under its own bar."""

    def __init__(self, console: Console):
        self.console = console
        self.progress: Progress | None = None

    def epoch_started(self, epoch: int, steps: int, lr: float, compiling: bool) -> None:
        self.close()  # the previous epoch's bar stays on screen, finished
        self.progress = Progress(
            TextColumn(f"epoch {epoch}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), console=self.console,
        )  # fmt: skip
        self.task = self.progress.add_task("train", total=steps, status="compiling" if compiling else "")
        self.progress.start()

    def logged(self, epoch: int, step: int, images_seen: int, n_train: int, loss: float) -> None:
        elapsed = self.progress.tasks[self.task].elapsed or 0.0
        speed = images_seen / elapsed if elapsed else 0.0
        self.progress.update(self.task, completed=step, status=f"loss {loss:.4f}  {speed:,.0f} img/s")

    def evaluated(self, record: dict) -> None:
        line = test_line(record) + f"  lr {record['lr']:g}"
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
    """--metrics: one JSON object per evaluation, flushed as it happens. A new run starts
    the file afresh; a resumed run appends to it (the earlier epochs are already there)."""

    def __init__(self, path: Path, append: bool):
        self.file = path.open("a" if append else "w")

    def epoch_started(self, *args, **kwargs) -> None:
        pass

    def logged(self, *args) -> None:
        pass

    def evaluated(self, record: dict) -> None:
        self.file.write(json_line(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


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
