"""Without the `viz` or `bench` extra: a one-line error naming what to install; terminal pictures still work."""

import json
import sys

import pytest
import torch

from tests.support import assert_user_error, run, run_viz, train_checkpoint
from tinymnist.errors import TinyMnistError
from tinymnist.tool import cli
from tinymnist.viz.confusion import write_confusion_png

INSTALL = "pip install 'tinymnist[viz]'"


def uninstall(monkeypatch, *packages):
    """Make `import package` (and its submodules) fail as if it were not installed."""
    for package in packages:
        loaded = [name for name in sys.modules if name == package or name.startswith(package + ".")]
        for name in {package, *loaded}:
            monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: import raises ImportError


def metrics_file(tmp_path):
    path = tmp_path / "m.jsonl"
    records = [
        {
            "epoch": e,
            "train_loss": None if e == 0 else 0.5 / e,
            "test_loss": 1.0 / (e + 1),
            "test_accuracy": 0.1 + 0.4 * e,
            "total": 100,
        }
        for e in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_plot_png_without_matplotlib_names_the_install_and_writes_nothing(tmp_path, monkeypatch):
    uninstall(monkeypatch, "matplotlib")
    path = metrics_file(tmp_path)
    assert_user_error(run_viz("plot", path, "-o", tmp_path / "c.png"), "plot -o needs matplotlib", INSTALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


def test_terminal_pictures_need_no_extra(tmp_path, monkeypatch):
    uninstall(monkeypatch, "matplotlib", "PIL", "safetensors", "tensorboard")
    result = run_viz("plot", metrics_file(tmp_path))
    assert result.exit_code == 0, result.output
    assert "90.00%" in result.stdout


def test_predict_image_without_pillow_names_the_install(tiny_split, tmp_path, monkeypatch):
    checkpoint = train_checkpoint(tiny_split, tmp_path / "mlp.pt", "mlp", "--epochs", "1")
    (tmp_path / "seven.png").write_bytes(b"\x89PNG")
    uninstall(monkeypatch, "PIL")
    result = run_viz("predict", checkpoint, "--image", tmp_path / "seven.png", "--device", "cpu")
    assert_user_error(result, "predict --image needs pillow", INSTALL)


def test_export_safetensors_without_safetensors_names_the_install_and_pt_still_works(tiny_split, tmp_path, monkeypatch):
    checkpoint = train_checkpoint(tiny_split, tmp_path / "mlp.pt", "mlp", "--epochs", "1")
    uninstall(monkeypatch, "safetensors")
    out = tmp_path / "model.safetensors"
    assert_user_error(run_viz("export", checkpoint, "-o", out), "needs safetensors", INSTALL)
    assert not out.exists()
    assert run_viz("export", checkpoint, "-o", tmp_path / "model.pt").exit_code == 0
    assert set(torch.load(tmp_path / "model.pt", weights_only=True)) == {
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    }


def test_tensorboard_reporter_without_tensorboard_names_the_install(tmp_path, monkeypatch):
    from tinymnist.tool.tensorboard import TensorBoardReporter

    uninstall(monkeypatch, "tensorboard", "torch.utils.tensorboard")
    with pytest.raises(TinyMnistError) as raised:
        TensorBoardReporter(tmp_path / "tb", 600)
    assert str(raised.value) == f"--tensorboard needs tensorboard, which is not installed; run {INSTALL}"


def test_confusion_png_without_matplotlib_names_the_install(tmp_path, monkeypatch):
    uninstall(monkeypatch, "matplotlib")
    with pytest.raises(TinyMnistError, match=r"eval --confusion -o needs matplotlib.*tinymnist\[viz\]"):
        write_confusion_png(torch.eye(10, dtype=torch.int64), tmp_path / "c.png")
    assert not list(tmp_path.iterdir())


def test_a_missing_extra_is_found_before_the_work(tiny_split, tmp_path, monkeypatch):
    """Each picture command checks its extra first: before it reads a metrics file, loads a
    checkpoint or the test set. Here each input is missing too, and the extra is what is named."""
    uninstall(monkeypatch, "matplotlib", "PIL", "safetensors")
    absent = tmp_path / "absent.pt"
    assert_user_error(run_viz("plot", tmp_path / "absent.jsonl", "-o", tmp_path / "c.png"), "plot -o needs matplotlib")
    assert_user_error(run_viz("predict", absent, "-o", tmp_path / "d.png"), "predict -o needs pillow", INSTALL)
    assert_user_error(run_viz("predict", absent, "--image", tmp_path / "7.png"), "predict --image needs pillow")
    assert_user_error(run_viz("export", absent, "-o", tmp_path / "m.safetensors"), "needs safetensors", INSTALL)
    confusion_png = ["--confusion", "-o", tmp_path / "c.png"]
    assert_user_error(run("eval", absent, *confusion_png), "eval --confusion -o needs matplotlib", INSTALL)
    checkpoint = train_checkpoint(tiny_split, tmp_path / "mlp.pt", "mlp", "--epochs", "1")
    empty = tmp_path / "no_data"
    empty.mkdir()
    with_data = ["--data-dir", empty, "--no-download", "--device", "cpu"]  # the test set would be missing
    assert_user_error(run_viz("predict", checkpoint, "-o", tmp_path / "d.png", *with_data), "predict -o needs pillow")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.pt", "no_data"]


@pytest.mark.parametrize(
    "extra, timed",
    [
        ([], "run_bench"),
        (["--time-to-accuracy", "0.99"], "run_time_to_accuracy"),
        (["--seeds", "1"], "run_seeds_bench"),
    ],
)
def test_bench_without_pillow_says_so_before_timing_anything(tmp_path, monkeypatch, extra, timed):
    """The tutorials' loop is timed after tinymnist's, minutes into a --time-to-accuracy run: pillow
    is checked first. --seeds times no tutorial loop, so it goes on without pillow."""

    def reached(*args, **kwargs):
        raise TinyMnistError("reached the timing")

    uninstall(monkeypatch, "PIL")
    monkeypatch.setattr(cli, timed, reached)
    result = run("bench", "--device", "cpu", "--no-compile", "--data-dir", tmp_path, *extra)
    if extra[:1] == ["--seeds"]:
        assert_user_error(result, "reached the timing")
    else:
        assert_user_error(result, "bench's reference loop needs pillow", "pip install 'tinymnist[bench]'")
