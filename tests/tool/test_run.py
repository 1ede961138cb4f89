"""What `tinymnist train` checks before training and what a resumed run may touch (run.py)."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from typer.testing import CliRunner

from tests.support import assert_user_error, needs_cpp_compiler, run, train_args
from tests.support.mirror import Mirror
from tinymnist import data
from tinymnist.tool import checkpoint
from tinymnist.tool.cli import app


@pytest.fixture
def finished(tiny_split, tmp_path):
    """A checkpoint of a 1-epoch mlp run, saved at runs/mlp.pt with metrics beside it."""
    folder = tmp_path / "runs"
    folder.mkdir()
    ckpt, metrics = folder / "mlp.pt", folder / "mlp.jsonl"
    result = run(*train_args(tiny_split, "--model", "mlp", "--epochs", 1, "--save-model", ckpt, "--metrics", metrics))
    assert result.exit_code == 0, result.output
    return ckpt, metrics


@pytest.mark.parametrize("epochs", [[], ["--epochs", "1"]])
def test_resuming_a_finished_checkpoint_says_so_in_one_line_and_exits_0(tiny_split, finished, epochs):
    ckpt, _ = finished
    before = ckpt.read_bytes()
    result = run(*train_args(tiny_split, "--resume", ckpt, *epochs))
    assert result.exit_code == 0, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "completed 1 of --epochs 1" in line and "--epochs 2" in line
    assert "Traceback" not in result.output and ckpt.read_bytes() == before


def test_a_resumed_run_writes_only_where_its_own_command_says(tiny_split, finished):
    """The checkpoint names the path it was saved to and its metrics file: neither is written again."""
    ckpt, metrics = finished
    checkpoint_bytes, metrics_text = ckpt.read_bytes(), metrics.read_text()
    result = run(*train_args(tiny_split, "--resume", ckpt, "--epochs", 2))
    assert result.exit_code == 0, result.output
    assert "after 2 epochs" in result.stdout
    assert ckpt.read_bytes() == checkpoint_bytes and metrics.read_text() == metrics_text
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["mlp.jsonl", "mlp.pt"]
    # which it says before training: a forgotten --save-model loses the epochs it trains
    note = f"tinymnist: note: no --save-model, so this run's epochs are not saved (--save-model {ckpt} continues"
    assert note in result.stderr
    saved = run(*train_args(tiny_split, "--resume", ckpt, "--epochs", 2, "--save-model", ckpt, "--dry-run"))
    assert saved.exit_code == 0 and "no --save-model" not in saved.stderr, saved.output


def test_a_resumed_run_appends_to_metrics_and_a_new_run_refuses_them(tiny_split, finished, tmp_path):
    ckpt, metrics = finished
    assert len(metrics.read_text().splitlines()) == 2  # untrained, epoch 1
    resumed = run(*train_args(tiny_split, "--resume", ckpt, "--epochs", 2, "--metrics", metrics))
    assert resumed.exit_code == 0, resumed.output
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [0, 1, 2]
    fresh = run(*train_args(tiny_split, "--model", "mlp", "--epochs", 1, "--metrics", metrics))
    assert_user_error(fresh, f"--metrics {metrics} holds an earlier run's metrics", "name another file")
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [0, 1, 2]


def test_a_resumed_run_refuses_metrics_past_its_checkpoint(tiny_split, finished, tmp_path):
    """Another run's file, or the interrupted run's evaluations after its last save: appending would mix
    two histories or hold evaluations twice. Nothing is dropped for the user; a dry run checks it too."""
    ckpt, _ = finished
    other = tmp_path / "other.jsonl"
    assert run(*train_args(tiny_split, "--model", "mlp", "--epochs", 3, "--metrics", other)).exit_code == 0
    before = other.read_bytes()
    for dry in ([], ["--dry-run"]):
        result = run(*train_args(tiny_split, "--resume", ckpt, "--epochs", 2, "--metrics", other, *dry))
        assert_user_error(result, f"--metrics {other} holds evaluations up to epoch 3", "checkpoint's epoch 1")
        assert other.read_bytes() == before


@pytest.mark.parametrize(
    "tail, words",
    [('{"epoch": 1.5, "test_lo', "its last line (line 3) was cut off"), ("not json\n", "line 3: not a metrics record")],
)
def test_a_resumed_run_refuses_a_metrics_file_it_cannot_continue(tiny_split, finished, tail, words):
    ckpt, metrics = finished
    metrics.write_text(metrics.read_text() + tail)
    before = metrics.read_bytes()
    result = run(*train_args(tiny_split, "--resume", ckpt, "--epochs", 2, "--metrics", metrics))
    assert_user_error(result, f"--metrics {metrics}", words)
    assert metrics.read_bytes() == before


def test_a_resumed_run_continues_a_metrics_file_with_a_blank_line_as_plot_reads_it(tiny_split, finished):
    ckpt, metrics = finished
    metrics.write_text(metrics.read_text() + "\n")
    resumed = run(*train_args(tiny_split, "--resume", ckpt, "--epochs", 2, "--metrics", metrics))
    assert resumed.exit_code == 0, resumed.output
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines() if line] == [0, 1, 2]


def test_a_flag_that_replaces_a_trained_value_on_resume_says_so(tiny_split, finished):
    ckpt, _ = finished
    saved_lr = checkpoint.peek(ckpt)["config"]["lr"]
    same = run(*train_args(tiny_split, "--resume", ckpt, "--epochs", 2, "--lr", saved_lr, "--dry-run"))
    assert same.exit_code == 0, same.output
    assert "replaces" not in same.stderr
    other = run(*train_args(tiny_split, "--resume", ckpt, "--epochs", 2, "--lr", 0.5, "--batch-size", 7, "--dry-run"))
    assert other.exit_code == 0, other.output
    assert f"tinymnist: --lr 0.5 replaces checkpoint {ckpt}'s {saved_lr} from here on" in other.stderr
    assert f"--batch-size 7 replaces checkpoint {ckpt}'s" in other.stderr and "bit for bit" in other.stderr
    logged = run(*train_args(tiny_split, "--resume", ckpt, "--epochs", 2, "--log-interval", 3, "--dry-run"))
    assert logged.exit_code == 0 and "replaces" not in logged.stderr  # how often it logs changes no number


def test_resume_takes_what_was_trained_from_the_checkpoint(tiny_split, finished, tmp_path):
    ckpt, _ = finished
    again = tmp_path / "again.pt"
    result = run(*train_args(tiny_split, "--resume", ckpt, "--epochs", 2, "--save-model", again))
    assert result.exit_code == 0, result.output
    config, state = checkpoint.load(again, torch.device("cpu"))
    assert (config["model"], config["optimizer"], state.epoch) == ("mlp", "adam", 2)
    assert config["save_model"] == str(again) and config["resume"] == str(ckpt)


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--seed", str(2**64)], ["--seed", "2**63-1"]),
        (["--seed", "-1"], ["--seed"]),
        (["--batch-size", "100000"], ["--batch-size 100000", "600 training images"]),
        (["--gamma", "inf"], ["--gamma"]),
        (["--no-accel", "--device", "cuda"], ["--no-accel", "--device cuda"]),
    ],
)
def test_numbers_training_cannot_use_are_one_line_errors(tiny_split, extra, fragments):
    assert_user_error(run(*train_args(tiny_split, "--model", "mlp", *extra)), *fragments)


def test_no_accel_alone_and_with_device_cpu_train_on_the_cpu(tiny_split):
    for extra in (["--no-accel"], ["--no-accel", "--device", "cpu"]):
        result = run(
            "train", "--data-dir", tiny_split, "--no-download", "--no-compile", "--model", "mlp", "--dry-run", *extra
        )
        assert result.exit_code == 0 and "on cpu" in result.stdout, result.output


def test_bench_with_no_models_is_a_user_error():
    assert_user_error(run("bench", "--models", " , "), "--models")


def test_eval_json_is_strict_json_for_nan_weights(tiny_split, finished, tmp_path):
    ckpt, _ = finished
    payload = torch.load(ckpt, weights_only=True)
    payload["params"] = {k: torch.full_like(v, float("nan")) for k, v in payload["params"].items()}
    torch.save(payload, tmp_path / "nan.pt")
    result = run("eval", tmp_path / "nan.pt", "--json", "--data-dir", tiny_split, "--no-download", "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert record["test_loss"] is None and record["total"] == 200


def test_help_shows_every_default_and_the_version_prints():
    wide = CliRunner().invoke(app, ["train", "-h"], env={"COLUMNS": "300"})  # one line per option
    options = [line for line in wide.stdout.splitlines() if line.startswith("│ --") and "--help" not in line]
    assert len(options) > 15
    for line in options:
        assert "[default: " in line, line
    assert "(cnn, or the checkpoint's)" in wide.stdout
    version = run("--version")
    assert version.exit_code == 0 and version.stdout.startswith("tinymnist ")


def start_training(data_dir, *extra):
    """A real `python -m tinymnist train` process (signals and exit codes need one), cnn in batches of 8."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "tinymnist",
        *map(str, train_args(data_dir, "--model", "cnn")),
        "--batch-size",
        "8",
        "--log-interval",
        "1",
        "--epochs",
        "50",
        *map(str, extra),
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(process, prefix: str) -> None:
    for line in process.stdout:
        if line.startswith(prefix):
            return
    pytest.fail(f"the run ended before printing {prefix!r}: {process.stderr.read()}")


def test_sigterm_exits_143_keeping_the_last_completed_epoch(tiny_split, tmp_path):
    import signal

    ckpt = tmp_path / "cnn.pt"
    process = start_training(tiny_split, "--save-model", ckpt)
    wait_for(process, "Train Epoch: 2")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1].startswith("tinymnist: interrupted by SIGTERM; the checkpoint of epoch 1")
    assert "Traceback" not in stderr
    assert checkpoint.load(ckpt, torch.device("cpu"))[1].epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.pt"]  # no temp or lock file left


def test_a_resumed_run_stopped_before_its_next_epoch_says_its_checkpoint_is_unchanged(tiny_split, tmp_path):
    """It said "nothing saved", as if the work were lost."""
    import signal

    ckpt = tmp_path / "cnn.pt"
    process = start_training(tiny_split, "--save-model", ckpt)
    wait_for(process, "Train Epoch: 2")
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    before = ckpt.read_bytes()
    resumed = start_training(tiny_split, "--resume", ckpt, "--save-model", ckpt)
    wait_for(resumed, "Train Epoch: 2")
    resumed.send_signal(signal.SIGINT)
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 130, stderr
    assert ckpt.read_bytes() == before  # nothing written before an epoch completes
    assert (
        stderr.strip().splitlines()[-1]
        == f"tinymnist: interrupted; no epoch completed in this run; {ckpt} (epoch 1) is unchanged"
    )


def test_a_new_run_stopped_before_its_first_checkpoint_leaves_no_outputs_and_can_run_again(tiny_split, tmp_path):
    """Its metrics file and TensorBoard events stayed behind, and the same command then refused them as an
    earlier run's; "nothing saved" was untrue."""
    files = ("--save-model", tmp_path / "cnn.pt", "--metrics", tmp_path / "cnn.jsonl", "--tensorboard", tmp_path / "tb")
    process = start_training(tiny_split, *files)
    wait_for(process, "Train Epoch: 1")  # the untrained evaluation is in the metrics and events by now
    assert (tmp_path / "cnn.jsonl").read_text() and list((tmp_path / "tb").iterdir())
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "tinymnist: interrupted; no epoch completed, nothing saved"
    assert list(tmp_path.iterdir()) == []
    again = run(*train_args(tiny_split, "--model", "cnn", "--dry-run", *files))  # checks the outputs as a run would
    assert again.exit_code == 0, again.output


def test_a_new_run_stopped_after_a_trained_evaluation_keeps_it_and_says_where(tiny_split, tmp_path):
    """An evaluation inside the first epoch (--eval-every) is the run's only record of its training: kept,
    and named, though no checkpoint is."""
    metrics = tmp_path / "cnn.jsonl"
    process = start_training(tiny_split, "--save-model", tmp_path / "cnn.pt", "--metrics", metrics, "--eval-every", 5)
    wait_for(process, "Train Epoch: 1")
    wait_for(process, "Test set")  # the evaluation after 5 steps
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"tinymnist: interrupted; no epoch completed, so no checkpoint; its evaluations are kept in {metrics}"
    )
    assert [json.loads(line)["epoch"] > 0 for line in metrics.read_text().splitlines()][:2] == [False, True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.jsonl"]


@needs_cpp_compiler
@pytest.mark.skipif(os.name != "posix", reason="the failing compiler is a shell script")
def test_a_c_compiler_that_fails_is_one_line_and_leaves_no_files(tiny_split, tmp_path):
    """A full temporary folder or a file size limit (`ulimit -f`) stops inductor's C++ compile: that was a
    170-line traceback and exit 1, and the run's metrics file stayed behind."""
    compiler = tmp_path / "bin" / "g++"  # g++'s --version for inductor's check; every compile fails
    compiler.parent.mkdir()
    failing = '[ "$1" = --version ] && exec g++ --version\necho "fatal error: No space left on device" >&2\nexit 1'
    compiler.write_text(f"#!/bin/sh\n{failing}\n")
    compiler.chmod(0o755)
    env = {**os.environ, "CXX": str(compiler), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}  # nothing cached
    outputs = tmp_path / "out"
    outputs.mkdir()
    files = ["--save-model", outputs / "mlp.pt", "--metrics", outputs / "mlp.jsonl"]
    command = [sys.executable, "-m", "tinymnist", *train_args(tiny_split, "--model", "mlp", "--compile", *files)]
    result = subprocess.run(list(map(str, command)), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "tinymnist: error: compiling the step failed: the C++ compiler stopped (fatal error: No space left on "
        "device); free space in the temporary folder ($TMPDIR) or raise its limits, or run without compiling "
        "(--no-compile)"
    )
    assert "Traceback" not in result.stderr
    assert list(outputs.iterdir()) == []


@pytest.mark.parametrize(
    ("signum", "code", "line"),
    [(signal.SIGINT, 130, "tinymnist: interrupted"), (signal.SIGTERM, 143, "tinymnist: interrupted by SIGTERM")],
)
def test_a_signal_while_the_data_loads_ends_in_one_line(tmp_path, signum, code, line):
    """A stop before training (here: in a download from a mirror that never answers) exited
    with the right status and not a word. The test signals once the mirror is asked."""
    asked = threading.Event()

    def never_answer(handler):
        asked.set()
        threading.Event().wait(60)

    mirror = Mirror()
    mirror.answers = {name: [never_answer] for name in data.FILES}
    args = [a for a in train_args(tmp_path / "data", "--model", "mlp") if a != "--no-download"]
    env = {**os.environ, data.MIRRORS_ENV: mirror.url}
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "tinymnist", *map(str, args)], stderr=subprocess.PIPE, text=True, env=env
        )
        assert asked.wait(timeout=120), process.communicate()
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        mirror.stop()
    assert process.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == line and "Traceback" not in stderr


def test_a_dry_run_over_a_real_history_is_refused_as_the_run_would_be(tiny_split, tmp_path):
    metrics = tmp_path / "history.jsonl"
    assert run(*train_args(tiny_split, "--model", "mlp", "--epochs", 1, "--metrics", metrics)).exit_code == 0
    history = metrics.read_bytes()
    dry = run(*train_args(tiny_split, "--model", "mlp", "--dry-run", "--metrics", metrics))
    assert_user_error(dry, f"--metrics {metrics} holds an earlier run's metrics")
    assert metrics.read_bytes() == history


def test_a_second_run_on_the_same_files_refuses_in_one_line(tiny_split, tmp_path):
    ckpt, metrics = tmp_path / "same.pt", tmp_path / "same.jsonl"
    first = start_training(tiny_split, "--save-model", ckpt, "--metrics", metrics)
    try:
        wait_for(first, "Train Epoch: 1")
        second = run(*train_args(tiny_split, "--model", "mlp", "--save-model", ckpt, "--metrics", metrics))
        assert_user_error(second, str(ckpt), "in use by another tinymnist run", f"pid {first.pid}")
    finally:
        first.kill()
        first.communicate()


def test_a_named_pipe_or_a_folder_as_checkpoint_is_refused_not_waited_on(tiny_split, tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.pt")
    assert_user_error(run("eval", tmp_path / "pipe.pt", "--data-dir", tiny_split), "pipe.pt", "not a file")
    assert_user_error(run(*train_args(tiny_split, "--resume", tmp_path)), "is a folder")


def test_a_file_as_data_dir_is_one_line_naming_the_flag(tmp_path):
    file = tmp_path / "cases.txt"
    file.write_text("my notes")
    for args in (train_args(file, "--model", "mlp"), ["download", "--data-dir", file]):
        assert_user_error(run(*args), f"the data folder {file} is a file, not a folder")
    assert file.read_text() == "my notes"


def test_damaged_checkpoints_are_named_in_words_not_torchs_advice(tiny_split, tmp_path):
    text, pickled = tmp_path / "notes.pt", tmp_path / "object.pt"
    text.write_text("101 dalmatians")
    torch.save({"format": object}, pickled)  # a class reference: weights_only refuses it
    for path in (text, pickled):
        refused = run("eval", path, "--data-dir", tiny_split)
        assert_user_error(refused, path.name, "not a torch.save file of tensors, numbers and strings")
        assert "weights_only" not in refused.stderr


def test_resume_refuses_flags_that_would_rewrite_what_was_trained(tiny_split, finished, tmp_path):
    """Its weights came from seed 1; a one-cycle schedule's every rate depends on its total steps."""
    ckpt, _ = finished
    before = ckpt.read_bytes()
    refused = run(*train_args(tiny_split, "--resume", ckpt, "--epochs", 2, "--seed", 5))
    assert_user_error(refused, "--seed/--seeds do not match the models of checkpoint", str(ckpt))
    cycle = tmp_path / "cycle.pt"
    one_cycle = ("--model", "mlp", "--schedule", "one-cycle")
    assert run(*train_args(tiny_split, *one_cycle, "--epochs", 1, "--save-model", cycle)).exit_code == 0
    stretched = run(*train_args(tiny_split, "--resume", cycle, "--epochs", 2))
    assert_user_error(stretched, "--epochs 2", "one-cycle schedule over 1 epoch(s)", "leave --epochs out")
    done = run(*train_args(tiny_split, "--resume", cycle))
    assert done.exit_code == 0 and "its one-cycle has ended" in done.stderr
    assert ckpt.read_bytes() == before


def test_resume_refuses_one_rate_for_many_models_and_metrics_onto_the_checkpoint(tiny_split, finished, tmp_path):
    """A single --lr on an N-model checkpoint was ignored; --metrics onto the resumed file appended JSON to it."""
    sweep = tmp_path / "sweep.pt"
    trained = run(*train_args(tiny_split, "--model", "mlp", "--epochs", 1, "--seeds", 2, "--save-model", sweep))
    assert trained.exit_code == 0, trained.output
    one_rate = run(*train_args(tiny_split, "--resume", sweep, "--epochs", 2, "--lr", 0.01))
    assert_user_error(one_rate, f"error: --lr does not match the models of checkpoint {sweep}")
    rates = tmp_path / "rates.pt"
    grid = ("--model", "mlp", "--seeds", 2, "--lr", "0.001,0.002")
    assert run(*train_args(tiny_split, *grid, "--epochs", 1, "--save-model", rates)).exit_code == 0
    again = run(*train_args(tiny_split, *grid, "--resume", rates, "--epochs", 2))  # the flags it was started with
    assert again.exit_code == 0 and "after 2 epochs" in again.stdout, again.output
    ckpt, _ = finished
    before = ckpt.read_bytes()
    onto = run(*train_args(tiny_split, "--resume", ckpt, "--epochs", 2, "--metrics", ckpt))
    assert_user_error(onto, f"--metrics {ckpt} is the checkpoint being resumed")
    assert ckpt.read_bytes() == before


def test_a_tensorboard_folder_that_fails_leaves_no_metrics_file(tiny_split, tmp_path):
    """The TensorBoard writers are made before --metrics is started: a failure there truncated it (now that a
    new run refuses an earlier run's metrics, it would leave a file of a run that never ran)."""
    metrics, board = tmp_path / "m.jsonl", tmp_path / "board"
    board.mkdir()
    (board / "ensemble").write_text("a file where a run's folder goes")
    result = run(*train_args(tiny_split, "--model", "mlp", "--seeds", 2, "--metrics", metrics, "--tensorboard", board))
    assert_user_error(result, "--tensorboard", "ensemble")
    assert not metrics.exists()


def test_gamma_with_a_one_cycle_schedule_is_refused(tiny_split):
    """--gamma scales StepLR; one-cycle (the fast recipe's) has none to scale."""
    assert_user_error(run(*train_args(tiny_split, "--model", "fast", "--gamma", 0.5)), "--gamma 0.5", "one-cycle")
    mlp = run(*train_args(tiny_split, "--model", "mlp", "--schedule", "one-cycle", "--gamma", 0.5))
    assert_user_error(mlp, "--schedule step")


def test_resume_checks_the_flags_given_now_before_anything_else(tiny_split, finished):
    ckpt, _ = finished
    assert_user_error(run(*train_args(tiny_split, "--resume", ckpt, "--epochs", "-3")), "--epochs")


def test_resuming_a_missing_checkpoint_names_the_flag(tiny_split, tmp_path):
    absent = tmp_path / "absent.pt"
    assert_user_error(run(*train_args(tiny_split, "--resume", absent)), f"--resume {absent}", "no such file")
