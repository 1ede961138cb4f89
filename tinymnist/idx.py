"""Read and write IDX files, the format MNIST ships in.

An IDX file is a tiny header followed by raw numbers (http://yann.lecun.com/exdb/mnist/):

    bytes 0-1   two zero bytes
    byte  2     type code of the numbers: 0x08 uint8 ... 0x0E float64 (IDX_DTYPES)
    byte  3     number of dimensions, ndim
    4*ndim      the size of each dimension, big-endian uint32
    the rest    prod(sizes) numbers, row-major, multi-byte types big-endian

MNIST's images are `uint8 (N, 28, 28)` and its labels `uint8 (N,)`. Unlike many
loaders that slice `[16:]` and hope, `read_idx` checks every field above and raises
`IdxError` naming the file and what is wrong: a truncated download or a file saved
under the wrong name must never turn silently into training data.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import secrets
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from tinymnist.errors import TinyMnistError

# type code -> (torch dtype, NumPy dtype of the numbers as stored: big-endian, ">")
IDX_DTYPES: dict[int, tuple[torch.dtype, np.dtype]] = {
    0x08: (torch.uint8, np.dtype("u1")),
    0x09: (torch.int8, np.dtype("i1")),
    0x0B: (torch.int16, np.dtype(">i2")),
    0x0C: (torch.int32, np.dtype(">i4")),
    0x0D: (torch.float32, np.dtype(">f4")),
    0x0E: (torch.float64, np.dtype(">f8")),
}
TYPE_CODES: dict[torch.dtype, int] = {torch_dtype: code for code, (torch_dtype, _) in IDX_DTYPES.items()}
MAGIC_PREFIX = b"\x00\x00"
GZIP_MAGIC = b"\x1f\x8b"  # what a gzip stream starts with (RFC 1952)
MAX_DIMS = 255  # ndim is one byte
MAX_SIZE = 2**32 - 1  # each size is a uint32
GZIP_LEVEL = 6  # gzip(1)'s default: level 9 is much slower for files barely smaller


class IdxError(TinyMnistError):
    """An IDX file is unreadable or violates the format; the message names the file."""


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """The tensor stored in an IDX file (`NAME.gz` is gunzipped), in native byte order."""
    path = Path(path)
    data = _read_bytes(path)  # writable, so the tensor can share it instead of copying
    if len(data) < 4:
        raise IdxError(f"{path}: holds {len(data)} bytes, fewer than the 4-byte IDX header")
    if data[:2] != MAGIC_PREFIX:
        got = bytes(data[:2]).hex(" ")
        raise IdxError(f"{path}: does not start with two zero bytes (got {got}){_name_hint(path, data)}")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise IdxError(f"{path}: unknown type code 0x{code:02X} (IDX defines {known})")
    if ndim == 0:
        raise IdxError(f"{path}: header says 0 dimensions (IDX data has at least 1)")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IdxError(f"{path}: header says {ndim} dimensions but the file ends after {len(data)} bytes")
    sizes = struct.unpack(f">{ndim}I", data[4:header_len])
    torch_dtype, stored_dtype = IDX_DTYPES[code]
    count = math.prod(sizes)
    payload_len = len(data) - header_len
    if payload_len != count * stored_dtype.itemsize:
        raise IdxError(f"{path}: payload is {payload_len} bytes, header says {_describe(sizes, stored_dtype)}")
    stored = np.frombuffer(data, dtype=stored_dtype, count=count, offset=header_len)  # (count,) view, no copy
    # Big-endian -> native: one unavoidable copy for multi-byte types, none for bytes.
    native = stored.astype(stored_dtype.newbyteorder("="), copy=False)
    tensor = torch.from_numpy(native).reshape(sizes)  # a view: torch allows all 255 dims
    assert tensor.dtype == torch_dtype
    return tensor


def write_idx(path: str | os.PathLike, tensor: torch.Tensor) -> None:
    """Store `tensor` so that `read_idx(path)` returns it exactly; gzip when the name ends in .gz.

    The file appears atomically: a crash mid-write leaves the old file (or none), never half a file.
    """
    path = Path(path)
    if tensor.dtype not in TYPE_CODES:
        names = ", ".join(str(d).removeprefix("torch.") for d in TYPE_CODES)
        raise IdxError(f"{path}: IDX cannot store {tensor.dtype} (it stores {names})")
    if not 1 <= tensor.dim() <= MAX_DIMS:
        raise IdxError(f"{path}: IDX stores 1 to {MAX_DIMS} dimensions, the tensor has {tensor.dim()}")
    if max(tensor.shape) > MAX_SIZE:
        raise IdxError(f"{path}: IDX sizes are uint32, dimension of {max(tensor.shape)} is too large")
    code = TYPE_CODES[tensor.dtype]
    header = MAGIC_PREFIX + bytes([code, tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    stored = tensor.detach().cpu().contiguous().numpy().astype(IDX_DTYPES[code][1], copy=False)  # big-endian
    with atomic_writer(path) as file, _compressed(path, file) as out:
        out.write(header)
        out.write(stored.data)  # the array's own memory, no tobytes() copy


def _read_bytes(path: Path) -> memoryview:
    """The file's bytes (gunzipped for .gz) in writable memory: torch warns about read-only buffers."""
    buffer = io.BytesIO()
    try:
        with open(path, "rb") as file:
            if not path.name.endswith(".gz"):
                shutil.copyfileobj(file, buffer)
                return buffer.getbuffer()
            try:
                with gzip.GzipFile(fileobj=file) as stream:
                    shutil.copyfileobj(stream, buffer)
            except (OSError, EOFError, zlib.error) as e:  # bad magic, bad CRC, cut-off stream
                file.seek(0)
                raise IdxError(f"{path}: corrupt gzip stream ({e}){_name_hint(path, file.read(2))}") from None
    except OSError as e:
        raise IdxError(f"{path}: cannot read ({e.strerror or e})") from None
    return buffer.getbuffer()


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A file for `path`'s new content; it replaces `path` only if the `with` block succeeds.

    The bytes go to a hidden temp file in the same folder, renamed into place at the end:
    os.replace is atomic within one file system, so readers see the old file or the whole
    new one. On any exception (KeyboardInterrupt too) the temp file is deleted.
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        with open(temp, "xb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _compressed(path: Path, file: BinaryIO) -> contextlib.AbstractContextManager[BinaryIO]:
    """`file` itself, or a gzip writer into it for `NAME.gz`."""
    if not path.name.endswith(".gz"):
        return contextlib.nullcontext(file)
    # mtime=0 and no name in the gzip header: the same tensor always gives the same bytes.
    return gzip.GzipFile(filename="", fileobj=file, mode="wb", compresslevel=GZIP_LEVEL, mtime=0)


def _describe(sizes: tuple[int, ...], dtype: np.dtype) -> str:
    """`10000x28x28 = 7840000` for bytes; `60x4 int32 (4 bytes each) = 960` otherwise."""
    shape, count = "x".join(map(str, sizes)), math.prod(sizes)
    if dtype.itemsize == 1:
        return f"{shape} = {count}"
    return f"{shape} {dtype.name} ({dtype.itemsize} bytes each) = {count * dtype.itemsize}"


def _name_hint(path: Path, data: bytes | memoryview) -> str:
    """Explain the commonest mix-up: a gzip file without .gz in its name, or the reverse."""
    if not path.name.endswith(".gz") and bytes(data[:2]) == GZIP_MAGIC:
        return f"; it looks gzip-compressed: name it {path.name}.gz"
    if path.name.endswith(".gz") and bytes(data[:2]) == MAGIC_PREFIX:
        return "; it looks uncompressed: drop the .gz from its name"
    return ""
