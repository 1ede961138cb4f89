"""Curves in the terminal, drawn with Unicode braille: each character is 2x4 dots.

Three panels (train loss, test loss, test accuracy) one above the other, one colour per
run, a multi-model run's min-max band dimmed under its mean; log axes as in the PNG.
Output that is not a terminal gets `numbers_table`: the same numbers as plain text, which
a log keeps and grep finds (braille without colours cannot tell the runs apart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.console import Group
from rich.text import Text

from tinymnist.viz.runs import ACCURACY_TICKS, QUANTITIES, TITLES, Run, Series, on_log_axis

BRAILLE_BLANK = 0x2800  # U+2800: the braille cell with no dots; each dot adds one bit
DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # [dot row 0-3][dot column 0-1]
COLOURS = ("cyan", "magenta", "yellow", "green", "blue", "red", "bright_white")
# Characters high. Accuracy spans about two decades of error (90% to 1%) and 98% vs 99%
# is 0.3 of one: 12 rows give that 7 dots, two rows apart.
PANEL_ROWS = {"train_loss": 8, "test_loss": 8, "test_accuracy": 12}
MARGIN = 8  # characters left of the plot for the y-axis labels


class Canvas:
    """width x height characters, that is 2*width x 4*height dots; dot y = 0 is the top."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.bits = [[0] * width for _ in range(height)]
        self.styles = [[""] * width for _ in range(height)]

    def dot(self, x: int, y: int, style: str) -> None:
        if 0 <= x < 2 * self.width and 0 <= y < 4 * self.height:
            self.bits[y // 4][x // 2] |= DOT_BITS[y % 4][x % 2]
            self.styles[y // 4][x // 2] = style  # a cell has one colour: the last drawn wins

    def line(self, x0: int, y0: int, x1: int, y1: int, style: str) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            self.dot(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), style)

    def rows(self) -> list[Text]:
        return [
            Text.assemble(*((chr(BRAILLE_BLANK + b) if b else " ", s) for b, s in zip(bits, styles, strict=True)))
            for bits, styles in zip(self.bits, self.styles, strict=True)
        ]


def plotted(quantity: str, value: float, total: int | None) -> float:
    """The height on a log10 axis (runs.on_log_axis), negated for accuracy so that up is better."""
    height = math.log10(max(on_log_axis(quantity, value, total), 1e-12))  # a loss of exactly 0 would be -inf
    return -height if quantity == "test_accuracy" else height


def text_plot(runs: list[Run], width: int) -> Group:
    """The three panels and a legend, `width` characters wide."""
    plot_width = max(width - MARGIN - 1, 20)
    epochs = [e for run in runs for s in run.series.values() for e in s.epochs]
    first, last = min(epochs), max(max(epochs), min(epochs) + 1)
    coloured = [(run, COLOURS[i % len(COLOURS)]) for i, run in enumerate(runs)]
    parts: list = []
    for quantity in QUANTITIES:
        if drawn := [(run, run.series[quantity], colour) for run, colour in coloured if quantity in run.series]:
            parts += [Text(TITLES[quantity], style="bold"), *panel(quantity, drawn, first, last, plot_width)]
    legend = [Text.assemble(("━━ ", colour), run.label) for run, colour in coloured]
    return Group(*parts, *legend)


@dataclass(frozen=True)
class Frame:
    """Where a point lands: epoch -> dot column, height on the log axis -> dot row (0 = top)."""

    first: int  # epochs at the left and right edges
    last: int
    bottom: float  # heights at the bottom and top edges
    top: float
    width: int  # characters
    rows: int

    def x(self, epoch: float) -> int:
        return round((epoch - self.first) / (self.last - self.first) * (2 * self.width - 1))

    def y(self, height: float) -> int:
        return round((self.top - height) / (self.top - self.bottom) * (4 * self.rows - 1))


def panel(quantity: str, drawn: list[tuple[Run, Series, str]], first: int, last: int, width: int) -> list[Text]:
    """One quantity's plot: the y labels, the braille canvas, the epoch axis."""
    rows = PANEL_ROWS[quantity]
    canvas = Canvas(width, rows)
    heights = [
        plotted(quantity, v, run.total) for run, s, _ in drawn for v in (*s.values, *(s.low or ()), *(s.high or ()))
    ]
    bottom, top = min(heights), max(heights)
    if top - bottom < 0.1:  # a flat curve: give it a decade's tenth of room
        bottom, top = bottom - 0.05, top + 0.05
    frame = Frame(first, last, bottom, top, width, rows)
    for run, series, colour in drawn:
        xs = [frame.x(e) for e in series.epochs]
        if series.low is not None:
            lows, highs = (dot_rows(frame, quantity, v, run.total) for v in (series.low, series.high))
            fill_band(canvas, xs, lows, highs, f"dim {colour}")
        points = list(zip(xs, dot_rows(frame, quantity, series.values, run.total), strict=True))
        for (x0, y0), (x1, y1) in zip(points, [*points[1:], points[-1]], strict=True):  # a lone point draws itself
            canvas.line(x0, y0, x1, y1, colour)
    labels = tick_labels(quantity, frame, drawn[0][0].total)
    lines = [
        Text(labels.get(i, "").rjust(MARGIN - 1) + ("┤" if i in labels else "│")) + row
        for i, row in enumerate(canvas.rows())
    ]
    axis = Text(" " * (MARGIN - 1) + "└" + "─" * width)
    epoch_labels = f"epoch {first}".ljust(width - len(str(last))) + str(last)
    return [*lines, axis, Text(" " * MARGIN + epoch_labels)]


def dot_rows(frame: Frame, quantity: str, values: tuple[float, ...], total: int | None) -> list[int]:
    return [frame.y(plotted(quantity, v, total)) for v in values]


def fill_band(canvas: Canvas, xs: list[int], lows: list[int], highs: list[int], style: str) -> None:
    """Fill the dots between the min and max curves, interpolated between epochs."""
    for i in range(len(xs) - 1 or 1):
        j = min(i + 1, len(xs) - 1)
        for x in range(xs[i], xs[j] + 1):
            t = (x - xs[i]) / (xs[j] - xs[i]) if xs[j] != xs[i] else 0.0
            low, high = lows[i] + t * (lows[j] - lows[i]), highs[i] + t * (highs[j] - highs[i])
            for y in range(round(min(low, high)), round(max(low, high)) + 1):
                canvas.dot(x, y, style)


def tick_labels(quantity: str, frame: Frame, total: int | None) -> dict[int, str]:
    """Character row -> label, for the ticks inside the range, at most one per row."""
    if quantity == "test_accuracy":
        ticks = [(plotted(quantity, a, total), f"{100 * a:g}%") for a in ACCURACY_TICKS]
    else:  # 1-2-5 steps per decade
        decades = range(math.floor(frame.bottom) - 1, math.ceil(frame.top) + 1)
        ticks = [(math.log10(m * 10.0**d), f"{m * 10.0**d:g}") for d in decades for m in (1, 2, 5)]
    labels: dict[int, str] = {}
    for height, label in ticks:
        row = frame.y(height) // 4
        if frame.bottom <= height <= frame.top and row not in labels:
            labels[row] = label
    return labels


def numbers_table(runs: list[Run]) -> str:
    """Each run's numbers per epoch as plain text; a band shows as mean (min-max)."""
    blocks = []
    for run in runs:
        lines = [run.label, f"{'epoch':>5}  {'train loss':>22}  {'test loss':>22}  {'test accuracy':>26}"]
        for epoch in sorted({e for s in run.series.values() for e in s.epochs}):
            cells = [cell(run.series.get(q), epoch, q) for q in QUANTITIES]
            lines.append(f"{epoch:>5}  {cells[0]:>22}  {cells[1]:>22}  {cells[2]:>26}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def cell(series: Series | None, epoch: int, quantity: str) -> str:
    if series is None or epoch not in series.epochs:
        return "-"
    i = series.epochs.index(epoch)
    mean = number(series.values[i], quantity)
    if series.low is None:
        return mean
    return f"{mean} ({number(series.low[i], quantity)}-{number(series.high[i], quantity)})"


def number(value: float, quantity: str) -> str:
    return f"{100 * value:.2f}%" if quantity == "test_accuracy" else f"{value:.4f}"
