"""Make a small real-handwriting data folder from the MNIST test files alone.

    python scripts/t10k_split.py ../shared/mnist /tmp/t10k-split

writes the first 8,000 t10k images as the training split and the last 2,000 as the
test split, under the four canonical names, so that `tinymnist train --data-dir
/tmp/t10k-split --no-download` trains on real digits without the 60,000 training
images (which machines without internet cannot fetch). The accuracy table in
README.md was measured this way.
"""

import sys
from pathlib import Path

from tinymnist.idx import read_idx, write_idx

TRAIN_SIZE = 8000  # of the 10,000 t10k images; the other 2,000 are the test split


def main(source: Path, target: Path) -> None:
    images = read_idx(source / "t10k-images-idx3-ubyte.gz")  # (10000, 28, 28) uint8
    labels = read_idx(source / "t10k-labels-idx1-ubyte.gz")  # (10000,) uint8
    target.mkdir(parents=True, exist_ok=True)
    for prefix, part in (("train", slice(None, TRAIN_SIZE)), ("t10k", slice(TRAIN_SIZE, None))):
        write_idx(target / f"{prefix}-images-idx3-ubyte.gz", images[part])
        write_idx(target / f"{prefix}-labels-idx1-ubyte.gz", labels[part])
    print(f"{target}: {TRAIN_SIZE} training and {len(images) - TRAIN_SIZE} test images")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/t10k_split.py MNIST_DIR TARGET_DIR")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
