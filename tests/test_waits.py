"""A mirror that accepts connections and never answers costs bounded time, announced line by line.

Timeouts and deadlines are tiny here (tenths of a second) so the tests run fast; what is
asserted is what was said and what was tried, never how long it took.
"""

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from tests.mirror import Mirror, serve, stall, status, trickle
from tinymnist.data import DownloadError, download
from tinymnist.data.fetch import Patience
from tinymnist.data.idx import write_idx

LABELS = "t10k-labels-idx1-ubyte.gz"


@pytest.fixture
def labels(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("served")
    write_idx(folder / LABELS, torch.randint(0, 10, (100,), dtype=torch.uint8))
    return (folder / LABELS).read_bytes()


@pytest.fixture
def start_mirror():
    started = []

    def start(*replies) -> Mirror:
        """A mirror answering `replies` in turn to requests for LABELS, 404 to anything else."""
        mirror = Mirror()
        mirror.answers = {LABELS: list(replies)} if replies else {}
        started.append(mirror)
        return mirror

    yield start
    for mirror in started:
        mirror.stop()


def md5s(body: bytes) -> dict[str, str]:
    return {LABELS: hashlib.md5(body).hexdigest()}


def test_each_retry_and_each_mirror_is_one_line_on_stderr(start_mirror, labels, tmp_path, capsys):
    stalled = start_mirror(stall(1.0))
    good = start_mirror(serve(labels))
    patience = Patience(connect_timeout=5, read_timeout=0.1, attempts=2, backoff=0)

    download(tmp_path, mirrors=[stalled.url, good.url], md5s=md5s(labels), progress=False, patience=patience)

    assert capsys.readouterr().err.splitlines() == [
        f"downloading {stalled.url}{LABELS}",
        f"{stalled.url}{LABELS}: no answer within 0.1 s; try 2 of 2 in 0 s",
        f"{stalled.url}{LABELS}: no answer within 0.1 s (2 tries); next mirror",
        f"downloading {good.url}{LABELS}",
    ]
    assert (tmp_path / LABELS).read_bytes() == labels


def test_a_mirror_that_never_answers_is_given_up_at_the_deadline(start_mirror, labels, tmp_path, capsys):
    stalled = start_mirror(stall(1.0))
    # Without the deadline, 1000 tries of 0.1 s each.
    patience = Patience(read_timeout=0.1, attempts=1000, backoff=0, deadline=0.5)

    with pytest.raises(DownloadError) as caught:
        download(tmp_path, mirrors=[stalled.url], md5s=md5s(labels), progress=False, patience=patience)

    assert 1 <= len(stalled.requested) < 1000
    assert "0.5 s deadline has passed" in str(caught.value)
    said = capsys.readouterr().err.splitlines()
    assert said[-1].startswith(f"{stalled.url}{LABELS}: ") and said[-1].endswith(f"giving up on {LABELS}")
    assert os.listdir(tmp_path) == []


def test_a_trickle_that_never_times_out_still_meets_the_deadline(start_mirror, labels, tmp_path):
    slow = start_mirror(trickle(labels, pause=0.05))  # a byte every 0.05 s
    good = start_mirror(serve(labels))
    patience = Patience(read_timeout=5, attempts=3, backoff=0, deadline=0.5)

    with pytest.raises(DownloadError, match=r"the 0\.5 s deadline passed after \d+ bytes") as caught:
        download(tmp_path, mirrors=[slow.url, good.url], md5s=md5s(labels), progress=False, patience=patience)

    assert slow.requested == [LABELS]  # the deadline is per file: no second try, no second mirror
    assert good.requested == []
    assert "tinymnist download --from" in str(caught.value)
    assert os.listdir(tmp_path) == []  # the temp file went with the attempt


def test_the_defaults_bound_every_wait():
    patience = Patience()
    assert patience.connect_timeout <= 10 and patience.read_timeout <= 15 and patience.deadline <= 300
    with pytest.raises(ValueError, match="attempts must be at least 1"):
        Patience(attempts=0)


def test_piped_cli_says_which_mirror_failed_and_names_download_from(start_mirror, tmp_path):
    gone = start_mirror()  # answers 404 to everything
    env = os.environ | {"TINYMNIST_MIRRORS": gone.url}
    result = subprocess.run(
        [sys.executable, "-m", "tinymnist", "download", "--data-dir", tmp_path / "data"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert f"downloading {gone.url}{name}" in lines
        assert f"{gone.url}{name}: HTTP 404; no mirror left" in lines
    assert "tinymnist download --from" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path / "data") == []


def test_status_answers_are_unchanged(start_mirror, labels, tmp_path, capsys):
    flaky = start_mirror(status(503), serve(labels))
    download(tmp_path, mirrors=[flaky.url], md5s=md5s(labels), progress=False, patience=Patience(backoff=0))
    assert f"{flaky.url}{LABELS}: HTTP 503; try 2 of 3 in 0 s" in capsys.readouterr().err.splitlines()
