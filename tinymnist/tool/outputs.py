"""The files the tool writes (--save-model, --metrics, pictures, --json): checked before
the work, one run each, written whole or not at all.

`check_output` refuses, before an hour of training, every path a run could not write (a
folder, a special file, a symbolic link, a missing folder, a name too long, no permission),
one of the run's own inputs, and a file of another kind than the output's (KINDS, told from
its first bytes): a run must lose nothing it did not make. `refuse_an_earlier_run` keeps a new
training run off an earlier run's checkpoint and metrics too. Export's state_dict has no kind
of its own, so export may replace any file but those four kinds; a missing or empty file
may always be replaced.

`exclusive` holds an OS lock per output for the run's lifetime (filelock.lock_descriptor),
so two runs never overwrite one checkpoint or interleave one metrics file. The lock sits on
a hidden sidecar, `.NAME.lock`, since the checkpoint's own inode changes with every atomic
save. The OS drops the lock however its process ends; a sidecar left by `kill -9` is
deleted by the next run that locks in that folder. Where the file system has no locks,
the sidecar's existence is the lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import filelock

from tinymnist import data
from tinymnist.data import files
from tinymnist.errors import TinyMnistError
from tinymnist.tool import checkpoint

# What to do when a lock file cannot be written, by the error the OS gave; anything else: another folder.
LOCK_ADVICE = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota)",
    errno.EFBIG: "raise the file size limit (ulimit -f)",
}


def check_output(path: Path, flag: str, inputs: Mapping[Path, str] | None = None) -> None:
    """Before any work, raise a one-line TinyMnistError naming `flag` if `path` is one of the
    run's `inputs` ({path: what to call it}), cannot be written, or holds another kind of file."""
    path = Path(path)
    _refuse_inputs(path, flag, inputs or {})  # first: "read-only" or "a symbolic link" would mislead
    check_output_path(path, flag)
    _check_replaceable(path, flag)


def _refuse_inputs(path: Path, flag: str, inputs: Mapping[Path, str]) -> None:
    for source, what in inputs.items():
        if same_file(path, source):
            raise TinyMnistError(f"{flag} {path} is {what}; name another file")


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same real path (links and relative paths followed; the file
    may not be there yet) or, for hard links, the same file on disk."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is not there, under another name: not one file
        return False


def data_inputs(data_dir: Path) -> dict[Path, str]:
    """The MNIST files a training run reads from `data_dir`, gzipped or not, whether or not
    they are there yet: a download would write them."""
    inputs = {}
    for name in data.FILES:  # "train-images-idx3-ubyte.gz"
        split = "training" if name.startswith("train") else "test"
        what = f"an input of this run (the MNIST {split} {name.split('-')[1]})"
        for form in (name, name.removesuffix(".gz")):
            inputs[Path(data_dir) / form] = what
    return inputs


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
        if stat.S_ISLNK(found.st_mode):  # replacing it would cut the link: the user meant its target
            raise TinyMnistError(
                f"{flag} {path} is a symbolic link (to {os.readlink(path)}); give the real path of the file"
            )
        if stat.S_ISDIR(found.st_mode):
            example = {"--metrics": "run.jsonl", "--json": "bench.json", "-o": "picture.png"}.get(flag, "run.pt")
            raise TinyMnistError(f"{flag} {path} is a folder; give a file path such as {path / example}")
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
        try:
            name_max = os.pathconf(path.parent, "PC_NAME_MAX")
            limit = f" (at most {name_max}, including the suffix of the temporary file saved first)"
        except (AttributeError, OSError):  # AttributeError: no pathconf outside POSIX
            limit = ""
        return TinyMnistError(
            f"{flag} {path}: the name is {len(os.fsencode(path.name))} bytes, too long for this file system"
            f"{limit}; choose a shorter name"
        )
    if error.errno == errno.ENOTDIR:
        return TinyMnistError(_missing_folder(path, flag))
    return TinyMnistError(f"{flag} {path}: cannot write in {path.parent} ({error.strerror}); choose another path")


def _missing_folder(path: Path, flag: str) -> str:
    """Say which part of the path is wrong: a file where a folder should be, or no folder yet."""
    for ancestor in path.parents:
        if ancestor.exists() and not ancestor.is_dir():
            return f"{flag} {path}: {ancestor} is a file, not a folder; choose another path"
        if ancestor.is_dir():
            break
    return f"{flag} {path}: folder {path.parent} does not exist; create it first"


# ---- what an output may replace ------------------------------------------------------------

HEAD_BYTES = 1 << 20  # read of a file to tell its kind: a bench report or a metrics line is far smaller
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # the first 8 bytes of every PNG (PNG specification, 5.2)
ZIP_SIGNATURE = b"PK\x03\x04"  # torch.save writes a zip archive: anything else is no checkpoint


def _json(text: bytes) -> object:
    """`text` parsed as JSON; None when it is not (nesting too deep for the parser included)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # ValueError: also bytes that are not UTF-8
        return None


def _is_checkpoint(path: Path, head: bytes) -> bool:
    return head.startswith(ZIP_SIGNATURE) and checkpoint.peek(path) is not None


def _is_metrics(path: Path, head: bytes) -> bool:
    record = _json(head.split(b"\n", 1)[0])  # every line a record; each has the epoch it was taken at
    return isinstance(record, dict) and "epoch" in record


def _is_bench_report(path: Path, head: bytes) -> bool:
    report = _json(head) if len(head) <= HEAD_BYTES else None  # only a whole file parses
    return isinstance(report, dict) and {"machine", "results"} <= report.keys()


def _is_png(path: Path, head: bytes) -> bool:
    return head.startswith(PNG_SIGNATURE)  # a PNG does not say who drew it: a picture may replace any PNG


# The kinds of file tinymnist writes, as a message names them, and how to tell one from its path and first bytes.
CHECKPOINT = "a tinymnist checkpoint"
METRICS = "a tinymnist metrics file"
BENCH_REPORT = "a tinymnist bench report"
PNG = "a PNG picture"
KINDS = {CHECKPOINT: _is_checkpoint, METRICS: _is_metrics, BENCH_REPORT: _is_bench_report, PNG: _is_png}
OUTPUT_KINDS = {"--save-model": CHECKPOINT, "--metrics": METRICS, "--json": BENCH_REPORT}
SUFFIX_KINDS = {".png": PNG}  # -o, where the suffix names the format; export's have no kind to tell


def _check_replaceable(path: Path, flag: str) -> None:
    """Refuse, naming `flag`, to replace a file of another kind than the output's own.
    Call it after check_output_path: `path` is then a regular file or nothing."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES + 1)  # one byte more than a kind reads: a longer file shows it
    except FileNotFoundError:
        return
    except OSError as e:
        what = f"cannot read it to tell what it is ({e.strerror})"
        raise TinyMnistError(f"{flag} {path}: {what}; name another file") from None
    if not head:  # an empty file: nothing is lost
        return
    kind = OUTPUT_KINDS.get(flag) or SUFFIX_KINDS.get(Path(path).suffix.lower())
    found = next((name for name, holds in KINDS.items() if holds(path, head)), None)
    if found == kind:  # its own kind; or, for an output with none to tell, no file of ours
        return
    if found is None:
        what = f"is not {kind}"
    elif kind is None:
        what = f"is {found}"
    else:
        what = f"is {found}, not {kind}"
    raise TinyMnistError(f"{flag} {path} {what}; name another file or delete it first")


def refuse_an_earlier_run(path: Path, flag: str) -> None:
    """Refuse, naming `flag`, a new run's output where an earlier run's checkpoint or metrics already are:
    its first epoch would replace hours of training (a forgotten --resume). Call it after check_output."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES + 1)
    except FileNotFoundError:
        return
    if _is_checkpoint(path, head):
        what = _described_checkpoint(checkpoint.peek(path))
        raise TinyMnistError(
            f"{flag} {path} holds {what}; pass --resume {path} to continue it, or name another file or delete it first"
        )
    if head and _is_metrics(path, head):
        raise TinyMnistError(
            f"{flag} {path} holds an earlier run's metrics; name another file or delete it first "
            "(a resumed run appends to its own)"
        )


def _described_checkpoint(entries: dict) -> str:
    """ "a checkpoint of mlp at epoch 2", from a checkpoint's unchecked entries."""
    config = entries.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    return f"a checkpoint of {model or 'a run'} at epoch {entries.get('epoch')}"


def check_continued_metrics(path: Path, flag: str, epoch: int) -> None:
    """Refuse, naming `flag`, a resumed run's metrics file that does not end where its checkpoint (saved at
    `epoch`) does: a last line cut off mid-write, a line that is no record, or records past `epoch` (another
    run's, or the interrupted run's after its last save, which the resumed run would make again). Reads
    only: the user decides what goes."""
    try:
        lines = path.read_bytes().splitlines(keepends=True)
    except FileNotFoundError:
        return
    if lines and not lines[-1].endswith(b"\n"):  # every record ends its line: this one was cut off
        cut = f"its last line (line {len(lines)}) was cut off mid-write"
        raise TinyMnistError(f"{flag} {path}: {cut}; delete that line or name another file")
    latest = 0.0
    for number, line in enumerate(lines, start=1):
        if not line.strip():  # as plot reads it
            continue
        record = _json(line)
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), (int, float)):
            raise TinyMnistError(f"{flag} {path}, line {number}: not a metrics record; delete it or name another file")
        latest = max(latest, record["epoch"])
    if latest > epoch:
        raise TinyMnistError(
            f"{flag} {path} holds evaluations up to epoch {latest:g}, past the checkpoint's epoch {epoch} "
            "(another run's, or this run's after its last save, which it would make again); "
            "name another file, or delete those lines to continue this one"
        )


# ---- one run per output file -------------------------------------------------------------


@contextlib.contextmanager
def exclusive(outputs: Mapping[str, Path | None]) -> Iterator[None]:
    """Hold every output file ({flag: path}; None is skipped) for this run alone, or raise naming the
    flag when another run holds one or two flags name one file. Removes dead writers' temp files."""
    held = {flag: Path(path) for flag, path in outputs.items() if path is not None}
    seen: dict[str, str] = {}
    for flag, path in held.items():
        real = os.path.realpath(path)
        if real in seen:
            raise TinyMnistError(f"{flag} {path} is also {seen[real]}; give each its own file")
        seen[real] = flag
    with contextlib.ExitStack() as stack:
        for flag, path in held.items():
            sidecar = lock_path(path)
            fd = _acquire(sidecar, path, flag)
            stack.callback(_release, fd, sidecar)
            try:  # this run's pid for a second run's message, after byte 0: Windows locks that byte
                os.ftruncate(fd, 0)
                os.write(fd, f"\n{os.getpid()}\n".encode())
            except OSError as e:  # a full disk, or `ulimit -f 0`
                raise _cannot_lock(sidecar, path, flag, e) from None
            files.remove_leftovers(path)
        for folder in {path.parent for path in held.values()}:
            _remove_dead_runs_locks(folder)
        yield


def lock_path(path: Path) -> Path:
    """The hidden sidecar file whose lock stands for `path`."""
    return path.with_name(f".{path.name}.lock")


def _remove_dead_runs_locks(folder: Path) -> None:
    """Delete the sidecars that runs killed by SIGKILL left behind: one nobody holds a lock
    on and that holds a pid is a dead run's, deleted while locked, as a run releases its own."""
    for sidecar in folder.glob(".*.lock"):
        try:
            fd = os.open(sidecar, os.O_RDWR)
        except OSError:
            continue
        try:
            if filelock.lock_descriptor(fd, blocking=False) and _same_file(fd, sidecar) and _holder(fd):
                _release(fd, sidecar)
                continue
        except OSError:  # no file locks here: nothing tells a dead run's sidecar from a live one's
            pass
        os.close(fd)


def _acquire(sidecar: Path, path: Path, flag: str) -> int:
    """Open and lock `sidecar`, or raise naming the run that holds it."""
    while True:
        try:
            fd, created = os.open(sidecar, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(sidecar, os.O_RDWR), False
            except FileNotFoundError:  # its holder deleted it between our two tries to open it
                continue
            except OSError as e:
                raise _cannot_lock(sidecar, path, flag, e) from None
        except OSError as e:
            raise _cannot_lock(sidecar, path, flag, e) from None
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
    os.lseek(fd, 1, os.SEEK_SET)  # past byte 0, which Windows locks
    text = os.read(fd, 32).decode(errors="replace").strip()
    return f" (pid {text})" if text.isdigit() else ""


def check_png_output(path: Path, flag: str = "-o", inputs: Mapping[Path, str] | None = None) -> None:
    """check_output for a picture: also a .png name, since every picture is written as PNG."""
    path = Path(path)
    _refuse_inputs(path, flag, inputs or {})
    check_output_path(path, flag)
    if path.suffix.lower() != ".png":
        raise TinyMnistError(f"{flag} {path}: the picture is written as PNG; name the file .png")
    _check_replaceable(path, flag)


@contextlib.contextmanager
def atomic_output(path: Path, flag: str = "-o") -> Iterator[BinaryIO]:
    """A binary file whose content replaces `path` if the block succeeds; else `path` is
    untouched (files.atomic_write), and a write that fails is one line naming the flag."""
    path = Path(path)
    check_output(path, flag)
    try:
        with files.atomic_write(path) as f:
            yield f
    except OSError as e:
        raise TinyMnistError(f"{flag} {path}: cannot be written ({e.strerror or e}); nothing was written") from None
