"""How a command ends: a mistake as one line and exit 2, an interrupt as 130 (Ctrl-C) or 143 (SIGTERM)."""

from __future__ import annotations

import functools
import sys

import typer
import typer.core

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
        except Exception as e:
            if (failed := cpp_compile_failure(e)) is None:
                raise  # a bug: its traceback is what a report needs
            print(f"tinymnist: error: {failed}", file=sys.stderr)
            raise typer.Exit(EXIT_USAGE) from None

    return wrapper


def cpp_compile_failure(error: BaseException) -> str | None:
    """torch.compile's C++ compiler failing (inductor's CppCompileError, raised or wrapped), in one line with
    the compiler's own words, where `error` is that; else None. A full disk or a file size limit is the
    usual cause on a user's machine; other compiler errors point to the generated code."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ == "CppCompileError":
            said = [line.strip() for line in str(getattr(error, "output", "")).splitlines() if line.strip()]
            space = next((line for line in said if any(words in line for words in OUT_OF_SPACE)), None)
            if space:
                return (
                    f"compiling the step failed: the C++ compiler stopped ({space[:160]}); free space in the "
                    "temporary folder ($TMPDIR) or raise its limits, or run without compiling (--no-compile)"
                )
            why = next((line for line in said if "error" in line.lower()), "no reason given")
            return (
                f"compiling the step failed: the C++ compiler stopped ({why[:160]}); run without compiling "
                "(--no-compile), and please report it with the command that failed"
            )
        inner = getattr(error, "inner_exception", None) or error.__cause__
        error = inner or (None if error.__suppress_context__ else error.__context__)
    return None


OUT_OF_SPACE = ("No space left", "File size limit", "exceeded", "Disk quota")


# click's UsageError, whose subclasses are what it raises for a bad command line; typer 0.29
# carries a copy of click of its own, so it is taken from typer's BadParameter, either way.
UsageError = typer.BadParameter.__bases__[0]


class OneLineUsageErrors(typer.core.TyperGroup):
    """click's own usage errors (an unknown flag or command, a value of the wrong type) as one
    `tinymnist: error:` line and exit 2, like every other mistake, instead of a framed box."""

    def make_context(self, info_name, args, parent=None, **extra):  # the options before the command
        alone = not args  # `tinymnist` alone: its help, as no_args_is_help says (the parser empties args)
        try:
            return super().make_context(info_name, args, parent, **extra)
        except UsageError as error:
            if alone:
                raise
            one_line(error)

    def invoke(self, ctx: typer.Context):  # the command's own arguments and options
        try:
            return super().invoke(ctx)
        except UsageError as error:
            one_line(error)


def one_line(error) -> None:
    where = f" (see {error.ctx.command_path} -h)" if error.ctx else ""
    print(f"tinymnist: error: {error.format_message()}{where}", file=sys.stderr)
    raise typer.Exit(EXIT_USAGE) from None
