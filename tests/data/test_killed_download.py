"""kill -9 in the middle of `tinymnist download` leaves a temp file; the next download removes it,
and nothing else."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import torch

from tests.support.mirror import Mirror, serve, trickle
from tinymnist.data import download
from tinymnist.data.fetch import Patience
from tinymnist.data.idx import write_idx

IMAGES = "train-images-idx3-ubyte.gz"  # the first file `tinymnist download` fetches
POLL = 0.05  # seconds between looks for the temp file


def test_the_next_download_removes_what_kill_9_left(tmp_path):
    write_idx(tmp_path / "served.gz", torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8))
    body = (tmp_path / "served.gz").read_bytes()
    data = tmp_path / "data"
    data.mkdir()
    unrelated = [".train-images-idx3-ubyte.gz.12345.part", ".notes.txt", "train-images-idx3-ubyte.gz.part"]
    for name in unrelated:
        (data / name).write_bytes(b"not tinymnist's to delete")

    mirror = Mirror()
    try:
        mirror.answers = {IMAGES: [trickle(body, pause=POLL)]}  # slow enough to be caught mid-way
        env = os.environ | {"TINYMNIST_MIRRORS": mirror.url}
        child = subprocess.Popen(
            [sys.executable, "-m", "tinymnist", "download", "--data-dir", data],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while not any(name.startswith(f".{IMAGES}.tinymnist-") for name in os.listdir(data)):
                assert child.poll() is None, "the download ended before it could be killed"
                time.sleep(POLL)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        leftovers = [name for name in os.listdir(data) if name not in unrelated]
        assert len(leftovers) == 1 and leftovers[0].startswith(f".{IMAGES}.tinymnist-"), leftovers

        mirror.answers = {IMAGES: [serve(body)]}
        download(
            data,
            mirrors=[mirror.url],
            md5s={IMAGES: hashlib.md5(body).hexdigest()},
            progress=False,
            patience=Patience(backoff=0),
        )
    finally:
        mirror.stop()

    assert sorted(os.listdir(data)) == sorted([IMAGES, *unrelated])
    assert (data / IMAGES).read_bytes() == body
