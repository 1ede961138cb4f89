"""How a command ends: a mistake as one line and exit 2, an interrupt as 130 (Ctrl-C) or 143 (SIGTERM)."""

from __future__ import annotations

import functools
import sys

import typer

from tinymnist.errors import TinyMnistError
from tinymnist.tool import interrupts

EXIT_USAGE = 2


def user_errors(command):
    """Turn a TinyMnistError into one stderr line and exit 2, an interrupt into exit 130 or 143: no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TinyMnistError as e:
            print(f"tinymnist: error: {e}", file=sys.stderr)
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: one line, unless a run has said what it saved
            interrupts.report(stop)
            raise typer.Exit(interrupts.exit_code(stop)) from None

    return wrapper
