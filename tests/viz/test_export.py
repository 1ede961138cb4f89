"""`tinymnist export`: the tutorials' own nn.Modules load the state_dict strictly and agree with `eval`.

The oracle is each seed tutorial's module, written here as the tutorial writes it.
"""

import contextlib
import errno
import json
import subprocess
import sys

import pytest
import torch

from tests.support import assert_user_error, run, run_viz, train_checkpoint
from tests.support.tutorials import TUTORIALS, tutorial_forward
from tinymnist.algorithm import networks
from tinymnist.algorithm.config import RECIPES
from tinymnist.data.idx import read_idx
from tinymnist.tool import checkpoint as checkpoint_file
from tinymnist.viz.export import tutorial_state_dict


@torch.no_grad()
@pytest.mark.parametrize("model_name", list(TUTORIALS))
def test_the_tutorial_module_loads_strictly_and_computes_what_apply_computes(model_name):
    params = networks.init_params(model_name, seed=3)
    module = TUTORIALS[model_name]().eval()
    module.load_state_dict(tutorial_state_dict(model_name, params), strict=True)
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    recipe = RECIPES[model_name]
    ours = networks.apply(model_name, params, (images.unsqueeze(1).float() / 255 - recipe.mean) / recipe.std)
    torch.testing.assert_close(tutorial_forward(model_name, module, images), ours, rtol=0, atol=0)


def load_exported(path):
    if path.suffix == ".safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        return safetensors_torch.load_file(str(path))
    return torch.load(path, weights_only=True)


@torch.no_grad()
@pytest.mark.parametrize("model_name", list(TUTORIALS))
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_an_export_reproduces_evals_correct_count_exactly(tiny_split, tmp_path, model_name, suffix):
    checkpoint = train_checkpoint(tiny_split, tmp_path / "run.pt", model_name, "--epochs", "1", "--batch-size", "32")
    result = run_viz("export", checkpoint, "-o", tmp_path / f"model{suffix}")
    assert result.exit_code == 0, result.output
    module = TUTORIALS[model_name]().eval()
    module.load_state_dict(load_exported(tmp_path / f"model{suffix}"), strict=True)

    images = read_idx(tiny_split / "t10k-images-idx3-ubyte.gz")  # (200, 28, 28) uint8
    labels = read_idx(tiny_split / "t10k-labels-idx1-ubyte.gz").long()
    batch = RECIPES[model_name].test_batch_size  # as the tutorial's test loader batches
    correct = sum(
        int((tutorial_forward(model_name, module, images[i : i + batch]).argmax(dim=1) == labels[i : i + batch]).sum())
        for i in range(0, len(images), batch)
    )
    evaluated = run("eval", checkpoint, "--json", "--data-dir", tiny_split, "--no-download", "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    assert correct == json.loads(evaluated.stdout.strip().splitlines()[-1])["correct"]


def test_safetensors_metadata_names_the_model_and_its_input_scaling(tiny_split, tmp_path):
    safe_open = pytest.importorskip("safetensors").safe_open
    checkpoint = train_checkpoint(tiny_split, tmp_path / "cnn.pt", "cnn", "--epochs", "1")
    assert run_viz("export", checkpoint, "-o", tmp_path / "cnn.safetensors").exit_code == 0
    with safe_open(str(tmp_path / "cnn.safetensors"), framework="pt") as f:
        assert f.metadata() == {"model": "cnn", "mean": "0.1307", "std": "0.3081"}


def test_a_wrong_suffix_or_a_missing_checkpoint_is_a_one_line_error(tiny_split, tmp_path):
    checkpoint = train_checkpoint(tiny_split, tmp_path / "mlp.pt", "mlp", "--epochs", "1")
    assert_user_error(run_viz("export", checkpoint, "-o", tmp_path / "model.npz"), "model.npz", ".safetensors")
    assert_user_error(run_viz("export", tmp_path / "absent.pt", "-o", tmp_path / "m.pt"), "absent.pt")
    (tmp_path / "exports").mkdir()
    assert_user_error(run_viz("export", checkpoint, "-o", tmp_path / "exports"), "exports is a folder", "model.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "mlp.pt"]
    assert not any((tmp_path / "exports").iterdir())


class FullDisk:
    """A file that takes half of what is written to it, then fails as a full disk does."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        self.file.flush()


def test_a_failed_write_keeps_the_previous_export_and_leaves_no_temp_file(tiny_split, tmp_path, monkeypatch):
    from tinymnist.viz import export

    checkpoint = train_checkpoint(tiny_split, tmp_path / "mlp.pt", "mlp", "--epochs", "1")
    target = tmp_path / "model.pt"
    target.write_bytes(b"the previous export")
    real_output = export.atomic_output

    @contextlib.contextmanager
    def on_a_full_disk(path):
        with real_output(path) as f:
            yield FullDisk(f)

    monkeypatch.setattr(export, "atomic_output", on_a_full_disk)
    assert_user_error(
        run_viz("export", checkpoint, "-o", target), "model.pt", "No space left on device", "free some space"
    )
    assert target.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.pt", "model.pt"]


def test_export_and_predict_take_the_one_model_of_several_that_seed_and_lr_pick(tiny_split, tmp_path):
    """--seeds 2 and two rates stack 4 models (leading dim N), which no tutorial nn.Module loads: export and
    predict take the one --seed and --lr pick (its own slice of every tensor, and the mistakes eval counts
    for it); without a pick, or with one that names no model or two, one line and nothing written."""
    grid = ("--epochs", "1", "--seeds", "2", "--lr", "0.001,0.002")
    checkpoint = train_checkpoint(tiny_split, tmp_path / "grid.pt", "mlp", *grid)
    held = "holds 4 models (--seed 1 --lr 0.001, --seed 2 --lr 0.001, --seed 1 --lr 0.002, --seed 2 --lr 0.002)"
    exported = tmp_path / "m.pt"
    assert_user_error(run_viz("export", checkpoint, "-o", exported), held, "pick one with --seed and --lr")
    assert_user_error(run_viz("export", checkpoint, "-o", exported, "--seed", 2), "pick one")  # two rates
    test_digits = ("--data-dir", tiny_split, "--no-download", "--device", "cpu")
    none = run_viz("predict", checkpoint, *test_digits, "--seed", 3, "--lr", 0.001)
    assert_user_error(none, held, "--seed 3 --lr 0.001 is none of them")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.pt"]

    result = run_viz("export", checkpoint, "-o", exported, "--seed", 2, "--lr", 0.002)
    assert result.exit_code == 0 and "the mlp (seed 2, lr 0.002) state_dict" in result.stdout, result.output
    stacked = checkpoint_file.load(checkpoint, torch.device("cpu"))[1].params
    state = torch.load(exported, weights_only=True)
    assert state.keys() == stacked.keys() and all(torch.equal(state[k], stacked[k][3]) for k in state)  # 4th model
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in state.values())  # not all 4
    evaluated = run("eval", checkpoint, "--json", *test_digits)
    records = [json.loads(line) for line in evaluated.stdout.splitlines()]
    (mine,) = [r for r in records if r.get("seed") == 2 and r.get("initial_lr") == 0.002]
    predicted = run_viz("predict", checkpoint, *test_digits, "--seed", 2, "--lr", 0.002, "--count", 1)
    assert predicted.exit_code == 0, predicted.output
    wrong = mine["total"] - mine["correct"]
    assert f"mlp (seed 2, lr 0.002) after 1 epoch: {wrong} of {mine['total']} test digits wrong" in predicted.stdout


def test_an_exported_file_given_as_a_checkpoint_is_named_as_an_export(tiny_split, tmp_path):
    """eval, predict and --resume of export's weights said only "not a tinymnist checkpoint"."""
    checkpoint = train_checkpoint(tiny_split, tmp_path / "mlp.pt", "mlp", "--epochs", "1")
    exported = tmp_path / "mlp_state.pt"
    assert run_viz("export", checkpoint, "-o", exported).exit_code == 0
    words = ("not a tinymnist checkpoint", "weights alone (a state_dict, such as `tinymnist export` writes)")
    test_digits = ("--data-dir", tiny_split, "--no-download", "--device", "cpu")
    assert_user_error(run("eval", exported, *test_digits), str(exported), *words, "give one --save-model wrote")
    assert_user_error(run_viz("predict", exported, *test_digits), *words)
    resumed = run("train", "--resume", exported, *test_digits, "--no-compile")
    assert_user_error(resumed, *words)


def test_an_output_that_is_a_symlink_is_refused_and_its_target_kept(tiny_split, tmp_path):
    """As train refuses --save-model onto a symlink: replacing the link would surprise, writing through it harm."""
    checkpoint = train_checkpoint(tiny_split, tmp_path / "mlp.pt", "mlp", "--epochs", "1")
    (tmp_path / "link.pt").symlink_to("mlp.pt")
    before = checkpoint.read_bytes()
    assert_user_error(run_viz("export", checkpoint, "-o", tmp_path / "link.pt"), "link.pt is a symbolic link")
    assert (tmp_path / "link.pt").is_symlink() and checkpoint.read_bytes() == before


def test_export_never_replaces_a_checkpoint_nor_a_file_a_run_holds(tiny_split, tmp_path):
    """`export a.pt -o a.pt` destroyed the checkpoint; so did exporting over one a training was saving."""
    from tinymnist.tool import outputs

    checkpoint = train_checkpoint(tiny_split, tmp_path / "mlp.pt", "mlp", "--epochs", "1")
    other = train_checkpoint(tiny_split, tmp_path / "other.pt", "mlp", "--epochs", "1")
    kept = {path: path.read_bytes() for path in (checkpoint, other)}
    for target in (checkpoint, other):
        assert_user_error(run_viz("export", checkpoint, "-o", target), f"-o {target}", "is a tinymnist checkpoint")
    held = tmp_path / "held.pt"
    with outputs.exclusive({"--save-model": held}):  # as a training saving there holds it
        assert_user_error(run_viz("export", checkpoint, "-o", held), "held.pt")
    assert {path: path.read_bytes() for path in kept} == kept and not held.exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_file_size_limit_is_one_line_keeps_the_previous_export_and_leaves_no_temp_file(tiny_split, tmp_path, suffix):
    """Under `ulimit -f`, torch.save's zip writer raised RuntimeError ("unexpected pos"), a traceback.
    Run as a process of its own: the limit must not reach pytest, and Python ignores SIGXFSZ, so a
    write past the limit fails with EFBIG rather than killing the process."""
    resource = pytest.importorskip("resource")  # POSIX only
    checkpoint = train_checkpoint(tiny_split, tmp_path / "mlp.pt", "mlp", "--epochs", "1")
    target = tmp_path / f"model{suffix}"
    target.write_bytes(b"the previous export")
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = 4096  # bytes: room for a lock file's pid, not for the mlp's 400 kB of weights

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    done = subprocess.run(
        [sys.executable, "-m", "tinymnist", "export", str(checkpoint), "-o", str(target)],
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"tinymnist: error: -o {target}: ") and "ulimit -f" in line, line
    assert target.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.pt", f"model{suffix}"]
