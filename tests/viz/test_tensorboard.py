"""train --tensorboard's reporter: the event files hold what was logged, at the right steps."""

import pytest

from tinymnist.data import load_mnist
from tinymnist.errors import TinyMnistError

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
from tinymnist.tool.tensorboard import TensorBoardReporter  # noqa: E402  (after the skip)


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
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "test_accuracy": accuracy,
        "correct": round(accuracy * 2000),
        "total": 2000,
        "lr": lr,
        "seconds": 0.5,
        "images_per_second": 1e4,
    }


def test_event_files_hold_every_scalar_at_its_step(tmp_path):
    n_train = 600  # 600 images, batch 64: 9 steps an epoch, the ragged 24 dropped
    reporter = TensorBoardReporter(tmp_path / "run", n_train)
    reporter.evaluated(record(0, None, 2.30, 0.10, 1.0))
    for epoch, lr in ((1, 1.0), (2, 0.7)):
        reporter.logged(epoch, 5, 5 * 64, n_train, 1.5 / epoch)
        reporter.logged(epoch, 9, 9 * 64, n_train, 1.0 / epoch)
        reporter.evaluated(record(epoch, 1.0 / epoch, 0.5 / epoch, 0.9 + epoch / 100, lr))
    reporter.evaluated(record(2.5, None, 0.2, 0.93, 0.7))  # --eval-every: halfway through epoch 3
    reporter.close()
    found = scalars(tmp_path / "run")
    assert set(found) == {"train/loss", "test/loss", "test/accuracy", "lr"}
    assert found["train/loss"] == ([320, 576, 920, 1176], [1.5, 1.0, 0.75, 0.5])  # images since the run began
    assert found["test/loss"] == ([0, 600, 1200, 1500], [2.3, 0.5, 0.25, 0.2])  # on the same axis
    assert found["test/accuracy"] == ([0, 600, 1200, 1500], [0.1, 0.91, 0.92, 0.93])
    assert found["lr"] == ([0, 600, 1200, 1500], [1.0, 1.0, 0.7, 0.7])


def test_one_folder_per_model_keeps_the_runs_apart(tmp_path):
    for seed, accuracy in ((1, 0.95), (2, 0.97)):
        reporter = TensorBoardReporter(tmp_path / f"seed{seed}_lr1", 600)
        reporter.evaluated(record(1, 0.2, 0.1, accuracy, 1.0))
        reporter.close()
    assert scalars(tmp_path / "seed1_lr1")["test/accuracy"] == ([600], [0.95])
    assert scalars(tmp_path / "seed2_lr1")["test/accuracy"] == ([600], [0.97])


def test_a_file_where_the_folder_should_be_is_a_one_line_error(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(TinyMnistError, match=r"--tensorboard .*taken: cannot write there"):
        TensorBoardReporter(tmp_path / "taken", 600)


def test_train_with_tensorboard_writes_what_metrics_writes(tiny_split, tmp_path):
    """Through the CLI: the folder that --tensorboard names holds each evaluation's test accuracy."""
    import json

    from tests.support import run, train_args

    metrics, board = tmp_path / "m.jsonl", tmp_path / "board" / "mlp"
    result = run(*train_args(tiny_split, "--model", "mlp", "--epochs", 2, "--metrics", metrics, "--tensorboard", board))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    found = scalars(board)
    n_train = len(load_mnist(tiny_split).train_images)
    assert found["test/accuracy"] == ([0, n_train, 2 * n_train], [r["test_accuracy"] for r in records])
    assert found["lr"][0] == [0, n_train, 2 * n_train]


def test_a_multi_model_run_writes_one_folder_per_model_and_one_for_the_ensemble(tiny_split, tmp_path):
    """Through the CLI, --seeds 2 and two rates: each model's folder holds its own --metrics
    accuracies, the ensemble's folder the ensemble's, and nothing else is there."""
    import json

    from tests.support import run, train_args

    metrics, board = tmp_path / "m.jsonl", tmp_path / "board"
    args = ("--model", "mlp", "--epochs", 1, "--seeds", 2, "--lr", "0.001,0.002", "--metrics", metrics)
    result = run(*train_args(tiny_split, *args, "--tensorboard", board))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    folders = {"seed1_lr0.001", "seed2_lr0.001", "seed1_lr0.002", "seed2_lr0.002", "ensemble"}
    assert {p.name for p in board.iterdir()} == folders
    for folder in folders:
        mine = [
            r
            for r in records
            if (folder == "ensemble") == bool(r.get("ensemble"))
            and (r.get("ensemble") or folder == f"seed{r['seed']}_lr{r['initial_lr']:g}")
        ]
        found = scalars(board / folder)
        assert [r["test_accuracy"] for r in mine] == found["test/accuracy"][1], folder
        assert len(found["test/accuracy"][0]) == 2, folder  # epochs 0 and 1
    assert "lr" not in scalars(board / "ensemble") and "train/mean_loss" in scalars(board / "ensemble")


def test_tensorboard_onto_a_file_is_refused_before_training(tiny_split, tmp_path):
    from tests.support import assert_user_error, run, train_args

    (tmp_path / "taken").write_text("not a folder")
    result = run(*train_args(tiny_split, "--model", "mlp", "--tensorboard", tmp_path / "taken" / "run"))
    assert_user_error(result, "--tensorboard", "is a file, not a folder")
    assert "Train Epoch" not in result.stdout


def test_a_new_run_refuses_an_earlier_runs_events_and_a_resumed_run_adds_to_its_own(tiny_split, tmp_path):
    """A second run into the same folder drew both runs as one in TensorBoard, their steps on top of each other."""
    from tests.support import assert_user_error, run, train_args

    board, ckpt = tmp_path / "board", tmp_path / "mlp.pt"
    first = run(*train_args(tiny_split, "--model", "mlp", "--epochs", 1, "--tensorboard", board, "--save-model", ckpt))
    assert first.exit_code == 0, first.output
    events = sorted(board.rglob("events.out.tfevents.*"))
    assert len(events) == 1
    for dry in ((), ("--dry-run",)):
        again = run(*train_args(tiny_split, "--model", "mlp", "--epochs", 1, "--tensorboard", board, *dry))
        assert_user_error(again, f"--tensorboard {board} holds an earlier run's TensorBoard events", "delete them")
        assert sorted(board.rglob("events.out.tfevents.*")) == events
    resumed = run(*train_args(tiny_split, "--resume", ckpt, "--epochs", 2, "--tensorboard", board))
    assert resumed.exit_code == 0, resumed.output
    assert len(list(board.rglob("events.out.tfevents.*"))) == 2
    assert scalars(board)["test/accuracy"][0][-1] > 0  # the resumed run's epoch 2 is in the folder
