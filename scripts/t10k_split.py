"""Make a small real-handwriting data folder from the MNIST test files alone.

    python scripts/t10k_split.py data t10k-split

reads the t10k images and labels from the first folder (checked as `tinymnist` checks
them) and writes the first 8,000 as the training split and the last 2,000 as the test
split, under the four canonical names, so that `tinymnist train --data-dir t10k-split
--no-download` trains on real digits without MNIST's 60,000 training images. The
README's example output was made this way. (The training images themselves can be
rebuilt from another copy of MNIST with `tinymnist download --from`.)
"""

import sys
from pathlib import Path

import torch

from tinymnist.data import load_test_split
from tinymnist.data.idx import write_idx
from tinymnist.errors import TinyMnistError

TEST_SIZE = 2000  # the last 2,000 of the 10,000 t10k images; the ones before them train


def main(source: Path, target: Path) -> None:
    images, labels = load_test_split(source)  # (N, 28, 28) uint8, (N,) int64
    if len(images) <= TEST_SIZE:
        raise TinyMnistError(f"{source}: holds {len(images)} test images, needs more than {TEST_SIZE}")
    target.mkdir(parents=True, exist_ok=True)
    for prefix, part in (("train", slice(None, -TEST_SIZE)), ("t10k", slice(-TEST_SIZE, None))):
        write_idx(target / f"{prefix}-images-idx3-ubyte.gz", images[part])
        write_idx(target / f"{prefix}-labels-idx1-ubyte.gz", labels[part].to(torch.uint8))  # as MNIST stores them
    print(f"{target}: {len(images) - TEST_SIZE} training and {TEST_SIZE} test images")


USAGE = "usage: python scripts/t10k_split.py MNIST_DIR TARGET_DIR"

if __name__ == "__main__":
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(USAGE + "\n\n" + __doc__.strip())
        sys.exit(0)
    if len(sys.argv) != 3:
        sys.exit(USAGE)
    try:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
    except (TinyMnistError, OSError) as e:
        sys.exit(f"t10k_split: error: {e}")
