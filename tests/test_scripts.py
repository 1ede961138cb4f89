"""scripts/train_images_from_pickle.py keeps nothing it cannot prove to be MNIST."""

import gzip
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_images_from_pickle.py"
REAL_FILES = ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def rebuild(pickle_path: Path, mnist_dir: Path, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, pickle_path, mnist_dir, target], capture_output=True, text=True, timeout=120
    )


def fake_mnist_dir(folder: Path) -> Path:
    folder.mkdir()
    for name in REAL_FILES:
        (folder / name).write_bytes(b"stand-in")
    return folder


def write_pickle(path: Path, payload) -> Path:
    with gzip.open(path, "wb") as file:
        pickle.dump(payload, file)
    return path


def test_images_without_mnists_md5_are_not_kept(tmp_path):
    """A pickle of the right layout and the right pixel scale, but not MNIST's images."""
    rng = np.random.default_rng(0)

    def pair(n):
        return rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, rng.integers(0, 10, n)

    pkl = write_pickle(tmp_path / "mnist.pkl.gz", (pair(50), pair(10), pair(10)))
    target = tmp_path / "full"
    result = rebuild(pkl, fake_mnist_dir(tmp_path / "mnist"), target)
    assert result.returncode != 0
    assert "published md5" in result.stderr
    assert list(target.iterdir()) == []  # the rebuilt file was removed, no real file copied


def test_a_pickle_that_names_other_code_is_refused(tmp_path):
    """A pickle may call anything it names on loading; only numpy's array rebuilders may be."""

    class Payload:
        def __reduce__(self):
            return (print, ("ran code from the pickle",))

    pkl = write_pickle(tmp_path / "mnist.pkl.gz", Payload())
    result = rebuild(pkl, fake_mnist_dir(tmp_path / "mnist"), tmp_path / "full")
    assert result.returncode != 0
    assert "refusing builtins.print" in result.stderr
    assert "ran code from the pickle" not in result.stdout
    assert not (tmp_path / "full").exists()


def test_missing_real_files_stop_it_before_anything_is_written(tmp_path):
    result = rebuild(tmp_path / "absent.pkl.gz", tmp_path, tmp_path / "full")
    assert result.returncode != 0
    assert "lacks train-labels-idx1-ubyte.gz" in result.stderr
    assert not (tmp_path / "full").exists()
