"""Checkpoints: a failed save keeps the previous one, and a load checks every part of the file."""

import contextlib
import io
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import needs_cuda, tmpfs
from tinymnist.algorithm import networks, optim
from tinymnist.algorithm.config import recipe_config
from tinymnist.algorithm.train import TrainState
from tinymnist.data import files
from tinymnist.errors import TinyMnistError
from tinymnist.tool import checkpoint
from tinymnist.tool.checkpoint_format import ENTRIES, brief

CPU = torch.device("cpu")
MODEL, OPTIMIZER = "mlp3", "adam"  # the smallest model: ~700 KB with Adam's two buffers


def make_state(epoch: int = 1, optimizer: str = OPTIMIZER, seed: int = 0) -> TrainState:
    params = networks.init_params(MODEL, seed)
    rng = {"cpu": torch.get_rng_state(), "shuffle": torch.Generator().manual_seed(seed).get_state()}
    return TrainState(params, optim.OPTIMIZERS[optimizer]().init(params), epoch, rng)


def config_dict(optimizer: str = OPTIMIZER) -> dict:
    return recipe_config(MODEL, optimizer).to_dict()


def write(path: Path, epoch: int = 1, **kwargs) -> Path:
    checkpoint.save(path, config_dict(), make_state(epoch, **kwargs))
    return path


def assert_refused(path: Path, *words: str) -> str:
    with pytest.raises(TinyMnistError) as caught:
        checkpoint.load(path, CPU)
    message = str(caught.value)
    assert message.startswith(f"checkpoint {path}: ") and "\n" not in message
    for word in words:
        assert word in message
    return message


# ---- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_what_save_writes_load_gives_back_for_every_optimizer(tmp_path, name):
    state = make_state(epoch=3, optimizer=name, seed=7)
    checkpoint.save(tmp_path / "run.pt", config_dict(optimizer=name), state)
    config, loaded = checkpoint.load(tmp_path / "run.pt", CPU)
    assert config == recipe_config(MODEL, name).to_dict() and loaded.epoch == 3
    torch.testing.assert_close(loaded.params, state.params, rtol=0, atol=0)
    torch.testing.assert_close(loaded.opt_state, state.opt_state, rtol=0, atol=0)
    torch.testing.assert_close(loaded.rng, state.rng, rtol=0, atol=0)
    assert list(loaded.opt_state) == list(state.opt_state)  # init's order: the compiled step guards on it
    assert os.listdir(tmp_path) == ["run.pt"]


def test_an_optimizer_state_of_another_optimizer_is_refused(tmp_path):
    checkpoint.save(tmp_path / "run.pt", config_dict(optimizer="adadelta"), make_state(optimizer="adam"))
    assert_refused(tmp_path / "run.pt", "optimizer state does not match adadelta", "lacks")


@pytest.mark.parametrize("part", ["config", "rng"])
def test_a_checkpoint_missing_a_config_field_or_the_shuffle_state_is_refused(tmp_path, part):
    """No version of tinymnist was released without them: such a file is damaged, said in one line."""
    path = write(tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    del payload[part]["micro_batch" if part == "config" else "shuffle"]
    torch.save(payload, path)
    assert_refused(path, "micro_batch" if part == "config" else "shuffle")


def test_nan_weights_are_data_and_load(tmp_path):
    """A diverged run's weights are a valid state: eval reports their NaN loss."""
    state = make_state()
    state.params["fc1.weight"][0, 0] = math.nan
    checkpoint.save(tmp_path / "nan.pt", config_dict(), state)
    _, loaded = checkpoint.load(tmp_path / "nan.pt", CPU)
    assert math.isnan(loaded.params["fc1.weight"][0, 0])


@needs_cuda
def test_a_cuda_checkpoint_loads_onto_the_gpu_and_its_generator_state_is_checked_there(tmp_path):
    state = make_state()
    state.rng["cuda"] = torch.cuda.get_rng_state()
    checkpoint.save(tmp_path / "cuda.pt", config_dict(), state)
    _, loaded = checkpoint.load(tmp_path / "cuda.pt", torch.device("cuda"))
    assert loaded.params["fc1.weight"].is_cuda and loaded.opt_state["step"].is_cuda
    assert torch.equal(loaded.rng["cuda"], state.rng["cuda"])

    state.rng["cuda"] = torch.zeros(3, dtype=torch.uint8)  # a CUDA generator state is 16 bytes
    checkpoint.save(tmp_path / "bad.pt", config_dict(), state)
    with pytest.raises(TinyMnistError, match="its cuda generator state is invalid"):
        checkpoint.load(tmp_path / "bad.pt", torch.device("cuda"))
    checkpoint.load(tmp_path / "bad.pt", CPU)  # eval on the CPU never restores it


# ---- every part is checked: one mutation at a time --------------------------------------------

DTYPES = [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.complex64]


def tensor_mutations(draw, tensor: torch.Tensor):
    """A tensor like `tensor` in every way but one."""
    kind = draw(st.sampled_from(["dtype", "meta", "sparse", "not a tensor", "shape"]))
    if kind == "dtype":
        return tensor.to(draw(st.sampled_from([d for d in DTYPES if d != tensor.dtype])))
    if kind == "meta":
        return tensor.to("meta")
    if kind == "sparse":
        return tensor.to_sparse()
    if kind == "not a tensor":
        return draw(st.sampled_from([None, 1.0, "weights", [0.0], {"data": tensor}, tensor.tolist()]))
    shape = draw(st.sampled_from(["unsqueeze", "flatten", "longer", "scalar"]))
    if shape == "unsqueeze":
        return tensor.unsqueeze(0)
    if shape == "flatten":
        return tensor.flatten() if tensor.dim() != 1 else tensor.reshape(1, -1)
    if shape == "longer":
        return torch.zeros((tensor.shape[0] + 1 if tensor.dim() else 2, *tensor.shape[1:]), dtype=tensor.dtype)
    return tensor.sum() if tensor.dim() else tensor.reshape(1)


def leaves(tree, at=()):
    """Paths to the tensors of a nested dict."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, (*at, key))
    else:
        yield at


def parent_of(payload, path):
    node = payload
    for key in path[:-1]:
        node = node[key]
    return node


BAD_EPOCHS = [True, False, -1, 1.5, "1", None, torch.tensor(1), [1]]
BAD_CONFIG_VALUES = {  # field: values of the wrong type, or invalid
    "model": [None, 1, ["mlp3"], "resnet"],
    "optimizer": [None, "lbfgs", 2],
    "lr": ["1e-3", True, None, math.nan, -1.0, math.inf],
    "batch_size": ["64", 64.0, True, 0, -5],
    "test_batch_size": [0, None, 2.5],
    "epochs": [0, "2", False],
    "seed": [2**64, -1, 1.0],
    "dry_run": [1, "no", None],
    "compile": ["yes", 0],
    "micro_batch": [-1, 1.5, "256"],
    "save_model": [1, b"run.pt"],
}


@st.composite
def damaged(draw, payload: dict):
    """`payload` with exactly one part wrong; returns (damaged payload, what was changed)."""
    payload = {**payload, "config": dict(payload["config"])}  # the tensors are replaced, never changed
    payload["params"], payload["rng"] = dict(payload["params"]), dict(payload["rng"])
    payload["opt_state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in payload["opt_state"].items()}
    part = draw(st.sampled_from(["params", "opt_state", "rng", "epoch", "config", "entries"]))
    if part in ("params", "opt_state", "rng"):
        path = (part, *draw(st.sampled_from(list(leaves(payload[part])))))
        node, key = parent_of(payload, path), path[-1]
        change = draw(st.sampled_from(["tensor", "missing", "extra"]))
        if change == "tensor" and part == "rng":
            node[key] = draw(st.sampled_from([node[key].float(), node[key][:-1], node[key].reshape(2, -1), 7]))
        elif change == "tensor":
            node[key] = tensor_mutations(draw, node[key])
        elif change == "missing" and part == "rng" and key != "cpu":
            node["cpu"] = node.pop(key)[:0]  # only "cpu" is required: spoil it instead
        elif change == "missing":
            del node[key]
        else:
            node[f"{key}.extra"] = torch.zeros(1)
        return payload, f"{change} at {path}"
    if part == "epoch":
        payload["epoch"] = draw(st.sampled_from(BAD_EPOCHS))
        return payload, f"epoch {payload['epoch']!r}"
    if part == "config":
        field = draw(st.sampled_from([*BAD_CONFIG_VALUES, "missing", "extra"]))
        if field == "missing":
            del payload["config"][draw(st.sampled_from(["model", "lr", "epochs", "seed"]))]
        elif field == "extra":
            payload["config"]["colour"] = "blue"
        else:
            payload["config"][field] = draw(st.sampled_from(BAD_CONFIG_VALUES[field]))
        return payload, f"config {field}"
    entry = draw(st.sampled_from([*ENTRIES, "extra"]))
    if entry == "extra":
        payload["extra"] = 1
    elif draw(st.booleans()):
        del payload[entry]
    else:
        payload[entry] = draw(st.sampled_from([None, [], "tinymnist-checkpoint-v0", 1.0]))
    return payload, f"entry {entry}"


@pytest.fixture(scope="module")
def valid_payload(tmp_path_factory) -> dict:
    path = write(tmp_path_factory.mktemp("valid") / "valid.pt")
    checkpoint.load(path, CPU)  # valid as written
    return torch.load(path, weights_only=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_checkpoint_with_any_one_part_wrong_is_one_line_naming_the_file(valid_payload, tmp_path, data):
    payload, change = data.draw(damaged(valid_payload))
    path = tmp_path / "damaged.pt"
    torch.save(payload, path)
    with pytest.raises(TinyMnistError) as caught:  # any other exception fails the test
        checkpoint.load(path, CPU)
    message = str(caught.value)
    assert message.startswith(f"checkpoint {path}: ") and "\n" not in message, change


def test_the_messages_say_which_part_is_wrong(valid_payload, tmp_path):
    def refused_with(change, *words):
        payload = {**valid_payload, "params": dict(valid_payload["params"]), "config": dict(valid_payload["config"])}
        change(payload)
        torch.save(payload, tmp_path / "bad.pt")
        return assert_refused(tmp_path / "bad.pt", *words)

    weight = valid_payload["params"]["fc1.weight"]
    refused_with(lambda p: p["params"].update({"fc1.weight": weight.double()}), "fc1.weight is float64, not float32")
    refused_with(lambda p: p["params"].update({"fc1.weight": weight[:3]}), "fc1.weight has shape (3, 784)")
    refused_with(lambda p: p["params"].update({"fc1.weight": weight.to("meta")}), "meta tensor")
    refused_with(lambda p: p["params"].pop("fc1.bias"), "params do not match model 'mlp3'", "lacks fc1.bias")
    refused_with(lambda p: p.update(epoch=True), "its epoch is True")
    refused_with(lambda p: p.pop("rng"), "it lacks rng")
    refused_with(lambda p: p["config"].update(test_batch_size=0), "stored config is invalid", "--test-batch-size")
    refused_with(lambda p: p["config"].update(batch_size="64"), "batch_size = '64', not int")
    refused_with(lambda p: p["config"].update(colour="blue"), "does not match this version", "has extra colour")


def test_an_rng_state_torch_rejects_is_refused_quoting_torch_at_a_word_boundary(valid_payload, tmp_path):
    payload = {**valid_payload, "rng": {**valid_payload["rng"], "cpu": torch.zeros(10, dtype=torch.uint8)}}
    torch.save(payload, tmp_path / "bad_rng.pt")
    message = assert_refused(tmp_path / "bad_rng.pt", "its cpu generator state is invalid")
    with pytest.raises(RuntimeError) as torch_error:
        torch.Generator().set_state(payload["rng"]["cpu"])
    quoted = message.split("invalid (", 1)[1].split(");", 1)[0]
    assert quoted == brief(str(torch_error.value))
    assert str(torch_error.value).startswith(quoted.removesuffix(" …"))


# ---- files that are not checkpoints at all -----------------------------------------------------


def test_unreadable_files_are_one_line_saying_what_is_wrong_in_words(tmp_path):
    good = write(tmp_path / "good.pt")
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:-100])
    # random bytes: seed 0 fails torch's weights-only unpickler, seed 20 with a KeyError (no torch.save records)
    (tmp_path / "garbage.pt").write_bytes(random.Random(0).randbytes(1000))
    (tmp_path / "keyerror.pt").write_bytes(random.Random(20).randbytes(1000))
    (tmp_path / "table.pt").write_text("a,b,c\n1,2,3")  # torch: "pop from empty list"
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as archive:  # a whole zip, but not torch.save's
        archive.writestr("notes.txt", "not tensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert_refused(tmp_path / "missing.pt", "no such file")
    assert_refused(tmp_path / "list.pt", "not a tinymnist checkpoint")
    for name in ("truncated.pt", "garbage.pt", "keyerror.pt", "table.pt", "other.pt"):
        message = assert_refused(tmp_path / name, "not a readable tinymnist checkpoint (")
        with pytest.raises(Exception) as torch_error:
            torch.load(tmp_path / name, weights_only=True)
        first_line = str(torch_error.value).strip().splitlines()[0]
        quoted = message.split("checkpoint (", 1)[1].removesuffix(")")
        # torch's advice (weights_only=False) is not passed on; a KeyError is a file without torch.save's records
        if "Weights only load failed" in first_line or isinstance(torch_error.value, KeyError):
            assert quoted == "it is not a torch.save file of tensors, numbers and strings"
        elif name in ("truncated.pt", "table.pt"):  # torch's words would be a zip or pickle internal
            assert quoted == "it is not a whole file written by torch.save: cut off, or another kind of file"
        else:
            assert name == "other.pt" and quoted == "a zip archive, but not one written by torch.save"


def test_brief_cuts_long_messages_at_a_word_boundary():
    assert brief("short message\nsecond line") == "short message"
    assert brief("word " * 30, limit=22) == "word word word word …"
    assert brief("averyveryverylongword " * 2, limit=10) == ""  # no whole word fits: quote nothing
    assert brief("") == ""


# ---- a save that fails keeps the previous checkpoint -------------------------------------------


def checkpoint_size() -> int:
    buffer = io.BytesIO()
    torch.save({"params": make_state().params, "opt_state": make_state().opt_state}, buffer)
    return len(buffer.getvalue())


def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path):
    size = checkpoint_size()
    with tmpfs(tmp_path / "disk", size_bytes=size * 3 // 2) as disk:  # room for one checkpoint, not two
        path = write(disk / "run.pt", epoch=1)
        before = path.read_bytes()
        with pytest.raises(TinyMnistError) as caught:
            write(path, epoch=2)
        assert str(caught.value) == (
            f"checkpoint {path}: saving epoch 2 failed (No space left on device); "
            "the previous checkpoint (epoch 1) is kept; free some space"
        )
        assert os.listdir(disk) == ["run.pt"] and path.read_bytes() == before


def test_a_full_disk_without_a_previous_checkpoint_says_none_is_kept(tmp_path):
    with tmpfs(tmp_path / "disk", size_bytes=64 * 1024) as disk:
        with pytest.raises(TinyMnistError, match=r"saving epoch 1 failed .*; there is no previous checkpoint"):
            write(disk / "run.pt", epoch=1)
        assert os.listdir(disk) == []


SAVE_UNDER_ULIMIT = """
    import resource, sys
    from pathlib import Path
    from tests.tool.test_checkpoint import write
    from tinymnist.errors import TinyMnistError

    limit = 64 * 1024  # bytes: far less than the checkpoint
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # ulimit -f; Python ignores SIGXFSZ
    try:
        write(Path(sys.argv[1]), epoch=2)
    except TinyMnistError as e:
        sys.exit(str(e))
"""


def test_a_file_size_limit_keeps_the_previous_checkpoint(tmp_path):
    path = write(tmp_path / "run.pt", epoch=1)
    before = path.read_bytes()
    repo = Path(__file__).resolve().parents[2]
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SAVE_UNDER_ULIMIT), str(path)], capture_output=True, text=True, cwd=repo
    )
    assert (child.returncode, child.stderr) == (
        1,
        (
            f"checkpoint {path}: saving epoch 2 failed (File too large); "
            "the previous checkpoint (epoch 1) is kept; raise the file size limit (ulimit -f)\n"
        ),
    )
    assert os.listdir(tmp_path) == ["run.pt"] and path.read_bytes() == before


def test_a_name_too_long_for_the_temp_file_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / ("r" * 240)  # fits the file system alone, not with the temp file's suffix
    checkpoint.save(tmp_path / "short.pt", config_dict(), make_state(epoch=4))
    os.rename(tmp_path / "short.pt", path)
    with pytest.raises(TinyMnistError) as caught:
        write(path, epoch=5)
    assert str(caught.value).endswith(
        "saving epoch 5 failed (File name too long); the previous checkpoint (epoch 4) is kept; choose a shorter name"
    )
    assert os.listdir(tmp_path) == [path.name]


def test_ctrl_c_during_a_save_waits_for_the_whole_file(tmp_path, monkeypatch):
    """The signal lands mid-write; the save finishes, then the interrupt goes on."""
    real_atomic_write = files.atomic_write

    class InterruptedHalfWay:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            half = len(data) // 2
            self.file.write(data[:half])
            signal.raise_signal(signal.SIGINT)
            self.file.write(data[half:])

    @contextlib.contextmanager
    def atomic_write(path):
        with real_atomic_write(path) as file:
            yield InterruptedHalfWay(file)

    path = write(tmp_path / "run.pt", epoch=1)
    monkeypatch.setattr(files, "atomic_write", atomic_write)
    with pytest.raises(KeyboardInterrupt):
        write(path, epoch=2)
    assert checkpoint.load(path, CPU)[1].epoch == 2
    assert os.listdir(tmp_path) == ["run.pt"]
