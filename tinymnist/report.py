"""Where a run's progress goes: log lines or a progress bar, --metrics, --save-model.

Piped or redirected output gets the exact lines pytorch/examples prints, so scripts
that parse them keep working; a terminal gets a progress bar with loss and speed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tinymnist import checkpoint
from tinymnist.config import TrainConfig
from tinymnist.train import TrainState


def test_line(record: dict) -> str:
    """pytorch/examples' evaluation line."""
    return (
        f"Test set: Average loss: {record['test_loss']:.4f}, "
        f"Accuracy: {record['correct']}/{record['total']} ({100 * record['test_accuracy']:.0f}%)"
    )


class LineReporter:
    """The log lines of pytorch/examples mnist/main.py, for logs and pipes."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.steps = 1

    def epoch_started(self, epoch: int, steps: int, lr: float) -> None:
        self.steps = steps

    def logged(self, epoch: int, step: int, images_seen: int, n_train: int, loss: float) -> None:
        seen = min(images_seen, n_train)
        print(
            f"Train Epoch: {epoch} [{seen}/{n_train} ({100 * step / self.steps:.0f}%)]\tLoss: {loss:.6f}",
            file=self.out,
            flush=True,
        )

    def evaluated(self, record: dict) -> None:
        print(f"\n{test_line(record)}\n", file=self.out, flush=True)

    def epoch_ended(self, state: TrainState) -> None:
        pass

    def close(self) -> None:
        pass


class ProgressReporter:
    """A rich progress bar per epoch showing the running loss and images/s."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[speed]:,.0f} img/s"),
            TimeElapsedColumn(),
            console=console,
        )
        self.progress.start()
        self.task = None

    def epoch_started(self, epoch: int, steps: int, lr: float) -> None:
        self.task = self.progress.add_task("train", total=steps, epoch=epoch, loss=float("nan"), speed=0.0)

    def logged(self, epoch: int, step: int, images_seen: int, n_train: int, loss: float) -> None:
        elapsed = self.progress.tasks[self.task].elapsed or 0.0
        speed = images_seen / elapsed if elapsed else 0.0
        self.progress.update(self.task, completed=step, loss=loss, speed=speed)

    def evaluated(self, record: dict) -> None:
        self.progress.console.print(test_line(record) + f"  lr {record['lr']:g}")

    def epoch_ended(self, state: TrainState) -> None:
        pass

    def close(self) -> None:
        self.progress.stop()


class MetricsFile:
    """--metrics: one JSON object per evaluation, flushed as it happens."""

    def __init__(self, path: Path, append: bool):
        self.file = path.open("a" if append else "w")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class RunObserver:
    """Fans the loop's events out to the display, --metrics and --save-model."""

    def __init__(self, config: TrainConfig, display, state: TrainState):
        self.config, self.display = config, display
        self.metrics = config.metrics and MetricsFile(Path(config.metrics), append=bool(config.resume))
        self.last_good = state  # the latest epoch boundary: what Ctrl-C saves
        self.records: list[dict] = []

    def epoch_started(self, epoch, steps, lr):
        self.display.epoch_started(epoch, steps, lr)

    def logged(self, *args):
        self.display.logged(*args)

    def evaluated(self, record):
        self.records.append(record)
        self.display.evaluated(record)
        if self.metrics:
            self.metrics.write(record)

    def epoch_ended(self, state: TrainState):
        self.last_good = state
        self.save(state)

    def save(self, state: TrainState):
        if self.config.save_model:
            checkpoint.save(Path(self.config.save_model), self.config.to_dict(), state)

    def close(self):
        self.display.close()
        if self.metrics:
            self.metrics.close()
