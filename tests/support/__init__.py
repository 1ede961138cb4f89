"""What the test modules share: running the CLI (and the picture commands alone), a silent
reporter, random data, fit as `train` calls it, PNG checks, a real small file system for full
disks, and the skip markers. Beside it: tutorials.py, the tutorials' own modules that tests hold
tinymnist to, and mirror.py, the HTTP server the download tests start."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from tinymnist.algorithm.config import model_configs
from tinymnist.algorithm.train import TestSet, Training, evaluate_one, fit
from tinymnist.data import MNIST
from tinymnist.tool.cli import app
from tinymnist.transforms.speed import cpu_compiler
from tinymnist.transforms.vmap import evaluate_many
from tinymnist.viz.commands import register

# torch.compile on the CPU builds C++; without a compiler tinymnist trains eager (test_cli.py)
# and the tests of the compiled step have nothing to run.
needs_cpp_compiler = pytest.mark.skipif(cpu_compiler() is None, reason="torch.compile on the CPU needs a C++ compiler")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(*args):
    """Run the CLI in-process; output is not a terminal, so it prints pytorch/examples lines."""
    return CliRunner().invoke(app, [str(a) for a in args])


def train_args(data_dir, *extra) -> list:
    """`tinymnist train` on a test data folder, on the CPU, eager (no compile time)."""
    return ["train", "--data-dir", data_dir, "--no-download", "--device", "cpu", "--no-compile", *extra]


def assert_user_error(result, *fragments):
    """Exit 2, one line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinymnist: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


class Silent:
    """A reporter that keeps what it is told instead of printing it."""

    def __init__(self):
        self.records, self.logged_steps, self.compiling = [], [], []

    def epoch_started(self, epoch, steps, lr, compiling):
        self.compiling.append(compiling)

    def logged(self, epoch, step, images_seen, n_train, loss):
        self.logged_steps.append((epoch, step))

    def evaluated(self, record):
        self.records.append(record)


def random_mnist(n_train: int, n_test: int, seed: int = 0, device="cpu") -> MNIST:
    """Random uint8 images and labels in MNIST's shapes: for tests that need no real digits."""
    g = torch.Generator().manual_seed(seed)
    images = lambda n: torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)  # noqa: E731
    labels = lambda n: torch.randint(0, 10, (n,), generator=g)  # noqa: E731
    return MNIST(*(t.to(device) for t in (images(n_train), labels(n_train), images(n_test), labels(n_test))))


def fit_run(config, data, state, step, reporter=None, on_epoch_end=None, steps_per_call=1):
    """train.fit as `tinymnist train` calls it for `config`: its models, the step, the test set."""
    models = model_configs(config)
    evaluate = TestSet(config, models, data, evaluate_many if config.n_models > 1 else evaluate_one)
    return fit(Training(config, models, step, evaluate, reporter, on_epoch_end, steps_per_call), data, state)


def viz_app() -> typer.Typer:
    """plot, predict and export on an app of their own, exactly as cli.py registers them."""
    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)
    return app


def run_viz(*args):
    """Run a picture command in-process; stdout is not a terminal."""
    return CliRunner().invoke(viz_app(), [str(a) for a in args])


def train_checkpoint(data_dir: Path, path: Path, model: str, *extra) -> Path:
    """`tinymnist train` on the CPU, eager, saving the checkpoint to `path`."""
    result = run(
        "train",
        "--model",
        model,
        "--data-dir",
        data_dir,
        "--no-download",
        "--device",
        "cpu",
        "--no-compile",
        "--save-model",
        path,
        *extra,
    )
    assert result.exit_code == 0, result.output
    return path


def open_png(path: Path, size: tuple[int, int]):
    """The PNG at `path` as an RGB pillow image, checked: the expected size, and not blank."""
    image_module = pytest.importorskip("PIL.Image")
    with image_module.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size
        rgb = image.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 16)  # None when there are more than that many
    assert colours is None or len(colours) > 2, "the picture is blank"
    return rgb


def no_temp_files(folder: Path) -> bool:
    """Nothing half-written left behind: no hidden temp files in `folder`."""
    return not [p for p in Path(folder).iterdir() if p.name.startswith(".")]


@contextlib.contextmanager
def tmpfs(folder: Path, size_bytes: int, read_only: bool = False):
    """Mount a tmpfs of `size_bytes` on `folder` (created) for the block; skip if we may not."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'mount failed'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def remount_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
