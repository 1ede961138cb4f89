"""Build MNIST's four IDX files from a copy already at hand: `tinymnist download --from SOURCE`.

    mnist.pkl.gz   the classic pickle: (images, labels) for 50,000 training + 10,000 validation
                   (MNIST's training set, in order) + 10,000 test images; pixels float32 byte / 256
    mnist.npz      Keras's ~/.keras/datasets/mnist.npz: x_train, y_train, x_test, y_test, uint8
    a folder       IDX files under MNIST's names, gzipped or not (torchvision's MNIST/raw)

A file is written only if its IDX bytes have the md5 of MNIST's uncompressed file (data.RAW_MD5).
"""

from __future__ import annotations

import gzip
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from tinymnist.data import FILES, RAW_MD5, check_data_dir, check_header, files, find_file, whole_contents
from tinymnist.data.idx import GZIP_MAGIC, idx_md5, open_idx, write_idx
from tinymnist.errors import TinyMnistError

TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = FILES
PIXEL_SCALE = 256  # mnist.pkl.gz stores byte / 256, so 255 is 0.99609375
IMAGE_SHAPE = (28, 28)
ZIP_MAGIC, PICKLE_MAGIC = b"PK", b"\x80"  # .npz is a zip; pickle protocol >= 2
FORMATS = "mnist.pkl.gz, Keras's mnist.npz, or a folder of IDX files such as torchvision's MNIST/raw"


def build_from(source: Path, data_dir: Path) -> dict[str, bool]:
    """Write into data_dir each MNIST file that `source` holds, md5-verified; nothing is written if any is
    not byte for byte MNIST's. Returns {name: written}: False where data_dir already held MNIST's file (as
    when `source` is data_dir itself), which is left as it is."""
    source, data_dir = Path(source), Path(data_dir)
    check_data_dir(data_dir)
    tensors = _read_source(source)  # name -> (N, 28, 28) or (N,) uint8
    wrong = [name for name, tensor in tensors.items() if idx_md5(tensor) != RAW_MD5[name]]
    if wrong:
        got = ", ".join(f"{name} (md5 {idx_md5(tensors[name])}, MNIST's is {RAW_MD5[name]})" for name in wrong)
        raise TinyMnistError(f"--from {source}: not an original copy of MNIST: {got}; nothing written")
    written = {name: not _holds_mnists(data_dir, name) for name in tensors}
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        for name, tensor in tensors.items():
            if written[name]:
                write_idx(data_dir / name, tensor)
    except OSError as e:
        raise TinyMnistError(f"cannot write into the data folder {data_dir}: {e.strerror or e}") from None
    return written


def _holds_mnists(data_dir: Path, name: str) -> bool:
    """Whether data_dir holds `name`, gzipped or not, with the md5 of MNIST's contents (else it is rebuilt)."""
    contents = whole_contents(data_dir, name)
    return contents is not None and idx_md5(contents) == RAW_MD5[name]


def _read_source(source: Path) -> dict[str, torch.Tensor]:
    if source.is_dir():
        return _from_folder(source)
    files.check_readable(source, "--from")
    try:
        with open(source, "rb") as file:
            start = file.read(2)
    except OSError as e:
        raise TinyMnistError(f"--from {source}: cannot read ({e.strerror or e}); give {FORMATS}") from None
    if start.startswith(ZIP_MAGIC):
        return _from_npz(source)
    if start.startswith((GZIP_MAGIC, PICKLE_MAGIC)):
        return _from_pickle(source, gzipped=start == GZIP_MAGIC)
    raise TinyMnistError(f"--from {source}: not a format tinymnist reads; give {FORMATS}")


def _from_folder(folder: Path) -> dict[str, torch.Tensor]:
    """The IDX files in `folder`, or in its `raw/` or `MNIST/raw/` as torchvision lays them out."""
    for candidate in (folder, folder / "raw", folder / "MNIST" / "raw"):
        if found := {name: path for name in FILES if (path := find_file(candidate, name))}:
            tensors = {}
            for name, path in found.items():
                with open_idx(path) as idx:
                    check_header(path, idx.header, name)  # refused by its header, unread, if not MNIST-sized
                    tensors[name] = idx.read()
            return tensors
    raise TinyMnistError(f"--from {folder}: holds none of {', '.join(FILES)} (gzipped or not); give {FORMATS}")


def _from_npz(path: Path) -> dict[str, torch.Tensor]:
    """Keras's arrays, stored as MNIST stores them: uint8 images (N, 28, 28), uint8 labels (N,)."""
    keys = {TRAIN_IMAGES: "x_train", TRAIN_LABELS: "y_train", TEST_IMAGES: "x_test", TEST_LABELS: "y_test"}
    try:
        with np.load(path, allow_pickle=False) as arrays:  # no pickle: an .npz may carry one too
            if missing := [key for key in keys.values() if key not in arrays.files]:
                raise TinyMnistError(f"--from {path}: lacks {', '.join(missing)}, which Keras's mnist.npz holds")
            loaded = {name: arrays[key] for name, key in keys.items()}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise TinyMnistError(f"--from {path}: not a readable .npz ({e})") from None
    for name, array in loaded.items():
        shape = (array.shape[1:] == IMAGE_SHAPE) if "images" in name else (array.ndim == 1)
        if array.dtype != np.uint8 or not shape:
            found = f"{array.dtype} {array.shape}"
            raise TinyMnistError(f"--from {path}: {keys[name]} is {found}; Keras stores uint8 (N, 28, 28) and (N,)")
    return {name: torch.from_numpy(array) for name, array in loaded.items()}


class _Refused(pickle.UnpicklingError):
    """A pickle that names something other than NumPy's arrays."""


class _ArraysOnly(pickle.Unpickler):
    """Unpickle NumPy arrays and nothing else: a pickle may name any callable to run on loading."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),  # how NumPy 1.x pickles an array
            ("numpy._core.multiarray", "_reconstruct"),  # ... and NumPy 2.x
            ("numpy.core.numeric", "_frombuffer"),  # ... with pickle protocol 5
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how Python 3 writes bytes into a protocol-2 pickle: str -> bytes, nothing else
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"refusing {module}.{name}: only NumPy arrays are expected")
        return super().find_class(module, name)


def _from_pickle(path: Path, gzipped: bool) -> dict[str, torch.Tensor]:
    """The classic mnist.pkl.gz: its training and validation sets together are MNIST's training set."""
    try:
        with gzip.open(path) if gzipped else open(path, "rb") as file:
            # latin1: the file was pickled by Python 2, whose str held NumPy's raw bytes
            (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _ArraysOnly(file, encoding="latin1").load()
        arrays = (train_x, train_y, valid_x, valid_y, test_x, test_y)
        if not all(isinstance(array, np.ndarray) and array.size for array in arrays):
            raise TypeError("expected six non-empty NumPy arrays")
    except _Refused as e:
        raise TinyMnistError(f"--from {path}: {e}; nothing written") from None
    except (EOFError, OSError, zlib.error, pickle.UnpicklingError) as e:  # the file ends early or is damaged
        raise TinyMnistError(f"--from {path}: cut off or damaged ({e}); copy it again; nothing written") from None
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"[:120]
        raise TinyMnistError(f"--from {path}: not the classic mnist.pkl.gz layout ({reason})") from None
    return {
        TRAIN_IMAGES: _as_bytes(path, np.concatenate([train_x, valid_x])),  # (60000, 28, 28)
        TRAIN_LABELS: _as_labels(path, np.concatenate([train_y, valid_y])),  # (60000,)
        TEST_IMAGES: _as_bytes(path, test_x),  # (10000, 28, 28)
        TEST_LABELS: _as_labels(path, test_y),  # (10000,)
    }


def _as_bytes(path: Path, pixels: np.ndarray) -> torch.Tensor:
    """(N, 784) float32 byte/256 -> (N, 28, 28) uint8, refusing any value that is not exact."""
    if pixels.dtype != np.float32 or pixels.ndim != 2 or pixels.shape[1] != np.prod(IMAGE_SHAPE):
        raise TinyMnistError(f"--from {path}: images are {pixels.dtype} {pixels.shape}, not float32 (N, 784)")
    scaled = pixels * PIXEL_SCALE  # (N, 784) float32, whole numbers 0..255 if this is MNIST
    if not (np.array_equal(scaled, np.round(scaled)) and scaled.min() >= 0 and scaled.max() <= 255):
        raise TinyMnistError(f"--from {path}: its pixels are not byte / {PIXEL_SCALE}: not MNIST's copy")
    return torch.from_numpy(scaled.astype(np.uint8).reshape(-1, *IMAGE_SHAPE))


def _as_labels(path: Path, labels: np.ndarray) -> torch.Tensor:
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() > 255:
        raise TinyMnistError(f"--from {path}: labels are {labels.dtype} {labels.shape}, not integers 0..255")
    return torch.from_numpy(labels.astype(np.uint8))
