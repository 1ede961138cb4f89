"""AdaptiveThreads against a simulated machine: a clock that a step advances by the time it
would take on the thread count it runs with, quiet or with a core taken."""

import dataclasses
import itertools

import pytest
import torch

from tinymnist.algorithm import optim
from tinymnist.algorithm.config import recipe_config
from tinymnist.algorithm.networks import init_params
from tinymnist.algorithm.train import make_gradient, make_step
from tinymnist.transforms import cpu_threads
from tinymnist.transforms.cpu_threads import AdaptiveThreads, thread_counts
from tinymnist.transforms.speed import device_step

# Seconds per step and the cores the process keeps busy meanwhile, by thread count: quiet,
# threads run or spin on their own cores; with one of 2 cores taken, two threads wait for
# each other and get about 1.2 cores (measured: 1.1-1.5), one thread keeps its core.
QUIET = {2: (0.001, 2.0), 1: (0.00125, 1.0)}
BUSY = {2: (0.02, 1.2), 1: (0.0011, 1.0)}


class Machine:
    """A step that advances a wall clock and a CPU clock as the profile says for the
    thread count it runs with, and records that count."""

    def __init__(self, profile: dict[int, tuple[float, float]], threads: int = 2):
        self.profile, self.threads, self.now, self.cpu, self.ran = profile, threads, 0.0, 0.0, []

    def clock(self) -> float:
        return self.now

    def cpu_clock(self) -> float:
        return self.cpu

    def set_threads(self, n: int) -> None:
        self.threads = n

    def step(self, x):
        seconds, cores = self.profile[self.threads]
        self.now, self.cpu = self.now + seconds, self.cpu + seconds * cores
        self.ran.append(self.threads)
        return x * 2


def governed(machine: Machine, most: int = 2, compiles: bool = True) -> AdaptiveThreads:
    return AdaptiveThreads(machine.step, most, machine.clock, machine.cpu_clock, machine.set_threads, compiles=compiles)


def run(adaptive: AdaptiveThreads, steps: int) -> None:
    for i in range(steps):
        assert adaptive(i) == 2 * i  # the step's own result, untouched


def test_the_candidates_are_all_threads_one_fewer_and_one():
    assert thread_counts(16) == [16, 15, 1]
    assert thread_counts(2) == [2, 1]
    assert thread_counts(1) == [1]


def test_a_quiet_run_never_leaves_all_threads():
    """Its steps are a fixed-thread run's, so its numbers are too."""
    machine = Machine(QUIET)
    run(governed(machine), 20_000)
    assert set(machine.ran) == {2}


def test_a_core_taken_from_the_start_is_noticed_in_the_first_periods():
    machine = Machine(BUSY)
    adaptive = governed(machine)
    run(adaptive, 3000)
    assert adaptive.threads == 1 and machine.threads == 1
    first_switch = machine.ran.index(1)
    assert first_switch <= cpu_threads.WARMUP_CALLS + cpu_threads.PERIOD_SECONDS / 0.02 + 1  # after one period
    later = machine.ran[first_switch:]
    seconds = sum(machine.profile[threads][0] for threads in later)
    assert len(later) * 0.0011 / seconds > 0.9  # probes of two threads are cut short: one thread's speed


def test_a_core_taken_late_is_noticed_at_once_and_given_back_when_it_returns():
    machine = Machine(QUIET)
    adaptive = governed(machine)
    run(adaptive, 10_000)
    machine.profile = BUSY
    taken = len(machine.ran)
    run(adaptive, 500)
    assert adaptive.threads == 1
    # within two periods: the one under way (part quiet), then one all busy
    assert machine.ran.index(1, taken) - taken <= 2 * cpu_threads.PERIOD_SECONDS / 0.02 + 1
    machine.profile = QUIET
    back = len(machine.ran)
    run(adaptive, 3000)
    assert adaptive.threads == 2
    # back within PROBE_EVERY periods of one thread, and a probe
    assert machine.ran.index(2, back) - back <= (cpu_threads.PROBE_EVERY + 1) * cpu_threads.PERIOD_SECONDS / 0.00125


def test_threads_that_never_fill_their_cores_probe_ever_more_rarely():
    """OMP_WAIT_POLICY=PASSIVE: threads sleep at barriers, so quiet 2 threads keep 1.3 cores
    busy and look starved; all threads stay the faster, and lost probes space out."""
    machine = Machine({2: (0.001, 1.3), 1: (0.00125, 1.0)})
    adaptive = governed(machine)
    run(adaptive, 60_000)
    assert adaptive.threads == 2
    starts = [i for i in range(1, len(machine.ran)) if machine.ran[i] == 1 and machine.ran[i - 1] == 2]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(b > 0.95 * a for a, b in itertools.pairwise(gaps))  # never shorter (a period is a step or so)
    assert gaps[-1] > 3.5 * gaps[0]  # waits of 8, 16, 32, then MAX_WAIT (64) periods
    assert machine.ran.count(1) / len(machine.ran) < 0.03


@pytest.mark.parametrize("caller_seconds, probes", [(0.0, True), (0.002, False)])
def test_a_period_mostly_spent_outside_the_step_does_not_count_as_a_core_taken(caller_seconds, probes):
    """Between calls the caller may work on one core for a while (an evaluation; bench compiling its
    next loop): a period that is mostly that gets under its thread count's cores without a core being
    taken. The control: the same low CPU time while the step itself ran starts a probe."""
    machine = Machine({2: (0.001, 1.2), 1: (0.00125, 1.0)})
    adaptive = governed(machine)
    for i in range(cpu_threads.WARMUP_CALLS + 1000):
        adaptive(i)
        machine.now += caller_seconds  # the caller's own work between calls, on the CPU clock as one core
        machine.cpu += caller_seconds
    assert (1 in machine.ran) == probes


def test_a_probe_that_is_barely_faster_does_not_switch():
    machine = Machine({2: (0.001, 1.2), 1: (0.00098, 1.0)})  # within MARGIN: noise, not a win
    adaptive = governed(machine)
    run(adaptive, 5000)
    assert adaptive.threads == 2


def test_the_first_calls_compile_and_are_not_timed():
    machine = Machine(dict(BUSY))
    adaptive = governed(machine)
    machine.profile[2] = (30.0, 2.0)  # a first call that compiles for half a minute
    run(adaptive, cpu_threads.WARMUP_CALLS)
    machine.profile[2] = BUSY[2]
    run(adaptive, 100)
    assert adaptive.incumbent_seconds == pytest.approx(0.02) or adaptive.threads == 1


def test_the_first_call_at_a_new_thread_count_compiles_again_and_is_not_held_against_it():
    """torch.compile guards on the thread count: a probe's first call takes seconds, once."""
    machine = Machine(BUSY)
    adaptive = governed(machine)
    real_step, first_on = machine.step, set()

    def step(x):
        if machine.threads not in first_on:  # each count's first call compiles for 2 s
            first_on.add(machine.threads)
            machine.now += 2.0
        return real_step(x)

    adaptive.step = step
    run(adaptive, 1000)
    first = machine.ran.index(1)
    assert set(machine.ran[first : first + 50]) == {1}  # the first probe won, its compile aside
    # the probe's first call is for train.Clock to leave out (the run's first call, on 2 threads, is the loop's)
    assert adaptive.untimed_seconds() == pytest.approx(2.0 + BUSY[1][0])


def test_an_eager_steps_first_call_at_a_new_thread_count_is_training():
    machine = Machine(BUSY)
    adaptive = governed(machine, compiles=False)
    run(adaptive, 1000)
    assert 1 in machine.ran and adaptive.untimed_seconds() == 0.0


def test_one_thread_has_nothing_to_choose():
    machine = Machine({1: (0.001, 0.5)}, threads=1)
    run(governed(machine, most=1), 2000)
    assert set(machine.ran) == {1}


def test_device_step_governs_a_cpu_step_with_several_threads_and_computes_the_same():
    """The step train runs on a CPU with 2 threads is AdaptiveThreads around the plain step, and
    gives the plain step's numbers with its thread count changed between calls; on 1 thread
    there is nothing to govern, and --threads fixes the count."""
    # SGD, not the recipe's Adam: 1 and 2 threads sum a product in other orders, and Adam's first step
    # moves a weight whose gradient is about 0 by up to lr either way (2.3e-5 was seen, random digits)
    config = recipe_config("mlp", "sgd", batch_size=16, compile=False, micro_batch=0)
    optimizer = optim.OPTIMIZERS["sgd"]()
    params = init_params("mlp", 0)
    opt_state = optimizer.init(params)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)
    args = (params, opt_state, images, labels, torch.arange(16), torch.tensor(0.01))
    expected = make_step(make_gradient(config), optimizer)(*args)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        step = device_step(config, optimizer, torch.device("cpu"))
        assert isinstance(step, AdaptiveThreads) and step.counts == [2, 1] and not step.compiles  # eager
        for threads in (2, 1, 2):
            step.set_threads(threads)
            torch.testing.assert_close(step(*args), expected)
        fixed = dataclasses.replace(config, threads=2)  # --threads 2: fixed, nothing adapts
        assert not isinstance(device_step(fixed, optimizer, torch.device("cpu")), AdaptiveThreads)
        torch.set_num_threads(1)
        assert not isinstance(device_step(config, optimizer, torch.device("cpu")), AdaptiveThreads)
    finally:
        torch.set_num_threads(before)
