"""`train --tensorboard DIR`: the run's scalars as TensorBoard event files.

A reporter like the log lines: train/loss every log interval; test/loss, test/accuracy
(a fraction, like --metrics) and lr every evaluation. The x axis is the images trained on
since the run began, so runs with different batch sizes line up and evaluations inside an
epoch (--eval-every) keep their place. A multi-model run gives each model its own folder
(DIR/seed1_lr0.001, ...), a separate run in TensorBoard, and the ensemble DIR/ensemble
(its test scalars, and train/mean_loss: the models' mean loss, as the log lines show).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tinymnist.algorithm.config import TrainConfig, model_grid
from tinymnist.data.files import folders_to_make, remove_if_empty
from tinymnist.errors import TinyMnistError
from tinymnist.tool.extras import require


def tensorboard_reporter(config: TrainConfig, n_train: int):
    """The reporter for `train --tensorboard` on `n_train` training images: one run, or one run per model."""
    grid = model_grid(config)
    if len(grid) == 1:
        return TensorBoardReporter(Path(config.tensorboard), n_train)
    return ModelsTensorBoard(Path(config.tensorboard), n_train, [model_folder(seed, lr) for lr, seed in grid])


EVENT_FILES = "events.out.tfevents.*"  # the names SummaryWriter gives the files it writes


def refuse_earlier_events(folder: Path, flag: str) -> None:
    """Refuse, naming `flag`, a new run's TensorBoard folder where an earlier run's event files are (N models'
    in their subfolders): TensorBoard would draw the two runs as one, their steps on top of each other. Only
    where a run writes is looked at, the folder and its subfolders: events deeper down are other runs to
    TensorBoard, and a large folder given by mistake is not walked whole."""
    folder = Path(folder)
    found = itertools.chain(folder.glob(EVENT_FILES), folder.glob(f"*/{EVENT_FILES}"))  # lazily: the first will do
    if folder.is_dir() and next(found, None) is not None:
        raise TinyMnistError(
            f"{flag} {folder} holds an earlier run's TensorBoard events; name another folder or delete them first "
            "(a resumed run may add to it)"
        )


def model_folder(seed: int, lr: float) -> str:
    return f"seed{seed}_lr{lr:g}"


class TensorBoardReporter:
    """Writes scalars into `log_dir` through torch.utils.tensorboard's SummaryWriter."""

    def __init__(self, log_dir: Path, n_train: int):
        self.path, self.n_train = log_dir, n_train
        self.made = folders_to_make(log_dir)  # deepest first: the writer makes them
        tensorboard = require("torch.utils.tensorboard", "--tensorboard")
        try:
            self.writer = tensorboard.SummaryWriter(log_dir=str(log_dir))
        except OSError as e:  # a file in the way, no permission: before training, not after
            raise TinyMnistError(
                f"--tensorboard {log_dir}: cannot write there ({e.strerror or e}); choose another folder"
            ) from None

    def epoch_started(self, *args, **kwargs) -> None:
        pass

    def logged(self, epoch: int, step: int, images_seen: int, n_train: int, loss: float) -> None:
        """images_seen counts from the start of `epoch` (1-based)."""
        self.writer.add_scalar("train/loss", loss, global_step=(epoch - 1) * n_train + images_seen)

    def evaluated(self, record: dict) -> None:
        images = round(record["epoch"] * self.n_train)  # "epoch" is fractional inside an epoch
        self.writer.add_scalar("test/loss", record["test_loss"], global_step=images)
        self.writer.add_scalar("test/accuracy", record["test_accuracy"], global_step=images)
        if "lr" in record:  # an ensemble's record has none: it is no one model's
            self.writer.add_scalar("lr", record["lr"], global_step=images)
        self.writer.flush()  # one flush per epoch: TensorBoard shows the run as it goes

    def close(self) -> None:
        self.writer.close()

    def discard(self) -> None:
        """Remove what the writer wrote (closed), and the folders it made, if nothing else is in them. A new
        run's: it refuses a folder with earlier event files, so the event files in log_dir are its own."""
        for events in self.path.glob(EVENT_FILES):
            events.unlink(missing_ok=True)
        remove_if_empty(self.made)


class ModelsTensorBoard:
    """A multi-model run: each model's records in its own folder, the ensemble's in DIR/ensemble."""

    def __init__(self, log_dir: Path, n_train: int, folders: list[str]):
        self.path, self.made = log_dir, folders_to_make(log_dir)
        # every folder made now: one that cannot be written fails before training
        self.models = {folder: TensorBoardReporter(log_dir / folder, n_train) for folder in folders}
        self.ensemble = TensorBoardReporter(log_dir / "ensemble", n_train)

    def epoch_started(self, *args, **kwargs) -> None:
        pass

    def logged(self, epoch: int, step: int, images_seen: int, n_train: int, loss: float) -> None:
        """`loss` is the models' mean, as on the log lines; each model's own is in its records."""
        self.ensemble.writer.add_scalar("train/mean_loss", loss, global_step=(epoch - 1) * n_train + images_seen)

    def evaluated(self, record: dict) -> None:
        if record.get("ensemble"):
            self.ensemble.evaluated(record)
        else:
            self.models[model_folder(record["seed"], record["initial_lr"])].evaluated(record)

    def close(self) -> None:
        for reporter in [*self.models.values(), self.ensemble]:
            reporter.close()

    def discard(self) -> None:
        for reporter in [*self.models.values(), self.ensemble]:
            reporter.discard()
        remove_if_empty(self.made)
