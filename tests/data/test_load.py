"""Loading: small train/test splits written with write_idx under the canonical names."""

import re
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch

from tests.support.mirror import Mirror
from tinymnist.data import (
    FILES,
    MNIST,
    TEST_FILES,
    DownloadError,
    MissingDataError,
    load_mnist,
    load_test_split,
    missing_data_message,
    missing_files,
    resolve_data_dir,
)
from tinymnist.data.idx import write_idx
from tinymnist.errors import TinyMnistError

TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = FILES  # the canonical .gz names


def write_examples(folder: Path, images_name: str, labels_name: str, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator)  # (n, 28, 28)
    labels = torch.randint(0, 10, (n,), dtype=torch.uint8, generator=generator)  # (n,)
    write_idx(folder / images_name, images)
    write_idx(folder / labels_name, labels)
    return images, labels


@pytest.fixture
def small_mnist(tmp_path) -> tuple[Path, MNIST]:
    """A data folder with 48 training and 16 test examples, and what was written."""
    train = write_examples(tmp_path, TRAIN_IMAGES, TRAIN_LABELS, 48, seed=0)
    test = write_examples(tmp_path, TEST_IMAGES, TEST_LABELS, 16, seed=1)
    return tmp_path, MNIST(*train, *test)


def test_load_returns_what_was_written(small_mnist):
    folder, written = small_mnist
    mnist = load_mnist(folder)
    assert mnist.train_images.shape == (48, 28, 28) and mnist.train_images.dtype == torch.uint8
    assert mnist.test_images.shape == (16, 28, 28) and mnist.test_images.dtype == torch.uint8
    assert mnist.train_labels.shape == (48,) and mnist.train_labels.dtype == torch.int64
    assert mnist.test_labels.shape == (16,) and mnist.test_labels.dtype == torch.int64
    for loaded, expected in zip(mnist, written, strict=True):
        assert torch.equal(loaded, expected.to(loaded.dtype))


@pytest.mark.parametrize(
    "device",
    ["cpu", "meta", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_load_puts_every_tensor_on_the_device(small_mnist, device):
    # "meta" tensors have shapes but no storage: it proves the move happens without a GPU.
    mnist = load_mnist(small_mnist[0], device=torch.device(device))
    assert all(tensor.device.type == device for tensor in mnist)


def test_uncompressed_copies_are_accepted(tmp_path):
    # torchvision's MNIST/raw/ holds gunzipped copies, named without .gz.
    write_examples(tmp_path, TRAIN_IMAGES.removesuffix(".gz"), TRAIN_LABELS, 8, seed=0)
    _, labels = write_examples(tmp_path, TEST_IMAGES, TEST_LABELS.removesuffix(".gz"), 4, seed=1)
    assert missing_files(tmp_path) == []
    mnist = load_mnist(tmp_path)
    assert mnist.train_images.shape == (8, 28, 28)
    assert torch.equal(mnist.test_labels, labels.long())


def test_gz_wins_over_an_uncompressed_copy(small_mnist):
    folder, written = small_mnist
    write_idx(folder / TEST_LABELS.removesuffix(".gz"), torch.zeros(16, dtype=torch.uint8))
    assert torch.equal(load_mnist(folder).test_labels, written.test_labels.long())


def test_missing_files_lists_the_canonical_names(tmp_path):
    assert missing_files(tmp_path) == list(FILES)
    write_examples(tmp_path, TEST_IMAGES, TEST_LABELS, 4, seed=0)
    assert missing_files(tmp_path) == [TRAIN_IMAGES, TRAIN_LABELS]
    assert missing_files(tmp_path / "no-such-folder") == list(FILES)


def test_missing_files_raise_with_instructions(tmp_path):
    write_examples(tmp_path, TEST_IMAGES, TEST_LABELS, 4, seed=0)
    with pytest.raises(MissingDataError) as caught:
        load_mnist(tmp_path)
    message = str(caught.value)
    assert isinstance(caught.value, TinyMnistError)
    assert message == missing_data_message(tmp_path, [TRAIN_IMAGES, TRAIN_LABELS])
    assert "\n" not in message  # the CLI prints it as one line
    assert f"`tinymnist download --data-dir {tmp_path}`" in message  # the fix fills this folder, not ./data
    for needed in (TRAIN_IMAGES, TRAIN_LABELS, str(tmp_path), "tinymnist download", "TINYMNIST_DATA", "--data-dir"):
        assert needed in message, needed
    assert TEST_IMAGES not in message


def test_count_mismatch_names_both_files(small_mnist):
    folder, _ = small_mnist
    write_idx(folder / TEST_LABELS, torch.zeros(15, dtype=torch.uint8))
    expected = f"{TEST_IMAGES} holds 16 images but {TEST_LABELS} holds 15 labels"
    with pytest.raises(TinyMnistError, match=re.escape(expected)):
        load_mnist(folder)


def test_swapped_training_and_test_files_are_named_as_such(small_mnist):
    """MNIST's two images files under each other's names: the counts give it away, and the error says so."""
    folder, _ = small_mnist
    write_idx(folder / TRAIN_IMAGES, torch.zeros(10_000, 28, 28, dtype=torch.uint8))  # the test set's size
    write_idx(folder / TRAIN_LABELS, torch.zeros(60_000, dtype=torch.uint8))
    with pytest.raises(TinyMnistError) as caught:
        load_mnist(folder)
    assert str(caught.value) == (
        f"{folder / TRAIN_IMAGES} holds 10000 images but {TRAIN_LABELS} holds 60000 labels "
        "(10000 is the test set's size: are the train- and t10k- files swapped?); "
        "put MNIST's own files there (`tinymnist download`, or `tinymnist download --from` a copy)"
    )

    write_idx(folder / TEST_LABELS, torch.zeros(60_000, dtype=torch.uint8))  # the training set's size
    with pytest.raises(TinyMnistError, match=re.escape("(60000 is the training set's size: are the train- and t10k")):
        load_test_split(folder)


@pytest.mark.parametrize("bad_label, dtype", [(10, torch.uint8), (255, torch.uint8), (-1, torch.int8)])
def test_label_outside_0_to_9_names_the_file(small_mnist, bad_label, dtype):
    folder, written = small_mnist
    labels = written.train_labels.to(dtype)
    labels[7] = bad_label
    write_idx(folder / TRAIN_LABELS, labels)
    expected = f"{TRAIN_LABELS}: label {bad_label} at index 7 is outside 0..9"
    with pytest.raises(TinyMnistError, match=re.escape(expected)):
        load_mnist(folder)


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(16, 28, 27, dtype=torch.uint8),
        torch.zeros(16, 784, dtype=torch.uint8),
        torch.zeros(16, 28, 28, dtype=torch.int16),
    ],
    ids=["28x27", "flat", "int16"],
)
def test_images_must_be_uint8_28x28(small_mnist, images):
    folder, _ = small_mnist
    write_idx(folder / TEST_IMAGES, images)
    with pytest.raises(TinyMnistError, match=re.escape(f"{TEST_IMAGES}: expected uint8 images Nx28x28")):
        load_mnist(folder)


def test_float_labels_are_rejected(small_mnist):
    folder, _ = small_mnist
    write_idx(folder / TEST_LABELS, torch.zeros(16, dtype=torch.float32))
    with pytest.raises(TinyMnistError, match=re.escape(f"{TEST_LABELS}: expected a vector of integer labels")):
        load_mnist(folder)


def test_empty_split_is_rejected(small_mnist):
    folder, _ = small_mnist
    write_idx(folder / TEST_IMAGES, torch.zeros(0, 28, 28, dtype=torch.uint8))
    write_idx(folder / TEST_LABELS, torch.zeros(0, dtype=torch.uint8))
    with pytest.raises(TinyMnistError, match=re.escape(f"{TEST_LABELS}: holds no examples")):
        load_mnist(folder)


def test_corrupt_file_is_a_project_error(small_mnist):
    folder, _ = small_mnist
    (folder / TRAIN_IMAGES).write_bytes(b"not gzip at all")
    with pytest.raises(TinyMnistError, match=re.escape(f"{TRAIN_IMAGES}: corrupt gzip stream")) as caught:
        load_mnist(folder)
    assert str(caught.value).endswith(
        "; `tinymnist download` fetches it again (offline: `tinymnist download --from` a copy replaces it)"
    )


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("TINYMNIST_DATA", raising=False)
    assert resolve_data_dir() == Path("data")
    assert resolve_data_dir(None) == Path("data")
    monkeypatch.setenv("TINYMNIST_DATA", "")  # set but empty: as if unset
    assert resolve_data_dir() == Path("data")
    monkeypatch.setenv("TINYMNIST_DATA", str(tmp_path / "from-env"))
    assert resolve_data_dir() == tmp_path / "from-env"
    assert resolve_data_dir(tmp_path / "from-flag") == tmp_path / "from-flag"


def test_real_t10k_loads_as_both_splits(real_mnist, tmp_path):
    # The README's recipe for real handwriting without the training images: t10k twice.
    for name in (TEST_IMAGES, TEST_LABELS):
        (tmp_path / name).symlink_to(real_mnist / name)
        (tmp_path / name.replace("t10k", "train")).symlink_to(real_mnist / name)
    mnist = load_mnist(tmp_path)
    assert mnist.train_images.shape == (10000, 28, 28)
    assert torch.bincount(mnist.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ---- the test split alone: what `eval` needs ----------------------------------------------


def test_the_test_split_needs_only_the_two_test_files(tmp_path):
    images, labels = write_examples(tmp_path, TEST_IMAGES, TEST_LABELS, 16, seed=1)
    test_images, _ = load_test_split(tmp_path, "meta")  # "meta": moved to the device, no storage
    assert test_images.shape == (16, 28, 28) and test_images.device.type == "meta"
    assert torch.equal(load_test_split(tmp_path)[0], images) and torch.equal(
        load_test_split(tmp_path)[1], labels.long()
    )
    with pytest.raises(MissingDataError, match=re.escape("train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz")):
        load_mnist(tmp_path)


def test_missing_test_files_name_only_those(tmp_path):
    write_examples(tmp_path, TRAIN_IMAGES, TRAIN_LABELS, 8, seed=0)
    with pytest.raises(MissingDataError) as caught:
        load_test_split(tmp_path)
    assert str(caught.value) == missing_data_message(tmp_path, list(TEST_FILES))


def test_download_for_the_test_split_asks_for_the_test_files_only(tmp_path, monkeypatch):
    mirror = Mirror()  # answers 404 to everything
    monkeypatch.setenv("TINYMNIST_MIRRORS", mirror.url)
    try:
        with pytest.raises(DownloadError) as caught:
            load_test_split(tmp_path / "data", download=True)
    finally:
        mirror.stop()
    assert sorted(mirror.requested) == sorted(TEST_FILES)
    assert TRAIN_IMAGES not in str(caught.value)


# ---- headers first: a file that claims too much is refused before it is read ---------------


def test_a_header_claiming_more_than_mnist_has_is_refused_unread(small_mnist):
    folder, _ = small_mnist
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: gzip framing
    with open(folder / TEST_IMAGES, "wb") as file:  # 80,000 zero images: 63 MB that pack into 61 KB
        file.write(packer.compress(b"\x00\x00\x08\x03" + struct.pack(">3I", 80_000, 28, 28)))
        for _ in range(80):
            file.write(packer.compress(bytes(784_000)))
        file.write(packer.flush())

    tracemalloc.start()
    try:
        with pytest.raises(
            TinyMnistError, match=re.escape(f"{TEST_IMAGES}: header says 80000 images, more than MNIST's 10000")
        ):
            load_test_split(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # far below the 63 MB it would unpack to
