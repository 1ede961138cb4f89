"""Hostile IDX files: a gzip bomb is refused by its header, and never unpacked past what the
header declares. Measured by peak memory (tracemalloc sees Python's and NumPy's
allocations): the old reader gunzipped the whole file before looking at it.
"""

import re
import struct
import tracemalloc
import zlib

import pytest

from tinymnist.data.idx import IdxError, open_idx, read_idx

BOMB_TAIL = 64 << 20  # 64 MiB of zeros after the header: 64 KiB gzipped


def gzip_bomb(path, head: bytes, zeros: int = BOMB_TAIL):
    """`head` then `zeros` zero bytes, gzipped a MiB at a time (never whole in memory)."""
    packer, zero_mib = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS), bytes(1 << 20)  # 16+: gzip framing
    with open(path, "wb") as file:
        file.write(packer.compress(head))
        for _ in range(zeros >> 20):
            file.write(packer.compress(zero_mib))
        file.write(packer.flush())
    return path


def peak_memory_of(read) -> int:
    """Peak bytes Python and NumPy allocated while `read()` ran (tracemalloc sees both)."""
    tracemalloc.start()
    try:
        read()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


SMALL = 8 << 20  # far below the bomb's 64 MiB, far above a few 1 MiB read buffers


@pytest.mark.parametrize(
    "head, message",
    [
        (b"\x00\x01\x08\x01", "does not start with two zero bytes"),  # wrong magic
        (b"\x00\x00\x08\x01" + struct.pack(">I", 10) + bytes(10), "bytes follow the payload"),  # 10 items claimed
    ],
    ids=["wrong-magic", "few-items-declared"],
)
def test_gzip_bomb_is_refused_without_unpacking_it(tmp_path, head, message):
    bomb = gzip_bomb(tmp_path / "bomb.gz", head)
    assert bomb.stat().st_size < BOMB_TAIL / 500  # it is a bomb: 64 MiB unpacked from a few KiB

    def read():
        with pytest.raises(IdxError, match=re.escape("bomb.gz: ") + ".*" + re.escape(message)):
            read_idx(bomb)

    assert peak_memory_of(read) < SMALL


def test_memory_follows_the_bytes_not_the_header_claim(tmp_path):
    # 3 TB declared, 64 MiB there: the reader holds what arrives, never what is promised.
    bomb = gzip_bomb(tmp_path / "bomb.gz", b"\x00\x00\x08\x03" + struct.pack(">3I", 2**32 - 1, 28, 28))

    def read():
        with pytest.raises(
            IdxError, match=re.escape(f"bomb.gz: payload is {BOMB_TAIL} bytes, header says 4294967295x28x28")
        ):
            read_idx(bomb)

    assert peak_memory_of(read) < 2 * BOMB_TAIL


def test_header_is_checked_before_any_payload_is_read(tmp_path):
    bomb = gzip_bomb(tmp_path / "bomb.gz", b"\x00\x00\x08\x03" + struct.pack(">3I", 80_000, 28, 28))
    shapes = []

    def look_at_the_header_only():
        with open_idx(bomb) as idx:
            shapes.append(idx.header.shape)  # a caller refusing 80,000 images reads no further

    assert peak_memory_of(look_at_the_header_only) < SMALL
    assert shapes == [(80_000, 28, 28)]


def test_uncompressed_file_with_a_huge_tail_is_refused_by_its_size(tmp_path):
    path = tmp_path / "big"
    with open(path, "wb") as file:
        file.write(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + bytes(10))
        file.truncate(BOMB_TAIL)  # a sparse file: 64 MiB that take no disk

    def read():
        with pytest.raises(IdxError, match=re.escape(f"big: payload is {BOMB_TAIL - 8} bytes, header says 10 = 10")):
            read_idx(path)

    assert peak_memory_of(read) < SMALL
