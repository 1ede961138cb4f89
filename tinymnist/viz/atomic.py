"""Output files written whole or not at all, with the error a user can act on.

files.atomic_write does the work (a temp file beside the target, renamed over it once
complete, deleted on any error); this adds the one-line message naming the flag when
the path cannot be written: a folder that does not exist, no permission, a full disk;
and, as for train's outputs (outputs.check_output_path), a symlink or a device is refused, not replaced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from tinymnist.errors import TinyMnistError
from tinymnist.files import atomic_write
from tinymnist.outputs import check_output_path


@contextlib.contextmanager
def atomic_output(path: Path, flag: str = "-o") -> Iterator[BinaryIO]:
    """A binary file whose content replaces `path` if the block succeeds; else `path` is untouched."""
    path = Path(path)
    check_output_path(path, flag)  # a folder, a symlink, a device, a missing folder: refused as train refuses them
    try:
        with atomic_write(path) as f:
            yield f
    except OSError as e:
        raise TinyMnistError(f"{flag} {path}: cannot be written ({e.strerror or e}); nothing was written") from None
