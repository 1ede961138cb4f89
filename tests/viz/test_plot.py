"""`tinymnist plot`: metrics files read into runs, the terminal plot, the table, the PNG."""

import json

import pytest
from rich.console import Console

from tests.support import assert_user_error, no_temp_files, open_png, run_viz
from tinymnist.errors import TinyMnistError
from tinymnist.viz import textplot
from tinymnist.viz.runs import read_runs


def record(epoch, accuracy, test_loss, train_loss, **extra):
    total = 10_000
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "test_accuracy": accuracy,
        "correct": round(accuracy * total),
        "total": total,
        "lr": 1.0,
        "seconds": 1.0,
        "images_per_second": 1.0,
        **extra,
    }


def curve(final_accuracy, epochs=5):
    """A run from the untrained 10% up to final_accuracy."""
    accuracies = [0.1] + [final_accuracy - 0.02 / e for e in range(1, epochs)] + [final_accuracy]
    return [record(e, a, 2.4 / (1 + 3 * e), None if e == 0 else 1.0 / (1 + 2 * e)) for e, a in enumerate(accuracies)]


def write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_single_run_is_its_own_numbers_and_train_loss_starts_at_epoch_1(tmp_path):
    records = curve(0.99)
    (run,) = read_runs([write_metrics(tmp_path / "cnn.jsonl", records)])
    assert run.label == "cnn.jsonl" and run.models == 1 and run.total == 10_000
    assert run.series["test_accuracy"].epochs == tuple(range(6))
    assert run.series["test_accuracy"].values == tuple(r["test_accuracy"] for r in records)
    assert run.series["train_loss"].epochs == tuple(range(1, 6))  # epoch 0 is untrained: null
    assert run.series["test_loss"].low is None


def test_a_resumed_run_counts_the_last_line_of_an_epoch(tmp_path):
    records = [*curve(0.99, epochs=3), record(3, 0.995, 0.1, 0.1)]  # resume appended epoch 3 again
    (run,) = read_runs([write_metrics(tmp_path / "m.jsonl", records)])
    assert run.series["test_accuracy"].epochs == (0, 1, 2, 3)
    assert run.series["test_accuracy"].values[-1] == 0.995


def test_a_multi_model_file_gives_mean_and_band_per_learning_rate_and_the_ensemble(tmp_path):
    accuracies = {(0.5, 1): 0.97, (0.5, 2): 0.98, (0.5, 3): 0.96, (1.0, 1): 0.99, (1.0, 2): 0.985}
    records = []
    for epoch in (0, 1):
        for (lr, seed), final in accuracies.items():
            records.append(
                record(epoch, 0.1 if epoch == 0 else final, 2.3, None if epoch == 0 else 0.5, seed=seed, lr=lr)
            )
        records.append(record(epoch, 0.1 if epoch == 0 else 0.992, 2.3, None, ensemble=True))
    runs = read_runs([write_metrics(tmp_path / "sweep.jsonl", records)])
    assert [r.label for r in runs] == [
        "sweep.jsonl lr=0.5 (3 seeds)",
        "sweep.jsonl lr=1 (2 seeds)",
        "sweep.jsonl ensemble",
    ]
    low_lr = runs[0].series["test_accuracy"]
    assert low_lr.values[1] == pytest.approx((0.97 + 0.98 + 0.96) / 3)
    assert (low_lr.low[1], low_lr.high[1]) == (0.96, 0.98)
    assert runs[1].models == 2 and runs[1].series["test_accuracy"].high[1] == 0.99
    assert runs[2].ensemble and runs[2].series["test_accuracy"].values == (0.1, 0.992)
    assert "train_loss" not in runs[2].series  # the ensemble is not trained


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("", "holds no evaluations"),
        ("{not json\n", "line 1: not JSON"),
        ('{"epoch": 0}\n', "lacks test_accuracy, test_loss"),
        (
            '\n{"epoch": "1", "test_loss": 0.1, "test_accuracy": 0.9}\n',
            "line 2: epoch, test_loss or test_accuracy is not",
        ),
        ('{"epoch": NaN, "test_loss": 0.1, "test_accuracy": 0.9}\n', "line 1: epoch nan or test_accuracy 0.9"),
        ('{"epoch": 1e308, "test_loss": 0.1, "test_accuracy": 0.9}\n', "is out of range"),
        ('{"epoch": -1, "test_loss": 0.1, "test_accuracy": 0.9}\n', "is out of range"),
        ('{"epoch": 1, "test_loss": 0.1, "test_accuracy": 5}\n', "test_accuracy 5 is out of range"),
        ('{"epoch": 0, "test_loss": 1, "test_accuracy": 0.5, "seed": [1]}\n', "line 1: seed, initial_lr or lr is not"),
        ('{"epoch": 0, "test_loss": 1, "test_accuracy": 0.5, "seed": 1, "lr": {}}\n', "seed, initial_lr or lr is not"),
    ],
)
def test_a_bad_metrics_file_is_a_one_line_error(tmp_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert_user_error(run_viz("plot", path), str(path), fragment)
    assert_user_error(run_viz("plot", path, "-o", tmp_path / "c.png"), str(path), fragment)
    assert_user_error(run_viz("plot", tmp_path / "absent.jsonl"), "absent.jsonl", "no such file")


def test_a_last_line_cut_off_is_left_out_with_a_note(tmp_path):
    """A run still writing its file, or one stopped mid-line: plot refused the whole file, asking whether it
    was a --metrics file. A broken line that ends in a newline, or one before the last, is still an error."""
    path = write_metrics(tmp_path / "live.jsonl", curve(0.9712))
    path.write_text(path.read_text() + '{"epoch": 6, "test_lo')
    result = run_viz("plot", path)
    assert result.exit_code == 0, result.output
    assert (
        result.stderr.strip()
        == f"tinymnist: note: metrics file {path}, line 7 is cut off; plotting the lines before it"
    )
    assert result.stdout.strip().splitlines()[-1].split() == ["5", "0.0909", "0.1500", "97.12%"]
    path.write_text(path.read_text() + "\n")
    assert_user_error(run_viz("plot", path), "line 7: not JSON")
    path.write_text('{"epoch": 0, "test_lo')
    assert_user_error(run_viz("plot", path), "its only line is cut off; a run has not written a whole record yet")


def test_a_binary_file_given_to_plot_is_told_as_no_metrics_file(tmp_path):
    """A checkpoint's zip bytes (plot mlp.pt for plot mlp.jsonl) printed the codec's words."""
    path = tmp_path / "mlp.pt"
    path.write_bytes(b"PK\x03\x04\x80\xff binary")
    assert_user_error(run_viz("plot", path), f"metrics file {path}: not text, so not a file `train --metrics` wrote")


def test_piped_output_is_a_table_of_the_numbers(tmp_path):
    path = write_metrics(tmp_path / "mlp.jsonl", curve(0.9712))
    result = run_viz("plot", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "mlp.jsonl"
    last = result.stdout.strip().splitlines()[-1].split()
    assert last == ["5", "0.0909", "0.1500", "97.12%"]


def final_rows(run_a, run_b):
    """The character rows of the two runs' last points in the terminal's accuracy panel."""
    runs = read_runs([run_a, run_b])
    drawn = [(r, r.series["test_accuracy"], c) for r, c in zip(runs, ("red", "blue"), strict=True)]
    lines = textplot.panel("test_accuracy", drawn, 0, 5, 60)
    last_column = textplot.MARGIN + 60 - 1
    rows = {"red": set(), "blue": set()}
    for row, line in enumerate(lines):
        for span in line.spans:
            if span.start <= last_column < span.end and str(span.style) in rows:
                rows[str(span.style)].add(row)
    return rows["red"], rows["blue"]


def test_the_terminal_plot_puts_98_and_99_percent_on_different_rows(tmp_path):
    red, blue = final_rows(
        write_metrics(tmp_path / "a.jsonl", curve(0.98)), write_metrics(tmp_path / "b.jsonl", curve(0.99))
    )
    assert red and blue and not red & blue


def test_the_terminal_plot_draws_every_panel_and_the_legend(tmp_path):
    runs = read_runs(
        [write_metrics(tmp_path / "a.jsonl", curve(0.98)), write_metrics(tmp_path / "b.jsonl", curve(0.99))]
    )
    console = Console(width=80, force_terminal=True, record=True)
    console.print(textplot.text_plot(runs, 80))
    text = console.export_text()
    for title in ("train loss", "test loss", "test accuracy", "━━ a.jsonl", "━━ b.jsonl", "99%", "90%"):
        assert title in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert any("\u2800" < ch <= "\u28ff" for ch in text)  # braille dots were drawn


def test_the_png_has_its_size_and_two_runs_differ_from_one(tmp_path):
    a, b = write_metrics(tmp_path / "a.jsonl", curve(0.98)), write_metrics(tmp_path / "b.jsonl", curve(0.99))
    for out, files in ((tmp_path / "one.png", [a]), (tmp_path / "two.png", [a, b])):
        result = run_viz("plot", *files, "-o", out)
        assert result.exit_code == 0, result.output
    one, two = open_png(tmp_path / "one.png", (1500, 480)), open_png(tmp_path / "two.png", (1500, 480))
    assert one.tobytes() != two.tobytes()
    assert no_temp_files(tmp_path)


def test_the_png_accuracy_axis_separates_98_from_99_percent(tmp_path):
    pytest.importorskip("matplotlib")
    from tinymnist.viz.curves import curves_figure

    runs = read_runs(
        [write_metrics(tmp_path / "a.jsonl", curve(0.98)), write_metrics(tmp_path / "b.jsonl", curve(0.99))]
    )
    figure = curves_figure(runs)
    figure.draw_without_rendering()
    ax = figure.axes[2]
    to_axes = ax.transAxes.inverted()
    heights = [to_axes.transform(ax.transData.transform((5, 1 - a)))[1] for a in (0.98, 0.99)]
    assert heights[1] - heights[0] > 0.1  # 99% above 98%, a tenth of the panel apart, with 10% on the same axis
    assert to_axes.transform(ax.transData.transform((0, 0.9)))[1] >= 0  # epoch 0's 10% is inside the panel


def test_an_unwritable_output_is_a_one_line_error_and_writes_nothing(tmp_path):
    path = write_metrics(tmp_path / "a.jsonl", curve(0.98))
    assert_user_error(run_viz("plot", path, "-o", tmp_path / "no" / "such" / "c.png"), "does not exist")
    assert_user_error(run_viz("plot", path, "-o", tmp_path), "is a folder")
    assert_user_error(run_viz("plot", path, "-o", tmp_path / "c.jpg"), "-o", "c.jpg", "name the file .png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_read_runs_raises_for_a_record_that_is_not_an_object(tmp_path):
    with pytest.raises(TinyMnistError, match="line 2: lacks epoch"):
        read_runs([write_metrics(tmp_path / "m.jsonl", [record(0, 0.1, 2.3, None), [1, 2]])])


def test_a_real_multi_model_run_plots_grouped_by_each_models_lr(tiny_split, tmp_path):
    """What `train --seeds 2 --lr a,b` writes: "lr" is each epoch's scheduled rate (StepLR
    moves it), the model is named by seed and initial_lr, the ensemble has no train loss."""
    from tests.support import run, train_args

    metrics = tmp_path / "sweep.jsonl"
    trained = run(
        *train_args(
            tiny_split,
            "--model",
            "mlp",
            "--seeds",
            2,
            "--lr",
            "0.001,0.002",
            "--gamma",
            0.5,
            "--epochs",
            2,
            "--metrics",
            metrics,
        )
    )
    assert trained.exit_code == 0, trained.output
    runs = read_runs([metrics])
    assert [r.label for r in runs] == [
        "sweep.jsonl lr=0.001 (2 seeds)",
        "sweep.jsonl lr=0.002 (2 seeds)",
        "sweep.jsonl ensemble",
    ]
    assert runs[0].series["test_accuracy"].epochs == (0, 1, 2) and "train_loss" not in runs[2].series
    assert run_viz("plot", metrics, "-o", tmp_path / "sweep.png").exit_code == 0


def test_fractional_epochs_from_eval_every_are_plotted(tmp_path):
    path = tmp_path / "m.jsonl"
    write_metrics(path, [record(0, 0.1, 2.3, None), record(0.5, 0.9, 0.4, None), record(1, 0.95, 0.2, 0.3)])
    (run,) = read_runs([path])
    assert run.series["test_accuracy"].epochs == (0, 0.5, 1)


def test_a_json_line_nested_too_deeply_is_a_one_line_error_naming_its_line(tmp_path):
    """json.loads recurses once per level: 100,000 brackets raised RecursionError, a traceback."""
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(record(0, 0.1, 2.3, None)) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    assert_user_error(run_viz("plot", path), f"metrics file {path}, line 2", "nested")


def test_a_single_run_inside_a_sweeps_file_is_kept_apart_not_counted_as_one_more_seed(tmp_path):
    """A sweep's records carry "seed" and "initial_lr"; a plain run's carry neither. Appended to a
    sweep's file, the plain run was averaged in as a third seed, silently. It gets its own line,
    labelled, and the sweep's mean and band stay the sweep's."""
    records = []
    for epoch in (0, 1):
        for seed, final in ((1, 0.97), (2, 0.98)):
            records.append(
                record(epoch, 0.1 if epoch == 0 else final, 2.3, None if epoch == 0 else 0.5, seed=seed, initial_lr=1.0)
            )
        records.append(record(epoch, 0.1 if epoch == 0 else 0.985, 2.3, None, ensemble=True))
    records += [record(0, 0.1, 2.3, None), record(1, 0.5, 1.5, 1.0)]  # the plain run: same lr, no seed
    runs = read_runs([write_metrics(tmp_path / "sweep.jsonl", records)])
    assert [r.label for r in runs] == [
        "sweep.jsonl (2 seeds)",
        "sweep.jsonl ensemble",
        "sweep.jsonl single run (no seed)",
    ]
    sweep, _, single = runs
    assert sweep.models == 2 and sweep.series["test_accuracy"].values[1] == pytest.approx(0.975)
    assert (sweep.series["test_accuracy"].low[1], sweep.series["test_accuracy"].high[1]) == (0.97, 0.98)
    assert single.models == 1 and single.series["test_accuracy"].values == (0.1, 0.5)
    assert single.series["test_accuracy"].low is None
