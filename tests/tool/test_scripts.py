"""scripts/t10k_split.py, the one user script: a train/test folder from the t10k files alone.
The research scripts are experiments, not tested here: each checks what it needs itself (research/README.md)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from tinymnist.data import load_mnist
from tinymnist.data.idx import write_idx

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "t10k_split.py"


def split(source: Path, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, source, target], capture_output=True, text=True, timeout=300)


def test_the_last_2000_test_and_the_rest_train(tmp_path):
    images = torch.randint(0, 256, (2100, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (2100,), dtype=torch.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)  # uncompressed, as torchvision keeps them

    result = split(tmp_path, tmp_path / "split")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'split'}: 100 training and 2000 test images\n"
    mnist = load_mnist(tmp_path / "split")
    assert torch.equal(mnist.train_images, images[:100]) and torch.equal(mnist.test_images, images[100:])
    assert torch.equal(mnist.train_labels, labels[:100].long()) and torch.equal(mnist.test_labels, labels[100:].long())


def test_missing_test_files_are_one_line_and_write_nothing(tmp_path):
    result = split(tmp_path, tmp_path / "split")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"t10k_split: error: MNIST files missing from {tmp_path}: t10k-images-idx3-ubyte.gz")
    assert os.listdir(tmp_path) == []


def test_help_says_how_to_call_it_and_succeeds():
    for flag in ("-h", "--help"):
        result = subprocess.run([sys.executable, SCRIPT, flag], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: python scripts/t10k_split.py MNIST_DIR TARGET_DIR\n")
        assert "first 8,000 as the training split" in result.stdout
    wrong = subprocess.run([sys.executable, SCRIPT, "only-one"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1 and wrong.stderr.startswith("usage:")
