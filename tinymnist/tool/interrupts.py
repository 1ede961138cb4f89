"""Ctrl-C and SIGTERM: a run ends at the first one, cleanly, and never mid-save.

Python turns SIGINT into `KeyboardInterrupt` and lets SIGTERM kill the process on
the spot (no checkpoint, no exit message). After `install()`:

- SIGINT raises `KeyboardInterrupt` and SIGTERM raises `Terminated` (a subclass, so
  every `except KeyboardInterrupt` that saves the last epoch handles both);
  `exit_code(exc)` is what the shell expects: 128 + the signal's number, 130 or 143.
- Only the first signal raises. The process is ending from then on, and a second
  Ctrl-C must not break into its cleanup (the save of the last epoch, the exit line)
  with a new traceback; later signals are ignored (SIGKILL still works).
- Inside `shielded()` (a checkpoint being written) a signal waits: it is raised when
  the block ends, so a file is never left half-written by an impatient Ctrl-C.
- Every stop ends in one line, `report(stop)`: the run that knows what it kept says so
  (`train`'s last checkpoint); wherever else a signal lands (start-up, loading the data,
  any other command), the line is said where the interrupt is caught.

Signal handlers belong to the process, so the handler object holds this state and
the process's signal table holds the handler: there is no module-level variable.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SHELL_SIGNAL_BASE = 128  # POSIX shells report "killed by signal N" as exit status 128 + N


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (`kill PID`, a job scheduler's stop): end the run as Ctrl-C does."""


def exit_code(exc: KeyboardInterrupt) -> int:
    """130 for Ctrl-C (SIGINT), 143 for SIGTERM."""
    signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
    return SHELL_SIGNAL_BASE + signum


def report(stop: KeyboardInterrupt, kept: str = "") -> None:
    """Print the line a stopped command ends with, once per stop: which signal, then `kept`
    (what the run has saved, said by the one that knows)."""
    if getattr(stop, "reported", False):  # said already, closer to where it landed
        return
    by = " by SIGTERM" if isinstance(stop, Terminated) else ""
    print(f"tinymnist: interrupted{by}{kept}", file=sys.stderr)
    stop.reported = True


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class _Handler:
    """The SIGINT/SIGTERM handler: raises once, and not while shielded."""

    def __init__(self) -> None:
        self.shield_depth = 0  # nested shielded() blocks now running
        self.pending: int | None = None  # a signal that arrived while shielded
        self.raised: int | None = None  # the first signal, once acted on: the run is ending

    def __call__(self, signum: int, frame) -> None:
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


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install() -> None:
    """Route SIGINT and SIGTERM through the handler above (once per process, main thread)."""
    if _installed() is None:
        handler = _Handler()
        for signum in SIGNALS:
            signal.signal(signum, handler)


def raise_if_swallowed() -> None:
    """Raise again a signal whose exception code outside ours caught and dropped.

    torch's C extension imports numpy and clears any error that import raises, a
    KeyboardInterrupt included: a Ctrl-C landing there would vanish, and as later signals
    are ignored once one has been raised, the run could then no longer be stopped.
    """
    handler = _installed()
    if handler is not None and handler.raised is not None:
        raise _exception(handler.raised)


class SwallowedSignals:
    """A reporter (train.Reporter) that ends the run at the next log line when a signal's
    exception was swallowed on the way: Python drops an exception raised inside a callback
    (torch.compile runs weakref callbacks mid-step), and the run would train on."""

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
    """Hold SIGINT and SIGTERM back until the block ends (blocks nest).

    Without `install()` (tinymnist used as a library, tests running the CLI in-process)
    the handler is put in place for the block only, then the previous ones return.
    Outside the main thread Python delivers no signals, so there is nothing to hold.
    """
    handler = _installed()
    previous = None
    if handler is None:
        if not _in_main_thread():
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
