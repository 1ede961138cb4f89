"""A data folder with MNIST's full shape for timing `train` where the real training images are missing.

    python scripts/speed_folder.py ../shared/mnist /tmp/speed-60k

writes 60,000 random uint8 training images (random labels) beside the real t10k test
files, so that an epoch has the recipe's 938 steps of 64. Speed does not depend on the
pixels; the test accuracy of a network trained on noise means nothing (about 10%).
"""

import sys
from pathlib import Path

import torch

from tinymnist.idx import read_idx, write_idx

TRAIN_SIZE = 60_000


def main(source: Path, target: Path) -> None:
    g = torch.Generator().manual_seed(0)
    target.mkdir(parents=True, exist_ok=True)
    images = torch.randint(0, 256, (TRAIN_SIZE, 28, 28), dtype=torch.uint8, generator=g)  # (60000, 28, 28)
    labels = torch.randint(0, 10, (TRAIN_SIZE,), dtype=torch.uint8, generator=g)  # (60000,)
    write_idx(target / "train-images-idx3-ubyte.gz", images)
    write_idx(target / "train-labels-idx1-ubyte.gz", labels)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        write_idx(target / name, read_idx(source / name))
    print(f"{target}: {TRAIN_SIZE} random training images, the real 10,000 test images")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/speed_folder.py MNIST_DIR TARGET_DIR")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
