"""What an output may replace (outputs.check_output): a file of its own kind, an empty one, or
nothing; never a file of another kind, never a file the run reads, and for a new training run never an
earlier run's checkpoint or metrics (outputs.refuse_an_earlier_run). Each refusal is one line,
exit 2, with the file left byte for byte as it was; each legitimate replacement still works."""

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.support import assert_user_error, run, train_args
from tinymnist.errors import TinyMnistError
from tinymnist.tool import checkpoint, outputs

PNG_BYTES = outputs.PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR"  # the signature is what tells a PNG
BENCH_ARGS = ("--models", "mlp", "--device", "cpu", "--no-compile", "--window-images", 64, "--repeats", 1)


@pytest.fixture(scope="module")
def made(tiny_split, tmp_path_factory) -> dict[str, Path]:
    """One file of each kind tinymnist writes, by the name of its kind; tests copy what they change."""
    folder = tmp_path_factory.mktemp("made")
    ckpt, metrics = folder / "run.pt", folder / "run.jsonl"
    result = run(*train_args(tiny_split, "--model", "mlp", "--epochs", 1, "--save-model", ckpt, "--metrics", metrics))
    assert result.exit_code == 0, result.output
    png, report, notes = folder / "picture.png", folder / "bench.json", folder / "notes.txt"
    png.write_bytes(PNG_BYTES)
    report.write_text(json.dumps({"machine": "a CPU", "results": []}, indent=2) + "\n")  # as bench writes it
    notes.write_text("a file of the user's own\n")
    return {"checkpoint": ckpt, "metrics": metrics, "png": png, "bench": report, "notes": notes}


def as_named(source: Path, path: Path) -> Path:
    """A copy of `source` at `path`: a user's typo, or a file of one kind named like another."""
    shutil.copyfile(source, path)
    return path


def assert_refused_and_kept(result, path: Path, before: bytes, *fragments):
    assert_user_error(result, str(path), *fragments)
    assert path.read_bytes() == before


# ---- train: --save-model and --metrics --------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "kind", "words"),
    [
        ("--metrics", "checkpoint", "is a tinymnist checkpoint, not a tinymnist metrics file"),  # the swap
        ("--save-model", "metrics", "is a tinymnist metrics file, not a tinymnist checkpoint"),
        ("--save-model", "png", "is a PNG picture, not a tinymnist checkpoint"),
        ("--save-model", "bench", "is a tinymnist bench report, not a tinymnist checkpoint"),
        ("--save-model", "notes", "is not a tinymnist checkpoint"),
        ("--metrics", "png", "is a PNG picture, not a tinymnist metrics file"),
        ("--metrics", "notes", "is not a tinymnist metrics file"),
    ],
)
def test_train_never_replaces_a_file_of_another_kind(tiny_split, made, tmp_path, flag, kind, words):
    path = as_named(made[kind], tmp_path / made[kind].name)
    before = path.read_bytes()
    result = run(*train_args(tiny_split, "--model", "mlp", "--epochs", 1, flag, path))
    assert_refused_and_kept(result, path, before, f"{flag} {path} {words}", "name another file or delete it first")


@pytest.mark.parametrize(
    ("flag", "name", "words"),
    [
        ("--save-model", "train-images-idx3-ubyte.gz", "(the MNIST training images)"),
        ("--metrics", "t10k-labels-idx1-ubyte.gz", "(the MNIST test labels)"),
        ("--save-model", "train-labels-idx1-ubyte", "(the MNIST training labels)"),  # the uncompressed name
    ],
)
def test_train_never_replaces_a_file_of_its_data_folder(tiny_split, tmp_path, flag, name, words):
    """Not even one that is not there yet: a download would write it, and the run then read it."""
    data = shutil.copytree(tiny_split, tmp_path / "data")
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    result = run(*train_args(data, "--model", "mlp", "--epochs", 1, flag, data / name))
    assert_user_error(result, f"{flag} {data / name} is an input of this run {words}; name another file")
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before


def test_an_input_under_another_name_is_still_an_input(tiny_split, tmp_path):
    """A linked data folder, or a hard link to a data file: the same file, whatever it is called."""
    data = shutil.copytree(tiny_split, tmp_path / "data")
    (tmp_path / "linked").symlink_to(data)
    images = data / "train-images-idx3-ubyte.gz"
    before = images.read_bytes()
    through_link = run(*train_args(tmp_path / "linked", "--epochs", 1, "--save-model", images))
    assert_user_error(through_link, "is an input of this run (the MNIST training images)")
    os.link(images, tmp_path / "images.pt")
    hard_link = run(*train_args(data, "--epochs", 1, "--save-model", tmp_path / "images.pt"))
    assert_user_error(hard_link, f"--save-model {tmp_path / 'images.pt'} is an input of this run")
    assert images.read_bytes() == before


@pytest.mark.parametrize("flag", ["--save-model", "--metrics"])
def test_a_new_run_never_replaces_an_earlier_runs_checkpoint_or_metrics(tiny_split, made, tmp_path, flag):
    """A forgotten --resume: the new run's first epoch would have replaced the earlier run's training."""
    kind = "checkpoint" if flag == "--save-model" else "metrics"
    path = as_named(made[kind], tmp_path / made[kind].name)
    before = path.read_bytes()
    result = run(*train_args(tiny_split, "--model", "mlp", "--epochs", 2, flag, path))
    words = "holds a checkpoint of mlp at epoch 1; pass --resume" if kind == "checkpoint" else "an earlier run's"
    assert_refused_and_kept(result, path, before, f"{flag} {path} ", words, "name another file or delete it first")


def test_a_resumed_run_never_saves_over_another_checkpoint(tiny_split, made, tmp_path):
    resumed, other = (as_named(made["checkpoint"], tmp_path / name) for name in ("resumed.pt", "other.pt"))
    before = other.read_bytes()
    result = run(*train_args(tiny_split, "--resume", resumed, "--save-model", other, "--epochs", 2))
    assert_refused_and_kept(result, other, before, f"--save-model {other} holds a checkpoint", f"--resume {other}")


def test_a_resumed_run_may_save_over_its_own_checkpoint_and_empty_files_may_be_replaced(tiny_split, made, tmp_path):
    ckpt = as_named(made["checkpoint"], tmp_path / "run.pt")
    metrics = as_named(made["metrics"], tmp_path / "run.jsonl")
    in_place = run(*train_args(tiny_split, "--resume", ckpt, "--save-model", ckpt, "--metrics", metrics, "--epochs", 2))
    assert in_place.exit_code == 0, in_place.output
    assert checkpoint.peek(ckpt)["epoch"] == 2
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [0, 1, 2]  # appended
    empty_ckpt, empty_metrics = tmp_path / "empty.pt", tmp_path / "empty.jsonl"
    empty_ckpt.touch()
    empty_metrics.touch()
    fresh = run(*train_args(tiny_split, "--epochs", 1, "--save-model", empty_ckpt, "--metrics", empty_metrics))
    assert fresh.exit_code == 0, fresh.output
    assert checkpoint.peek(empty_ckpt)["epoch"] == 1 and len(empty_metrics.read_text().splitlines()) == 2


# ---- bench --json -----------------------------------------------------------------------------


def test_bench_json_never_replaces_a_checkpoint_but_replaces_its_own_report(made, tmp_path):
    ckpt = as_named(made["checkpoint"], tmp_path / "run.pt")
    before = ckpt.read_bytes()
    onto = run("bench", *BENCH_ARGS, "--data-dir", tmp_path / "none", "--json", ckpt)
    assert onto.exit_code == 2 and "Traceback" not in onto.output, onto.output
    refusal = f"tinymnist: error: --json {ckpt} is a tinymnist checkpoint, not a tinymnist bench report"
    assert onto.stderr.strip().splitlines()[-1].startswith(refusal), onto.stderr
    assert ckpt.read_bytes() == before
    report = tmp_path / "bench.json"
    for _ in range(2):  # the second run replaces the first one's report
        result = run("bench", *BENCH_ARGS, "--data-dir", tmp_path / "none", "--json", report)
        assert result.exit_code == 0, result.output
        assert [row["model"] for row in json.loads(report.read_text())["results"]] == ["mlp"]


def test_bench_json_is_refused_before_any_timing(made, tmp_path):
    ckpt = as_named(made["checkpoint"], tmp_path / "run.pt")
    onto = run("bench", *BENCH_ARGS, "--data-dir", tmp_path / "none", "--json", ckpt)
    assert_user_error(onto, f"--json {ckpt} is a tinymnist checkpoint")


# ---- pictures (-o NAME.png) and export ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "words"), [("checkpoint", "a tinymnist checkpoint"), ("metrics", "a tinymnist metrics file")]
)
def test_a_picture_never_replaces_a_file_of_another_kind(made, tmp_path, kind, words):
    pytest.importorskip("matplotlib")
    path = as_named(made[kind], tmp_path / "curves.png")
    before = path.read_bytes()
    result = run("plot", made["metrics"], "-o", path)
    assert_refused_and_kept(result, path, before, f"-o {path} is {words}, not a PNG picture")


def test_a_picture_replaces_a_png(made, tmp_path):
    pytest.importorskip("matplotlib")
    path = as_named(made["png"], tmp_path / "curves.png")
    for _ in range(2):  # a PNG of no known origin, then the first run's own
        result = run("plot", made["metrics"], "-o", path)
        assert result.exit_code == 0, result.output
        assert path.read_bytes().startswith(outputs.PNG_SIGNATURE) and path.read_bytes() != PNG_BYTES


@pytest.mark.parametrize("spelling", ["the same name", "a hard link"])
def test_predict_never_draws_over_its_own_image(made, tmp_path, spelling):
    """A picture may replace any PNG, but not the --image it is drawn from: refused before any
    work (the checkpoint named here does not exist, and loading it would be another error)."""
    image_module = pytest.importorskip("PIL.Image")
    image = tmp_path / "digit.png"
    digit = image_module.new("L", (28, 28), 255)
    digit.paste(0, (12, 6, 16, 22))  # a dark "1" on white, as a user's photo of one
    digit.save(image)
    before = image.read_bytes()
    output = image if spelling == "the same name" else tmp_path / "linked.png"
    if output != image:
        os.link(image, output)
    result = run("predict", tmp_path / "absent.pt", "--device", "cpu", "--image", image, "-o", output)
    assert_user_error(result, f"-o {output} is an --image file predict reads; name another file")
    assert image.read_bytes() == before


@pytest.mark.parametrize(
    ("command", "kind", "words"),
    [
        (["plot", "{path}"], "metrics", "a metrics file plot reads"),
        (["eval", "{path}", "--confusion", "--device", "cpu"], "checkpoint", "the checkpoint eval reads"),
        (["predict", "{path}", "--device", "cpu"], "checkpoint", "the checkpoint predict reads"),
    ],
)
def test_a_picture_never_replaces_the_file_its_command_reads(made, tmp_path, command, kind, words):
    """Named .png, a command's input passes the suffix check; it is refused as an input, not as a file
    of another kind that "delete it first" would lose."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("PIL")
    path = as_named(made[kind], tmp_path / "input.png")
    before = path.read_bytes()
    result = run(*[arg.format(path=path) for arg in command], "-o", path)
    assert_refused_and_kept(result, path, before, f"-o {path} is {words}; name another file")


@pytest.mark.parametrize(("kind", "words"), [("metrics", "a tinymnist metrics file"), ("png", "a PNG picture")])
def test_export_never_replaces_a_file_of_another_kind_but_replaces_its_own(made, tmp_path, kind, words):
    path = as_named(made[kind], tmp_path / "model.pt")
    before = path.read_bytes()
    result = run("export", made["checkpoint"], "-o", path)
    assert_refused_and_kept(result, path, before, f"-o {path} is {words}; name another file or delete it first")
    path.unlink()
    for _ in range(2):  # a state_dict carries no mark of its writer: export replaces one, as any file not ours
        result = run("export", made["checkpoint"], "-o", path)
        assert result.exit_code == 0, result.output


# ---- telling a kind, safely -----------------------------------------------------------------------


def test_a_first_line_nested_too_deeply_is_no_metrics_file_and_no_traceback(tmp_path):
    """json.loads raises RecursionError, not ValueError, for 100,000 nested arrays."""
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(TinyMnistError, match="is not a tinymnist metrics file"):
        outputs.check_output(path, "--metrics")


def test_a_large_file_is_told_from_its_first_bytes(tmp_path):
    """A metrics file far longer than what is read is still one; a bench report that long is not ours."""
    metrics = tmp_path / "long.jsonl"
    metrics.write_text(json.dumps({"epoch": 0, "test_accuracy": 0.1}) + "\n" + "x" * (2 * outputs.HEAD_BYTES))
    outputs.check_output(metrics, "--metrics")
    report = tmp_path / "long.json"
    report.write_text(json.dumps({"machine": "m", "results": ["x" * (2 * outputs.HEAD_BYTES)]}))
    with pytest.raises(TinyMnistError, match="is not a tinymnist bench report"):
        outputs.check_output(report, "--json")
