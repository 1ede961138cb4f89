"""Output files written whole or not at all, with the error a user can act on.

files.atomic_write does the work (a temp file beside the target, renamed over it once
complete, deleted on any error); this adds the one-line message naming the flag when
the path cannot be written: a folder that does not exist, no permission, a full disk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from tinymnist.errors import TinyMnistError
from tinymnist.files import atomic_write


@contextlib.contextmanager
def atomic_output(path: Path, flag: str = "-o") -> Iterator[BinaryIO]:
    """A binary file whose content replaces `path` if the block succeeds; else `path` is untouched."""
    path = Path(path)
    if path.is_dir():
        raise TinyMnistError(f"{flag} {path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise TinyMnistError(f"{flag} {path}: folder {path.parent} does not exist; create it first")
    try:
        with atomic_write(path) as f:
            yield f
    except OSError as e:
        raise TinyMnistError(f"{flag} {path}: cannot be written ({e.strerror or e}); nothing was written") from None
