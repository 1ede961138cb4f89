"""`tinymnist download --from`: MNIST's files rebuilt from mnist.pkl.gz, mnist.npz or an IDX folder,
kept only with MNIST's md5.

Small fake sources stand in for the real ones; where a test needs them accepted, it
swaps MNIST's md5s for those of the fake files (`accept`). The refusals run the real
command in a subprocess and check its exit status and the folder it leaves.
"""

import gzip
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tinymnist import data
from tinymnist.data import FILES, RAW_MD5, download
from tinymnist.data.idx import idx_md5, read_idx, write_idx
from tinymnist.data.sources import build_from
from tinymnist.errors import TinyMnistError

TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = FILES
RNG = np.random.default_rng(0)


def fake_mnist(n_train: int = 60, n_test: int = 10) -> dict[str, np.ndarray]:
    """Random digits in MNIST's layout: uint8 images (N, 28, 28), uint8 labels (N,)."""
    arrays = {}
    for (images, labels), n in (((TRAIN_IMAGES, TRAIN_LABELS), n_train), ((TEST_IMAGES, TEST_LABELS), n_test)):
        arrays[images] = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[labels] = RNG.integers(0, 10, n, dtype=np.uint8)
    return arrays


def write_pickle(path, payload, protocol=pickle.HIGHEST_PROTOCOL):
    with gzip.open(path, "wb") as file:
        pickle.dump(payload, file, protocol=protocol)
    return path


def classic_pickle(path, arrays, train_size=50, protocol=2):
    """mnist.pkl.gz's layout: (train, validation, test) pairs of float32 byte/256 pixels, int64 labels."""
    flat = lambda images: images.reshape(len(images), 784).astype(np.float32) / 256  # noqa: E731
    x, y = flat(arrays[TRAIN_IMAGES]), arrays[TRAIN_LABELS].astype(np.int64)
    test = (flat(arrays[TEST_IMAGES]), arrays[TEST_LABELS].astype(np.int64))
    sets = ((x[:train_size], y[:train_size]), (x[train_size:], y[train_size:]), test)
    return write_pickle(path, sets, protocol)  # protocol 2, as the Python 2 original, unless asked


@pytest.fixture
def accept(monkeypatch):
    """accept(arrays): take these fake files as MNIST, by their md5s."""

    def take(arrays):
        monkeypatch.setattr(
            "tinymnist.data.sources.RAW_MD5", {n: idx_md5(torch.from_numpy(a)) for n, a in arrays.items()}
        )

    return take


def assert_written(folder, arrays):
    assert sorted(os.listdir(folder)) == sorted(arrays)  # nothing else, no temp file
    for name, array in arrays.items():
        assert torch.equal(read_idx(folder / name), torch.from_numpy(array)), name


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinymnist", "download", *map(str, args)], capture_output=True, text=True, timeout=300
    )


# ---- the three formats ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_classic_pickle_train_and_validation_become_the_training_set(tmp_path, accept, protocol):
    arrays = fake_mnist()
    accept(arrays)
    written = build_from(classic_pickle(tmp_path / "mnist.pkl.gz", arrays, protocol=protocol), tmp_path / "data")
    assert written == dict.fromkeys(FILES, True)
    assert_written(tmp_path / "data", arrays)


def test_an_uncompressed_pickle_is_read_too(tmp_path, accept):
    arrays = fake_mnist()
    accept(arrays)
    path = classic_pickle(tmp_path / "mnist.pkl.gz", arrays)
    (tmp_path / "mnist.pkl").write_bytes(gzip.decompress(path.read_bytes()))
    build_from(tmp_path / "mnist.pkl", tmp_path / "data")
    assert_written(tmp_path / "data", arrays)


def test_keras_npz(tmp_path, accept):
    arrays = fake_mnist()
    accept(arrays)
    keys = dict(zip(FILES, ["x_train", "y_train", "x_test", "y_test"], strict=True))
    np.savez(tmp_path / "mnist.npz", **{keys[name]: array for name, array in arrays.items()})
    build_from(tmp_path / "mnist.npz", tmp_path / "data")
    assert_written(tmp_path / "data", arrays)


@pytest.mark.parametrize("layout", [".", "raw", "MNIST/raw"])
def test_folder_of_idx_files_gzipped_or_not(tmp_path, accept, layout):
    arrays = fake_mnist()
    accept(arrays)
    folder = tmp_path / "torchvision" / layout
    folder.mkdir(parents=True)
    for i, (name, array) in enumerate(arrays.items()):
        write_idx(folder / (name if i % 2 else name.removesuffix(".gz")), torch.from_numpy(array))
    build_from(tmp_path / "torchvision", tmp_path / "data")
    assert_written(tmp_path / "data", arrays)


def test_rebuilt_files_are_taken_without_touching_the_network(tmp_path, accept):
    arrays = fake_mnist()
    accept(arrays)
    build_from(classic_pickle(tmp_path / "mnist.pkl.gz", arrays), tmp_path / "data")
    download(tmp_path / "data", mirrors=["http://127.0.0.1:9/"])  # would be refused: nothing is asked
    assert data.load_mnist(tmp_path / "data").train_images.shape == (60, 28, 28)


def test_the_data_folder_as_its_own_source_is_left_as_it_is(tmp_path, accept):
    """`download --from DIR --data-dir DIR`: the files are checked, not rewritten onto themselves."""
    arrays = fake_mnist()
    accept(arrays)
    build_from(classic_pickle(tmp_path / "mnist.pkl.gz", arrays), tmp_path / "data")
    before = {name: os.stat(tmp_path / "data" / name) for name in FILES}

    assert build_from(tmp_path / "data", tmp_path / "data") == dict.fromkeys(FILES, False)

    assert_written(tmp_path / "data", arrays)
    for name, stat in before.items():
        after = os.stat(tmp_path / "data" / name)
        assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name


def test_only_the_files_that_are_not_mnists_are_rebuilt(tmp_path, accept):
    """A file with another md5 under MNIST's name (another dataset, say) or a cut-off one is replaced."""
    arrays = fake_mnist()
    accept(arrays)
    data_dir = tmp_path / "data"
    build_from(classic_pickle(tmp_path / "mnist.pkl.gz", arrays), data_dir)
    write_idx(data_dir / TRAIN_LABELS, torch.from_numpy((arrays[TRAIN_LABELS] + 1) % 10))  # a valid IDX, not MNIST's
    cut = (data_dir / TEST_IMAGES).read_bytes()
    (data_dir / TEST_IMAGES).write_bytes(cut[: len(cut) // 2])

    written = build_from(tmp_path / "mnist.pkl.gz", data_dir)

    assert written == {TRAIN_IMAGES: False, TRAIN_LABELS: True, TEST_IMAGES: True, TEST_LABELS: False}
    assert_written(data_dir, arrays)


# ---- refusals ------------------------------------------------------------------------------


def test_files_without_mnists_md5_are_not_written(tmp_path):
    """The right layout and pixel scale, but not MNIST's images: the real md5s refuse them."""
    source = classic_pickle(tmp_path / "mnist.pkl.gz", fake_mnist())
    result = cli("--from", source, "--data-dir", tmp_path / "data")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"tinymnist: error: --from {source}: not an original copy of MNIST: ")
    assert line.endswith("; nothing written")
    assert RAW_MD5[TRAIN_IMAGES] in line and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_a_pickle_that_names_other_code_is_refused(tmp_path):
    """A pickle may call anything it names on loading; only NumPy's array rebuilders may be."""

    class Payload:
        def __reduce__(self):
            return (print, ("ran code from the pickle",))

    source = write_pickle(tmp_path / "mnist.pkl.gz", Payload())
    result = cli("--from", source, "--data-dir", tmp_path / "data")
    assert result.returncode == 2
    assert result.stderr == (
        f"tinymnist: error: --from {source}: refusing builtins.print: only NumPy arrays are expected; nothing written\n"
    )
    assert "ran code from the pickle" not in result.stdout
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("damage", ["cut-pickle", "flipped-pickle", "cut-gzip"])
def test_a_cut_off_or_damaged_pickle_says_so(tmp_path, damage):
    """A download that stopped early, or a disk error, is named as such, not as another layout."""
    pickled = pickle.dumps(((np.zeros((5, 784), np.float32), np.zeros(5, np.int64)),) * 3, protocol=2)
    if damage == "cut-pickle":
        pickled = pickled[: len(pickled) // 2]
    if damage == "flipped-pickle":  # the first opcode after the protocol header: no opcode is 0xff
        pickled = pickled[:2] + b"\xff" + pickled[3:]
    packed = gzip.compress(pickled)
    if damage == "cut-gzip":
        packed = packed[: len(packed) // 2]
    source = tmp_path / "mnist.pkl.gz"
    source.write_bytes(packed)
    with pytest.raises(TinyMnistError) as caught:
        build_from(source, tmp_path / "data")
    message = str(caught.value)
    assert message.startswith(f"--from {source}: cut off or damaged (") and message.endswith(
        "); copy it again; nothing written"
    ), message
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "payload, message",
    [
        (((np.zeros((5, 784), np.float32) + 0.3, np.zeros(5, np.int64)),) * 3, "pixels are not byte / 256"),
        (((np.zeros((5, 28, 28), np.uint8), np.zeros(5, np.int64)),) * 3, "not float32 (N, 784)"),
        (((np.zeros((5, 784), np.float32), np.zeros(5, np.float32)),) * 3, "not integers 0..255"),
        ({"not": "mnist"}, "not the classic mnist.pkl.gz layout"),
        (((np.zeros((0, 784), np.float32), np.zeros(0, np.int64)),) * 3, "not the classic mnist.pkl.gz layout"),
    ],
    ids=["pixel-scale", "image-shape", "float-labels", "a-dict", "empty"],
)
def test_a_pickle_in_another_layout_is_one_line(tmp_path, payload, message):
    source = write_pickle(tmp_path / "mnist.pkl.gz", payload)
    with pytest.raises(TinyMnistError, match=re.escape(message)):
        build_from(source, tmp_path / "data")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x_train": np.zeros((2, 28, 28), np.uint8)}, "lacks y_train, x_test, y_test"),
        ({k: np.zeros((2, 28, 28)) for k in ("x_train", "y_train", "x_test", "y_test")}, "x_train is float64"),
        (
            {k: np.zeros((2, 4), np.uint8) for k in ("x_train", "y_train", "x_test", "y_test")},
            "x_train is uint8 (2, 4)",
        ),
    ],
    ids=["missing-keys", "float", "shape"],
)
def test_an_npz_in_another_layout_is_one_line(tmp_path, arrays, message):
    np.savez(tmp_path / "mnist.npz", **arrays)
    with pytest.raises(TinyMnistError, match=re.escape(message)):
        build_from(tmp_path / "mnist.npz", tmp_path / "data")


def test_unreadable_sources_are_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "empty").mkdir()
    for source, message in [
        (tmp_path / "absent.pkl.gz", "cannot read (No such file or directory)"),
        (tmp_path / "notes.txt", "not a format tinymnist reads"),
        (tmp_path / "broken.npz", "not a readable .npz"),
        (tmp_path / "empty", "holds none of train-images-idx3-ubyte.gz"),
    ]:
        with pytest.raises(TinyMnistError, match=re.escape(message)):
            build_from(source, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_a_folder_file_claiming_too_many_images_is_refused_by_its_header(tmp_path):
    (tmp_path / "src").mkdir()
    header = b"\x00\x00\x08\x03" + (80_000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (tmp_path / "src" / TEST_IMAGES.removesuffix(".gz")).write_bytes(header)  # no payload read: none there
    with pytest.raises(TinyMnistError, match="header says 80000 images, more than MNIST's 10000"):
        build_from(tmp_path / "src", tmp_path / "data")


def test_real_mnist_files_pass_the_md5_check(real_mnist, tmp_path):
    result = cli("--from", real_mnist, "--data-dir", tmp_path / "data")
    present = [name for name in FILES if (real_mnist / name).is_file()]
    for name in present:
        written = gzip.decompress((tmp_path / "data" / name).read_bytes())
        assert written == gzip.decompress((real_mnist / name).read_bytes())
    assert result.returncode == (0 if len(present) == 4 else 2), result.stderr
    if len(present) < 4:  # the missing training images are named, with the ways to get them
        assert "MNIST files missing from" in result.stderr and TRAIN_IMAGES in result.stderr
