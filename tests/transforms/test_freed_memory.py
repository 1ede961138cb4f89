"""Freed memory kept for reuse: a tensor made again lands on pages already faulted in, and the
command asks for it. A case that sets malloc's thresholds runs in a fresh process: they outlive any test."""

import ctypes
import subprocess
import sys

import pytest

from tinymnist.transforms import freed_memory

CHILD = """
import resource, sys, torch
from tinymnist.transforms.freed_memory import reuse_freed_memory
print(reuse_freed_memory() if sys.argv[1] == "reuse" else "default")
def step():  # a step's pattern: a large new tensor written, then freed
    torch.empty(10 * 2**20).fill_(1.0)  # 40 MiB, above any bound glibc's dynamic threshold reaches
for _ in range(16):  # the heap settles: posix_memalign's alignment leaves a freed block short of the next
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(16):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(freed_memory.glibc_malloc() is None, reason="malloc's thresholds are glibc's")


def page_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout
    returned, faults = out.split()
    return returned, int(faults)


@glibc_only
def test_a_tensor_made_again_reuses_the_freed_pages():
    """By default glibc maps a 40 MiB block fresh each time and unmaps it when freed: each of 16
    steps faults all its pages in again. Kept for reuse, once the heap has settled, the 16 steps
    fault less than one step's worth in all."""
    _, default = page_faults("default")
    returned, reused = page_faults("reuse")
    assert returned == "True"
    assert default >= 16 * 10  # at least 10 faults a step, even in 2 MiB pages
    assert reused * 16 < default


def test_elsewhere_it_changes_nothing_and_says_so(monkeypatch):
    """Not glibc (musl names no glibc; macOS and Windows have no confstr name for it): False, and no
    C library loaded, so no mallopt called."""
    monkeypatch.setattr(freed_memory.os, "confstr", lambda name: None, raising=False)
    monkeypatch.setattr(freed_memory.ctypes, "CDLL", None)  # calling it fails the test
    monkeypatch.setattr(freed_memory, "reusing", False)
    assert freed_memory.reuse_freed_memory() is False and freed_memory.reusing is False


def test_an_allocator_preloaded_over_glibcs_is_left_alone(monkeypatch):
    """LD_PRELOAD=libjemalloc.so (or tcmalloc): the malloc this process calls is not libc.so.6's,
    and glibc's settings would miss it. Two fake libraries whose mallocs differ stand for that."""

    class Library:
        def __init__(self, malloc_address: int):
            self.malloc = ctypes.c_void_p(malloc_address)

    libraries = {"libc.so.6": Library(0x1000), None: Library(0x2000)}  # the process's: the preloaded one
    monkeypatch.setattr(freed_memory.os, "confstr", lambda name: "glibc 2.36", raising=False)
    monkeypatch.setattr(freed_memory.ctypes, "CDLL", lambda name: libraries[name])
    assert freed_memory.glibc_malloc() is None
    libraries[None] = libraries["libc.so.6"]  # the control: glibc's own malloc in use
    assert freed_memory.glibc_malloc() is libraries["libc.so.6"]


@glibc_only
@pytest.mark.parametrize("command", [["-m", "tinymnist"], ["-c", "from tinymnist.tool.entry import main; main()"]])
def test_the_command_keeps_freed_memory(command):
    """`python -m tinymnist` and the console script's entry point (torchrun starts the same)."""
    result = subprocess.run([sys.executable, *command, "info"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Freed memory" in result.stdout and "kept for the next step" in result.stdout
