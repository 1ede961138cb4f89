"""Shared fixtures: where the real MNIST test files are, when they are here at all."""

import os
from pathlib import Path

import pytest

# ../shared/mnist beside the checkout holds the real t10k files (md5-verified);
# TINYMNIST_TEST_MNIST points elsewhere. On a user's machine neither may exist.
REAL_MNIST = Path(os.environ.get("TINYMNIST_TEST_MNIST", Path(__file__).resolve().parents[2] / "shared" / "mnist"))
T10K_IMAGES = "t10k-images-idx3-ubyte.gz"
T10K_LABELS = "t10k-labels-idx1-ubyte.gz"


@pytest.fixture(scope="session")
def real_mnist() -> Path:
    """The folder with the real t10k images and labels; skips the test when absent."""
    if not ((REAL_MNIST / T10K_IMAGES).is_file() and (REAL_MNIST / T10K_LABELS).is_file()):
        pytest.skip(f"real MNIST t10k files not found in {REAL_MNIST} (set TINYMNIST_TEST_MNIST)")
    return REAL_MNIST
