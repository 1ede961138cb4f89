"""Draw digits with their predictions: in the terminal, as plain text, or as a PNG grid.

A terminal gets Unicode half blocks: "▀" paints its upper half in the foreground colour and
its lower half in the background colour, so a 28x28 digit takes 28x14 characters, grey
levels intact. Other output gets an ASCII ramp (darker characters for more ink) instead.
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
# The PNG grid, in pixels. A cell: a margin, two caption lines, the digit, a margin.
PNG_COLUMNS = 8  # the fewest columns of a grid (grid_columns adds more for many digits)
DIGIT_SCALE = 3  # each MNIST pixel as a 3x3 block: the strokes and grey rims stay visible
DIGIT_PIXELS = 28 * DIGIT_SCALE
FONT_PIXELS = 11
LINE_HEIGHT = 14  # a caption line: the font and the space under it
CAPTION_HEIGHT = 2 * LINE_HEIGHT  # the name, then the prediction
MARGIN = 8
CELL_WIDTH = DIGIT_PIXELS + 2 * MARGIN  # 100: "7 (99.9%) true 3" is 76 pixels wide
CELL_HEIGHT = MARGIN + CAPTION_HEIGHT + DIGIT_PIXELS + MARGIN


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

    def said(self, mark: str = "") -> str:
        """The prediction, and the truth if it differs: "7 (99.9%)", "7 (51.2%) ✗ true 3" with mark=" ✗"."""
        return f"{self.predicted} ({100 * self.probability:.1f}%)" + (f"{mark} true {self.label}" if self.wrong else "")

    def caption(self) -> str:
        """One line, at most DIGIT_WIDTH characters: the name and what was said."""
        said = self.said(" ✗")
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


def write_digits_png(digits: list[Digit], path: Path) -> None:
    """A grid of the digits, each under its name and prediction (red when wrong), as one pillow
    image with each digit's pixels pasted as blocks: a matplotlib axes per digit is far slower."""
    image_module = require("PIL.Image", "predict -o")
    draw_module = require("PIL.ImageDraw", "predict -o")
    font = caption_font(require("PIL.ImageFont", "predict -o"))
    columns = grid_columns(len(digits))
    rows = math.ceil(len(digits) / columns)
    sheet = image_module.new("RGB", (columns * CELL_WIDTH, rows * CELL_HEIGHT), "white")
    draw = draw_module.Draw(sheet)
    for index, digit in enumerate(digits):
        left, top = digit_origin(index, columns)
        pixels = digit.image.cpu().numpy().repeat(DIGIT_SCALE, axis=0).repeat(DIGIT_SCALE, axis=1)  # (84, 84)
        sheet.paste(image_module.fromarray(pixels).convert("RGB"), (left, top))
        lines = ((fitted(digit.name, draw, font), "black"), (digit.said(), "red" if digit.wrong else "black"))
        centre = left + DIGIT_PIXELS // 2
        for line, (text, colour) in enumerate(lines):
            y = top - CAPTION_HEIGHT + line * LINE_HEIGHT
            draw.text((centre - draw.textlength(text, font=font) / 2, y), text, fill=colour, font=font)
    with atomic_output(path) as f:
        sheet.save(f, format="PNG")


def grid_columns(count: int) -> int:
    """At least PNG_COLUMNS, more for many digits, so that the sheet stays about square."""
    square = math.ceil(math.sqrt(count * CELL_HEIGHT / CELL_WIDTH))
    return max(1, min(count, max(PNG_COLUMNS, square)))


def digit_origin(index: int, columns: int) -> tuple[int, int]:
    """(left, top) in the sheet of the `index`-th digit's pixels, row by row."""
    row, column = divmod(index, columns)
    left = column * CELL_WIDTH + (CELL_WIDTH - DIGIT_PIXELS) // 2
    top = row * CELL_HEIGHT + MARGIN + CAPTION_HEIGHT
    return left, top


def caption_font(image_font):
    """Pillow's own font, so that no font file must be found: at FONT_PIXELS with FreeType
    (Pillow >= 10.1), else its older 11-pixel bitmap font (load_default takes no size there)."""
    try:
        return image_font.load_default(size=FONT_PIXELS)
    except TypeError:
        return image_font.load_default()


def fitted(text: str, draw, font) -> str:
    """`text`, cut with an ellipsis to the width of a cell (a file name can be long)."""
    room = CELL_WIDTH - 2 * MARGIN
    if draw.textlength(text, font=font) <= room:
        return text
    while text and draw.textlength(text + "…", font=font) > room:
        text = text[:-1]
    return text + "…"
