"""Ctrl-C and SIGTERM: a run ends at the first one, cleanly, and never mid-save.

After `install()`, SIGINT raises `KeyboardInterrupt` and SIGTERM `Terminated` (a subclass,
so every handler that saves the last epoch handles both). Only the first signal raises:
a second Ctrl-C must not break into the cleanup. Inside `shielded()` (a checkpoint being
written) a signal waits until the block ends. Once the command has returned (`finished()`,
while the process exits) a signal raises nothing: it ends the process at once. Every stop
ends in one line, `report(stop)`. The handler object holds this state, and the process's
signal table holds the handler.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
FINISHED = "; the command had finished"  # said of a signal that came after the command's work
SHELL_SIGNAL_BASE = 128  # POSIX shells report "killed by signal N" as exit status 128 + N


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (`kill PID`, a job scheduler's stop): end the run as Ctrl-C does."""


def exit_code(exc: KeyboardInterrupt) -> int:
    """130 for Ctrl-C (SIGINT), 143 for SIGTERM."""
    signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
    return SHELL_SIGNAL_BASE + signum


def report(stop: KeyboardInterrupt, kept: str = "") -> None:
    """Print the line a stopped command ends with, once per stop: which signal, then `kept`
    (what the run has saved)."""
    if getattr(stop, "reported", False):  # said already, closer to where it landed
        return
    by = " by SIGTERM" if isinstance(stop, Terminated) else ""
    print(f"tinymnist: interrupted{by}{kept}", file=sys.stderr or sys.stdout)
    stop.reported = True


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class _Handler:
    """The SIGINT/SIGTERM handler: raises once, and not while shielded."""

    def __init__(self) -> None:
        self.shield_depth = 0  # nested shielded() blocks now running
        self.pending: int | None = None  # a signal that arrived while shielded
        self.raised: int | None = None  # the first signal, once acted on: the run is ending
        self.finished = False  # the command has returned: only the exit callbacks are left

    def __call__(self, signum: int, frame) -> None:
        if self.finished:  # an exception now would escape every handler: say so and leave at once
            stop = _exception(signum)
            report(stop, " while exiting" + ("" if self.raised is not None else FINISHED))
            flush_output()
            os._exit(exit_code(_exception(self.raised or signum)))
        if self.raised is not None:
            return  # the run is already ending: let its cleanup finish
        if self.shield_depth:
            self.pending = self.pending or signum
            return
        self.raised = signum
        raise _exception(signum)

    def unshield(self, leaving_by_exception: bool) -> None:
        """End one shielded block; the outermost one raises the signal that waited."""
        self.shield_depth -= 1
        if self.shield_depth or self.pending is None:
            return
        self.raised, self.pending = self.pending, None  # the run is ending: later signals are ignored
        if not leaving_by_exception:  # else that exception already ends the run, its own way
            raise _exception(self.raised)


def _installed() -> _Handler | None:
    handler = signal.getsignal(signal.SIGINT)
    return handler if isinstance(handler, _Handler) else None


def install() -> None:
    """Route SIGINT and SIGTERM through the handler above (once per process, main thread)."""
    if _installed() is None:
        handler = _Handler()
        for signum in SIGNALS:
            signal.signal(signum, handler)
        sys.unraisablehook = _quiet_when_ours


def finished(code: int | str | None) -> int | str | None:
    """The command has returned with exit code `code`: from now on a signal (while the exit callbacks run,
    which may wait for torch.compile's worker processes) ends the process at once with its one line and
    exit code, where an exception would escape every handler. -> the code to leave with: a signal whose
    exception a finalizer swallowed as the command returned still ends it as an interrupt.

    The signals are held back across the switch, so that none lands between the check and the flag."""
    handler = _installed()
    if handler is None:
        return code
    with _held_back():  # a signal that waited is handled as it ends, by the finished handler
        handler.finished = True
        if handler.raised is not None and code == 0:  # raised inside a __del__ or weakref callback, and dropped
            stop = _exception(handler.raised)
            report(stop, FINISHED)
            code = exit_code(stop)
    return code


@contextlib.contextmanager
def _held_back() -> Iterator[None]:
    """SIGINT and SIGTERM blocked by the OS for the block (where it can: not on Windows)."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:
        yield
        return
    mask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        mask(signal.SIG_UNBLOCK, SIGNALS)


def flush_output() -> None:
    """Flush stdout and stderr before os._exit, which skips it; either may be closed (`>&-`: None)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()


def _quiet_when_ours(unraisable) -> None:
    """sys.unraisablehook: Python drops an exception raised inside a finalizer (a `__del__`, a weakref
    callback) with a traceback; our signal's exception there is no error (the handler has noted the
    signal, and the run ends at the next check), so it goes unsaid. Anything else as Python says it."""
    handler = _installed()
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and handler is not None and handler.raised is not None:
        return
    sys.__unraisablehook__(unraisable)


def raise_if_swallowed() -> None:
    """Raise again a signal whose exception code outside ours caught and dropped (torch's C
    extension clears any error its numpy import raises): later signals are ignored, so the run
    could otherwise no longer be stopped."""
    handler = _installed()
    if handler is not None and handler.raised is not None:
        raise _exception(handler.raised)


class SwallowedSignals:
    """A reporter (train.Reporter) that ends the run at the next log line when a signal's exception
    was swallowed: Python drops one raised inside a callback (torch.compile runs some mid-step)."""

    def epoch_started(self, *args) -> None:
        raise_if_swallowed()

    def logged(self, *args) -> None:
        raise_if_swallowed()

    def evaluated(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends (blocks nest). Without `install()` (as a
    library) the handler is in place for the block only; outside the main thread no signal comes."""
    handler = _installed()
    previous = None
    if handler is None:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handler = _Handler()
        previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
    handler.shield_depth += 1
    leaving_by_exception = True
    try:
        yield
        leaving_by_exception = False
    finally:
        if previous is not None:
            for signum, old in previous.items():
                if old is not None:  # None: set outside Python, cannot be put back
                    signal.signal(signum, old)
        handler.unshield(leaving_by_exception)
