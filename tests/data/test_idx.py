"""IDX read/write: the real MNIST files, round trips of every type, and corrupt files.

The oracle for real files is an independent reading of the bytes with gzip, struct and
NumPy, following the format description, not `read_idx` itself.
"""

import gzip
import hashlib
import os
import re
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinymnist.data import FILES, RAW_MD5
from tinymnist.data.idx import IDX_DTYPES, IdxError, idx_md5, read_idx, write_idx
from tinymnist.errors import TinyMnistError

T10K_IMAGES, T10K_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
# Published t10k digit counts (0..9), e.g. in torchvision's and TensorFlow's dataset docs.
T10K_DIGIT_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801  # uint8 with 3 dims, uint8 with 1 dim

# One example folder per test; write_idx overwrites the file atomically on every example.
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def no_temp_files(folder) -> bool:
    return not [name for name in os.listdir(folder) if name.endswith(".part")]


# ---- the real MNIST test set -------------------------------------------------------------


def test_real_files_have_the_published_md5(real_mnist):
    for name in (T10K_IMAGES, T10K_LABELS):
        assert hashlib.md5((real_mnist / name).read_bytes()).hexdigest() == FILES[name]
        # What `download --from` holds a rebuilt file to: the md5 of the bytes inside the gzip.
        assert hashlib.md5(gzip.decompress((real_mnist / name).read_bytes())).hexdigest() == RAW_MD5[name]
        assert idx_md5(read_idx(real_mnist / name)) == RAW_MD5[name]


def test_real_images_match_an_independent_reading(real_mnist):
    raw = gzip.decompress((real_mnist / T10K_IMAGES).read_bytes())
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    expected = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)  # (10000, 28, 28)

    images = read_idx(real_mnist / T10K_IMAGES)

    assert (magic, n, rows, cols) == (IMAGES_MAGIC, 10000, 28, 28)
    assert images.dtype == torch.uint8 and images.shape == (10000, 28, 28)
    assert torch.equal(images, torch.from_numpy(expected.copy()))  # every pixel
    assert images.max() == 255 and images.min() == 0  # real ink, not an all-zero parse


def test_real_labels_histogram(real_mnist):
    raw = gzip.decompress((real_mnist / T10K_LABELS).read_bytes())
    magic, n = struct.unpack(">II", raw[:8])
    independent = np.bincount(np.frombuffer(raw, dtype=np.uint8, offset=8), minlength=10)

    labels = read_idx(real_mnist / T10K_LABELS)

    assert (magic, n) == (LABELS_MAGIC, 10000)
    assert labels.dtype == torch.uint8 and labels.shape == (10000,)
    assert torch.bincount(labels.long(), minlength=10).tolist() == independent.tolist() == T10K_DIGIT_COUNTS


def test_uncompressed_copy_reads_the_same(real_mnist, tmp_path):
    # torchvision leaves the gunzipped files in MNIST/raw/ under the names without .gz.
    raw_copy = tmp_path / T10K_IMAGES.removesuffix(".gz")
    raw_copy.write_bytes(gzip.decompress((real_mnist / T10K_IMAGES).read_bytes()))
    assert torch.equal(read_idx(raw_copy), read_idx(real_mnist / T10K_IMAGES))


def test_write_idx_reproduces_the_original_bytes(real_mnist, tmp_path):
    original = gzip.decompress((real_mnist / T10K_LABELS).read_bytes())
    write_idx(tmp_path / "labels", read_idx(real_mnist / T10K_LABELS))
    assert (tmp_path / "labels").read_bytes() == original


def test_one_missing_pixel_is_reported_exactly(real_mnist, tmp_path):
    raw = gzip.decompress((real_mnist / T10K_IMAGES).read_bytes())
    short = tmp_path / T10K_IMAGES
    short.write_bytes(gzip.compress(raw[:-1], compresslevel=1))
    with pytest.raises(IdxError) as caught:
        read_idx(short)
    assert str(caught.value) == f"{short}: payload is 7839999 bytes, header says 10000x28x28 = 7840000"


def test_cut_off_gzip_stream_is_a_project_error(real_mnist, tmp_path):
    cut = tmp_path / T10K_IMAGES
    cut.write_bytes((real_mnist / T10K_IMAGES).read_bytes()[:100_000])
    with pytest.raises(TinyMnistError, match=re.escape(f"{T10K_IMAGES}: corrupt gzip stream")):
        read_idx(cut)


# ---- round trips ---------------------------------------------------------------------------

TORCH_DTYPES = [torch_dtype for torch_dtype, _ in IDX_DTYPES.values()]


@st.composite
def idx_tensors(draw, min_side=0):
    """Any tensor IDX can hold: every type code, rank 1-4, NaNs and infinities included."""
    torch_dtype = draw(st.sampled_from(TORCH_DTYPES))
    numpy_dtype = torch.empty(0, dtype=torch_dtype).numpy().dtype
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=min_side, max_side=5))
    return torch.from_numpy(draw(hnp.arrays(numpy_dtype, shape)))


@FAST
@given(tensor=idx_tensors(), suffix=st.sampled_from([".gz", ""]))
def test_round_trip(tmp_path, tensor, suffix):
    path = tmp_path / f"any-idx{suffix}"
    write_idx(path, tensor)
    back = read_idx(path)
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert back.numpy().tobytes() == tensor.numpy().tobytes()  # bit-exact, NaN payloads too
    assert no_temp_files(tmp_path)


# Per type code: struct's format letter (an oracle for the big-endian layout) and values
# whose bytes differ when read in the wrong order.
HANDMADE = {
    0x08: ("B", [1, 2, 200]),
    0x09: ("b", [1, -2, 100]),
    0x0B: ("h", [1, -2, 300]),
    0x0C: ("i", [1, -2, 70000]),
    0x0D: ("f", [1.5, -2.0, 2.0**100]),  # exact in float32
    0x0E: ("d", [1.5, -2.0, 1e300]),
}


@pytest.mark.parametrize("code", sorted(HANDMADE))
def test_numbers_are_big_endian(tmp_path, code):
    letter, values = HANDMADE[code]
    handmade = bytes([0, 0, code, 1]) + struct.pack(">I", 3) + struct.pack(f">3{letter}", *values)
    (tmp_path / "handmade").write_bytes(handmade)

    tensor = read_idx(tmp_path / "handmade")

    assert tensor.dtype == IDX_DTYPES[code][0] and tensor.tolist() == values
    write_idx(tmp_path / "written", tensor)
    assert (tmp_path / "written").read_bytes() == handmade


@FAST
@given(tensor=idx_tensors())
def test_idx_md5_is_the_md5_of_the_uncompressed_file(tmp_path, tensor):
    write_idx(tmp_path / "raw", tensor)
    assert idx_md5(tensor) == hashlib.md5((tmp_path / "raw").read_bytes()).hexdigest()


def test_round_trip_of_a_non_contiguous_view(tmp_path):
    tensor = torch.arange(24, dtype=torch.int32).reshape(2, 3, 4).transpose(0, 2)  # (4, 3, 2) view
    write_idx(tmp_path / "view.gz", tensor)
    assert torch.equal(read_idx(tmp_path / "view.gz"), tensor)


def test_gzip_output_is_deterministic(tmp_path):
    write_idx(tmp_path / "a.gz", torch.arange(100, dtype=torch.uint8))
    compressed = (tmp_path / "a.gz").read_bytes()
    # RFC 1952: byte 3 holds the flags (0: no file name stored), bytes 4-7 the mtime.
    assert compressed[3] == 0 and compressed[4:8] == bytes(4)


def test_zero_dimensions_are_rejected(tmp_path):
    (tmp_path / "scalar").write_bytes(b"\0\0\x08\x00\x07")  # a uint8 0-d "tensor" holding 7
    with pytest.raises(IdxError, match="scalar: header says 0 dimensions"):
        read_idx(tmp_path / "scalar")


CANNOT_HOLD = [
    torch.zeros(3, dtype=torch.int64),  # no 64-bit integer type code
    torch.zeros(3, dtype=torch.bool),
    torch.tensor(1, dtype=torch.uint8),  # 0 dimensions
    torch.zeros(0, 2**32, dtype=torch.uint8),  # a size beyond uint32 (empty, so it fits in memory)
]


@pytest.mark.parametrize("tensor", CANNOT_HOLD, ids=["int64", "bool", "0-d", "huge"])
def test_write_rejects_what_idx_cannot_hold(tmp_path, tensor):
    with pytest.raises(IdxError, match=re.escape("out.gz")):
        write_idx(tmp_path / "out.gz", tensor)
    assert os.listdir(tmp_path) == []


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "labels.gz"
    write_idx(path, torch.arange(10, dtype=torch.uint8))
    before = path.read_bytes()

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)  # Ctrl-C after the bytes, before the rename
    with pytest.raises(KeyboardInterrupt):
        write_idx(path, torch.zeros(10, dtype=torch.uint8))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["labels.gz"]


# ---- corruptions ---------------------------------------------------------------------------


def idx_bytes(tensor: torch.Tensor, tmp_path) -> bytes:
    write_idx(tmp_path / "valid", tensor)
    return (tmp_path / "valid").read_bytes()


def assert_rejected(tmp_path, content: bytes, suffix: str) -> None:
    """Stored raw or gzipped, the corrupt content raises IdxError naming the file."""
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(gzip.compress(content, compresslevel=1) if suffix else content)
    with pytest.raises(IdxError, match=re.escape(f"corrupt{suffix}: ")):
        read_idx(path)


def header_length(content: bytes) -> int:
    return 4 + 4 * content[3]


suffixes = st.sampled_from([".gz", ""])


@FAST
@given(tensor=idx_tensors(), data=st.data(), suffix=suffixes)
def test_truncation_is_rejected(tmp_path, tensor, data, suffix):
    content = idx_bytes(tensor, tmp_path)
    keep = data.draw(st.integers(0, len(content) - 1))
    assert_rejected(tmp_path, content[:keep], suffix)


@FAST
@given(tensor=idx_tensors(), extra=st.binary(min_size=1, max_size=16), suffix=suffixes)
def test_trailing_bytes_are_rejected(tmp_path, tensor, extra, suffix):
    assert_rejected(tmp_path, idx_bytes(tensor, tmp_path) + extra, suffix)


@FAST
@given(tensor=idx_tensors(), position=st.sampled_from([0, 1]), byte=st.integers(1, 255), suffix=suffixes)
def test_wrong_magic_is_rejected(tmp_path, tensor, position, byte, suffix):
    content = bytearray(idx_bytes(tensor, tmp_path))
    content[position] = byte
    assert_rejected(tmp_path, bytes(content), suffix)


@FAST
@given(tensor=idx_tensors(), code=st.integers(0, 255).filter(lambda c: c not in IDX_DTYPES), suffix=suffixes)
def test_unknown_type_code_is_rejected(tmp_path, tensor, code, suffix):
    content = bytearray(idx_bytes(tensor, tmp_path))
    content[2] = code
    assert_rejected(tmp_path, bytes(content), suffix)


@FAST
@given(tensor=idx_tensors(min_side=1), data=st.data(), suffix=suffixes)
def test_wrong_rank_is_rejected(tmp_path, tensor, data, suffix):
    # With no empty dimension, a smaller rank leaves payload bytes the sizes do not explain,
    # and a rank whose sizes run past the end of the file cannot be read at all. (A larger
    # rank that fits can, rarely, describe the same bytes validly: not a corruption to test.)
    content = bytearray(idx_bytes(tensor, tmp_path))
    too_long = range(max(len(content) // 4, tensor.dim() + 1), 256)
    content[3] = data.draw(st.sampled_from([*range(tensor.dim()), *too_long]))
    assert_rejected(tmp_path, bytes(content), suffix)


@FAST
@given(tensor=idx_tensors(min_side=1), data=st.data(), suffix=suffixes)
def test_wrong_size_is_rejected(tmp_path, tensor, data, suffix):
    content = bytearray(idx_bytes(tensor, tmp_path))
    axis = data.draw(st.integers(0, tensor.dim() - 1))
    size = data.draw(st.integers(0, 2**32 - 1).filter(lambda s: s != tensor.shape[axis]))
    content[4 + 4 * axis : 8 + 4 * axis] = struct.pack(">I", size)
    assert_rejected(tmp_path, bytes(content), suffix)


@FAST
@given(tensor=idx_tensors(), data=st.data())
def test_cut_off_gzip_file_is_rejected(tmp_path, tensor, data):
    write_idx(tmp_path / "valid.gz", tensor)
    compressed = (tmp_path / "valid.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(compressed[: data.draw(st.integers(1, len(compressed) - 1))])
    with pytest.raises(IdxError, match=re.escape("cut.gz: ")):
        read_idx(tmp_path / "cut.gz")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=64), suffix=suffixes)
def test_garbage_raises_idx_error_or_nothing(tmp_path, garbage, suffix):
    # A few random byte strings are valid IDX by chance (b"\0\0\x08\x01\0\0\0\0" is an
    # empty vector), so the property is: a tensor or IdxError, never another exception.
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(garbage)
    try:
        assert isinstance(read_idx(path), torch.Tensor)
    except IdxError as e:
        assert path.name in str(e)


@FAST
@given(tensor=idx_tensors(), data=st.data())
def test_flipped_gzip_byte_raises_idx_error_or_nothing(tmp_path, tensor, data):
    # A flip in the gzip header's timestamp or OS byte changes nothing; elsewhere it breaks
    # the deflate stream, the CRC or the IDX header. Either way: no other exception.
    write_idx(tmp_path / "flipped.gz", tensor)
    content = bytearray((tmp_path / "flipped.gz").read_bytes())
    content[data.draw(st.integers(0, len(content) - 1))] ^= data.draw(st.integers(1, 255))
    (tmp_path / "flipped.gz").write_bytes(bytes(content))
    try:
        assert isinstance(read_idx(tmp_path / "flipped.gz"), torch.Tensor)
    except IdxError as e:
        assert "flipped.gz" in str(e)


def test_missing_file_is_a_project_error(tmp_path):
    with pytest.raises(IdxError, match=re.escape("absent.gz: cannot read")):
        read_idx(tmp_path / "absent.gz")
