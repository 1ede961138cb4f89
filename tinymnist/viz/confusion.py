"""`eval --confusion`: which digits the network takes for which.

Row = the true digit, column = the predicted one, so row d sums to the number of test
images of digit d and the diagonal counts the correct ones. Per-class accuracy is the
diagonal over the row sums (recall, in the usual words).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich import box
from rich.table import Table

from tinymnist.algorithm.networks import NUM_CLASSES
from tinymnist.tool.extras import require
from tinymnist.tool.outputs import atomic_output

FIGURE_INCHES = (7, 6)
DPI = 100  # 700 x 600 pixels
PNG_PURPOSE = "eval --confusion -o"  # what needs matplotlib, if it is missing


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) predicted and (N,) true digits -> (10, 10) int64 counts, [true, predicted]."""
    pairs = labels.long() * NUM_CLASSES + predictions.long()  # (N,): one bin per (true, predicted)
    return torch.bincount(pairs, minlength=NUM_CLASSES * NUM_CLASSES).view(NUM_CLASSES, NUM_CLASSES).cpu()


def per_class_accuracy(matrix: torch.Tensor) -> list[float | None]:
    """Correct / total per true digit; None for a digit absent from the test set."""
    totals = matrix.sum(dim=1)  # (10,)
    return [int(c) / int(t) if t else None for c, t in zip(matrix.diagonal(), totals, strict=True)]


def confusion_dict(matrix: torch.Tensor) -> dict:
    """What `eval --json` adds: the matrix as lists ([true][predicted]) and the per-class accuracy."""
    return {"confusion_matrix": matrix.tolist(), "per_class_accuracy": per_class_accuracy(matrix)}


def confusion_table(matrix: torch.Tensor) -> Table:
    """The matrix as a rich Table: correct counts in green, the largest mistakes in red."""
    # No lines between columns: 12 columns of MNIST's 4-digit counts then fit a pipe's 80 characters.
    title = "confusion matrix: rows true digit, columns predicted"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("true", justify="right", style="bold")
    for digit in range(NUM_CLASSES):
        table.add_column(str(digit), justify="right")
    table.add_column("accuracy", justify="right", style="bold")
    off_diagonal = matrix - torch.diag(matrix.diagonal())
    worst = int(off_diagonal.max())
    for digit, (row, accuracy) in enumerate(zip(matrix.tolist(), per_class_accuracy(matrix), strict=True)):
        cells = [cell(count, predicted == digit, count == worst) for predicted, count in enumerate(row)]
        table.add_row(str(digit), *cells, "-" if accuracy is None else f"{100 * accuracy:.2f}%")
    return table


def cell(count: int, correct: bool, worst: bool) -> str:
    if count == 0:
        return "."  # quieter than a column of zeros
    if correct:
        return f"[green]{count}[/]"
    return f"[bold red]{count}[/]" if worst else str(count)


def write_confusion_png(matrix: torch.Tensor, path: Path) -> None:
    """The matrix as a heat map with every count written in its cell; write it atomically."""
    matplotlib = require("matplotlib", PNG_PURPOSE)
    figure_module = require("matplotlib.figure", PNG_PURPOSE)
    colors = require("matplotlib.colors", PNG_PURPOSE)
    figure = figure_module.Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    ax = figure.subplots()
    counts = matrix.numpy()
    # A log colour scale: the diagonal's ~1000 would wash out the mistakes' handfuls.
    # Zero cells are masked and stay white.
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="white")
    norm = colors.LogNorm(vmin=1, vmax=max(int(counts.max()), 2))
    image = ax.imshow(np.ma.masked_equal(counts, 0), cmap=cmap, norm=norm)
    for true in range(NUM_CLASSES):
        for predicted in range(NUM_CLASSES):
            count = int(counts[true, predicted])
            colour = "white" if count > 0 and norm(count) > 0.6 else "black"  # white on deep blue
            ax.text(predicted, true, str(count), ha="center", va="center", fontsize=8, color=colour)
    row_labels = [f"{d}  {'-' if a is None else f'{100 * a:.1f}%'}" for d, a in enumerate(per_class_accuracy(matrix))]
    ax.set_xticks(range(NUM_CLASSES))
    ax.set_yticks(range(NUM_CLASSES), row_labels)
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit  (its accuracy)")
    ax.set_title(f"confusion matrix: {int(matrix.diagonal().sum())}/{int(matrix.sum())} correct")
    figure.colorbar(image, ax=ax, label="images (log scale)")
    with atomic_output(path) as f:
        figure.savefig(f, format="png")
