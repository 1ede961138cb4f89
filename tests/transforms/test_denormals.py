"""Denormals flushed to zero: in every thread when set before torch's first parallel op, and
by the command itself. Each case runs in a fresh process: the setting outlives any test."""

import os
import subprocess
import sys

import pytest

CHILD = """
import sys, torch
import tinymnist as tm
from tinymnist.transforms import denormals
torch.set_num_threads(2)  # a parallel op then runs on two threads, also on a one-core machine
when = sys.argv[1]
if when == "first":
    returned = tm.flush_denormals()  # as a library user calls it: before any other torch work
    if not torch.set_flush_denormal(True):
        print("unsupported"); sys.exit()
    print("returned", returned)
torch.ones(1 << 20).mul(2.0)  # a parallel op: OpenMP starts its threads here
if when == "after threads started":
    print("returned", tm.flush_denormals())  # as a library user calls it
print(denormals.flushed_in_every_thread())
"""


def flushed(when: str) -> str:
    result = subprocess.run([sys.executable, "-c", CHILD, when], capture_output=True, text=True, check=True)
    if result.stdout.strip() == "unsupported":
        pytest.skip("this CPU cannot flush denormals")
    return result.stdout.strip()


def test_set_before_threads_start_every_thread_flushes():
    assert flushed("first") == "returned True\nTrue"


def test_without_it_denormals_are_kept():
    assert flushed("never") == "False"  # the check can fail: a kept denormal shows


def test_set_after_threads_started_only_the_calling_thread_flushes():
    """Why the command sets it first thing: a thread copies the setting only when it starts; the
    call says so."""
    assert flushed("after threads started") == "returned False\nFalse"


@pytest.mark.parametrize("command", [["-m", "tinymnist"], ["-c", "from tinymnist.tool.entry import main; main()"]])
def test_the_command_flushes_in_every_thread(command):
    """`python -m tinymnist` and the console script's entry point (torchrun starts the same)."""
    flushed("first")  # skips where the CPU cannot
    two_threads = {**os.environ, "OMP_NUM_THREADS": "2"}  # a flush after the threads start shows on any machine
    result = subprocess.run([sys.executable, *command, "info"], capture_output=True, text=True, env=two_threads)
    assert result.returncode == 0, result.stderr
    assert "CPU denormals" in result.stdout and "flushed to zero in every thread" in result.stdout


NUMPY_CHILD = """
import warnings, numpy
import tinymnist as tm
warnings.simplefilter("default")  # every warning shown once, as a plain run shows them
tm.flush_denormals() if {flush} else None
numpy.finfo(numpy.float64).smallest_subnormal  # what matplotlib asks while it draws
"""


def test_numpys_warning_about_the_flush_it_meant_is_not_shown():
    """numpy's finfo warns that the smallest subnormal is 0 once denormals flush; the flush is meant."""
    flushed("first")  # skips where the CPU cannot
    plain = subprocess.run([sys.executable, "-c", NUMPY_CHILD.format(flush=False)], capture_output=True, text=True)
    ours = subprocess.run([sys.executable, "-c", NUMPY_CHILD.format(flush=True)], capture_output=True, text=True)
    assert plain.returncode == ours.returncode == 0, plain.stderr + ours.stderr
    assert "smallest subnormal" not in plain.stderr  # numpy alone has nothing to say
    assert "smallest subnormal" not in ours.stderr
