"""Read and write IDX files, the format MNIST ships in (http://yann.lecun.com/exdb/mnist/):

    bytes 0-1   two zero bytes
    byte  2     type code of the numbers: 0x08 uint8 ... 0x0E float64 (IDX_DTYPES)
    byte  3     number of dimensions, ndim
    4*ndim      the size of each dimension, big-endian uint32
    the rest    prod(sizes) numbers, row-major, multi-byte types big-endian

Every field is checked, and `IdxError` names the file. `open_idx` reads the header alone, so
a caller can refuse a file by it (a gzip bomb is refused after 4 bytes), and `read()`
decompresses exactly the declared payload, plus one byte to prove that nothing follows.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from tinymnist.data.files import atomic_write
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
READ_CHUNK = 1 << 20  # bytes per read: the payload grows by this much at a time


class IdxError(TinyMnistError):
    """An IDX file is unreadable or violates the format; the message names the file."""


@dataclass(frozen=True)
class IdxHeader:
    dtype: torch.dtype
    shape: tuple[int, ...]
    stored: np.dtype  # the numbers as the file stores them (big-endian)

    @property
    def payload_bytes(self) -> int:
        return math.prod(self.shape) * self.stored.itemsize


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """The tensor stored in an IDX file (`NAME.gz` is gunzipped), in native byte order."""
    with open_idx(path) as idx:
        return idx.read()


@contextlib.contextmanager
def open_idx(path: str | os.PathLike) -> Iterator[IdxReader]:
    """Open an IDX file and read only its header, checked: `.header`, then `.read()` the payload."""
    path = Path(path)
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise IdxError(f"{path}: cannot read ({e.strerror or e})") from None
    gunzipped = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else contextlib.nullcontext(raw)
    with raw, gunzipped as stream:
        yield IdxReader(path, raw, stream)


class IdxReader:
    """An open IDX file whose header has been read and checked."""

    def __init__(self, path: Path, raw: BinaryIO, stream: BinaryIO):
        self.path, self._raw, self._stream = path, raw, stream
        self.header = self._read_header()

    def read(self) -> torch.Tensor:
        """Exactly the payload the header declares, as a tensor; nothing may follow it."""
        header, size = self.header, self.header.payload_bytes
        declared = f"header says {_describe(header)}"
        if self._stream is self._raw:  # uncompressed: the file's size tells the payload's at once
            on_disk = os.fstat(self._raw.fileno()).st_size - self._raw.tell()
            if on_disk != size:
                raise IdxError(f"{self.path}: payload is {on_disk} bytes, {declared}")
        payload = self._read_up_to(size)  # grows as bytes arrive: a header's claim alone costs nothing
        if len(payload) < size:
            raise IdxError(f"{self.path}: payload is {len(payload)} bytes, {declared}")
        with self._errors():
            if self._stream.read(1):  # one byte more, not the rest: a bomb's tail stays packed
                raise IdxError(f"{self.path}: bytes follow the payload, {declared}")
        # Big-endian -> native: one unavoidable copy for multi-byte types, none for bytes.
        stored = np.frombuffer(payload, dtype=header.stored)  # (count,) view of the writable bytearray
        native = stored.astype(header.stored.newbyteorder("="), copy=False)
        tensor = torch.from_numpy(native).reshape(header.shape)  # a view: torch allows all 255 dims
        assert tensor.dtype == header.dtype
        return tensor

    def _read_header(self) -> IdxHeader:
        path = self.path
        start = bytes(self._read_up_to(4))
        if len(start) < 4:
            raise IdxError(f"{path}: holds {len(start)} bytes, fewer than the 4-byte IDX header")
        if start[:2] != MAGIC_PREFIX:
            raise IdxError(f"{path}: does not start with two zero bytes (got {start[:2].hex(' ')}){_hint(path, start)}")
        code, ndim = start[2], start[3]
        if code not in IDX_DTYPES:
            known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
            raise IdxError(f"{path}: unknown type code 0x{code:02X} (IDX defines {known})")
        if ndim == 0:
            raise IdxError(f"{path}: header says 0 dimensions (IDX data has at least 1)")
        sizes = self._read_up_to(4 * ndim)
        if len(sizes) < 4 * ndim:
            raise IdxError(f"{path}: header says {ndim} dimensions but the file ends after {4 + len(sizes)} bytes")
        torch_dtype, stored = IDX_DTYPES[code]
        return IdxHeader(torch_dtype, struct.unpack(f">{ndim}I", sizes), stored)

    def _read_up_to(self, count: int) -> bytearray:
        """The next `count` bytes of the stream, or all that is left if fewer."""
        buffer = bytearray()
        with self._errors():
            while len(buffer) < count and (chunk := self._stream.read(min(READ_CHUNK, count - len(buffer)))):
                buffer += chunk  # realloc grows large buffers in place (mremap), without copying
        return buffer

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn what gzip and the OS raise while reading into one IdxError naming the file."""
        try:
            yield
        except (OSError, EOFError, zlib.error) as e:  # bad magic, bad CRC, cut-off stream; I/O errors
            if self._stream is self._raw:
                raise IdxError(f"{self.path}: cannot read ({e.strerror or e})") from None
            self._raw.seek(0)
            hint = _hint(self.path, self._raw.read(2))
            raise IdxError(f"{self.path}: corrupt gzip stream ({e}){hint}") from None


def write_idx(path: str | os.PathLike, tensor: torch.Tensor) -> None:
    """Store `tensor` so that `read_idx(path)` returns it exactly, atomically; gzip when the name ends in .gz."""
    path = Path(path)
    header, payload = _encode(tensor, path)
    with atomic_write(path) as file:
        out = contextlib.nullcontext(file)
        if path.name.endswith(".gz"):  # mtime=0 and no name: the same tensor always gives the same bytes
            out = gzip.GzipFile(filename="", fileobj=file, mode="wb", compresslevel=GZIP_LEVEL, mtime=0)
        with out as stream:
            stream.write(header)
            stream.write(payload)


def idx_md5(tensor: torch.Tensor) -> str:
    """The md5 of the uncompressed IDX file `write_idx` makes of `tensor` (MNIST publishes these)."""
    header, payload = _encode(tensor, Path("tensor"))
    digest = hashlib.md5(header)
    digest.update(payload)
    return digest.hexdigest()


def _encode(tensor: torch.Tensor, path: Path) -> tuple[bytes, memoryview]:
    """The header and the big-endian payload of `tensor`, or IdxError if IDX cannot hold it."""
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
    return header, stored.reshape(-1).data  # the array's own memory, no tobytes() copy


def _describe(header: IdxHeader) -> str:
    """`10000x28x28 = 7840000` for bytes; `60x4 int32 (4 bytes each) = 960` otherwise."""
    shape, count, dtype = "x".join(map(str, header.shape)), math.prod(header.shape), header.stored
    if dtype.itemsize == 1:
        return f"{shape} = {count}"
    return f"{shape} {dtype.name} ({dtype.itemsize} bytes each) = {count * dtype.itemsize}"


def _hint(path: Path, start: bytes) -> str:
    """Explain the commonest mix-up: a gzip file without .gz in its name, or the reverse."""
    if not path.name.endswith(".gz") and start[:2] == GZIP_MAGIC:
        return f"; it looks gzip-compressed: name it {path.name}.gz"
    if path.name.endswith(".gz") and start[:2] == MAGIC_PREFIX:
        return "; it looks uncompressed: drop the .gz from its name"
    return ""
