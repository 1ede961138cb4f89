"""train --tensorboard's reporter: the event files hold what was logged, at the right steps."""

import pytest

from tinymnist.errors import TinyMnistError

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
from tinymnist.viz.tensorboard_log import TensorBoardReporter  # noqa: E402  (after the skip)


def scalars(log_dir):
    """tag -> (steps, values) as tensorboard itself reads them back (values stored as float32)."""
    accumulator = event_accumulator.EventAccumulator(str(log_dir))
    accumulator.Reload()
    found = {}
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        found[tag] = ([e.step for e in events], pytest.approx([e.value for e in events], rel=1e-6))
    return found


def record(epoch, train_loss, test_loss, accuracy, lr):
    return {"epoch": epoch, "train_loss": train_loss, "test_loss": test_loss, "test_accuracy": accuracy,
            "correct": round(accuracy * 2000), "total": 2000, "lr": lr, "seconds": 0.5,
            "images_per_second": 1e4}  # fmt: skip


def test_event_files_hold_every_scalar_at_its_step(tmp_path):
    reporter = TensorBoardReporter(tmp_path / "run")
    n_train = 600  # 600 images, batch 64: 9 steps an epoch, the ragged 24 dropped
    reporter.evaluated(record(0, None, 2.30, 0.10, 1.0))
    for epoch, lr in ((1, 1.0), (2, 0.7)):
        reporter.logged(epoch, 5, 5 * 64, n_train, 1.5 / epoch)
        reporter.logged(epoch, 9, 9 * 64, n_train, 1.0 / epoch)
        reporter.evaluated(record(epoch, 1.0 / epoch, 0.5 / epoch, 0.9 + epoch / 100, lr))
    reporter.close()
    found = scalars(tmp_path / "run")
    assert set(found) == {"train/loss", "test/loss", "test/accuracy", "lr"}
    assert found["train/loss"] == ([320, 576, 920, 1176], [1.5, 1.0, 0.75, 0.5])  # images since the run began
    assert found["test/loss"] == ([0, 1, 2], [2.3, 0.5, 0.25])
    assert found["test/accuracy"] == ([0, 1, 2], [0.1, 0.91, 0.92])
    assert found["lr"] == ([0, 1, 2], [1.0, 1.0, 0.7])


def test_one_folder_per_model_keeps_the_runs_apart(tmp_path):
    for seed, accuracy in ((1, 0.95), (2, 0.97)):
        reporter = TensorBoardReporter(tmp_path / f"seed{seed}_lr1")
        reporter.evaluated(record(1, 0.2, 0.1, accuracy, 1.0))
        reporter.close()
    assert scalars(tmp_path / "seed1_lr1")["test/accuracy"] == ([1], [0.95])
    assert scalars(tmp_path / "seed2_lr1")["test/accuracy"] == ([1], [0.97])


def test_a_file_where_the_folder_should_be_is_a_one_line_error(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(TinyMnistError, match=r"--tensorboard .*taken: cannot write there"):
        TensorBoardReporter(tmp_path / "taken")
