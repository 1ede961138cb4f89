"""What the test_viz_* modules share: the picture commands as a CLI, PNG checks, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tests.helpers import run
from tinymnist.viz.commands import register


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
