"""Output files: every path that cannot work is refused up front, one run per file, no leftovers."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import remount_read_only, tmpfs
from tinymnist.errors import TinyMnistError
from tinymnist.tool import outputs
from tinymnist.tool.tensorboard import refuse_earlier_events

FLAG = "--save-model"


def refused(path: Path, *words: str) -> str:
    """check_output_path's message for `path`, after checking it names the flag, the path, `words`."""
    with pytest.raises(TinyMnistError) as caught:
        outputs.check_output_path(path, FLAG)
    message = str(caught.value)
    assert "\n" not in message and f"{FLAG} {path}" in message
    for word in words:
        assert word in message
    return message


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_a_new_file_in_a_writable_folder_and_an_existing_file_pass_and_leave_nothing(tmp_path):
    (tmp_path / "old.pt").write_bytes(b"previous run")
    for name in ("new.pt", "old.pt"):
        outputs.check_output_path(tmp_path / name, FLAG)
    assert listing(tmp_path) == ["old.pt"]
    assert (tmp_path / "old.pt").read_bytes() == b"previous run"


def test_a_relative_path_in_the_current_folder_passes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outputs.check_output_path(Path("run.pt"), FLAG)
    assert listing(tmp_path) == []


def test_symbolic_links_are_refused_naming_their_target(tmp_path):
    (tmp_path / "real.pt").write_bytes(b"kept")
    (tmp_path / "link.pt").symlink_to(tmp_path / "real.pt")
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "nowhere.pt")
    refused(tmp_path / "link.pt", "symbolic link", str(tmp_path / "real.pt"), "real path")
    refused(tmp_path / "dangling.pt", "symbolic link")
    assert (tmp_path / "link.pt").is_symlink() and (tmp_path / "real.pt").read_bytes() == b"kept"


def test_a_folder_a_device_and_a_pipe_are_refused(tmp_path):
    refused(tmp_path, "is a folder", str(tmp_path / "run.pt"))
    refused(Path(os.devnull), "device", "regular file")
    os.mkfifo(tmp_path / "pipe")
    refused(tmp_path / "pipe", "special file", "regular file")


def test_a_missing_folder_and_a_path_under_a_file_are_told_apart(tmp_path):
    refused(tmp_path / "no" / "such" / "run.pt", f"folder {tmp_path / 'no' / 'such'} does not exist", "create it")
    (tmp_path / "notes.txt").write_text("a file")
    refused(tmp_path / "notes.txt" / "run.pt", f"{tmp_path / 'notes.txt'} is a file, not a folder")
    refused(tmp_path / "notes.txt" / "deeper" / "run.pt", f"{tmp_path / 'notes.txt'} is a file")


@pytest.mark.parametrize("length", [240, 300])
def test_a_name_too_long_with_the_temp_suffix_is_refused(tmp_path, length):
    """240 bytes fit NAME_MAX (255) on their own, not with the temporary file's suffix."""
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    refused(tmp_path / ("a" * length), f"{length} bytes", "too long", f"at most {name_max}", "shorter name")
    assert listing(tmp_path) == []


def test_an_unwritable_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes through permission bits; a read-only mount stops it
        with tmpfs(folder, 64 * 1024, read_only=True):
            refused(folder / "run.pt", f"cannot write in {folder}", "Read-only file system")
    else:
        folder.mkdir(mode=0o555)
        refused(folder / "run.pt", f"cannot write in {folder}", "Permission denied")


def test_a_read_only_file_is_refused(tmp_path):
    folder = tmp_path / "fs"
    if os.geteuid() == 0:
        with tmpfs(folder, 64 * 1024):
            (folder / "run.pt").write_bytes(b"kept")
            remount_read_only(folder)
            refused(folder / "run.pt", "read-only")
    else:
        folder.mkdir()
        (folder / "run.pt").write_bytes(b"kept")
        (folder / "run.pt").chmod(0o444)
        refused(folder / "run.pt", "read-only")


# ---- one run per output file ---------------------------------------------------------------

HOLDER = """
    import sys
    from pathlib import Path
    from tinymnist.tool import outputs

    with outputs.exclusive({"--save-model": Path(sys.argv[1]), "--metrics": Path(sys.argv[2])}):
        print("holding", flush=True)
        sys.stdin.readline()
"""


def start_holder(checkpoint: Path, metrics: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), str(checkpoint), str(metrics)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "holding\n"
    return holder


def second_run(outputs_by_flag: dict) -> str:
    """The message a second run, in a process of its own, gets for these outputs."""
    code = (
        "import sys; from pathlib import Path; from tinymnist.tool import outputs\n"
        "from tinymnist.errors import TinyMnistError\n"
        "try:\n"
        f"    with outputs.exclusive({{k: Path(v) for k, v in {outputs_by_flag!r}.items()}}): pass\n"
        "except TinyMnistError as e:\n"
        "    sys.exit(str(e))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == "", result
    return result.stderr


def test_a_second_run_on_the_same_files_refuses_naming_the_first(tmp_path):
    checkpoint, metrics = tmp_path / "run.pt", tmp_path / "run.jsonl"
    holder = start_holder(checkpoint, metrics)
    try:
        message = second_run({"--save-model": str(checkpoint)})
        assert message == (
            f"--save-model {checkpoint} is in use by another tinymnist run (pid {holder.pid}); "
            "wait for it or choose another path\n"
        )
        assert second_run({"--metrics": str(metrics)}).startswith(f"--metrics {metrics} is in use")
    finally:
        holder.communicate("done\n", timeout=60)
    assert holder.returncode == 0
    assert listing(tmp_path) == []  # a clean exit deletes its lock files
    with outputs.exclusive({"--save-model": checkpoint, "--metrics": metrics}):
        pass


def test_a_killed_run_releases_its_files(tmp_path):
    checkpoint, metrics = tmp_path / "run.pt", tmp_path / "run.jsonl"
    holder = start_holder(checkpoint, metrics)
    holder.kill()  # SIGKILL: no cleanup runs, the OS still drops the locks
    holder.wait(timeout=60)
    assert outputs.lock_path(checkpoint).exists()  # the stale sidecar, harmless:
    with outputs.exclusive({"--save-model": checkpoint, "--metrics": metrics}):
        assert second_run({"--save-model": str(checkpoint)}).startswith(f"--save-model {checkpoint} is in use")
    assert listing(tmp_path) == []


def test_a_killed_runs_locks_for_other_names_go_when_a_run_takes_a_lock_in_that_folder(tmp_path):
    """Names never used again: the next run in the folder deletes their dead sidecars, and
    leaves a live run's, and a file that is not ours."""
    killed = start_holder(tmp_path / "old.pt", tmp_path / "old.jsonl")
    killed.kill()
    killed.wait(timeout=60)
    live = start_holder(tmp_path / "live.pt", tmp_path / "live.jsonl")
    not_ours = tmp_path / ".notes.lock"
    not_ours.write_text("another program's lock file\n")
    try:
        with outputs.exclusive({"--save-model": tmp_path / "new.pt"}):
            pass
        assert listing(tmp_path) == sorted([".live.jsonl.lock", ".live.pt.lock", ".notes.lock"])
        assert second_run({"--save-model": str(tmp_path / "live.pt")}).startswith("--save-model")  # still held
    finally:
        live.communicate("done\n", timeout=60)
    assert listing(tmp_path) == [".notes.lock"]


def test_locks_are_released_when_the_run_fails(tmp_path):
    checkpoint = tmp_path / "run.pt"
    with pytest.raises(RuntimeError, match="training failed"):
        with outputs.exclusive({"--save-model": checkpoint}):
            raise RuntimeError("training failed")
    assert listing(tmp_path) == []
    with outputs.exclusive({"--save-model": checkpoint}):
        pass


def test_one_file_for_two_flags_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    same = {"--save-model": tmp_path / "real" / "run.out", "--metrics": tmp_path / "alias" / "run.out"}
    with pytest.raises(TinyMnistError, match=r"^--metrics .*alias/run.out is also --save-model; give each its own"):
        with outputs.exclusive(same):
            pass
    with outputs.exclusive({"--save-model": tmp_path / "run.pt", "--metrics": None}):  # None: flag not given
        assert listing(tmp_path) == [".run.pt.lock", "alias", "real"]


def test_taking_a_file_removes_its_dead_writers_temp_files_and_nothing_else(tmp_path):
    leftovers = [".run.pt.tinymnist-0123abcd.part", ".run.jsonl.tinymnist-89abcdef.part"]
    lookalikes = [
        ".run.pt.tinymnist-0123abcd.part~",  # an editor's backup
        ".run.pt.tinymnist-0123ABCD.part",  # not our lower-case hex
        ".run.pt.tinymnist-0123abc.part",  # one digit short
        ".other.pt.tinymnist-0123abcd.part",  # another target's
        "run.pt.tinymnist-0123abcd.part",  # not hidden
        ".run.pt.lock.tinymnist-0123abcd.part",
    ]
    for name in leftovers + lookalikes:
        (tmp_path / name).write_bytes(b"x")
    with outputs.exclusive({"--save-model": tmp_path / "run.pt", "--metrics": tmp_path / "run.jsonl"}):
        assert set(listing(tmp_path)) == {*lookalikes, ".run.pt.lock", ".run.jsonl.lock"}
    assert listing(tmp_path) == sorted(lookalikes)


def test_earlier_events_are_looked_for_where_a_run_writes(tmp_path):
    """A run writes events into its --tensorboard folder, N models' into its subfolders: an earlier run's there
    are refused; events deeper down (TensorBoard's other runs) are not looked for, nor walked to."""
    board = tmp_path / "board"
    (board / "old" / "runs").mkdir(parents=True)
    (board / "old" / "runs" / "events.out.tfevents.1.host").write_bytes(b"")
    refuse_earlier_events(board, "--tensorboard")  # nothing where this run writes
    refuse_earlier_events(tmp_path / "absent", "--tensorboard")
    for where in (board, board / "seed1_lr0.1"):
        where.mkdir(exist_ok=True)
        (where / "events.out.tfevents.2.host").write_bytes(b"")
        with pytest.raises(TinyMnistError, match=r"--tensorboard .* holds an earlier run's TensorBoard events"):
            refuse_earlier_events(board, "--tensorboard")
        (where / "events.out.tfevents.2.host").unlink()
