"""Pictures a person looks at: colour palettes, the confusion matrix, example predictions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.labels import bit_palette as palette
from ..paths import write_atomically

__all__ = ["colourise", "confusion_picture", "palette", "samples_picture", "save_png"]

IGNORE_COLOUR = (255, 255, 255)


def colourise(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """``[H, W]`` integer labels (negative = ignored) to ``uint8 [H, W, 3]``."""
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    valid = labels >= 0
    out[valid] = colours[labels[valid] % len(colours)]
    out[~valid] = IGNORE_COLOUR
    return out


def save_png(image: Image.Image, path: Path) -> None:
    write_atomically(path, lambda target: image.save(target, format="PNG"))


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def confusion_picture(
    histogram: np.ndarray, mapping: np.ndarray, class_names: Sequence[str], cell: int = 24
) -> Image.Image:
    """Row-normalised confusion matrix after matching: rows are classes, columns the classes
    the clusters were matched to. ``histogram`` is ``hist[cluster, class]``."""
    size = histogram.shape[0]
    matched = np.zeros_like(histogram, dtype=np.float64)
    matched[mapping] = histogram  # row j: the cluster matched to class j
    by_class = matched.T  # [class, predicted class]
    totals = by_class.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(totals > 0, by_class / np.maximum(totals, 1), 0.0)
    font = _font()
    margin = 8 + 7 * max((len(name) for name in class_names), default=1)
    picture = Image.new("RGB", (margin + size * cell + 8, margin + size * cell + 8), "white")
    draw = ImageDraw.Draw(picture)
    for row in range(size):
        draw.text((4, margin + row * cell + cell // 3), class_names[row], fill="black", font=font)
        for col in range(size):
            shade = int(255 * (1 - normalised[row, col]))
            box = (
                margin + col * cell,
                margin + row * cell,
                margin + (col + 1) * cell - 1,
                margin + (row + 1) * cell - 1,
            )
            draw.rectangle(box, fill=(shade, shade, 255))
    for col in range(size):
        draw.text((margin + col * cell + 2, 4), class_names[col][:3], fill="black", font=font)
    return picture


def samples_picture(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str]) -> Image.Image:
    """A grid of ``uint8 [H, W, 3]`` pictures, one example per row, with column titles."""
    height, width = rows[0][0].shape[:2]
    header = 16
    picture = Image.new("RGB", (width * len(titles), header + height * len(rows)), "white")
    draw = ImageDraw.Draw(picture)
    for col, title in enumerate(titles):
        draw.text((col * width + 4, 2), title, fill="black", font=_font())
    for row, tiles in enumerate(rows):
        for col, tile in enumerate(tiles):
            picture.paste(Image.fromarray(tile), (col * width, header + row * height))
    return picture
