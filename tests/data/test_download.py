"""Downloading through real HTTP: mirrors on 127.0.0.1 that the tests script to fail.

Each `Mirror` (tests/support/mirror.py) is a ThreadingHTTPServer on a free port. The files served
are the real t10k files when they are here (their md5 is the published one), else small
synthetic IDX files.
"""

import errno
import gzip
import hashlib
import os
import re
import socket
from pathlib import Path

import pytest
import requests
import torch

from tests.support.mirror import Mirror, cut_off, gzip_if_accepted, serve, stall, status
from tinymnist.data import DEFAULT_MIRRORS, FILES, DownloadError, download, load_mnist
from tinymnist.data.fetch import Patience
from tinymnist.data.idx import read_idx, write_idx
from tinymnist.data.sources import build_from
from tinymnist.errors import TinyMnistError

T10K_IMAGES, T10K_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
PATIENT = Patience(connect_timeout=5.0, read_timeout=5.0, attempts=2, backoff=0.0)  # no sleeps between tries
FAST = {"patience": PATIENT, "progress": False}  # download() kwargs


@pytest.fixture
def mirrors():
    """mirrors(n) -> n running Mirrors, stopped after the test."""
    started: list[Mirror] = []

    def start(n: int) -> list[Mirror]:
        started.extend(Mirror() for _ in range(n))
        return started[-n:]

    yield start
    for mirror in started:
        mirror.stop()


@pytest.fixture
def refusing_url() -> str:
    """A mirror URL on a port nothing listens on: the connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


@pytest.fixture(scope="module")
def t10k(request, tmp_path_factory) -> dict[str, bytes]:
    """The two t10k files to serve: the real ones when present, else synthetic IDX files."""
    try:
        folder = request.getfixturevalue("real_mnist")
    except pytest.skip.Exception:  # not on this machine: the download logic is tested all the same
        folder = tmp_path_factory.mktemp("synthetic")
        write_idx(folder / T10K_IMAGES, torch.randint(0, 256, (100, 28, 28), dtype=torch.uint8))
        write_idx(folder / T10K_LABELS, torch.randint(0, 10, (100,), dtype=torch.uint8))
    return {name: (folder / name).read_bytes() for name in (T10K_IMAGES, T10K_LABELS)}


def md5_of(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.md5(body).hexdigest() for name, body in files.items()}


def labels_only(t10k: dict[str, bytes]) -> dict[str, bytes]:
    return {T10K_LABELS: t10k[T10K_LABELS]}


def entries(folder: Path) -> list[str]:
    """Everything in the folder, hidden temp files included."""
    return sorted(os.listdir(folder))


# ---- the happy paths ---------------------------------------------------------------------


def test_real_files_arrive_with_the_published_md5(mirrors, real_mnist, tmp_path):
    real = {name: (real_mnist / name).read_bytes() for name in (T10K_IMAGES, T10K_LABELS)}
    (mirror,) = mirrors(1)
    mirror.answers = {name: [serve(body)] for name, body in real.items()}

    download(tmp_path, mirrors=[mirror.url], md5s={name: FILES[name] for name in real}, **FAST)  # production md5s

    assert entries(tmp_path) == sorted(real)
    for name, body in real.items():
        assert (tmp_path / name).read_bytes() == body
    assert read_idx(tmp_path / T10K_IMAGES).shape == (10000, 28, 28)


def test_mirrors_come_from_the_environment(mirrors, refusing_url, t10k, tmp_path, monkeypatch):
    (good,) = mirrors(1)
    good.answers = {name: [serve(body)] for name, body in t10k.items()}
    # The first mirror refuses connections; spaces and an empty entry are ignored.
    monkeypatch.setenv("TINYMNIST_MIRRORS", f"{refusing_url}, {good.url},")

    download(tmp_path, md5s=md5_of(t10k), **FAST)

    assert entries(tmp_path) == sorted(t10k)
    assert good.requested == [T10K_IMAGES, T10K_LABELS]


def test_all_four_files_then_load(mirrors, t10k, tmp_path):
    # The real training images are not available offline: serve synthetic training files.
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    write_idx(synthetic / "train-images-idx3-ubyte.gz", torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8))
    write_idx(synthetic / "train-labels-idx1-ubyte.gz", torch.randint(0, 10, (64,), dtype=torch.uint8))
    files = {path.name: path.read_bytes() for path in synthetic.iterdir()} | t10k
    (mirror,) = mirrors(1)
    mirror.answers = {name: [serve(body)] for name, body in files.items()}
    data_dir = tmp_path / "data" / "nested"  # created on demand

    download(data_dir, mirrors=[mirror.url], md5s=md5_of(files), **FAST)

    assert entries(data_dir) == sorted(FILES)
    mnist = load_mnist(data_dir)
    assert mnist.train_images.shape == (64, 28, 28) and mnist.test_labels.dtype == torch.int64


def test_present_files_are_not_fetched_again(mirrors, t10k, tmp_path):
    (mirror,) = mirrors(1)
    mirror.answers = {name: [serve(body)] for name, body in t10k.items()}
    (tmp_path / T10K_IMAGES).write_bytes(t10k[T10K_IMAGES])
    # An uncompressed copy, as torchvision leaves in MNIST/raw/, counts as present too.
    (tmp_path / T10K_LABELS.removesuffix(".gz")).write_bytes(gzip.decompress(t10k[T10K_LABELS]))

    download(tmp_path, mirrors=[mirror.url], md5s=md5_of(t10k), **FAST)

    assert mirror.requested == []
    assert entries(tmp_path) == sorted([T10K_IMAGES, T10K_LABELS.removesuffix(".gz")])


@pytest.mark.parametrize("keep", [-10, 0], ids=["cut-off", "empty"])
def test_broken_gz_already_present_is_fetched_again(mirrors, t10k, tmp_path, keep):
    (mirror,) = mirrors(1)
    mirror.answers = {T10K_LABELS: [serve(t10k[T10K_LABELS])]}
    (tmp_path / T10K_LABELS).write_bytes(t10k[T10K_LABELS][:keep])  # an earlier run's leftover

    download(tmp_path, mirrors=[mirror.url], md5s=md5_of(labels_only(t10k)), **FAST)

    assert mirror.requested == [T10K_LABELS]
    assert (tmp_path / T10K_LABELS).read_bytes() == t10k[T10K_LABELS]


def test_a_present_file_claiming_more_than_mnist_has_is_fetched_again(mirrors, t10k, tmp_path):
    (mirror,) = mirrors(1)
    mirror.answers = {T10K_LABELS: [serve(t10k[T10K_LABELS])]}
    (tmp_path / T10K_LABELS).write_bytes(gzip.compress(b"\0\0\x08\x01" + (80_000).to_bytes(4, "big")))
    download(tmp_path, mirrors=[mirror.url], md5s=md5_of(labels_only(t10k)), **FAST)
    assert mirror.requested == [T10K_LABELS]
    assert (tmp_path / T10K_LABELS).read_bytes() == t10k[T10K_LABELS]


def test_leftovers_of_a_present_file_are_removed_too(mirrors, t10k, tmp_path):
    (mirror,) = mirrors(1)
    (tmp_path / T10K_LABELS).write_bytes(t10k[T10K_LABELS])
    (tmp_path / f".{T10K_LABELS}.tinymnist-0123abcd.part").write_bytes(b"killed mid-way")
    download(tmp_path, mirrors=[mirror.url], md5s=md5_of(labels_only(t10k)), **FAST)
    assert mirror.requested == []
    assert entries(tmp_path) == [T10K_LABELS]


def test_a_server_that_compresses_on_the_fly_is_not_asked_to(mirrors, t10k, tmp_path):
    (mirror,) = mirrors(1)
    mirror.answers = {T10K_LABELS: [gzip_if_accepted(t10k[T10K_LABELS])]}
    download(tmp_path, mirrors=[mirror.url], md5s=md5_of(labels_only(t10k)), **FAST)
    assert (tmp_path / T10K_LABELS).read_bytes() == t10k[T10K_LABELS]


def test_the_published_md5s_are_those_of_the_real_downloads(real_mnist):
    """The md5 table against the real files as the mirrors serve them (gzipped bytes):
    every file present in the real MNIST folder must have the md5 FILES gives it."""
    present = [name for name in FILES if (real_mnist / name).is_file()]
    assert len(present) >= 2  # the two test files at least
    for name in present:
        assert hashlib.md5((real_mnist / name).read_bytes()).hexdigest() == FILES[name], name
    assert all(url.startswith("https://") and url.endswith("/") for url in DEFAULT_MIRRORS)


# ---- faults --------------------------------------------------------------------------------


def test_5xx_is_retried_on_the_same_mirror(mirrors, t10k, tmp_path):
    (mirror,) = mirrors(1)
    mirror.answers = {T10K_LABELS: [status(503), serve(t10k[T10K_LABELS])]}
    download(tmp_path, mirrors=[mirror.url], md5s=md5_of(labels_only(t10k)), **FAST)
    assert mirror.requested == [T10K_LABELS, T10K_LABELS]
    assert (tmp_path / T10K_LABELS).read_bytes() == t10k[T10K_LABELS]


def test_persistent_5xx_moves_to_the_next_mirror(mirrors, t10k, tmp_path):
    failing, good = mirrors(2)
    failing.answers = {T10K_LABELS: [status(503)]}
    good.answers = {T10K_LABELS: [serve(t10k[T10K_LABELS])]}
    download(tmp_path, mirrors=[failing.url, good.url], md5s=md5_of(labels_only(t10k)), **FAST)
    assert failing.requested == [T10K_LABELS] * PATIENT.attempts
    assert good.requested == [T10K_LABELS]
    assert entries(tmp_path) == [T10K_LABELS]


@pytest.mark.parametrize("code", [403, 404])
def test_4xx_moves_on_without_retrying(mirrors, t10k, tmp_path, code):
    failing, good = mirrors(2)
    failing.answers = {T10K_LABELS: [status(code)]}
    good.answers = {T10K_LABELS: [serve(t10k[T10K_LABELS])]}
    download(tmp_path, mirrors=[failing.url, good.url], md5s=md5_of(labels_only(t10k)), **FAST)
    assert failing.requested == [T10K_LABELS]
    assert (tmp_path / T10K_LABELS).read_bytes() == t10k[T10K_LABELS]


def test_retries_back_off_exponentially(mirrors, t10k, tmp_path, monkeypatch):
    pauses = []
    monkeypatch.setattr("tinymnist.data.fetch.time.sleep", pauses.append)
    (mirror,) = mirrors(1)
    mirror.answers = {T10K_LABELS: [status(500)]}
    slow = FAST | {"patience": Patience(attempts=4, backoff=0.5)}
    with pytest.raises(DownloadError, match=r"HTTP 500 \(4 tries\)"):
        download(tmp_path, mirrors=[mirror.url], md5s=md5_of(labels_only(t10k)), **slow)
    assert pauses == [0.5, 1.0, 2.0]
    assert len(mirror.requested) == 4


def test_wrong_bytes_move_to_the_next_mirror(mirrors, t10k, tmp_path):
    wrong, good = mirrors(2)
    wrong.answers = {T10K_IMAGES: [serve(t10k[T10K_IMAGES][::-1])]}  # right length, wrong bytes
    good.answers = {T10K_IMAGES: [serve(t10k[T10K_IMAGES])]}
    download(tmp_path, mirrors=[wrong.url, good.url], md5s=md5_of({T10K_IMAGES: t10k[T10K_IMAGES]}), **FAST)
    assert wrong.requested == [T10K_IMAGES]  # a checksum mismatch is not retried
    assert (tmp_path / T10K_IMAGES).read_bytes() == t10k[T10K_IMAGES]


def test_cut_off_body_is_retried(mirrors, t10k, tmp_path):
    (mirror,) = mirrors(1)
    mirror.answers = {T10K_IMAGES: [cut_off(t10k[T10K_IMAGES]), serve(t10k[T10K_IMAGES])]}
    download(tmp_path, mirrors=[mirror.url], md5s=md5_of({T10K_IMAGES: t10k[T10K_IMAGES]}), **FAST)
    assert mirror.requested == [T10K_IMAGES, T10K_IMAGES]
    assert entries(tmp_path) == [T10K_IMAGES]
    assert (tmp_path / T10K_IMAGES).read_bytes() == t10k[T10K_IMAGES]


def test_timeout_is_retried(mirrors, t10k, tmp_path):
    (mirror,) = mirrors(1)
    mirror.answers = {T10K_LABELS: [stall(2.0), serve(t10k[T10K_LABELS])]}
    download(
        tmp_path,
        mirrors=[mirror.url],
        md5s=md5_of(labels_only(t10k)),
        **FAST | {"patience": Patience(read_timeout=0.2, attempts=2, backoff=0.0)},
    )
    assert mirror.requested == [T10K_LABELS, T10K_LABELS]
    assert (tmp_path / T10K_LABELS).read_bytes() == t10k[T10K_LABELS]


def test_every_mirror_failing_explains_each_answer(mirrors, refusing_url, t10k, tmp_path):
    unavailable, cut, wrong = mirrors(3)
    unavailable.answers = {T10K_IMAGES: [status(503)]}
    cut.answers = {T10K_IMAGES: [cut_off(t10k[T10K_IMAGES])]}
    wrong.answers = {T10K_IMAGES: [serve(b"\0\0\x08\x01\0\0\0\x00")]}  # a valid, empty IDX file
    urls = [unavailable.url, cut.url, wrong.url, refusing_url]

    with pytest.raises(DownloadError) as caught:
        download(tmp_path, mirrors=urls, md5s=md5_of({T10K_IMAGES: t10k[T10K_IMAGES]}), **FAST)

    assert isinstance(caught.value, TinyMnistError)
    line = next(line for line in str(caught.value).splitlines() if line.startswith(f"{T10K_IMAGES}: "))
    answers = line.removeprefix(f"{T10K_IMAGES}: ").split("; ")
    assert [answer.split(": ", 1)[0] for answer in answers] == [url + T10K_IMAGES for url in urls]
    assert "HTTP 503 (2 tries)" in answers[0]
    assert re.search(rf"body cut off after \d+ of {len(t10k[T10K_IMAGES])} bytes", answers[1])
    assert "md5 mismatch (got " in answers[2]
    assert answers[3].endswith("Connection refused (2 tries)")
    for instruction in (str(tmp_path), "TINYMNIST_DATA", "--data-dir", "TINYMNIST_MIRRORS"):
        assert instruction in str(caught.value)
    assert entries(tmp_path) == []  # no file under the final name, no temp file
    with pytest.raises(DownloadError):  # into folders of its own making: none left behind empty
        download(tmp_path / "new" / "data", mirrors=urls[:1], md5s=md5_of({T10K_IMAGES: t10k[T10K_IMAGES]}), **FAST)
    assert entries(tmp_path) == []


def test_a_file_that_arrived_stays_when_another_fails(mirrors, t10k, tmp_path):
    (mirror,) = mirrors(1)
    mirror.answers = {T10K_LABELS: [serve(t10k[T10K_LABELS])], T10K_IMAGES: [status(404)]}
    with pytest.raises(DownloadError) as caught:
        download(tmp_path, mirrors=[mirror.url], md5s=md5_of(t10k), **FAST)
    assert entries(tmp_path) == [T10K_LABELS]
    assert (tmp_path / T10K_LABELS).read_bytes() == t10k[T10K_LABELS]
    assert f"{T10K_IMAGES}: {mirror.url}{T10K_IMAGES}: HTTP 404" in str(caught.value).splitlines()
    assert f"{T10K_LABELS}:" not in str(caught.value)


def test_a_mirror_whose_name_does_not_resolve_is_asked_once_in_a_run(mirrors, t10k, tmp_path, capsys, monkeypatch):
    """No network (or a wrong host name): no retries, no second file asked of it. `.invalid` never
    resolves (RFC 2606); a proxy would answer for it, so none is used."""
    for proxy in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    (good,) = mirrors(1)
    good.answers = {name: [serve(body)] for name, body in t10k.items()}
    nowhere = "http://mnist-mirror.invalid/"

    download(tmp_path, mirrors=[nowhere, good.url], md5s=md5_of(t10k), **FAST)

    assert entries(tmp_path) == sorted(t10k)
    said = [line for line in capsys.readouterr().err.splitlines() if nowhere in line]
    assert said[0] == f"downloading {nowhere}{T10K_IMAGES}"
    assert said[1].startswith(f"{nowhere}{T10K_IMAGES}: ") and "no network, or a wrong mirror name" in said[1]
    assert said[2].startswith(f"{nowhere}{T10K_LABELS}: not asked: ") and len(said) == 3


def test_data_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(DownloadError, match=re.escape(f"cannot create the data folder {tmp_path / 'a-file' / 'data'}")):
        download(tmp_path / "a-file" / "data", mirrors=["http://127.0.0.1:9/"], **FAST)


def test_a_file_as_the_data_folder_is_named_as_such_and_left_alone(tmp_path):
    file = tmp_path / "cases.txt"
    file.write_text("my notes")
    calls = (
        lambda: download(file, mirrors=["http://127.0.0.1:9/"], **FAST),
        lambda: load_mnist(file),
        lambda: load_mnist(file, download=True),
        lambda: build_from(tmp_path / "mnist.pkl.gz", file),  # refused before the source is read
    )
    refusal = re.escape(f"the data folder {file} is a file, not a folder; choose a folder")
    for call in calls:
        with pytest.raises(TinyMnistError, match=refusal):
            call()
    assert entries(tmp_path) == ["cases.txt"] and file.read_text() == "my notes"


def test_full_disk_is_a_project_error(mirrors, t10k, tmp_path, monkeypatch):
    (mirror,) = mirrors(1)
    mirror.answers = {T10K_LABELS: [serve(t10k[T10K_LABELS])]}

    def full_disk(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("tinymnist.data.fetch.atomic_write", full_disk)
    expected = f"cannot write into the data folder {tmp_path}: No space left on device"
    with pytest.raises(DownloadError, match=re.escape(expected)):
        download(tmp_path, mirrors=[mirror.url], md5s=md5_of(labels_only(t10k)), **FAST)


def test_ctrl_c_mid_download_leaves_nothing(mirrors, t10k, tmp_path, monkeypatch):
    (mirror,) = mirrors(1)
    mirror.answers = {T10K_IMAGES: [serve(t10k[T10K_IMAGES])]}
    real_iter_content = requests.Response.iter_content

    def first_chunk_then_ctrl_c(response, *args, **kwargs):
        yield next(real_iter_content(response, *args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(requests.Response, "iter_content", first_chunk_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        download(tmp_path, mirrors=[mirror.url], md5s=md5_of(t10k), **FAST)
    assert entries(tmp_path) == []


def test_progress_bar_only_when_asked_or_on_a_terminal(mirrors, t10k, tmp_path, capsys):
    (mirror,) = mirrors(1)
    mirror.answers = {T10K_LABELS: [serve(t10k[T10K_LABELS])]}
    md5s = md5_of(labels_only(t10k))

    download(tmp_path / "quiet", mirrors=[mirror.url], md5s=md5s, **FAST | {"progress": None})
    quiet = capsys.readouterr()  # pytest's stderr is not a terminal: no bar, only what was fetched
    assert quiet == ("", f"downloading {mirror.url}{T10K_LABELS}\n")

    download(tmp_path / "shown", mirrors=[mirror.url], md5s=md5s, **FAST | {"progress": True})
    shown = capsys.readouterr()
    assert shown.out == "" and T10K_LABELS in shown.err
    assert re.search(r"(\S+)/\1 (bytes|kB|MB)", shown.err)  # the byte counter: done/total, all done
