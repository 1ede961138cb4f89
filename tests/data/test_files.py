"""atomic_write leaves the old file or the whole new one; remove_leftovers cleans up after kill -9,
and only tinymnist's own temp files of that target, and never one that a live writer holds."""

import errno
import os
import signal
import subprocess
import sys

import pytest

from tinymnist.data.files import atomic_write, probe_write, remove_leftovers, temp_pattern

HOLD_A_WRITE = """
import sys, time
from tinymnist.data.files import atomic_write
with atomic_write(sys.argv[1]) as file:
    file.write(b"half of it")
    file.flush()
    print("writing", flush=True)
    time.sleep(600)
"""


def hidden(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


@pytest.fixture
def writer(tmp_path):
    """A process in the middle of atomic_write(tmp_path / 'model.pt'), killed after the test."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_WRITE, tmp_path / "model.pt"], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "writing\n"  # the temp file exists and is locked
    yield process
    process.kill()
    process.wait()


def test_the_new_content_replaces_the_old_whole(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with atomic_write(target) as file:
        file.write(b"new")
        assert target.read_bytes() == b"old"  # nothing visible until the block ends
        assert len(hidden(tmp_path)) == 1 and temp_pattern(target).fullmatch(hidden(tmp_path)[0])
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["model.pt"]


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path, error):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(type(error)), atomic_write(target) as file:
        file.write(b"half")
        raise error
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_kill_9_leaves_a_temp_file_that_the_next_write_removes(tmp_path, writer):
    target = tmp_path / "model.pt"
    (leftover,) = hidden(tmp_path)

    assert remove_leftovers(target) == []  # its writer is alive: not a leftover yet
    assert hidden(tmp_path) == [leftover]

    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert hidden(tmp_path) == [leftover] and not target.exists()  # what kill -9 leaves

    with atomic_write(target) as file:  # the next write of that file cleans up first
        file.write(b"whole")
    assert os.listdir(tmp_path) == ["model.pt"]
    assert target.read_bytes() == b"whole"


def test_only_this_targets_own_temp_files_are_removed(tmp_path):
    target = tmp_path / "mnist.gz"
    ours = ".mnist.gz.tinymnist-0123abcd.part"
    others = [
        ".other.gz.tinymnist-0123abcd.part",  # another target's
        ".mnist.gz.tinymnist-0123abcd.part.keep",  # not exactly the pattern
        ".mnist.gz.tinymnist-0123ABCD.part",  # upper-case hex: not a name we make
        ".mnist.gz.0123abcd.part",  # someone else's naming
        "mnist.gz.part",  # a browser's partial download
        ".mnist.gz.tinymnist-0123abcd.tmp",
    ]
    for name in [ours, *others]:
        (tmp_path / name).write_bytes(b"x")

    assert remove_leftovers(target) == [tmp_path / ours]
    assert sorted(os.listdir(tmp_path)) == sorted(others)
    assert remove_leftovers(tmp_path / "no-such-folder" / "x") == []


def test_a_live_writer_in_this_process_is_left_alone(tmp_path):
    target = tmp_path / "model.pt"
    with atomic_write(target) as file:
        file.write(b"new")
        assert remove_leftovers(target) == []  # flock conflicts between two opens in one process too
    assert target.read_bytes() == b"new"


def test_probe_write_says_what_atomic_write_would_meet(tmp_path):
    probe_write(tmp_path / "model.pt")
    assert os.listdir(tmp_path) == []
    with pytest.raises(OSError) as caught:
        probe_write(tmp_path / ("x" * 240))  # fits the 255-byte limit, its temp file does not
    assert caught.value.errno == errno.ENAMETOOLONG
    with pytest.raises(FileNotFoundError):
        probe_write(tmp_path / "no-such-folder" / "model.pt")
    assert os.listdir(tmp_path) == []
