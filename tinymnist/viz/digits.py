"""Draw digits with their predictions: in the terminal, as plain text, or as a PNG grid.

A terminal gets Unicode half blocks: "▀" paints its upper half in the foreground
colour and its lower half in the background colour, so one character shows two
pixels and a 28x28 digit takes 28x14 characters, grey levels intact. Output that is
not a terminal has no colours, so it gets an ASCII ramp instead (one character per
two pixels, darker characters for more ink), which survives logs and pipes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Group
from rich.style import Style
from rich.text import Text

from tinymnist.tool.extras import require
from tinymnist.tool.outputs import atomic_output

UPPER_HALF_BLOCK = "▀"
ASCII_RAMP = " .:-=+*#%@"  # Paul Bourke's 10-level character ramp, from no ink to full ink
DIGIT_WIDTH = 28  # characters: one per pixel column
GAP = 2  # characters between digits
PNG_COLUMNS = 8
PNG_INCHES_PER_DIGIT = 1.6  # room for the digit and a two-line title
DPI = 100


@dataclass(frozen=True)
class Digit:
    image: torch.Tensor  # (28, 28) uint8, white ink on black as MNIST stores it
    name: str  # "#1234" (its index in the test set) or the image's file name
    predicted: int
    probability: float  # of the predicted digit, 0..1
    label: int | None = None  # the true digit, when known

    @property
    def wrong(self) -> bool:
        return self.label is not None and self.label != self.predicted

    def caption(self) -> str:
        """One line, at most DIGIT_WIDTH characters: the name, the prediction, and the truth if it differs."""
        said = f"{self.predicted} ({100 * self.probability:.1f}%)" + (f" ✗ true {self.label}" if self.wrong else "")
        room = DIGIT_WIDTH - len(said) - 2
        name = self.name if len(self.name) <= room else self.name[: max(room - 1, 0)] + "…"
        return f"{name}: {said}"


def terminal_digits(digits: list[Digit], width: int) -> Group:
    """Rows of half-block digits with their captions, as many per row as fit in `width`."""
    return _rows(digits, width, _half_block_lines)


def plain_digits(digits: list[Digit], width: int) -> Group:
    """The same layout in plain ASCII, for output that is not a terminal."""
    return _rows(digits, width, _ascii_lines)


def _rows(digits: list[Digit], width: int, draw) -> Group:
    per_row = max(1, (width + GAP) // (DIGIT_WIDTH + GAP))
    parts = []
    for start in range(0, len(digits), per_row):
        row = digits[start : start + per_row]
        captions = Text(" " * GAP).join(
            Text(d.caption().ljust(DIGIT_WIDTH), style="bold red" if d.wrong else "bold") for d in row
        )
        drawn = [draw(d.image) for d in row]  # each: 14 Text lines of 28 characters
        lines = [Text(" " * GAP).join(pieces) for pieces in zip(*drawn, strict=True)]
        parts += [captions, *lines, Text("")]
    return Group(*parts)


def _half_block_lines(image: torch.Tensor) -> list[Text]:
    grey = image.tolist()  # 28 rows of 28 ints 0..255
    lines = []
    for top, bottom in zip(grey[0::2], grey[1::2], strict=True):  # 14 pairs of pixel rows
        line = Text()
        for upper, lower in zip(top, bottom, strict=True):
            line.append(
                UPPER_HALF_BLOCK, Style(color=f"rgb({upper},{upper},{upper})", bgcolor=f"rgb({lower},{lower},{lower})")
            )
        lines.append(line)
    return lines


def _ascii_lines(image: torch.Tensor) -> list[Text]:
    pairs = image.view(14, 2, 28).float().mean(dim=1)  # (14, 28): two pixel rows per line of text
    levels = (pairs / 256 * len(ASCII_RAMP)).long()  # (14, 28) in 0..9
    return [Text("".join(ASCII_RAMP[i] for i in row)) for row in levels.tolist()]


def write_digits_png(digits: list[Digit], path: Path, purpose: str = "predict -o") -> None:
    """A grid of the digits, PNG_COLUMNS wide, each titled with its prediction (red when wrong)."""
    figure_module = require("matplotlib.figure", purpose)
    columns = min(len(digits), PNG_COLUMNS)
    rows = math.ceil(len(digits) / columns)
    figure = figure_module.Figure(
        figsize=(columns * PNG_INCHES_PER_DIGIT, rows * PNG_INCHES_PER_DIGIT), dpi=DPI, layout="constrained"
    )
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, digit in zip(axes, digits, strict=False):
        ax.imshow(digit.image.cpu().numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        title = f"{digit.name}\n{digit.predicted} ({100 * digit.probability:.1f}%)"
        if digit.wrong:
            title += f" ✗ true {digit.label}"
        ax.set_title(title, fontsize=9, color="red" if digit.wrong else "black")
    with atomic_output(path) as f:
        figure.savefig(f, format="png")
