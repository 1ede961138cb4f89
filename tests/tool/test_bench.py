"""`tinymnist bench` runs briefly and reports every field; its baseline computes what ours does."""

import json
import statistics
import time

import pytest
import torch

from tests.support import assert_user_error, needs_cpp_compiler, run
from tinymnist.algorithm import networks, optim
from tinymnist.algorithm.config import recipe_config
from tinymnist.algorithm.train import make_gradient, make_step
from tinymnist.tool import bench, memory, time_to_accuracy

pytest.importorskip("PIL", reason="the reference loop needs pillow (pip install 'tinymnist[bench]')")

from tinymnist.tool.reference import reference_loop
from tinymnist.transforms import first_conv


def test_bench_reports_every_field(tmp_path):
    out = tmp_path / "bench.json"
    result = run(
        "bench",
        "--models",
        "mlp",
        "--device",
        "cpu",
        "--window-images",
        128,
        "--repeats",
        2,
        "--warmup",
        1,
        "--no-compile",
        "--data-dir",
        tmp_path / "none",
        "--json",
        out,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["data"].startswith("random uint8") and report["torch"] == torch.__version__
    (row,) = report["results"]
    assert row["model"] == "mlp" and row["batch_size"] == 64 and "compiled" not in row
    for loop in ("reference", "eager"):
        timing = row[loop]
        assert len(timing["rates"]) == 2 and timing["images_per_second"] == pytest.approx(
            statistics.median(timing["rates"])
        )
        assert timing["images_per_second"] > 0 and timing["peak_memory_mb"] > 0
        assert timing["first_step_seconds"] > 0 and timing["warmup_seconds"] >= 0
    # the median of each round's ratio: both loops timed in the same round, under the same load
    ratio = statistics.median(e / r for e, r in zip(row["eager"]["rates"], row["reference"]["rates"], strict=True))
    assert row["eager_vs_reference"] == pytest.approx(ratio)
    assert f"{row['eager_vs_reference']:.2f}x" in result.stdout  # the table shows the ratio


@pytest.mark.parametrize("flag", [["--models", "mlp"], ["--warmup", "0"], ["--window-images", "512"]])
def test_time_to_accuracy_refuses_the_flags_it_would_ignore(flag):
    assert_user_error(run("bench", "--time-to-accuracy", "0.99", *flag), flag[0], "does not apply")


def test_a_file_as_data_dir_is_refused_not_taken_for_missing_files(tmp_path):
    """Missing MNIST files mean random images; a file where the folder should be is a mistake."""
    file = tmp_path / "cases.txt"
    file.write_text("my notes")
    result = run("bench", "--models", "mlp", "--device", "cpu", "--no-compile", "--data-dir", file)
    assert_user_error(result, f"the data folder {file} is a file, not a folder")


def test_time_to_accuracy_takes_one_number_of_models():
    assert_user_error(run("bench", "--time-to-accuracy", "0.99", "--seeds", "1,4"), "--seeds 1,4", "one number")
    zero = run("bench", "--time-to-accuracy", "0.99", "--seeds", "0")
    assert_user_error(zero, "--seeds 0: '0' is not a count", "like --seeds 10")  # not a list it would refuse


def test_time_to_accuracy_over_seeds_reports_their_spread(real_split, tmp_path):
    """--seeds 3: fast and cnn train 3 models each in one run; each row says how many reached the
    target and the mean, min and max of their times, every one a time the run's records hold."""
    out = tmp_path / "t.json"
    result = run(
        "bench",
        "--time-to-accuracy",
        "0.5",
        "--seeds",
        "3",
        "--device",
        "cpu",
        "--no-compile",
        "--data-dir",
        real_split,
        "--json",
        out,
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert [(r["loop"], r["models"]) for r in rows] == [
        ("tinymnist fast", 3),
        ("tinymnist cnn", 3),
        ("reference cnn", 1),
    ]
    for row in rows[:2]:
        assert row["reached"] == 3  # 50% is reached well within the recipes' epochs
        assert row["min_seconds"] <= row["seconds"] <= row["max_seconds"]
        assert f"{row['reached']}/3" in result.stdout


def test_time_to_accuracy_over_rounds_gives_the_median_round_and_keeps_every_round(real_split, tmp_path):
    """--repeats 3: the three loops run three times in turn; each row's seconds and ratio are the medians of
    its rounds', and the JSON keeps every round's rows."""
    out = tmp_path / "t.json"
    args = ("--time-to-accuracy", "0.5", "--repeats", "3", "--device", "cpu", "--no-compile", "--json", out)
    result = run("bench", *args, "--data-dir", real_split)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert len(report["rounds"]) == 3 and all(len(rows) == 3 for rows in report["rounds"])
    for loop, row in enumerate(report["results"]):
        runs = [rows[loop] for rows in report["rounds"]]
        assert row["round_seconds"] == [r["seconds"] for r in runs]
        assert row["seconds"] == statistics.median(row["round_seconds"])
        assert row["speedup_vs_reference"] == pytest.approx(statistics.median(r["speedup_vs_reference"] for r in runs))
        assert "/".join(f"{t:.2f}" for t in row["round_seconds"]) in result.stdout  # every digit, in the table
    assert "medians of 3 rounds" in result.stdout and "3/3 rounds" in result.stdout
    assert "round 3 of 3: tinymnist fast" in result.stderr  # each round said as it ends: a stop keeps them


def test_a_loop_that_missed_the_target_in_a_round_has_the_median_of_the_rounds_that_reached_it(capsys):
    reached = {"reached": 1, "seconds": 2.0, "images": 640, "epochs": 0.5, "best_accuracy": 0.99}
    missed = {"reached": 0, "seconds": None, "images": None, "epochs": 2, "best_accuracy": 0.98}
    common = {"loop": "tinymnist fast", "models": 1, "first_step_seconds": 1.0}
    rounds = [r | common | {"speedup_vs_reference": r["seconds"] and 3 * r["seconds"]} for r in (reached, missed)]
    row = time_to_accuracy.over_rounds([rounds[0], rounds[1], rounds[0] | {"seconds": 4.0, "epochs": 1.5}])
    assert (row["rounds_reached"], row["seconds"], row["epochs"], row["speedup_vs_reference"]) == (2, 3.0, 1.0, 6.0)
    assert row["round_seconds"] == [2.0, None, 4.0] and row["reached"] == 0
    never = time_to_accuracy.over_rounds([rounds[1], rounds[1]])
    assert (never["rounds_reached"], never["seconds"], never["speedup_vs_reference"]) == (0, None, None)
    time_to_accuracy.print_time_to_accuracy([row, never | {"loop": "reference cnn"}], 0.99, torch.device("cpu"), None)
    table = capsys.readouterr().out
    assert "2/3 rounds" in table and "2.00/-/4.00" in table and "0/2 rounds" in table and "not reached" in table


def test_bench_rejects_an_unknown_model():
    assert_user_error(run("bench", "--models", "mlp,vgg"), "--models 'vgg' is unknown")


@needs_cpp_compiler
def test_bench_checks_the_first_convolutions_setting_before_timing(monkeypatch):
    monkeypatch.setenv(first_conv.CHOICE_ENV, "sometimes")
    result = run("bench", "--models", "mlp", "--device", "cpu", "--data-dir", "no-such-folder")
    assert_user_error(result, "TINYMNIST_FIRST_CONV is 'sometimes'")
    assert "timing" not in result.output


@pytest.mark.parametrize("extra", [[], ["--seeds", "1"], ["--time-to-accuracy", "0.5"]])
def test_bench_checks_its_json_path_before_timing_anything(tmp_path, extra):
    """A folder given as --json was an IsADirectoryError traceback after the whole run."""
    result = run(
        "bench", "--device", "cpu", "--no-compile", "--data-dir", tmp_path / "none", "--json", tmp_path, *extra
    )
    assert_user_error(result, f"--json {tmp_path} is a folder")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra", [["--models", "mlp,cnn", "--seeds", "1,4"], ["--time-to-accuracy", "0.99", "--seeds", "4"]]
)
def test_seeds_that_cannot_fit_are_refused_before_any_timing(tmp_path, monkeypatch, extra):
    """bench --seeds had no memory check: it built and timed N models until memory ran out. With
    1 MiB free, four models of any recipe are refused up front, as train --seeds refuses them. The
    --seeds 1,4 bench times its loops in turns, so it holds 1 + 1 + 4 models at once."""
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2**20)
    result = run("bench", "--device", "cpu", "--no-compile", "--data-dir", tmp_path / "none", *extra)
    expected = "--seeds (every count and the single model at once): 6 " if "mlp,cnn" in extra else "--seeds: 4 "
    assert_user_error(result, expected, "models need about", "run fewer models at once")


@pytest.mark.parametrize(
    "counts, fragment",
    [("1,x", "'x' is not a count of 1 or more"), ("1,,4", "an empty item"), ("4,0", "'0' is not a count")],
)
def test_a_bad_model_count_is_named(counts, fragment):
    result = run("bench", "--models", "mlp", "--device", "cpu", "--no-compile", "--seeds", counts)
    assert_user_error(result, f"--seeds {counts}: {fragment}", "like --seeds 1,4,16")


def test_a_count_given_twice_is_timed_once():
    from tinymnist.tool.cli import parse_counts

    assert parse_counts("4,1,4") == [4, 1]


def test_a_huge_model_count_is_refused_at_once():
    """N x one model's bytes: constant time, however large N (nothing is built per model)."""
    started = time.perf_counter()
    result = run("bench", "--models", "mlp", "--device", "cpu", "--no-compile", "--seeds", f"1,{10**12}")
    assert_user_error(result, f"at once): {10**12 + 2} mlp models need about")
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("model", ["mlp", "lenet"])
def test_reference_loop_trains_like_our_step(model):
    """Same params, same batch: the tutorials' loop and our step give the same loss and update.
    The batch is the whole (tiny) dataset, so the DataLoader's shuffle cannot change it."""
    g = torch.Generator().manual_seed(0)
    config = recipe_config(model, batch_size=32)
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8, generator=g)  # (32, 28, 28)
    labels = torch.randint(0, 10, (32,), generator=g)  # (32,)
    params = networks.init_params(model, 0)
    net, ref_loss = next(reference_loop(config, params, images, labels, torch.device("cpu")))

    optimizer = optim.OPTIMIZERS[config.optimizer]()
    step = make_step(make_gradient(config), optimizer)
    new_params, _, loss = step(
        params, optimizer.init(params), images, labels, torch.arange(32), torch.tensor(config.lr)
    )
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for name, value in net.state_dict().items():
        # Adam's first step moves every weight by about lr (1e-3): a gradient near zero, summed in
        # another order, moves its weight by up to a few 1e-5 more (1.03e-5 was seen in a full run).
        torch.testing.assert_close(new_params[name], value, rtol=1e-5, atol=5e-5)


def test_seeds_bench_times_n_models_in_one_step_against_n_single_runs(tmp_path):
    """bench --seeds 1,2: the single step, then 1 and 2 models through the N-model (vmapped) step;
    each ratio is the single step's images/s over the vmapped one's, as the JSON and the table say."""
    out = tmp_path / "s.json"
    args = ("--models", "mlp", "--seeds", "1,2", "--device", "cpu", "--no-compile", "--window-images", 128)
    result = run("bench", *args, "--repeats", 3, "--warmup", 0, "--data-dir", tmp_path / "none", "--json", out)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())["results"]
    assert list(row["n_models"]) == ["1", "2"]
    for timed in row["n_models"].values():
        ratio = statistics.median(s / n for s, n in zip(row["single"]["rates"], timed["rates"], strict=True))
        assert len(timed["rates"]) == 3 and timed["time_vs_n_single_runs"] == pytest.approx(ratio)
        assert f"{ratio:.2f}x" in result.stdout


def test_each_timed_loop_keeps_its_own_thread_count():
    """An adaptive step sets torch's thread count, which is the whole process's (cpu_threads.py). Timed in
    turns, every loop starts on bench's count and each of its windows on the count it left last, as if it
    ran alone: a loop that drops to one thread neither moves another loop's count nor finds its own reset
    (a reset would have the adaptive step time steps on a count it does not know it runs). Bench ends on
    the count it started with."""
    torch.set_num_threads(2)  # conftest puts the suite's count back
    seen = {"drops": [], "watches": []}

    def dropping_steps():
        while True:
            seen["drops"].append(torch.get_num_threads())
            torch.set_num_threads(1)
            yield

    def watching_steps():
        while True:
            seen["watches"].append(torch.get_num_threads())
            yield

    loops = {"drops": bench.Loop(dropping_steps(), 1), "watches": bench.Loop(watching_steps(), 1)}
    timed = bench.time_in_turns(loops, torch.device("cpu"), window_steps=2, timing=bench.Timing(repeats=3, warmup=1))
    assert seen["watches"] and set(seen["watches"]) == {2}
    assert seen["drops"][0] == 2 and set(seen["drops"][1:]) == {1}
    assert torch.get_num_threads() == 2
    assert (timed["drops"]["fewest_threads"], timed["watches"]["fewest_threads"]) == (1, 2)


def test_a_loop_that_left_its_threads_while_timed_gets_a_note_a_quiet_run_none():
    """An adaptive step leaves its threads only while another program takes a core: then the tutorials'
    loop on fixed threads stalls, and its ratio says nothing of a quiet machine (the helper that found it
    saw 117.8x against 5.9x quiet)."""
    quiet = {"reference": {"fewest_threads": 2}, "compiled": {"fewest_threads": 2}}
    assert bench.busy_note("mlp", quiet, threads=2) is None
    busy = {"reference": {"fewest_threads": 2}, "compiled": {"fewest_threads": 1}}
    note = bench.busy_note("mlp", busy, threads=2)
    assert note.startswith("tinymnist: note: mlp: another program took a core") and "1 thread of 2" in note


def test_loops_are_timed_in_turns_each_round_starting_one_loop_later():
    """Windows interleave, so drifting load slows every loop alike; each round starts one loop
    later, so that no loop always runs just after the same other one. Warm-up first, for every
    loop, then an untimed window of each."""
    calls = []

    def steps(name):
        while True:
            calls.append(name)
            yield

    loops = {name: bench.Loop(steps(name), 1) for name in "abc"}
    timed = bench.time_in_turns(loops, torch.device("cpu"), window_steps=1, timing=bench.Timing(repeats=3, warmup=0))
    assert "".join(calls) == "abc" + "abc" + "abc" + "bca" + "cab"  # compiles, settling, three rounds
    assert all(len(t["rates"]) == 3 for t in timed.values())
