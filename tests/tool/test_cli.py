"""`tinymnist` as users run it: train, eval, resume, shapes, info, and every bad input."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from tests.support import assert_user_error, needs_cpp_compiler, needs_cuda, run, train_args
from tinymnist.tool import checkpoint
from tinymnist.tool.cli import usable_cores

TEST_LINE = re.compile(r"Test set: Average loss: (\d+\.\d{4}), Accuracy: (\d+)/(\d+) \((\d+)%\)")
TRAIN_LINE = re.compile(r"Train Epoch: (\d+) \[(\d+)/(\d+) \((\d+)%\)\]\tLoss: (\d+\.\d{6})")


def test_dry_run_does_one_step_and_one_evaluation(tiny_split, tmp_path):
    metrics = tmp_path / "m.jsonl"
    result = run(*train_args(tiny_split, "--model", "mlp", "--dry-run", "--metrics", metrics))
    assert result.exit_code == 0, result.output
    ((_, seen, total, percent, _),) = TRAIN_LINE.findall(result.stdout)
    assert int(percent) == round(100 * int(seen) / int(total)) < 100  # of the epoch, as the brackets say
    assert len(TEST_LINE.findall(result.stdout)) == 1
    assert not metrics.exists()  # a dry run writes no output (tests/test_run.py: not over a real history)
    final = result.stdout.strip().splitlines()[-1]
    assert re.search(r"after one step \(a dry run\) on cpu; its one step took \d+\.\d s; no speed measured$", final)
    assert "images/s" not in final and "epoch" not in final


def test_dry_run_saves_no_checkpoint(tiny_split, tmp_path):
    """One step is not a completed epoch: a checkpoint of it would claim what never happened."""
    ckpt = tmp_path / "m.pt"
    assert run(*train_args(tiny_split, "--model", "mlp", "--dry-run", "--save-model", ckpt)).exit_code == 0
    assert not ckpt.exists()


def test_metrics_agree_with_the_printed_lines_and_eval_reproduces_them(tiny_split, tmp_path):
    metrics, ckpt = tmp_path / "m.jsonl", tmp_path / "mlp.pt"
    result = run(*train_args(tiny_split, "--model", "mlp", "--epochs", 2, "--metrics", metrics, "--save-model", ckpt))
    assert result.exit_code == 0, result.output
    printed = TEST_LINE.findall(result.stdout)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(printed) == len(records) == 3  # untrained, epoch 1, epoch 2
    for (loss, correct, total, percent), record in zip(printed, records, strict=True):
        assert float(loss) == pytest.approx(record["test_loss"], abs=5e-5)
        assert int(percent) == round(100 * record["test_accuracy"])
        assert (int(correct), int(total)) == (record["correct"], record["total"])
        assert record["test_accuracy"] == record["correct"] / record["total"]
        assert set(record) >= {"epoch", "train_loss", "lr", "seconds", "images_per_second"}
    assert "Final test accuracy" in result.stdout.strip().splitlines()[-1]

    evaluated = run("eval", ckpt, "--json", "--data-dir", tiny_split, "--no-download", "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    again = json.loads(evaluated.stdout)
    assert (again["correct"], again["test_loss"], again["epoch"]) == (
        records[-1]["correct"],
        records[-1]["test_loss"],
        2,
    )


def assert_same_tree(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tree(a[key], b[key])
    else:
        assert torch.equal(a, b), "not bit-identical"


@pytest.mark.parametrize("compile", ["--no-compile", pytest.param("--compile", marks=needs_cpp_compiler)])
def test_resume_is_bit_exact(tiny_split, tmp_path, compile):
    """4 epochs in one run == 2 epochs, then --resume up to 4: params, optimizer state, RNG state.
    On fixed threads, as promised: the same numbers whatever else the machine runs. cnn, so
    dropout and shuffling both draw from the generator that the checkpoint saves;
    compiled too, where inductor draws its dropout seeds from that same generator."""
    common = ("--model", "cnn", "--batch-size", 50, "--log-interval", 100, "--threads", 2, compile)
    straight, first, resumed = tmp_path / "straight.pt", tmp_path / "first.pt", tmp_path / "resumed.pt"
    assert run(*train_args(tiny_split, *common, "--epochs", 4, "--save-model", straight)).exit_code == 0
    assert run(*train_args(tiny_split, *common, "--epochs", 2, "--save-model", first)).exit_code == 0
    result = run(
        *train_args(tiny_split, "--resume", first, "--epochs", 4, "--save-model", resumed, "--threads", 2, compile)
    )
    assert result.exit_code == 0, result.output
    assert "Train Epoch: 3" in result.stdout and "Train Epoch: 2" not in result.stdout
    _, a = checkpoint.load(straight, torch.device("cpu"))
    _, b = checkpoint.load(resumed, torch.device("cpu"))
    assert a.epoch == b.epoch == 4
    assert_same_tree(a.params, b.params)
    assert_same_tree(a.opt_state, b.opt_state)
    assert_same_tree(a.rng, b.rng)


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--model", "resnet"], ["--model", "mlp, mlp3, cnn, lenet"]),
        (["--optimizer", "lion"], ["--optimizer", "sgd"]),
        (["--batch-size", "0"], ["--batch-size must be positive, got 0"]),
        (["--test-batch-size", "-5"], ["--test-batch-size"]),
        (["--epochs", "0"], ["--epochs"]),
        (["--lr", "-0.1"], ["--lr"]),
        (["--micro-batch", "-1"], ["--micro-batch", "0 (whole batch) or positive"]),
        (["--threads", "0"], ["--threads", "positive"]),
        (["--seeds", "1,4"], ["--seeds 1,4", "one number of models", "tinymnist bench --seeds takes a list"]),
        (["--seeds", "four"], ["--seeds four", "a whole number of models"]),
        (["--seeds", "0"], ["--seeds", "1 or more"]),
        (["--lr", "nan"], ["--lr"]),
        (["--device", "tpu"], ["--device"]),
        (["--save-model", "/nonexistent-folder/model.pt"], ["--save-model", "does not exist"]),
    ],
)
def test_bad_flags_exit_2_with_one_line(tiny_split, extra, fragments):
    assert_user_error(run(*train_args(tiny_split, *extra)), *fragments)


def test_threads_fixes_the_cpu_thread_count(tiny_split):
    torch.set_num_threads(2)  # conftest restores the count
    assert run(*train_args(tiny_split, "--epochs", 1, "--threads", 1)).exit_code == 0
    assert torch.get_num_threads() == 1


def test_more_threads_than_cores_is_said_and_still_runs(tiny_split):
    """--threads above the core count is allowed (the same count on another machine gives the same
    numbers), but it is slower here, so the run says so."""
    threads = usable_cores() + 1
    result = run(*train_args(tiny_split, "--epochs", 1, "--threads", threads))
    assert result.exit_code == 0, result.output
    assert f"--threads {threads} is more than this machine's {threads - 1} cores" in result.stderr
    assert "more than this machine" not in run(*train_args(tiny_split, "--epochs", 1, "--threads", 1)).stderr


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["train", "--bogus"], ["No such option: --bogus", "train -h"]),
        (["train", "--batch-size", "abc"], ["'--batch-size'", "integer"]),
        (["bench", "--repeats"], ["'--repeats' requires an argument"]),
        (["eval"], ["Missing argument 'CHECKPOINT'"]),
        (["bogus"], ["No such command 'bogus'"]),
        (["--bogus"], ["No such option: --bogus"]),
    ],
)
def test_a_command_line_click_cannot_parse_is_one_line_too(args, fragments):
    """click's own usage errors end like every other mistake: one line, exit 2, not a framed box."""
    assert_user_error(run(*args), *fragments)


def test_the_command_alone_still_shows_its_help():
    result = run()
    assert "Usage:" in result.output and "train" in result.output and "error" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_user_error(tiny_split):
    assert_user_error(run(*train_args(tiny_split, "--device", "cuda")), "--device cuda", "CUDA is not available")


def test_missing_data_with_no_download_names_the_files_and_what_to_do(tmp_path):
    result = run(*train_args(tmp_path / "empty"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "train-images-idx3-ubyte.gz" in result.stderr and "TINYMNIST_DATA" in result.stderr


def test_corrupt_and_mismatched_checkpoints_are_user_errors(tiny_split, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    assert_user_error(run(*train_args(tiny_split, "--resume", garbage)), "garbage.pt")
    assert_user_error(run("eval", garbage, "--data-dir", tiny_split, "--no-download"), "garbage.pt")

    good = tmp_path / "mlp.pt"
    assert run(*train_args(tiny_split, "--model", "mlp", "--epochs", 1, "--save-model", good)).exit_code == 0
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:-100])
    assert_user_error(run(*train_args(tiny_split, "--resume", truncated)), "truncated.pt")
    assert_user_error(
        run(*train_args(tiny_split, "--resume", good, "--model", "cnn", "--epochs", 2)), "--model cnn", "mlp"
    )

    payload = torch.load(good, weights_only=True)
    payload["params"]["fc1.weight"] = torch.zeros(3, 3)
    torch.save(payload, tmp_path / "wrong_shape.pt")
    assert_user_error(
        run(*train_args(tiny_split, "--resume", tmp_path / "wrong_shape.pt", "--epochs", 2)), "do not match"
    )

    del payload["rng"]
    torch.save(payload, tmp_path / "no_rng.pt")
    assert_user_error(run(*train_args(tiny_split, "--resume", tmp_path / "no_rng.pt", "--epochs", 2)), "lacks rng")


def test_non_finite_loss_stops_naming_the_epoch_and_keeps_the_last_good_checkpoint(tiny_split, tmp_path):
    ckpt = tmp_path / "mlp.pt"
    # gamma 1e30: epoch 1 trains normally, epoch 2's learning rate is 1e27 and blows up.
    args = ("--model", "mlp", "--optimizer", "sgd", "--lr", "0.01", "--gamma", "1e30", "--epochs", 3)
    result = run(*train_args(tiny_split, *args, "--save-model", ckpt))
    assert_user_error(result, "epoch 2", "lower --lr")
    assert "epoch 1 is kept" in result.stderr
    _, state = checkpoint.load(ckpt, torch.device("cpu"))
    assert state.epoch == 1 and all(torch.isfinite(p).all() for p in state.params.values())

    unsaved = run(*train_args(tiny_split, *args))  # no --save-model: no claim that something is kept
    assert_user_error(unsaved, "epoch 2")
    assert "kept" not in unsaved.stderr


def test_ctrl_c_saves_the_last_epoch_and_exits_130(tiny_split, tmp_path):
    ckpt = tmp_path / "cnn.pt"
    command = [
        sys.executable,
        "-m",
        "tinymnist",
        *map(str, train_args(tiny_split, "--model", "cnn")),
        "--batch-size",
        "8",
        "--log-interval",
        "1",
        "--epochs",
        "50",
        "--save-model",
        str(ckpt),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # wait until epoch 2 is under way
        if line.startswith("Train Epoch: 2"):
            process.send_signal(signal.SIGINT)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    _, state = checkpoint.load(ckpt, torch.device("cpu"))
    assert state.epoch == 1
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_shapes_prints_the_arithmetic_and_the_9216():
    result = run("shapes", "cnn")
    assert result.exit_code == 0, result.output
    assert "9216" in result.stdout and "1,199,882" in result.stdout
    assert_user_error(run("shapes", "vgg"), "MODEL 'vgg' is unknown; choose one of mlp")  # an argument, no --model


def test_info_reports_torch_and_accelerators():
    result = run("info")
    assert result.exit_code == 0, result.output
    assert torch.__version__ in result.stdout and "CUDA available" in result.stdout


def test_python_dash_m_and_help_mention_the_compile_default():
    result = subprocess.run([sys.executable, "-m", "tinymnist", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--compile" in result.stdout and "--save-model" in result.stdout


@needs_cuda
def test_cuda_dry_run_compiled(tiny_split):
    result = run("train", "--data-dir", tiny_split, "--no-download", "--device", "cuda", "--compile", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "on cuda" in result.stdout


def test_tf32_matmuls_are_switched_on_for_cuda_only():
    from tinymnist.transforms.speed import use_tf32_matmuls

    torch.backends.cuda.matmul.allow_tf32 = False  # conftest restores the setting afterwards
    use_tf32_matmuls(torch.device("cpu"))
    assert not torch.backends.cuda.matmul.allow_tf32
    use_tf32_matmuls(torch.device("cuda"))
    assert torch.backends.cuda.matmul.allow_tf32


def test_a_checkpoint_whose_config_fields_differ_is_one_line(tiny_split, tmp_path):
    """A config key missing (no released version lacked one) or one no version had: refused, naming it."""
    ckpt = tmp_path / "old.pt"
    assert run(*train_args(tiny_split, "--model", "mlp", "--epochs", "1", "--save-model", ckpt)).exit_code == 0
    payload = torch.load(ckpt, weights_only=True)
    del payload["config"]["cuda_graphs"]
    payload["config"]["colour"] = "blue"
    torch.save(payload, ckpt)
    evaluated = run("eval", ckpt, "--data-dir", tiny_split, "--no-download")
    assert_user_error(evaluated, "does not match this version", "lacks cuda_graphs", "has extra colour")
    resumed = run(*train_args(tiny_split, "--resume", ckpt, "--epochs", "2"))
    assert_user_error(resumed, "does not match this version", str(ckpt))


@pytest.fixture
def no_cpp_compiler():
    """A machine where none of the C++ compilers torch.compile looks for is installed.

    inductor's own `config.patch` restores the option on exit; monkeypatch would delete
    it (inductor's config module has no real attributes) and break every later compile."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": (None, "no-such-c++-compiler")}):
        yield


def test_compile_without_a_cpp_compiler_is_a_one_line_error(tiny_split, no_cpp_compiler):
    args = ["train", "--data-dir", tiny_split, "--no-download", "--device", "cpu", "--compile", "--dry-run"]
    assert_user_error(run(*args), "C++ compiler", "--no-compile")
    bench = run("bench", "--models", "mlp", "--device", "cpu", "--window-images", 64, "--repeats", 1)
    assert_user_error(bench, "C++ compiler", "--no-compile")


def test_without_a_cpp_compiler_the_default_step_runs_eager(tiny_split, no_cpp_compiler):
    result = run("train", "--data-dir", tiny_split, "--no-download", "--device", "cpu", "--model", "mlp", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "no C++ compiler" in result.stderr
    assert re.search(r"its one step took \d+\.\d s; no speed", result.stdout)  # not "compiling included"
    quiet = run(*train_args(tiny_split, "--model", "mlp", "--dry-run"))  # --no-compile: nothing to say
    assert quiet.exit_code == 0 and "C++" not in quiet.stderr, quiet.output


def test_a_cpp_compile_error_is_found_raised_or_wrapped_and_said_by_its_cause():
    """inductor raises CppCompileError inside its own wrappers (InductorError, BackendCompilerFailed: their
    inner_exception). A full disk or a size limit gets the space advice; another compiler error, the advice
    to run eager and report it; anything else, or an error raised `from None` while one was handled, is not one."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import CppCompileError

    from tinymnist.tool.exits import cpp_compile_failure

    full = CppCompileError(["g++", "k.cpp"], "k.cpp: In function\nld: final link failed: No space left on device\n")
    wrapped = BackendCompilerFailed(lambda: None, full, None)
    assert "(ld: final link failed: No space left on device); free space" in cpp_compile_failure(wrapped)
    bad_code = CppCompileError(["g++", "k.cpp"], "k.cpp:3:1: error: expected ';' before '}' token\n")
    said = cpp_compile_failure(bad_code)
    assert "(k.cpp:3:1: error: expected ';' before '}' token)" in said and "please report it" in said
    assert cpp_compile_failure(RuntimeError("a bug")) is None
    try:
        try:
            raise full
        except CppCompileError:
            raise ValueError("another error, its context hidden") from None
    except ValueError as hidden:
        assert cpp_compile_failure(hidden) is None
