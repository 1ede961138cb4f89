"""`tinymnist bench --busy-core`: both steps, quiet and busy in turn, and a busy process that
never outlives bench, however bench ends."""

import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.support import assert_user_error, run
from tinymnist.errors import TinyMnistError
from tinymnist.tool import busy_core


def spy_on_busy_processes(monkeypatch) -> list:
    """Every busy process bench starts, each checked to be spinning when its windows start;
    windows of a fraction of a second (the real ones last seconds)."""
    children, real = [], busy_core.busy_core

    @contextlib.contextmanager
    def spied(*args, **kwargs):
        with real(*args, **kwargs) as child:
            assert child.poll() is None
            children.append(child)
            yield child

    monkeypatch.setattr(busy_core, "busy_core", spied)
    monkeypatch.setattr(busy_core, "WINDOW_SECONDS", 0.2)
    monkeypatch.setattr(busy_core, "SETTLE_SECONDS", 0.05)
    return children


def busy_core_bench(tmp_path, *extra):
    args = ("--models", "mlp", "--busy-core", "--device", "cpu", "--no-compile", "--warmup", 0)
    return run("bench", *args, "--data-dir", tmp_path / "none", *extra)


def per_round(numerator, denominator):
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def test_busy_core_bench_reports_both_steps_quiet_and_busy(tmp_path, monkeypatch):
    """Quiet and busy windows in turn, a busy process of its own for each round's busy windows,
    gone afterwards; the JSON and the table have every side, their ratios."""
    children = spy_on_busy_processes(monkeypatch)
    out = tmp_path / "busy.json"
    result = busy_core_bench(tmp_path, "--repeats", 3, "--json", out)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "mlp" and row["loop"] == "eager" and row["first_step_seconds"] > 0
    for step in ("fixed", "adaptive"):
        for load in ("quiet", "busy"):
            windows = row[step][load]["windows"]
            assert len(windows) == 3 and row[step][load]["images_per_second"] == statistics.median(windows)
        # each round's busy window over its quiet one, the median of those: load drifting between rounds cancels
        ratio = per_round(row[step]["busy"]["windows"], row[step]["quiet"]["windows"])
        assert row[step]["busy_vs_quiet"] == pytest.approx(ratio)
        assert f"{ratio:.2f}x" in result.stdout
    quiet = per_round(row["adaptive"]["quiet"]["windows"], row["fixed"]["quiet"]["windows"])
    assert row["adaptive_vs_fixed_quiet"] == pytest.approx(quiet)
    assert len(children) == 3 and all(child.returncode is not None for child in children)


@pytest.mark.parametrize(("error", "exit_code"), [(RuntimeError, 1), (KeyboardInterrupt, 130)])
def test_the_busy_process_is_gone_when_bench_fails_or_is_interrupted(tmp_path, monkeypatch, error, exit_code):
    children, real_window = spy_on_busy_processes(monkeypatch), busy_core.timed_window

    def timed_window(*args):
        if children:  # the first busy window
            raise error("in the busy window")
        return real_window(*args)

    monkeypatch.setattr(busy_core, "timed_window", timed_window)
    result = busy_core_bench(tmp_path, "--repeats", 2)
    assert result.exit_code == exit_code, result.output
    (child,) = children
    assert child.returncode is not None


def test_the_busy_process_stops_at_its_time_limit():
    """Bounded: it stops by itself; windows that outlasted it would be timed partly quiet,
    so bench says so instead of reporting them."""
    with pytest.raises(TinyMnistError, match="outlasted"), busy_core.busy_core(seconds=0.1) as child:
        child.wait(timeout=120)
    assert child.returncode == 0


def process_gone(pid: int) -> bool:
    """No such process, or a zombie left for its new parent to reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


KILLED_BENCH = """
from tinymnist.tool import busy_core
with busy_core.busy_core() as child:
    print(child.pid, flush=True)
    child.wait()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_busy_process_stops_when_bench_is_killed():
    """SIGKILL runs no `finally`: the busy process sees its parent gone and stops by itself."""
    parent = subprocess.Popen([sys.executable, "-c", KILLED_BENCH], stdout=subprocess.PIPE, text=True)
    busy_pid = int(parent.stdout.readline())
    assert not process_gone(busy_pid)
    parent.kill()
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 120  # a bound for a hung test, not a measurement
    while not process_gone(busy_pid):
        assert time.monotonic() < deadline, f"busy process {busy_pid} outlived its killed parent"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "other", [["--seeds", "2"], ["--time-to-accuracy", "0.99"], ["--window-images", "64"], ["--device", "cuda"]]
)
def test_busy_core_refuses_what_does_not_apply(other):
    assert_user_error(run("bench", "--busy-core", *other), "--busy-core", other[0])


def test_busy_core_on_one_thread_is_refused():
    """With one thread there is nothing to drop: the adaptive step is the fixed one, and the
    comparison would only time noise (torch takes OMP_NUM_THREADS=1 this way)."""
    torch.set_num_threads(1)  # conftest restores the count
    assert_user_error(run("bench", "--busy-core", "--models", "mlp"), "--busy-core", "1 thread", "OMP_NUM_THREADS")
