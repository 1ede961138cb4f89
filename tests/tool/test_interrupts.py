"""Ctrl-C and SIGTERM: clean exits (130, 143), never a traceback, never a half-done save.

The process tests synchronise on what the child prints and on a signal wakeup pipe,
never on sleeps, so they cannot pass or fail by timing.
"""

import signal
import subprocess
import sys
import textwrap

import pytest

from tinymnist.tool import interrupts


def start(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(child: subprocess.Popen, expected: str) -> None:
    line = child.stdout.readline().strip()
    assert line == expected, f"child printed {line!r}; stderr: {child.stderr.read()}"


def finish(child: subprocess.Popen) -> tuple[int, str, str]:
    """Exit status and the rest of stdout, stderr (read through the buffers readline filled)."""
    returncode = child.wait(timeout=120)  # the children print a few lines: no pipe fills up
    return returncode, child.stdout.read(), child.stderr.read()


# A child running the console script's `main` whose `import torch` never finishes:
# the import is frozen in place, so the signal lands inside it, as a Ctrl-C during a
# real (slow) start-up does.
FROZEN_TORCH_IMPORT = """
    import sys, time

    class FrozenTorchImport:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                print("importing torch", flush=True)
                time.sleep(600)
            return None

    sys.meta_path.insert(0, FrozenTorchImport())
    sys.argv = ["tinymnist", "info"]
    from tinymnist.tool.entry import main
    main()
"""


@pytest.mark.parametrize(
    ("signum", "code", "line"),
    [
        (signal.SIGINT, 130, "tinymnist: interrupted\n"),
        (signal.SIGTERM, 143, "tinymnist: interrupted by SIGTERM\n"),
    ],
)
def test_a_signal_while_importing_torch_exits_cleanly(signum, code, line):
    child = start(FROZEN_TORCH_IMPORT)
    wait_for_line(child, "importing torch")
    child.send_signal(signum)
    returncode, _, err = finish(child)
    assert (returncode, err) == (code, line)


# A child whose CLI import swallows the Ctrl-C that lands in it, as torch's C extension
# does when the signal arrives while it imports numpy (it clears any error of that
# import, KeyboardInterrupt included). The child signals itself, so nothing depends on
# timing; the stand-in CLI says so if the run goes on.
SWALLOWING_CLI_IMPORT = """
    import importlib.util, os, signal, sys

    class SwallowingImport:
        def find_spec(self, name, path=None, target=None):
            return importlib.util.spec_from_loader(name, self) if name == "tinymnist.tool.cli" else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            try:
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next bytecode
                signal.sigtimedwait([], 0)
            except BaseException:  # the C extension's PyErr_Clear
                pass
            module.main = lambda: print("the run went on")

    sys.meta_path.insert(0, SwallowingImport())
    from tinymnist.tool.entry import main
    main()
"""


def test_a_ctrl_c_that_an_import_swallows_still_ends_the_run():
    """Once a signal has raised, later ones are ignored: a swallowed one would leave a run nothing stops."""
    assert finish(start(SWALLOWING_CLI_IMPORT)) == (130, "", "tinymnist: interrupted\n")


# A child training on a data folder (argv[1]) whose first log line swallows a SIGTERM's
# exception, as Python does with an exception raised inside a callback (torch.compile's
# weakref callbacks run mid-step): the signal has been acted on, so later ones are ignored.
SWALLOWED_DURING_TRAINING = """
    import os, signal, sys
    from tinymnist.algorithm import train

    real_check = train.check_finite

    def swallowing(*args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            pass
        return real_check(*args)

    train.check_finite = swallowing
    sys.argv = ["tinymnist", "train", "--data-dir", sys.argv[1], "--no-download", "--device", "cpu",
                "--no-compile", "--model", "mlp", "--epochs", "3"]
    from tinymnist.tool.entry import main
    main()
"""


def test_a_signal_swallowed_during_training_still_ends_the_run(tiny_split):
    """It ends at the same log line, with exit 143 and the one line, instead of training on."""
    code, out, err = finish(start(SWALLOWED_DURING_TRAINING, tiny_split))
    assert code == 143, err
    assert "Train Epoch: 2" not in out and err.strip().splitlines()[-1].startswith("tinymnist: interrupted by SIGTERM")


def test_the_console_script_module_does_not_import_torch():
    """Everything imported before `main` installs the handlers is outside their reach."""
    child = start(
        "import sys, tinymnist.tool.entry; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    assert finish(child) == (0, "[]\n", "")


# A child that "saves" under shielded() and waits for signals on the wakeup pipe
# (the C-level handler writes one byte per signal, so no signal can be missed).
SHIELDED_SAVE = """
    import os, signal, sys
    from tinymnist.tool import interrupts

    interrupts.install()
    wakeups, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)
    try:
        with interrupts.shielded():
            print("saving", flush=True)
            for n in range(int(sys.argv[2])):
                os.read(wakeups, 1)
                print(f"signal {n + 1} held", flush=True)
            with open(sys.argv[1], "w") as f:
                f.write("complete")
        print("went on after the save")
    except KeyboardInterrupt as e:
        print("interrupted after the save", flush=True)
        sys.exit(interrupts.exit_code(e))
"""


@pytest.mark.parametrize(
    ("signals", "code"),
    [
        ([signal.SIGINT], 130),
        ([signal.SIGINT, signal.SIGINT], 130),  # an impatient second Ctrl-C
        ([signal.SIGTERM], 143),
        ([signal.SIGTERM, signal.SIGINT], 143),  # the first signal decides the exit status
    ],
)
def test_signals_during_a_save_wait_for_it_then_end_the_run(tmp_path, signals, code):
    target = tmp_path / "checkpoint"
    child = start(SHIELDED_SAVE, target, len(signals))
    wait_for_line(child, "saving")
    for n, signum in enumerate(signals, start=1):
        child.send_signal(signum)
        wait_for_line(child, f"signal {n} held")
    returncode, out, err = finish(child)
    assert (returncode, out, err) == (code, "interrupted after the save\n", "")
    assert target.read_text() == "complete"


# A child whose cleanup after the first Ctrl-C waits for (and must survive) a second.
CLEANUP_AFTER_INTERRUPT = """
    import os, signal, sys
    from tinymnist.tool import interrupts

    interrupts.install()
    wakeups, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)
    try:
        print("training", flush=True)
        while True:
            os.read(wakeups, 1)
    except KeyboardInterrupt as e:
        os.set_blocking(wakeups, False)  # the first signal's byte may still be there
        try:
            os.read(wakeups, 16)
        except BlockingIOError:
            pass
        os.set_blocking(wakeups, True)
        print("cleaning up", flush=True)
        os.read(wakeups, 1)  # the second Ctrl-C arrives here
        print("cleaned up", flush=True)
        sys.exit(interrupts.exit_code(e))
"""


def test_a_second_ctrl_c_does_not_break_into_the_cleanup():
    child = start(CLEANUP_AFTER_INTERRUPT)
    wait_for_line(child, "training")
    child.send_signal(signal.SIGINT)
    wait_for_line(child, "cleaning up")
    child.send_signal(signal.SIGINT)
    assert finish(child) == (130, "cleaned up\n", "")


def test_exit_codes_are_128_plus_the_signal():
    assert interrupts.exit_code(KeyboardInterrupt()) == 130
    assert interrupts.exit_code(interrupts.Terminated()) == 143
    assert issubclass(interrupts.Terminated, KeyboardInterrupt)  # existing handlers catch both


# In-process: pytest runs tests in the main thread with Python's own handlers, as a
# test that calls the CLI in-process does; shielded() puts its handler in for the block.


def test_shielded_holds_a_signal_until_the_block_ends_then_restores_the_handlers():
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.shielded():
            signal.raise_signal(signal.SIGINT)
            steps.append("after the signal")
    assert steps == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_nested_blocks_hold_the_signal_until_the_outermost_ends():
    steps = []
    with pytest.raises(interrupts.Terminated):
        with interrupts.shielded():
            with interrupts.shielded():
                signal.raise_signal(signal.SIGTERM)
            steps.append("inner block ended")
    assert steps == ["inner block ended"]


def test_a_block_that_fails_keeps_its_own_exception():
    """A save that fails ends the run with its own message; the held Ctrl-C adds nothing."""
    with pytest.raises(OSError, match="disk full"):
        with interrupts.shielded():
            signal.raise_signal(signal.SIGINT)
            raise OSError("disk full")
    with interrupts.shielded():  # and nothing stays pending for a later block
        pass


def test_shielded_outside_the_main_thread_is_a_no_op():
    import threading

    ran = []
    thread = threading.Thread(target=lambda: ran.append(list(_enter_and_leave())))
    thread.start()
    thread.join()
    assert ran == [["inside"]]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _enter_and_leave():
    with interrupts.shielded():
        yield "inside"


# A child running the console script's `main` with a stand-in for the CLI (importing torch takes seconds):
# STAND_IN's code defines `command`, which runs as the CLI's main, and may use `wait_at_exit`, an exit
# callback that says "exiting" and waits, as the shutdown of torch.compile's worker processes can.
WITH_A_STAND_IN_CLI = """
    import atexit, importlib.util, os, signal, sys, time
    from tinymnist.tool import interrupts

    def wait_at_exit():
        print("exiting", flush=True)
        time.sleep(600)

    STAND_IN

    class StandInCli:
        def find_spec(self, name, path=None, target=None):
            return importlib.util.spec_from_loader(name, self) if name == "tinymnist.tool.cli" else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            module.main = command

    sys.meta_path.insert(0, StandInCli())
    from tinymnist.tool.entry import main
    main()
"""


def stand_in(command: str, *shell) -> subprocess.Popen:
    """The child above with `command` as the CLI; `shell`: run it through bash with these redirections."""
    code = textwrap.dedent(WITH_A_STAND_IN_CLI).replace("STAND_IN", textwrap.dedent(command))
    if not shell:
        return start(code)
    line = f'{sys.executable} -c "$0" {" ".join(shell)}'
    return subprocess.Popen(["bash", "-c", line, code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_ctrl_c_after_the_command_finished_says_so_and_exits_at_once():
    """The interpreter's finalization would have put the default handler back: killed without a word."""
    child = stand_in("def command():\n    atexit.register(wait_at_exit)")
    wait_for_line(child, "exiting")
    child.send_signal(signal.SIGINT)
    assert finish(child) == (130, "", "tinymnist: interrupted while exiting; the command had finished\n")


def test_after_an_interrupted_command_another_signal_ends_the_exit_callbacks():
    """The run's cleanup ignores a second signal; its exit callbacks do not."""
    child = stand_in("""
        def command():
            atexit.register(wait_at_exit)
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(600)
            except KeyboardInterrupt as stop:  # as exits.py ends a command
                interrupts.report(stop)
                raise SystemExit(interrupts.exit_code(stop))
    """)
    wait_for_line(child, "exiting")
    child.send_signal(signal.SIGTERM)
    assert finish(child) == (130, "", "tinymnist: interrupted\ntinymnist: interrupted by SIGTERM while exiting\n")


def test_a_signal_a_finalizer_swallowed_as_the_command_returned_still_ends_it_in_one_line():
    """Python drops an exception raised inside a __del__ with a traceback: the signal still ends the run
    (exit 130, its one line), and nothing else is said."""
    child = stand_in("""
        class Freed:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                signal.sigtimedwait([], 0)  # the handler runs here, inside __del__

        def command():
            kept = Freed()
            print("done", flush=True)
    """)
    assert finish(child) == (130, "done\n", "tinymnist: interrupted; the command had finished\n")


@pytest.mark.parametrize("closed", [">&-", "2>&-", ">&- 2>&-"])
def test_a_command_with_its_output_closed_exits_0(closed):
    child = stand_in("def command():\n    pass", closed)
    assert finish(child)[0] == 0


@pytest.mark.parametrize(("code", "status", "stderr"), [(0, 0, ""), (2, 2, ""), (None, 0, ""), ("bad", 1, "bad\n")])
def test_a_process_leaves_with_its_exit_code_and_everything_printed(code, status, stderr):
    """leave skips the interpreter's finalization (where gloo's threads aborted a rank, and a Ctrl-C
    went unreported), so it must flush what was printed itself: piped output is block-buffered."""
    script = f"from tinymnist.tool import entry; print('the final line', end=''); entry.leave({code!r})"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (status, "the final line", stderr)
