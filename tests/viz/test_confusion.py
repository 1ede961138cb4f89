"""eval --confusion's parts: the matrix against a plain loop, the table, the JSON form, the PNG."""

import json

import torch
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from tests.support import no_temp_files, open_png
from tinymnist.viz.confusion import (
    confusion_dict,
    confusion_matrix,
    confusion_table,
    per_class_accuracy,
    write_confusion_png,
)

pairs = st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=300)


@given(pairs)
def test_the_matrix_counts_each_true_predicted_pair_like_a_loop(pairs):
    labels = torch.tensor([t for t, _ in pairs])
    predictions = torch.tensor([p for _, p in pairs])
    expected = [[0] * 10 for _ in range(10)]
    for true, predicted in pairs:
        expected[true][predicted] += 1
    matrix = confusion_matrix(predictions, labels)
    assert matrix.shape == (10, 10) and matrix.tolist() == expected
    accuracy = per_class_accuracy(matrix)
    for digit in range(10):
        shown = [p for t, p in pairs if t == digit]
        assert accuracy[digit] == (shown.count(digit) / len(shown) if shown else None)


def example_matrix():
    labels = torch.arange(1000) % 10  # (1000,): 100 of each digit
    predictions = labels.clone()
    predictions[torch.nonzero(labels == 4).squeeze(1)[:7]] = 9  # seven 4s taken for 9s
    predictions[torch.nonzero(labels == 7).squeeze(1)[:2]] = 1
    return confusion_matrix(predictions, labels)


def test_the_json_form_round_trips_and_holds_per_class_accuracy():
    matrix = example_matrix()
    again = json.loads(json.dumps(confusion_dict(matrix)))
    assert again["confusion_matrix"][4][9] == 7 and again["confusion_matrix"][4][4] == 93
    assert again["per_class_accuracy"][4] == 0.93 and again["per_class_accuracy"][0] == 1.0
    assert sum(map(sum, again["confusion_matrix"])) == 1000


def test_the_table_shows_counts_and_per_class_accuracy():
    console = Console(width=120, record=True, force_terminal=False)
    console.print(confusion_table(example_matrix()))
    text = console.export_text()
    row_4 = next(line for line in text.splitlines() if line.strip("│┃ ").startswith("4 "))
    cells = row_4.replace("│", " ").split()
    assert cells == ["4", ".", ".", ".", ".", "93", ".", ".", ".", ".", "7", "93.00%"]


def test_the_table_of_full_mnist_counts_fits_a_pipes_80_columns_uncut():
    labels = torch.arange(10_000) % 10  # (10000,): 1,000 of each digit, so 4-digit counts on the diagonal
    console = Console(width=80, record=True, force_terminal=False)
    console.print(confusion_table(confusion_matrix(labels, labels)))
    text = console.export_text()
    assert "accuracy" in text and "…" not in text and max(map(len, text.splitlines())) <= 80
    assert all("1000" in line for line in text.splitlines() if line.strip()[:1].isdigit())


def test_the_png_has_its_size_and_is_not_blank(tmp_path):
    write_confusion_png(example_matrix(), tmp_path / "confusion.png")
    open_png(tmp_path / "confusion.png", (700, 600))
    assert no_temp_files(tmp_path)


def test_eval_confusion_counts_what_eval_counts(tiny_split, tmp_path):
    """Through the CLI: the diagonal is eval's correct count, the rows are the test labels."""
    import json

    from tests.support import assert_user_error, run, train_args
    from tinymnist.data import load_test_split

    ckpt = tmp_path / "mlp.pt"
    assert run(*train_args(tiny_split, "--model", "mlp", "--epochs", 1, "--save-model", ckpt)).exit_code == 0
    result = run("eval", ckpt, "--confusion", "--json", "--data-dir", tiny_split, "--no-download", "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    matrix = torch.tensor(record["confusion_matrix"])  # (10, 10)
    assert int(matrix.diagonal().sum()) == record["correct"]
    _, labels = load_test_split(tiny_split)
    assert matrix.sum(dim=1).tolist() == torch.bincount(labels, minlength=10).tolist()
    table = run("eval", ckpt, "--confusion", "--data-dir", tiny_split, "--no-download", "--device", "cpu")
    assert "confusion matrix" in table.stdout and "Test set:" in table.stdout
    assert_user_error(run("eval", ckpt, "-o", tmp_path / "c.png", "--data-dir", tiny_split), "--confusion")
    jpeg = tmp_path / "c.jpg"
    assert_user_error(run("eval", ckpt, "--confusion", "-o", jpeg, "--data-dir", tiny_split), "c.jpg", ".png")
    assert not jpeg.exists()
    png, where = tmp_path / "c.png", ["--data-dir", tiny_split, "--no-download", "--device", "cpu"]
    drawn = run("eval", ckpt, "--confusion", "-o", png, *where)
    assert drawn.exit_code == 0 and drawn.stdout.strip().endswith(f"wrote {png}") and png.exists()
    drawn = run("eval", ckpt, "--confusion", "--json", "-o", png, *where)  # stdout stays JSON lines
    assert json.loads(drawn.stdout)["correct"] == record["correct"] and f"wrote {png}" in drawn.stderr
