"""Turn a photo or drawing of a digit into a 28x28 MNIST digit, the way MNIST was made.

LeCun, Cortes and Burges: each digit was "size normalized to fit in a 20x20 pixel box while
preserving its aspect ratio", antialiased, then "centered in a 28x28 image by computing the
center of mass of the pixels". So, for any picture (PNG/JPEG, any size, colour):

    upright, as its EXIF orientation says ──> grey, 0..1
      ──invert if the border is light──> light ink on black, like MNIST
      ──crop to the ink's bounding box──> (h, w)
      ──resize, longer side 20, antialiased──> at most (20, 20)
      ──paste into 28x28 with the centre of mass at the middle──> uint8 (28, 28)

A network trained on MNIST reads a digit too small, off-centre or dark-on-light as another.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tinymnist.data import IMAGE_SIZE
from tinymnist.data.files import check_readable
from tinymnist.errors import TinyMnistError
from tinymnist.tool.extras import require

DIGIT_BOX = 20  # the box MNIST's digits were normalized into (the longer side)
# Where MNIST puts a digit's centre of mass, in pixel-index coordinates: measured over
# the 10,000 test digits, the mean is 13.99 (rows) and 14.01 (columns), spread 0.29.
CENTRE = 14.0
LIGHT_BACKGROUND = 0.5  # a border greyer than half-way is paper: invert to light-on-dark
MIN_CONTRAST = 0.1  # ink must differ from the background by a tenth of the grey range
# A pixel is ink when it is this far from the background towards the strongest ink:
# low enough to keep a stroke's antialiased rim, high enough to drop JPEG noise and paper grain.
INK_THRESHOLD = 0.2


def read_grey(path: Path) -> torch.Tensor:
    """The image at `path` as grey levels (H, W) in 0..1; a transparent background counts as white."""
    image_module = require("PIL.Image", "predict --image")
    image_ops = require("PIL.ImageOps", "predict --image")
    check_readable(path, "--image")  # a named pipe would block the read forever
    try:
        with image_module.open(path) as image:
            image.load()
            # A phone stores the sensor's rows and an EXIF tag saying how to turn them for
            # viewing; without the turn, a portrait photo's digit lies on its side.
            image = image_ops.exif_transpose(image)
    except FileNotFoundError:
        raise TinyMnistError(f"--image {path}: no such file") from None
    except image_module.DecompressionBombError as e:  # pillow refuses to unpack it: too many pixels
        raise TinyMnistError(f"--image {path}: too large to read safely ({e}); scale it down") from None
    except (image_module.UnidentifiedImageError, OSError, ValueError) as e:
        raise TinyMnistError(f"--image {path}: not an image pillow can read ({e}); give a PNG or JPEG") from None
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Digits drawn on a transparent canvas are dark strokes whose "background" is
        # black with alpha 0: lay them on white paper, or every pixel would be black.
        rgba = image.convert("RGBA")
        image = image_module.alpha_composite(image_module.new("RGBA", rgba.size, "white"), rgba)
    grey = np.asarray(image.convert("L"), dtype=np.float32)  # (H, W), 0..255
    return torch.from_numpy(grey.copy()) / 255


def mnist_digit(grey: torch.Tensor, name: str = "image") -> torch.Tensor:
    """grey (H, W) in 0..1 -> uint8 (28, 28), white ink on black, centred as in MNIST."""
    border = torch.cat([grey[0], grey[-1], grey[:, 0], grey[:, -1]])  # (2H + 2W,)
    if border.median() > LIGHT_BACKGROUND:
        grey, border = 1 - grey, 1 - border
    background = border.median()
    contrast = grey.max() - background
    if contrast < MIN_CONTRAST:
        raise TinyMnistError(f"--image {name}: no digit found (the picture is nearly one grey); crop it to the digit")
    ink = ((grey - background) / contrast).clamp(0, 1)  # (H, W): 0 background, 1 the strongest stroke
    ink = torch.where(ink > INK_THRESHOLD, ink, 0)  # MNIST's background is exactly 0
    rows, cols = ink.any(dim=1).nonzero().squeeze(1), ink.any(dim=0).nonzero().squeeze(1)
    box = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # (h, w): the bounding box of the ink
    scale = DIGIT_BOX / max(box.shape)
    size = (max(1, round(box.shape[0] * scale)), max(1, round(box.shape[1] * scale)))
    digit = F.interpolate(box[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    digit = digit.clamp(0, 1)  # (h', w'), longer side 20
    digit = digit / digit.max()  # a thin stroke shrunk to 20 px fades: MNIST strokes reach full ink
    top, left = paste_offset(digit)
    canvas = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    canvas[top : top + size[0], left : left + size[1]] = digit
    return (canvas * 255).round().to(torch.uint8)


def paste_offset(digit: torch.Tensor) -> tuple[int, int]:
    """Where the digit's top-left corner goes so that its centre of mass lands on CENTRE,
    kept inside the 28x28 image."""
    height, width = digit.shape
    mass = digit.sum()
    centre_row = (digit.sum(dim=1) * torch.arange(height)).sum() / mass
    centre_col = (digit.sum(dim=0) * torch.arange(width)).sum() / mass
    top = min(max(round(float(CENTRE - centre_row)), 0), IMAGE_SIZE - height)
    left = min(max(round(float(CENTRE - centre_col)), 0), IMAGE_SIZE - width)
    return top, left
