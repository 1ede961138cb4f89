"""The `tinymnist` console script (and `python -m tinymnist`): signals first, then torch.

Importing torch takes seconds; a Ctrl-C then would end in a traceback from deep inside torch, so the
handlers go in first and the heavy imports happen inside `main`. Keep this file and `tinymnist/__init__.py`
free of heavy imports.
"""

from __future__ import annotations

import sys

from tinymnist.tool import interrupts


def main() -> None:
    interrupts.install()
    try:
        from tinymnist.tool.cli import main as cli_main  # imports torch

        interrupts.raise_if_swallowed()  # a Ctrl-C that torch's import caught still ends the run
        try:
            cli_main()
        except SystemExit as done:
            exit_if_torchrun(done.code)
            raise
        exit_if_torchrun(0)
    except KeyboardInterrupt as e:  # during the imports: each command reports its own
        interrupts.report(e)
        sys.exit(interrupts.exit_code(e))


def exit_if_torchrun(code) -> None:
    """Under torchrun, leave without the interpreter's finalization (torchrun.exit_now)."""
    from tinymnist.tool import torchrun

    if torchrun.launched():
        torchrun.exit_now(code)
