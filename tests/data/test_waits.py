"""A mirror that accepts connections and never answers costs bounded time, announced line by line.

Timeouts and deadlines are tiny here (tenths of a second) so the tests run fast; what is
asserted is what was said and what was tried, never how long it took.
"""

import hashlib
import os
import subprocess
import sys

import pytest
import requests
import torch

from tests.support.mirror import Mirror, serve, stall, stall_after_headers, status, trickle
from tinymnist.data import FILES, DownloadError, download
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
    assert os.listdir(tmp_path) == []  # the data folder it made for nothing is gone, and no temp file


def test_status_answers_are_unchanged(start_mirror, labels, tmp_path, capsys):
    flaky = start_mirror(status(503), serve(labels))
    download(tmp_path, mirrors=[flaky.url], md5s=md5s(labels), progress=False, patience=Patience(backoff=0))
    assert f"{flaky.url}{LABELS}: HTTP 503; try 2 of 3 in 0 s" in capsys.readouterr().err.splitlines()


# ---- a dead mirror is asked for one file, not for each of the four ------------------------

FOUR = {name: name.encode() * 100 for name in FILES}  # MNIST's four names; any bytes do
FIRST, *OTHERS = FOUR
QUICK = Patience(connect_timeout=0.1, read_timeout=0.1, attempts=2, backoff=0)
SILENCES = {"never answers": stall(2.0), "headers, then silence": stall_after_headers(2.0)}


def four_md5s() -> dict[str, str]:
    return {name: hashlib.md5(body).hexdigest() for name, body in FOUR.items()}


def serving_four(start_mirror) -> Mirror:
    mirror = start_mirror()
    mirror.answers = {name: [serve(body)] for name, body in FOUR.items()}
    return mirror


@pytest.mark.parametrize("silence", SILENCES.values(), ids=SILENCES.keys())
def test_a_silent_mirror_is_not_asked_again_for_the_other_files(start_mirror, tmp_path, capsys, silence):
    dead = start_mirror()
    dead.answers = {name: [silence] for name in FOUR}
    good = serving_four(start_mirror)

    download(tmp_path, mirrors=[dead.url, good.url], md5s=four_md5s(), progress=False, patience=QUICK)

    assert dead.requested == [FIRST] * QUICK.attempts  # its tries at the first file, then never again
    assert good.requested == list(FOUR)
    assert sorted(os.listdir(tmp_path)) == sorted(FOUR)
    said = capsys.readouterr().err.splitlines()
    for name in OTHERS:
        assert f"downloading {dead.url}{name}" not in said
        skip = [line for line in said if line.startswith(f"{dead.url}{name}: not asked: ")]
        assert len(skip) == 1 and skip[0].endswith(f"(2 tries) on {FIRST}; next mirror"), said


def test_only_a_silent_mirror_fails_every_file_after_one_files_tries(start_mirror, tmp_path, capsys):
    """Offline, as it were: the first file's tries are said once as they happen and once in the error; the
    other files, never asked, are one line of the error and nothing on the way."""
    dead = start_mirror()
    dead.answers = {name: [stall(2.0)] for name in FOUR}

    with pytest.raises(DownloadError) as caught:
        download(tmp_path, mirrors=[dead.url], md5s=four_md5s(), progress=False, patience=QUICK)

    assert dead.requested == [FIRST] * QUICK.attempts
    lines = str(caught.value).splitlines()
    assert lines[1] == f"{FIRST}: {dead.url}{FIRST}: no answer within 0.1 s (2 tries)"
    assert lines[2] == f"{', '.join(OTHERS)}: not asked: no mirror answered for an earlier file"
    assert len(lines) == 4
    said = capsys.readouterr().err
    assert all(name not in said for name in OTHERS), said
    assert "tinymnist download --from" in lines[-1]  # today's closing hint, unchanged
    assert os.listdir(tmp_path) == []


def test_a_mirror_that_never_connects_is_not_asked_again(start_mirror, tmp_path, monkeypatch):
    # A connect timeout cannot be staged on 127.0.0.1, which answers or refuses at once:
    # requests raises it for a TEST-NET address (RFC 5737, never routed) instead.
    unreachable, asked, real_get = "http://192.0.2.1/mnist/", [], requests.Session.get

    def get(session, url, **kwargs):
        if not url.startswith(unreachable):
            return real_get(session, url, **kwargs)
        asked.append(url.removeprefix(unreachable))
        raise requests.ConnectTimeout("connect timed out")

    monkeypatch.setattr(requests.Session, "get", get)
    good = serving_four(start_mirror)

    download(tmp_path, mirrors=[unreachable, good.url], md5s=four_md5s(), progress=False, patience=QUICK)

    assert asked == [FIRST] * QUICK.attempts
    assert good.requested == list(FOUR)


@pytest.mark.parametrize(
    "answers",
    [[status(503)], [stall(2.0), serve(FOUR[FIRST])]],
    ids=["answers 503", "silent once, then serves"],
)
def test_a_mirror_that_answers_is_asked_for_every_file(start_mirror, tmp_path, answers):
    # Only a last try that got no answer marks a mirror dead: an HTTP error is an answer,
    # and a silence that a retry got past is forgiven.
    flaky = start_mirror()
    flaky.answers = {FIRST: answers} | {name: [status(503)] for name in OTHERS}
    good = serving_four(start_mirror)

    download(tmp_path, mirrors=[flaky.url, good.url], md5s=four_md5s(), progress=False, patience=QUICK)

    assert sorted(set(flaky.requested)) == sorted(FOUR)
