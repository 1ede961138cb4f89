"""Data parallelism across processes (issue 13): real 2-process gloo runs on the CPU.

The single-process run is the oracle: an mlp (no dropout) trained by two processes on
halves of each global batch takes the same steps as one process on the whole batch.
Processes start either through torchrun (`python -m torch.distributed.run`, the command
users type) or directly with the environment torchrun gives each worker, which lets a
test read each rank's own output and kill one rank.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.support import assert_user_error, needs_cpp_compiler, run, train_args
from tinymnist.data import files
from tinymnist.errors import TinyMnistError
from tinymnist.tool import checkpoint, torchrun

MLP = ["--model", "mlp", "--log-interval", "1"]
# A guard against a hang, not a measured threshold: the survivor must stop within the
# collective timeout; a test that waits past this has found a hang.
HANG_GUARD_S = torchrun.COLLECTIVE_TIMEOUT.seconds + 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_args(data_dir, *extra) -> list[str]:
    return [str(a) for a in train_args(data_dir, *MLP, *extra)]


def quiet_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on a 2-core CI machine


def run_torchrun(data_dir, *extra, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "tinymnist",
        *cli_args(data_dir, *extra),
    ]
    return subprocess.run(command, capture_output=True, text=True, env=quiet_env(), timeout=600)


def one_process(data_dir, *extra) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tinymnist", *cli_args(data_dir, *extra)]
    return subprocess.run(command, capture_output=True, text=True, env=quiet_env(), timeout=600)


def start_ranks(data_dir, *extra, world_size: int = 2) -> list[subprocess.Popen]:
    """The processes torchrun would start, each with its RANK, WORLD_SIZE, LOCAL_RANK."""
    port = free_port()
    return [start_rank(data_dir, rank, world_size, port, *extra) for rank in range(world_size)]


def start_rank(data_dir, rank: int, world_size: int, port: int, *extra, env=None) -> subprocess.Popen:
    """One of them: rank `rank` of `world_size`, meeting at 127.0.0.1:`port`."""
    return subprocess.Popen(
        [sys.executable, "-m", "tinymnist", *cli_args(data_dir, *extra)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **quiet_env(),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            **(env or {}),
        },
    )


def logged_losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"^Train Epoch: .*\tLoss: ([0-9.]+)$", stdout, re.MULTILINE)]


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_take_the_single_process_steps(tiny_split, tmp_path):
    ranks = start_ranks(
        tiny_split, "--epochs", 2, "--metrics", tmp_path / "two.jsonl", "--save-model", tmp_path / "two.pt"
    )
    outs = [rank.communicate(timeout=600) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outs
    single = one_process(tiny_split, "--epochs", 2, "--metrics", tmp_path / "one.jsonl")
    assert single.returncode == 0, single.stderr

    (leader_out, _), (follower_out, follower_err) = outs
    assert follower_out == "" and follower_err == ""  # one voice: rank 0's
    two, one = logged_losses(leader_out), logged_losses(single.stdout)
    assert len(two) == len(one) == 2 * 10  # 600 images in global batches of 64: 10 steps an epoch
    assert two == pytest.approx(one, rel=1e-5)
    assert leader_out.count("Final test accuracy") == 1

    two_records, one_records = metrics(tmp_path / "two.jsonl"), metrics(tmp_path / "one.jsonl")
    assert [r["epoch"] for r in two_records] == [0, 1, 2]  # one line per evaluation, written once
    assert abs(two_records[-1]["test_accuracy"] - one_records[-1]["test_accuracy"]) <= 0.002
    assert two_records[-1]["test_loss"] == pytest.approx(one_records[-1]["test_loss"], rel=1e-5)

    evaluated = run("eval", tmp_path / "two.pt", "--json", "--device", "cpu", "--data-dir", tiny_split, "--no-download")
    assert evaluated.exit_code == 0, evaluated.output
    record = json.loads(evaluated.stdout)
    assert (record["epoch"], record["correct"]) == (2, two_records[-1]["correct"])


def test_checkpoints_cross_between_torchrun_and_one_process(tiny_split, tmp_path):
    """Epoch 1 by torchrun, epoch 2 by one process, and the other way round: both end
    where one process training both epochs ends."""
    reference = one_process(tiny_split, "--epochs", 2, "--save-model", tmp_path / "ref.pt")
    assert reference.returncode == 0, reference.stderr
    first = run_torchrun(tiny_split, "--epochs", 1, "--save-model", tmp_path / "torchrun1.pt")
    assert first.returncode == 0, first.stderr
    then = one_process(
        tiny_split, "--epochs", 2, "--resume", tmp_path / "torchrun1.pt", "--save-model", tmp_path / "torchrun1_one2.pt"
    )
    assert then.returncode == 0, then.stderr
    first = one_process(tiny_split, "--epochs", 1, "--save-model", tmp_path / "one1.pt")
    assert first.returncode == 0, first.stderr
    then = run_torchrun(
        tiny_split, "--epochs", 2, "--resume", tmp_path / "one1.pt", "--save-model", tmp_path / "one1_torchrun2.pt"
    )
    assert then.returncode == 0, then.stderr
    assert then.stdout.count("Final test accuracy") == 1

    # Adam moves a weight by about lr = 1e-3 a step, whatever its gradient's size, so float
    # rounding in the all-reduced gradient shows as ~1e-6; a wrong resume shows as ~1e-3.
    _, expected = checkpoint.load(tmp_path / "ref.pt", torch.device("cpu"))
    for crossed in ("torchrun1_one2.pt", "one1_torchrun2.pt"):
        _, state = checkpoint.load(tmp_path / crossed, torch.device("cpu"))
        assert state.epoch == 2
        for name, value in expected.params.items():
            torch.testing.assert_close(state.params[name], value, rtol=1e-4, atol=1e-5, msg=f"{crossed}: {name}")


def test_a_killed_rank_stops_the_other_with_one_line_and_the_checkpoint_resumes(tiny_split, tmp_path):
    saved = tmp_path / "model.pt"
    ranks = start_ranks(tiny_split, "--epochs", 10_000, "--save-model", saved)
    while not saved.exists():  # mid-run: at least one epoch checkpointed
        assert ranks[0].poll() is None and ranks[1].poll() is None, ranks[0].communicate()
        time.sleep(0.1)
    ranks[1].send_signal(signal.SIGKILL)
    _, stderr = ranks[0].communicate(timeout=HANG_GUARD_S)
    ranks[1].communicate()

    assert ranks[0].returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinymnist: error: rank 0 of 2: lost rank 1"), stderr
    assert f"is kept in {saved}" in lines[0]
    _, state = checkpoint.load(saved, torch.device("cpu"))  # intact: it loads and validates whole
    assert not [p.name for p in tmp_path.iterdir() if files.temp_pattern(saved).fullmatch(p.name)]  # no temp file

    resumed = one_process(tiny_split, "--epochs", state.epoch + 1, "--resume", saved, "--save-model", saved)
    assert resumed.returncode == 0, resumed.stderr
    _, after = checkpoint.load(saved, torch.device("cpu"))
    assert after.epoch == state.epoch + 1


def test_a_batch_the_processes_cannot_share_is_one_line(tiny_split, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    result = run(*cli_args(tiny_split, "--batch-size", 63))
    assert_user_error(result, "--batch-size 63", "2 processes")


@pytest.mark.parametrize(
    ("rank", "world_size", "fragment"),
    [("abc", "2", "must be whole numbers"), ("0", "0", "WORLD_SIZE=0"), ("2", "2", "RANK=2 of WORLD_SIZE=2")],
)
def test_torchrun_variables_set_by_hand_are_checked_before_any_wait(
    tiny_split, monkeypatch, rank, world_size, fragment
):
    """RANK=abc was a ValueError, WORLD_SIZE=0 a ZeroDivisionError, RANK >= WORLD_SIZE a wait for minutes."""
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert_user_error(run(*cli_args(tiny_split)), fragment, "start with torchrun")


def test_a_rank_with_no_rank_0_to_meet_says_so_in_one_line_after_its_timeout(tiny_split):
    """It waited twice the collective timeout inside torch's C++ connect, printing C++ stack lines."""
    port = free_port()  # nothing listens there
    rank_1 = start_rank(tiny_split, 1, 2, port, env={torchrun.RENDEZVOUS_TIMEOUT_ENV: "1"})
    _, stderr = rank_1.communicate(timeout=60)
    assert rank_1.returncode == 2, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("tinymnist: error: rank 1 of 2: no rank 0 answered"), line
    for fragment in ("MASTER_ADDR=127.0.0.1", f"MASTER_PORT={port}", "within 1 s", "start rank 0"):
        assert fragment in line, line


def test_sigterm_ends_a_rank_waiting_for_rank_0_at_once(tiny_split):
    """torch's C++ connect held SIGTERM back for minutes. The wait is a Python loop now: a
    signal ends it between two tries, as it ends every other part of a run."""
    rank_1 = start_rank(tiny_split, 1, 2, free_port())
    time.sleep(8)  # past the imports (seconds): waiting for a rank 0 that never comes
    rank_1.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    rank_1.communicate(timeout=HANG_GUARD_S)
    assert rank_1.returncode == 143
    assert time.monotonic() - sent < 5


def test_without_torchrun_there_is_no_process_group():
    assert torchrun.from_env({}) is None
    assert torchrun.from_env({"RANK": "1"}) is None  # one stray variable says nothing about a group
    with pytest.raises(TinyMnistError, match="LOCAL_RANK is not"):  # a group meant by hand, not trained alone
        torchrun.from_env({"RANK": "1", "WORLD_SIZE": "2"})
    assert torchrun.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == torchrun.Cluster(3, 4, 1)


@needs_cpp_compiler
def test_the_all_reduce_compiles_into_the_one_step_graph(tiny_split):
    """--micro-batch 0: the whole step, functional all-reduce included, is one fullgraph
    torch.compile (a graph break would raise); it takes the eager single process's steps."""
    ranks = start_ranks(tiny_split, "--epochs", 1, "--compile", "--micro-batch", 0)
    outs = [rank.communicate(timeout=600) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outs
    single = one_process(tiny_split, "--epochs", 1)
    assert logged_losses(outs[0][0]) == pytest.approx(logged_losses(single.stdout), rel=1e-5)
    assert len(logged_losses(single.stdout)) == 10
    assert "s compiling)" in outs[0][0]  # --compile (after train_args' --no-compile) took effect


# ---- sweeps: the models split over the processes (distributed_sweep.py) -----------------


def without_timings(records: list[dict]) -> list[dict]:
    """Records as equal runs write them: the wall-clock fields differ from run to run."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in records]


def test_a_sweep_over_two_processes_is_the_one_process_sweep(tiny_split, tmp_path):
    """--seeds 3 over 2 processes (shares of 2 and 1 models): the same records as one process,
    epoch by epoch, and checkpoints that cross: epoch 1 by the processes and epoch 2 by one
    process, and the other way round, end in the same N models."""
    sweep, m = ("--seeds", 3), tmp_path
    ranks = start_ranks(
        tiny_split, *sweep, "--epochs", 1, "--metrics", m / "two_first.jsonl", "--save-model", m / "two1.pt"
    )
    outs = [rank.communicate(timeout=600) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outs
    (leader_out, _), (follower_out, follower_err) = outs
    assert follower_out == "" and follower_err == ""  # one voice: rank 0's
    assert leader_out.count("Final test accuracy over 3 models") == 1
    then = one_process(
        tiny_split,
        *sweep,
        "--epochs",
        2,
        "--resume",
        m / "two1.pt",
        "--metrics",
        m / "two_first.jsonl",
        "--save-model",
        m / "two1_one2.pt",
    )
    assert then.returncode == 0, then.stderr

    first = one_process(
        tiny_split, *sweep, "--epochs", 1, "--metrics", m / "one_first.jsonl", "--save-model", m / "one1.pt"
    )
    assert first.returncode == 0, first.stderr
    ranks = start_ranks(
        tiny_split,
        *sweep,
        "--epochs",
        2,
        "--resume",
        m / "one1.pt",
        "--metrics",
        m / "one_first.jsonl",
        "--save-model",
        m / "one1_two2.pt",
    )
    outs = [rank.communicate(timeout=600) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outs

    two_first, one_first = metrics(m / "two_first.jsonl"), metrics(m / "one_first.jsonl")
    assert [(r["epoch"], r.get("seed")) for r in two_first] == [(e, s) for e in (0, 1, 2) for s in (1, 2, 3, None)]
    for two, one in zip(without_timings(two_first), without_timings(one_first), strict=True):
        # the ensemble's probabilities are summed over the processes first: its loss may differ in the last bits
        assert two.pop("test_loss") == pytest.approx(one.pop("test_loss"), rel=1e-6)
        assert two == one  # accuracies, counts, train losses, rates: each model's, exactly
    _, expected = checkpoint.load(m / "two1_one2.pt", torch.device("cpu"))
    _, crossed = checkpoint.load(m / "one1_two2.pt", torch.device("cpu"))
    torch.testing.assert_close(crossed.params, expected.params, rtol=0, atol=0)
    torch.testing.assert_close(crossed.opt_state, expected.opt_state, rtol=0, atol=0)
    assert torch.equal(crossed.rng["shuffle"], expected.rng["shuffle"])  # (3, L): every model's data order

    evaluated = run("eval", m / "one1_two2.pt", "--json", "--device", "cpu", "--data-dir", tiny_split, "--no-download")
    assert evaluated.exit_code == 0, evaluated.output
    lines = [json.loads(line) for line in evaluated.stdout.splitlines()]
    assert [(line["correct"], line.get("seed")) for line in lines] == [
        (r["correct"], r.get("seed")) for r in one_first[-4:]
    ]


def test_more_processes_than_models_is_one_line(tiny_split, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "5")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    result = run(*cli_args(tiny_split, "--seeds", 2, "--lr", "0.001,0.002"))
    assert_user_error(result, "5 processes for 4 models", "at most 4 processes")


@pytest.mark.parametrize(("n_models", "world_size"), [(1, 1), (2, 2), (3, 2), (7, 3), (8, 3), (8, 4)])
def test_the_shares_cover_every_model_once_as_evenly_as_can_be(n_models, world_size):
    rows = [torchrun.share(n_models, torchrun.Cluster(r, world_size, r)) for r in range(world_size)]
    assert [i for part in rows for i in range(n_models)[part]] == list(range(n_models))  # contiguous, in rank order
    sizes = [len(range(n_models)[part]) for part in rows]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
