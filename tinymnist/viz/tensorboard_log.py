"""`train --tensorboard DIR`: the run's scalars as TensorBoard event files.

A reporter like the log lines and the progress bar: the training loop calls
`logged` every log interval and `evaluated` once per evaluation. `tensorboard
--logdir DIR` then shows

    train/loss      every log interval; x = images trained on since the run began
    test/loss       every evaluation (epoch 0 = untrained); x = epoch
    test/accuracy   the same, as a fraction, like --metrics and the LeNet seed tutorial
    lr              the learning rate of the evaluation's record; x = epoch

Images, not steps, on the training axis: runs with different batch sizes line up.
A multi-model run gives each model its own folder (DIR/seed1_lr1, ...), which
TensorBoard lists as separate runs.
"""

from __future__ import annotations

from pathlib import Path

from tinymnist.errors import TinyMnistError
from tinymnist.viz.extras import require


class TensorBoardReporter:
    """Writes scalars into `log_dir` through torch.utils.tensorboard's SummaryWriter."""

    def __init__(self, log_dir: Path):
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
        """images_seen counts from the start of `epoch` (1-based); each epoch spans n_train
        on the axis (an epoch that drops its ragged last batch trains on a few fewer)."""
        self.writer.add_scalar("train/loss", loss, global_step=(epoch - 1) * n_train + images_seen)

    def evaluated(self, record: dict) -> None:
        epoch = record["epoch"]
        self.writer.add_scalar("test/loss", record["test_loss"], global_step=epoch)
        self.writer.add_scalar("test/accuracy", record["test_accuracy"], global_step=epoch)
        self.writer.add_scalar("lr", record["lr"], global_step=epoch)
        self.writer.flush()  # one flush per epoch: TensorBoard shows the run as it goes

    def close(self) -> None:
        self.writer.close()
