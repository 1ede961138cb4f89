"""A lock file that cannot be written (a full disk, `ulimit -f 0`) is one line naming the
flag, the file and what to do, at start-up, before any work, and leaves nothing behind."""

import os
import subprocess
import sys

import pytest

from tests.support import tmpfs
from tinymnist.errors import TinyMnistError
from tinymnist.tool import outputs


def under_no_file_size(*args) -> subprocess.CompletedProcess:
    """`tinymnist ARGS` under `ulimit -f 0`: files may be created, not grown."""
    import resource  # POSIX only: here, not at the top, so that Windows can collect this file

    def no_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # Python ignores SIGXFSZ: writes raise EFBIG

    return subprocess.run(
        [sys.executable, "-m", "tinymnist", *map(str, args)],
        capture_output=True,
        text=True,
        preexec_fn=no_file_size,
        timeout=600,
    )


def fill(path) -> None:
    with open(path, "wb", buffering=0) as file, pytest.raises(OSError):
        while True:
            file.write(b"\0" * 4096)


@pytest.mark.skipif(sys.platform == "win32", reason="ulimit -f is POSIX")
def test_ulimit_f_0_at_start_up_is_one_line(tiny_split, tmp_path):
    checkpoint = tmp_path / "mlp.pt"
    args = ["--model", "mlp", "--device", "cpu", "--no-compile", "--data-dir", tiny_split, "--no-download"]
    result = under_no_file_size("train", *args, "--save-model", checkpoint)
    assert (result.returncode, result.stderr) == (
        2,
        f"tinymnist: error: --save-model {checkpoint}: cannot write the lock file {outputs.lock_path(checkpoint)} "
        "(File too large); raise the file size limit (ulimit -f) or choose another folder\n",
    )
    assert os.listdir(tmp_path) == []


def test_a_full_disk_at_start_up_is_one_line(tmp_path):
    with tmpfs(tmp_path / "disk", size_bytes=64 * 1024) as disk:
        fill(disk / "filler")  # every block taken; empty files can still be created
        metrics = disk / "run.jsonl"
        with pytest.raises(TinyMnistError) as caught:
            with outputs.exclusive({"--metrics": metrics}):
                pass
        assert str(caught.value) == (
            f"--metrics {metrics}: cannot write the lock file {outputs.lock_path(metrics)} "
            "(No space left on device); free some space or choose another folder"
        )
        assert os.listdir(disk) == ["filler"]
