"""The `tinymnist` console script (and `python -m tinymnist`): signals first, then torch.

Importing torch takes seconds; a Ctrl-C then would end in a traceback from deep inside torch, so the
handlers go in first and the heavy imports happen inside `main`. Keep this file and `tinymnist/__init__.py`
free of heavy imports.
"""

from __future__ import annotations

import atexit
import os
import sys

from tinymnist.tool import interrupts


def main() -> None:
    interrupts.install()
    try:
        from tinymnist.tool.cli import main as cli_main  # imports torch

        interrupts.raise_if_swallowed()  # a Ctrl-C that torch's import caught still ends the run
        try:
            cli_main()
            code = 0
        except SystemExit as done:
            code = done.code
        leave(code)
    except KeyboardInterrupt as e:  # during the imports, or as the command returned: each command reports its own
        interrupts.report(e)
        sys.exit(interrupts.exit_code(e))


def leave(code: int | str | None) -> None:
    """End the process once the command has returned, without the interpreter's finalization.

    Finalization takes about a second after torch (its modules torn down one by one). It runs the exit
    callbacks with our signal handler, whose exception there is only printed as ignored, then puts the
    default handlers back: a Ctrl-C then killed the process without a word. Under torchrun it could also
    abort gloo's threads still releasing the last collective's tensors. Every file is closed by now; the
    exit callbacks (torch.compile's worker processes stopping) run here, where a signal ends the process
    at once with its line (interrupts.finished)."""
    code = interrupts.finished(code)
    from tinymnist.tool import torchrun

    if not torchrun.launched():  # torchrun's ranks leave at once, as they always have
        atexit._run_exitfuncs()
    if isinstance(code, str):  # as SystemExit would print it
        print(code, file=sys.stderr or sys.stdout)
    interrupts.flush_output()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)
