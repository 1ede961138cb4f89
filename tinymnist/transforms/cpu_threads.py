"""A transform, CPU only: run the step with the thread count that is fastest now.

When another program takes a core, torch's OpenMP threads wait for the descheduled one at every
op's barrier: on 2 cores with one taken, mlp fell to 0.2x of its quiet speed and cnn to 0.3x. One
thread keeps over 0.9x but is slower quiet (mlp 0.85x, cnn 0.68x), and no OpenMP wait policy fixes
both (research/wait_policy.py, BENCHMARKS.md "A busy core"). A taken core shows in the process's
CPU time (2 threads: 1.89-2.01 CPU s/s quiet, 1.07-1.50 with one taken; research/cpu_busy_signal.py),
which starts a probe of fewer threads; the faster stays. A quiet run never leaves n threads, so its
numbers are a fixed-thread run's to the bit (`--threads N` fixes them under any load). Each new count
compiles once (inductor's cpp.dynamic_threads would spare that, but gave a compiled mlp3 step a wrong
loss): that call is left out of the probe's timing, and its seconds are kept in `untimed_seconds()`,
which train.fit takes off the training clock. The count is torch's, process-wide.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

PERIOD_SECONDS = 0.1  # long enough to average a few mlp steps, short enough to react within a second
MIN_PERIOD_STEPS = 2  # a period of one long step (cnn, lenet) is too noisy to compare
STARVED = 0.3  # cores: n threads that got under n - 0.3 cores' CPU time in a period lost one
PROBE_EVERY, MAX_WAIT = 8, 64  # periods between probes on fewer threads; the longest wait after lost probes
MARGIN = 0.95  # a probe wins when its steps take under 0.95 of the incumbent's
ABANDON = 2.0  # a probe is cut short once it has taken twice the incumbent's time for its steps
WARMUP_CALLS = 2  # the first calls compile: not timed
STEP_SHARE = 0.5  # a period's CPU time counts when the step ran for at least this share of its wall time


def thread_counts(most: int) -> list[int]:
    """The candidates: all threads first, then one fewer (a core taken), then one (no barrier)."""
    return sorted({most, max(1, most - 1), 1}, reverse=True)


class AdaptiveThreads:
    """A drop-in for a CPU step: the same arguments and results, run with the fastest thread count."""

    def __init__(
        self,
        step: Callable,
        most: int,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.process_time,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        compiles: bool = True,
    ):
        """`compiles`: the step holds compiled graphs, so that a new thread count compiles again."""
        self.step, self.clock, self.cpu_clock, self.set_threads = step, clock, cpu_clock, set_threads
        self.compiles = compiles
        self.counts = thread_counts(most)
        self.incumbent = self.counts[0]
        self.incumbent_seconds = None  # per step, over the incumbent's last period
        self.probe = None  # the thread count on trial, or None
        self.probes = 0  # probes so far: the other counts are tried in turn
        self.periods, self.wait = 0, 0  # the incumbent's periods since the last probe, and before the next
        self.calls, self.steps, self.seconds = 0, 0, 0.0  # this period's steps and their wall time
        self.counts_run = {self.incumbent}  # thread counts the step has been called with (and compiled for)
        self.compile_seconds = 0.0  # the wall time of the first calls at a new count: compiling, not training
        self.period_start = (0.0, 0.0)  # both clocks when the period's first step started

    @property
    def threads(self) -> int:
        return self.incumbent if self.probe is None else self.probe

    def __call__(self, *args):
        started = self.clock()
        if self.steps == 0:
            self.period_start = (started, self.cpu_clock())
        result = self.step(*args)
        seconds = self.clock() - started
        if self.compiles and self.threads not in self.counts_run:
            self.compile_seconds += seconds
        self.record(seconds, self.threads)
        return result

    def untimed_seconds(self) -> float:
        """The seconds of the calls so far that compiled for a new thread count (train.Clock leaves
        them out of the training time; the first call, at all threads, is the loop's to leave out)."""
        return self.compile_seconds

    def record(self, seconds: float, threads: int) -> None:
        """One call's wall time: ends the period when it is long enough, or a probe that lags."""
        self.calls += 1
        if self.calls <= WARMUP_CALLS or len(self.counts) == 1:
            return
        if threads not in self.counts_run:  # its first call at this count compiled again: not timed
            self.counts_run.add(threads)
            return
        self.steps, self.seconds = self.steps + 1, self.seconds + seconds
        lagging = self.probe is not None and self.seconds > ABANDON * self.incumbent_seconds * self.steps
        if lagging or (self.seconds >= PERIOD_SECONDS and self.steps >= MIN_PERIOD_STEPS):
            wall, cpu = self.clock() - self.period_start[0], self.cpu_clock() - self.period_start[1]
            # A period the step ran for under half of was mostly the caller's (an evaluation, another
            # loop compiling): its CPU time says nothing of a core taken from the step.
            cores = cpu / wall if self.seconds >= STEP_SHARE * wall else None
            before = self.threads
            self.end_period(self.seconds / self.steps, cores)
            if self.threads != before:
                self.set_threads(self.threads)
            self.steps, self.seconds = 0, 0.0

    def end_period(self, seconds_per_step: float, cores: float | None) -> None:
        """`cores`: the CPU seconds the process got per second of the period; None: unknown."""
        if self.probe is not None:  # the trial is over: the faster count stays
            if seconds_per_step < MARGIN * self.incumbent_seconds:
                self.incumbent, self.incumbent_seconds, self.wait = self.probe, seconds_per_step, 0
            elif self.incumbent == self.counts[0]:
                self.wait = min(max(PROBE_EVERY, 2 * self.wait), MAX_WAIT)
            self.probe = None
            return
        self.incumbent_seconds, self.periods = seconds_per_step, self.periods + 1
        if self.incumbent == self.counts[0]:
            due = cores is not None and cores < self.incumbent - STARVED and self.periods >= self.wait
        else:
            due = self.periods >= PROBE_EVERY
        if due:
            others = [c for c in self.counts if c != self.incumbent]
            self.probe, self.probes, self.periods = others[self.probes % len(others)], self.probes + 1, 0
