"""Shared fixtures: where the real MNIST test files are, when they are here at all."""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI runs the same examples every time (a red CI must be reproducible); locally,
# hypothesis keeps exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def restore_tf32_setting():
    """`train`, `eval` and `bench` turn TF32 matmuls on for CUDA, process-wide. Tests run
    the CLI in-process, so restore the setting: a later CUDA test that compares two ways
    of computing a step must see float32 arithmetic, not TF32 rounding. (On an H200, the
    graphed cnn test failed after the CLI test had left TF32 on.)"""
    before = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(autouse=True)
def restore_thread_count():
    """A CPU step may change torch's thread count, process-wide (transforms/cpu_threads.py,
    `--threads`); the next test starts from the count this one found."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# TINYMNIST_TEST_MNIST names a folder with the real t10k files (CI sets it); without
# it, or without the files, the tests that need real handwriting skip. Resolved here,
# once: a relative path (the default "data") would mean another folder to a test that
# links to it from its tmp_path, or that runs a command in another directory.
REAL_MNIST = Path(os.environ.get("TINYMNIST_TEST_MNIST") or "data").resolve()
T10K_IMAGES = "t10k-images-idx3-ubyte.gz"
T10K_LABELS = "t10k-labels-idx1-ubyte.gz"


@pytest.fixture(scope="session")
def real_mnist() -> Path:
    """The folder with the real t10k images and labels; skips the test when absent."""
    if not ((REAL_MNIST / T10K_IMAGES).is_file() and (REAL_MNIST / T10K_LABELS).is_file()):
        pytest.skip(f"real MNIST t10k files not found in {REAL_MNIST} (set TINYMNIST_TEST_MNIST)")
    return REAL_MNIST


def write_split(folder: Path, train: tuple, test: tuple) -> Path:
    """Write (images, labels) pairs under the four canonical MNIST names, as `load_mnist` reads them."""
    from tinymnist.data.idx import write_idx

    folder.mkdir(parents=True, exist_ok=True)
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="session")
def real_split(real_mnist, tmp_path_factory) -> Path:
    """Real handwriting as a data folder: the first 8,000 t10k images train, the last 2,000 test."""
    from tinymnist.data.idx import read_idx

    images = read_idx(real_mnist / T10K_IMAGES)  # (10000, 28, 28) uint8
    labels = read_idx(real_mnist / T10K_LABELS)  # (10000,) uint8
    return write_split(
        tmp_path_factory.mktemp("real_split"), (images[:8000], labels[:8000]), (images[8000:], labels[8000:])
    )


@pytest.fixture(scope="session")
def tiny_split(tmp_path_factory) -> Path:
    """A small synthetic data folder (600 train, 200 test images) for tests that need no real digits."""
    g = torch.Generator().manual_seed(0)
    make = lambda n: (  # noqa: E731
        torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n,), dtype=torch.uint8, generator=g),
    )
    return write_split(tmp_path_factory.mktemp("tiny_split"), make(600), make(200))
