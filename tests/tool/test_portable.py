"""tinymnist on a system without `fcntl` and `resource` (Windows has neither): train, eval,
resume and the refusal of a second run on a held output still work.

Each command runs as users run it, `python -m tinymnist`, in a process where importing
either module fails (`sys.modules[name] = None`), so a top-level import anywhere in the
package is an ImportError here. Linux without fcntl has no file locks at all: tinymnist
then takes the lock file's existence as the lock.
"""

import json
import os
import subprocess
import sys
import textwrap

from tinymnist.tool import outputs

WITHOUT_FCNTL = textwrap.dedent("""
    import sys, warnings
    sys.modules["fcntl"] = None
    sys.modules["resource"] = None
    # filelock says at import that it falls back to soft locks; no real system gets here
    # (Windows has its own locks), so the line is noise in these tests
    warnings.filterwarnings("ignore", "only soft file lock is available")
    from tinymnist.tool.entry import main
    sys.argv[0] = "tinymnist"
    main()
""")

HOLD_WITHOUT_FCNTL = textwrap.dedent("""
    import sys, warnings
    sys.modules["fcntl"] = None
    warnings.filterwarnings("ignore", "only soft file lock is available")
    from pathlib import Path
    from tinymnist.tool import outputs
    with outputs.exclusive({"--save-model": Path(sys.argv[1])}):
        print("holding", flush=True)
        sys.stdin.readline()
""")


def tinymnist(*args) -> subprocess.CompletedProcess:
    """`tinymnist ARGS` in a process that cannot import fcntl or resource."""
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_FCNTL, *map(str, args)], capture_output=True, text=True, timeout=600
    )


def train(data, *extra) -> subprocess.CompletedProcess:
    return tinymnist(
        "train", "--model", "mlp", "--device", "cpu", "--no-compile", "--data-dir", data, "--no-download", *extra
    )


def assert_refused_naming(result: subprocess.CompletedProcess, flag: str, pid: int) -> None:
    """Exit 2 and one line on stderr: the flag, the holder's pid, no traceback."""
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"tinymnist: error: {flag} ") and "is in use by another tinymnist run" in line, line
    assert f"(pid {pid})" in line, line


def test_train_eval_and_resume_without_fcntl_or_resource(tiny_split, tmp_path):
    checkpoint, metrics, resumed = tmp_path / "mlp.pt", tmp_path / "mlp.jsonl", tmp_path / "mlp2.pt"

    trained = train(tiny_split, "--epochs", 1, "--save-model", checkpoint, "--metrics", metrics)
    assert trained.returncode == 0, trained.stderr
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [0, 1]

    evaluated = tinymnist("eval", checkpoint, "--json", "--data-dir", tiny_split, "--no-download", "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["epoch"] == 1

    continued = train(tiny_split, "--resume", checkpoint, "--epochs", 2, "--save-model", resumed)
    assert continued.returncode == 0, continued.stderr
    again = tinymnist("eval", resumed, "--json", "--data-dir", tiny_split, "--no-download", "--device", "cpu")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["epoch"] == 2

    assert sorted(os.listdir(tmp_path)) == ["mlp.jsonl", "mlp.pt", "mlp2.pt"]  # no lock or temp file left


def test_a_held_output_is_refused_naming_the_holder(tiny_split, tmp_path):
    """Held here, with the OS lock, as any tinymnist run holds its outputs."""
    checkpoint = tmp_path / "mlp.pt"
    with outputs.exclusive({"--save-model": checkpoint}):
        second = train(tiny_split, "--epochs", 1, "--save-model", checkpoint)
    assert_refused_naming(second, "--save-model", os.getpid())
    assert os.listdir(tmp_path) == []  # nothing trained, nothing written, the lock file gone


def test_where_there_are_no_file_locks_the_lock_file_is_the_lock(tiny_split, tmp_path):
    checkpoint = tmp_path / "mlp.pt"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_WITHOUT_FCNTL, checkpoint], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "holding\n"
        second = train(tiny_split, "--epochs", 1, "--save-model", checkpoint)
    finally:
        holder.communicate("done\n", timeout=60)
    assert_refused_naming(second, "--save-model", holder.pid)
    assert f"if that run has ended, delete {outputs.lock_path(checkpoint)}" in second.stderr
    assert os.listdir(tmp_path) == []  # the holder's clean exit deleted its lock file
