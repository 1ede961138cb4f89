"""The files the tool writes (--save-model, --metrics, pictures, --json): checked before
the work, one run each, written whole or not at all.

A run that trains for an hour and then cannot write its checkpoint has lost the hour,
so `check_output_path` refuses, before anything starts, every path that cannot work:
a folder, a device or other special file, a symbolic link (replacing it would cut the
link: the user meant the file it points at), a missing folder, a path under a file, a
name too long once the temporary file's suffix is added, an unwritable folder or file.

Two runs writing one checkpoint or one metrics file at once would silently overwrite
each other and interleave their JSON lines. `exclusive` holds an OS lock per output file
for the run's lifetime (filelock.lock_descriptor: flock on POSIX, LockFileEx on Windows);
a second run refuses in one line naming the first one's pid. The lock sits on a hidden
sidecar, `.NAME.lock`: not on the checkpoint itself, whose inode changes with every
atomic save (a lock on the old inode guards nothing). The OS drops the lock when its
process ends, however it ends, so a sidecar left by `kill -9` is harmless, and the next
run on that file deletes it; any other exit deletes it at once. Where the file system
has no locks, the sidecar's existence is the lock. Once a run holds a file, it deletes
that file's temp files left by writers that died (files.remove_leftovers).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import filelock

from tinymnist.data import files
from tinymnist.errors import TinyMnistError

# What to do when a lock file cannot be written, by the error the OS gave; anything else: another folder.
LOCK_ADVICE = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota)",
    errno.EFBIG: "raise the file size limit (ulimit -f)",
}


def check_output_path(path: Path, flag: str) -> None:
    """Raise a one-line TinyMnistError naming `flag` if a run could not write `path`."""
    path = Path(path)
    try:
        found = os.lstat(path)  # lstat: the link itself, not what it points at
    except FileNotFoundError:
        found = None
    except OSError as e:
        raise _cannot_write(path, flag, e) from None
    if found is not None:
        if stat.S_ISLNK(found.st_mode):
            raise TinyMnistError(
                f"{flag} {path} is a symbolic link (to {os.readlink(path)}); give the real path of the file"
            )
        if stat.S_ISDIR(found.st_mode):
            raise TinyMnistError(f"{flag} {path} is a folder; give a file path such as {path / 'run.pt'}")
        if not stat.S_ISREG(found.st_mode):
            device = stat.S_ISCHR(found.st_mode) or stat.S_ISBLK(found.st_mode)
            kind = "a device" if device else "a special file (a pipe or socket)"
            raise TinyMnistError(f"{flag} {path} is {kind}, not a regular file; give the path of a regular file")
        if not os.access(path, os.W_OK):
            raise TinyMnistError(f"{flag} {path} is read-only; make it writable or choose another path")
    if not path.parent.is_dir():
        raise TinyMnistError(_missing_folder(path, flag))
    try:
        files.probe_write(path)  # the temp file a save would create, removed again
    except OSError as e:
        raise _cannot_write(path, flag, e) from None


def check_output_folder(path: Path, flag: str) -> None:
    """Raise a one-line TinyMnistError naming `flag` if a run could not create files in folder `path`
    (it may not exist yet: the nearest folder that does must then be writable)."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: nothing can be created through it
            raise TinyMnistError(f"{flag} {existing} is a broken symbolic link; give a folder path")
        existing = existing.parent
    if not existing.is_dir():
        raise TinyMnistError(f"{flag} {path}: {existing} is a file, not a folder; choose a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TinyMnistError(f"{flag} {path}: folder {existing} is not writable; choose another folder")


def _cannot_write(path: Path, flag: str, error: OSError) -> TinyMnistError:
    if error.errno == errno.ENAMETOOLONG:
        return TinyMnistError(
            f"{flag} {path}: the name is {len(os.fsencode(path.name))} bytes, too long for this file system"
            f"{_name_max(path.parent)}; choose a shorter name"
        )
    if error.errno == errno.ENOTDIR:
        return TinyMnistError(_missing_folder(path, flag))
    return TinyMnistError(f"{flag} {path}: cannot write in {path.parent} ({error.strerror}); choose another path")


def _name_max(folder: Path) -> str:
    if not hasattr(os, "pathconf"):  # POSIX only
        return ""
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except OSError:
        return ""
    return f" (at most {name_max}, including the suffix of the temporary file saved first)"


def _missing_folder(path: Path, flag: str) -> str:
    """Say which part of the path is wrong: a file where a folder should be, or no folder yet."""
    for ancestor in path.parents:
        if ancestor.exists() and not ancestor.is_dir():
            return f"{flag} {path}: {ancestor} is a file, not a folder; choose another path"
        if ancestor.is_dir():
            break
    return f"{flag} {path}: folder {path.parent} does not exist; create it first"


@contextlib.contextmanager
def exclusive(outputs: Mapping[str, Path | None]) -> Iterator[None]:
    """Hold every output file ({flag: path}; None is skipped) for this run alone.

    Raises TinyMnistError naming the flag when another run holds one, or when two flags
    name the same file. Taking each lock, it removes that file's dead writers' temp files.
    """
    held = {flag: Path(path) for flag, path in outputs.items() if path is not None}
    _refuse_one_file_for_two_flags(held)
    with contextlib.ExitStack() as stack:
        for flag, path in held.items():
            stack.enter_context(_lock(path, flag))
            files.remove_leftovers(path)
        yield


def lock_path(path: Path) -> Path:
    """The hidden sidecar file whose lock stands for `path`."""
    return path.with_name(f".{path.name}.lock")


def _refuse_one_file_for_two_flags(held: dict[str, Path]) -> None:
    seen: dict[str, str] = {}
    for flag, path in held.items():
        real = os.path.realpath(path)
        if real in seen:
            raise TinyMnistError(f"{flag} {path} is also {seen[real]}; give each its own file")
        seen[real] = flag


@contextlib.contextmanager
def _lock(path: Path, flag: str) -> Iterator[None]:
    sidecar = lock_path(path)
    fd = _acquire(sidecar, path, flag)
    try:
        _write_pid(fd, sidecar, path, flag)
        yield
    finally:
        _release(fd, sidecar)


def _acquire(sidecar: Path, path: Path, flag: str) -> int:
    """Open and lock `sidecar`, or raise naming the run that holds it."""
    while True:
        opened = _open(sidecar, path, flag)
        if opened is None:  # its holder deleted it between our two tries to open it
            continue
        fd, created = opened
        try:
            locked, has_locks = filelock.lock_descriptor(fd, blocking=False), True
        except OSError:  # no file locks here (some network mounts): the sidecar's existence is the lock
            locked, has_locks = created, False
        if not locked:
            holder = _holder(fd)
            os.close(fd)
            stale = "" if has_locks else f" (no file locks here: if that run has ended, delete {sidecar})"
            raise TinyMnistError(
                f"{flag} {path} is in use by another tinymnist run{holder}; wait for it or choose another path{stale}"
            )
        # The run that held the lock deletes the sidecar before letting go of it; if that
        # happened between our open and lock, we locked a deleted file: start over.
        if _same_file(fd, sidecar):
            return fd
        os.close(fd)


def _open(sidecar: Path, path: Path, flag: str) -> tuple[int, bool] | None:
    """(descriptor, whether this call created the file), or None if it vanished meanwhile."""
    try:
        return os.open(sidecar, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        pass
    except OSError as e:
        raise _cannot_lock(sidecar, path, flag, e) from None
    try:
        return os.open(sidecar, os.O_RDWR), False
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _cannot_lock(sidecar, path, flag, e) from None


def _write_pid(fd: int, sidecar: Path, path: Path, flag: str) -> None:
    """Write this run's pid for the message a second run prints. It starts after byte 0:
    Windows locks that byte, and no other process may read a locked byte."""
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"\n{os.getpid()}\n".encode())
    except OSError as e:  # a full disk, or `ulimit -f 0`
        raise _cannot_lock(sidecar, path, flag, e) from None


def _cannot_lock(sidecar: Path, path: Path, flag: str, error: OSError) -> TinyMnistError:
    advice = f"{LOCK_ADVICE[error.errno]} or " if error.errno in LOCK_ADVICE else ""
    return TinyMnistError(
        f"{flag} {path}: cannot write the lock file {sidecar} ({error.strerror}); {advice}choose another folder"
    )


def _release(fd: int, sidecar: Path) -> None:
    """Delete the sidecar and let go of its lock, in the order each OS allows."""
    if files.WINDOWS:  # it deletes no open file: once closed, this fails while another run has it open
        os.close(fd)
        with contextlib.suppress(OSError):
            sidecar.unlink()
    else:
        sidecar.unlink(missing_ok=True)  # while still locked: see _acquire
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _holder(fd: int) -> str:
    """' (pid N)' as the holder wrote it; empty if it has not written it yet."""
    os.lseek(fd, 1, os.SEEK_SET)  # past byte 0: see _write_pid
    text = os.read(fd, 32).decode(errors="replace").strip()
    return f" (pid {text})" if text.isdigit() else ""


def check_png_output(path: Path, flag: str = "-o") -> None:
    """Before any work: a .png name (every picture is written as PNG) at a path train would accept."""
    check_output_path(Path(path), flag)
    if Path(path).suffix.lower() != ".png":
        raise TinyMnistError(f"{flag} {path}: the picture is written as PNG; name the file .png")


@contextlib.contextmanager
def atomic_output(path: Path, flag: str = "-o") -> Iterator[BinaryIO]:
    """A binary file whose content replaces `path` if the block succeeds; else `path` is
    untouched (files.atomic_write), and a write that fails is one line naming the flag."""
    path = Path(path)
    check_output_path(path, flag)  # a folder, a symlink, a device, a missing folder: refused as train refuses them
    try:
        with files.atomic_write(path) as f:
            yield f
    except OSError as e:
        raise TinyMnistError(f"{flag} {path}: cannot be written ({e.strerror or e}); nothing was written") from None
