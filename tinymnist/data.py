"""Get MNIST onto the device: find or download the four IDX files, check them, load them once.

    data/train-images-idx3-ubyte.gz   60000 images  -> (60000, 28, 28) uint8
    data/train-labels-idx1-ubyte.gz   60000 labels  -> (60000,) int64
    data/t10k-images-idx3-ubyte.gz    10000 images  -> (10000, 28, 28) uint8
    data/t10k-labels-idx1-ubyte.gz    10000 labels  -> (10000,) int64

The folder is `--data-dir`, else `$TINYMNIST_DATA`, else `./data`. Each file may also
sit there uncompressed, named without `.gz` (torchvision leaves such copies in
`MNIST/raw/`). `download` fetches what is missing, checking every file against its
published md5 before it gets its final name. `load_mnist` checks shapes, dtypes, counts
and label range but not md5s, so tests can train on small splits they write with
`write_idx` under the same names.

Images stay uint8 on the device (a quarter of float32's memory); the training step
converts each batch to float itself.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from tinymnist.errors import TinyMnistError
from tinymnist.fetch import fetch_files
from tinymnist.idx import IdxError, read_idx

# The published md5 of each file as distributed (gzipped), from torchvision's MNIST class.
FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# Tried in order. yann.lecun.com, the original home, now answers scripts with 403/404,
# so it is not worth a request.
DEFAULT_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # PyTorch's copy (torchvision's first choice)
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # TensorFlow's copy
)
DATA_DIR_ENV = "TINYMNIST_DATA"
MIRRORS_ENV = "TINYMNIST_MIRRORS"
DEFAULT_DATA_DIR = Path("data")
IMAGE_SIZE = 28  # MNIST digits are 28x28 pixels
NUM_CLASSES = 10  # the digits 0..9
GUNZIP_CHUNK = 1 << 20  # bytes per read when checking that a .gz decompresses to its end


class MissingDataError(TinyMnistError):
    """MNIST files are not in the data folder; the message says how to put them there."""


class DownloadError(TinyMnistError):
    """Every mirror failed for some files: one line per file with each mirror's answer."""


class MNIST(NamedTuple):
    train_images: torch.Tensor  # (60000, 28, 28) uint8
    train_labels: torch.Tensor  # (60000,) int64
    test_images: torch.Tensor  # (10000, 28, 28) uint8
    test_labels: torch.Tensor  # (10000,) int64


def resolve_data_dir(flag: Path | None = None) -> Path:
    """The data folder: the --data-dir flag, else $TINYMNIST_DATA, else ./data."""
    if flag is not None:
        return Path(flag)
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def find_file(data_dir: Path, name: str) -> Path | None:
    """`NAME.gz` in data_dir, else its uncompressed copy `NAME`; None when neither is there."""
    for candidate in (Path(data_dir) / name, Path(data_dir) / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def missing_files(data_dir: Path) -> list[str]:
    """The canonical names (`….gz`) of the MNIST files that are not in data_dir in either form."""
    return [name for name in FILES if find_file(data_dir, name) is None]


def missing_data_message(data_dir: Path, missing: Sequence[str]) -> str:
    """One line for the user: which files are missing, and every way to provide them."""
    listed = ", ".join(missing)
    return f"MNIST files missing from {data_dir}: {listed}. Run `tinymnist download`, or {_by_hand(data_dir, missing)}"


def load_mnist(data_dir: Path, device: torch.device | str = "cpu") -> MNIST:
    """Read the four files once, check them, and return them on `device`."""
    data_dir = Path(data_dir)
    if missing := missing_files(data_dir):
        raise MissingDataError(missing_data_message(data_dir, missing))
    train_images, train_labels = _load_split(data_dir, "train", device)
    test_images, test_labels = _load_split(data_dir, "t10k", device)
    return MNIST(train_images, train_labels, test_images, test_labels)


def _load_split(data_dir: Path, prefix: str, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    images_path = find_file(data_dir, f"{prefix}-images-idx3-ubyte.gz")
    labels_path = find_file(data_dir, f"{prefix}-labels-idx1-ubyte.gz")
    images = _read(images_path)  # (N, 28, 28) uint8
    labels = _read(labels_path)  # (N,) uint8
    if images.dtype != torch.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.dim() != 3:
        shape = "x".join(map(str, images.shape))
        raise TinyMnistError(f"{images_path}: expected uint8 images Nx28x28, found {images.dtype} {shape}")
    if labels.dim() != 1 or labels.dtype.is_floating_point:
        shape = "x".join(map(str, labels.shape))
        raise TinyMnistError(f"{labels_path}: expected a vector of integer labels, found {labels.dtype} {shape}")
    if len(images) != len(labels):
        counts = f"{len(images)} images but {labels_path.name} holds {len(labels)} labels"
        raise TinyMnistError(f"{images_path} holds {counts}")
    if len(labels) == 0:
        raise TinyMnistError(f"{labels_path}: holds no examples")
    out_of_range = (labels < 0) | (labels >= NUM_CLASSES)  # (N,) bool
    if out_of_range.any():
        index = int(out_of_range.nonzero()[0])
        label = int(labels[index])
        raise TinyMnistError(f"{labels_path}: label {label} at index {index} is outside 0..{NUM_CLASSES - 1}")
    # Labels become int64 because that is what cross_entropy and nll_loss index with.
    return images.to(device), labels.to(device=device, dtype=torch.int64)


def _read(path: Path) -> torch.Tensor:
    try:
        return read_idx(path)
    except IdxError as e:
        raise IdxError(f"{e}; delete it and run `tinymnist download` to fetch it again") from None


def download(
    data_dir: Path,
    mirrors: Sequence[str] | None = None,
    md5s: Mapping[str, str] | None = None,
    progress: bool | None = None,
    *,
    timeout: float = 30.0,
    attempts: int = 3,
    backoff: float = 1.0,
) -> None:
    """Fetch each file of `md5s` (default: FILES) that data_dir lacks, trying `mirrors` in order.

    mirrors: base URLs; default $TINYMNIST_MIRRORS (comma-separated), else DEFAULT_MIRRORS.
    A refused connection, a timeout (`timeout` seconds), a cut-off body or an HTTP 5xx is
    tried up to `attempts` times per mirror, sleeping backoff, 2*backoff, ... in between;
    an HTTP 4xx or a wrong md5 moves on to the next mirror at once. A file gets its final
    name only once its md5 matches. progress: a byte-count bar on stderr (default: only
    on a terminal). Raises DownloadError naming every file that no mirror could provide;
    the files that did arrive stay.
    """
    data_dir = Path(data_dir)
    md5s = FILES if md5s is None else md5s
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the data folder {data_dir}: {e.strerror or e}") from None
    wanted = {name: md5 for name, md5 in md5s.items() if not _already_present(data_dir, name)}
    mirrors = list(mirrors) if mirrors is not None else _mirrors_from_env()
    policy = {"timeout": timeout, "attempts": attempts, "backoff": backoff}
    try:
        failures = fetch_files(data_dir, wanted, mirrors, progress=progress, **policy)
    except OSError as e:  # the local disk (full, read-only): network errors are answers, not raised
        raise DownloadError(f"cannot write into the data folder {data_dir}: {e.strerror or e}") from None
    if failures:
        lines = [f"{name}: {'; '.join(answers)}" for name, answers in failures.items()]
        how = f"To fix: {_by_hand(data_dir, list(failures))}, or list other mirrors in {MIRRORS_ENV}=URL,URL"
        raise DownloadError("\n".join(["could not download MNIST; what each mirror answered:", *lines, how]))


def _already_present(data_dir: Path, name: str) -> bool:
    """A .gz counts if its gzip stream decompresses to the end (a cut-off one is fetched again);
    without a .gz, an uncompressed copy counts."""
    gz_path = data_dir / name
    if not gz_path.is_file():
        return (data_dir / name.removesuffix(".gz")).is_file()
    try:
        with gzip.open(gz_path, "rb") as stream:
            if not stream.read(1):  # gzip reads an empty file as zero members, without complaint
                return False
            while stream.read(GUNZIP_CHUNK):
                pass
        return True
    except (OSError, EOFError, zlib.error):
        return False


def _mirrors_from_env() -> list[str]:
    listed = [url.strip() for url in os.environ.get(MIRRORS_ENV, "").split(",")]
    return [url for url in listed if url] or list(DEFAULT_MIRRORS)


def _by_hand(data_dir: Path, names: Sequence[str]) -> str:
    return (
        f"copy {', '.join(names)} (gzipped, or uncompressed without .gz; e.g. from {DEFAULT_MIRRORS[0]}) "
        f"into {data_dir} by hand, "
        f"or point {DATA_DIR_ENV}=FOLDER or --data-dir FOLDER at a folder that has them"
    )
