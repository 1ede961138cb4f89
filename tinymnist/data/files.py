"""Write a file so that readers see the old content or the whole new one, never half of it.

`atomic_write(path)` writes a hidden temp file beside `path`, fsyncs it and renames it over
`path`; any exception, Ctrl-C too, deletes it. Its writer holds an OS lock on it, which dies
with the process, so `remove_leftovers(path)` deletes only temp files that no living writer
holds (after `kill -9` or a power cut). Where the OS has no file locks, leftovers are kept.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import filelock

from tinymnist.errors import TinyMnistError

TOKEN_BYTES = 4  # 8 hex digits: two writers of one file at once never pick the same name
WINDOWS = os.name == "nt"  # it renames and deletes no file that is open; POSIX does both


def temp_pattern(path: Path) -> re.Pattern[str]:
    """The names of `path`'s temp files, and only those: `.NAME.tinymnist-<8 hex>.part`."""
    return re.compile(rf"\.{re.escape(Path(path).name)}\.tinymnist-[0-9a-f]{{{2 * TOKEN_BYTES}}}\.part")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file for `path`'s new content; it replaces `path` only if the block succeeds."""
    path = Path(path)
    remove_leftovers(path)
    file, temp = _create_locked_temp(path)
    try:
        with file:  # closing drops the lock: only after the rename, where the OS allows it
            yield file
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
            if WINDOWS:
                file.close()  # it renames no open file
            os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)  # gone already after a successful rename


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files of `path` left by writers that died; return what was deleted."""
    path = Path(path)
    pattern = temp_pattern(path)
    try:
        names = [name for name in os.listdir(path.parent) if pattern.fullmatch(name)]
    except OSError:  # no folder yet (or unreadable): nothing of ours can be in it
        return []
    removed = []
    for name in names:
        leftover = path.with_name(name)
        with contextlib.suppress(OSError):  # gone already, or on a file system without locks: keep
            if _remove_if_abandoned(leftover):
                removed.append(leftover)
    return removed


def _remove_if_abandoned(leftover: Path) -> bool:
    """Delete `leftover` if no living writer holds its lock; say whether it was deleted."""
    with open(leftover, "rb") as file:
        if not filelock.lock_descriptor(file.fileno(), blocking=False):
            return False  # its writer lives
        if not WINDOWS:
            leftover.unlink()  # while locked, so a writer that just created it can tell (below)
            return True
    leftover.unlink()  # Windows, once closed: it fails while the writer has the file open
    return True


def probe_write(path: str | os.PathLike) -> None:
    """Raise the OSError `atomic_write(path)` would meet opening its temp file, leaving nothing behind."""
    file, temp = _create_locked_temp(Path(path))
    file.close()
    temp.unlink()


def _create_locked_temp(path: Path) -> tuple[BinaryIO, Path]:
    """A new temp file for `path`, opened and locked before anyone else can delete it for a leftover."""
    while True:
        temp = path.with_name(f".{path.name}.tinymnist-{secrets.token_hex(TOKEN_BYTES)}.part")
        file = open(temp, "xb")
        try:
            filelock.lock_descriptor(file.fileno())  # waits only while a remove_leftovers looks at it
        except OSError:  # no file locks here (some network mounts): nobody can take it either
            return file, temp
        # Between open and lock another run's remove_leftovers may have unlinked it: then start over.
        if os.fstat(file.fileno()).st_nlink > 0:
            return file, temp
        file.close()


def check_readable(path: str | os.PathLike, what: str) -> None:
    """Raise a one-line TinyMnistError unless `path` is a regular file or missing: a named pipe or
    a device would block a reader forever or feed it without end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise TinyMnistError(f"{what} {path}: cannot read it ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a pipe, socket or device"
        raise TinyMnistError(f"{what} {path}: is {kind}, not a file; give the path of a file")


def folders_to_make(folder: Path) -> list[Path]:
    """The folders of `folder`'s path that are not there yet, deepest first: what making it creates."""
    return [f for f in (folder, *folder.parents) if not f.exists()]


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders a command made (folders_to_make's), deepest first, as long as each is empty."""
    for folder in folders:
        if not folder.is_dir():
            continue
        if any(folder.iterdir()):
            return
        folder.rmdir()
