"""Pictures a person looks at: colour palettes, the confusion matrix, example predictions."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.labels import bit_palette as palette
from ..paths import write_atomically

__all__ = ["colourise", "confusion_picture", "legend_strip", "palette", "samples_picture", "save_png"]

IGNORE_COLOUR = (255, 255, 255)


def colourise(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """``[H, W]`` integer labels (negative = ignored) to ``uint8 [H, W, 3]``."""
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    valid = labels >= 0
    out[valid] = colours[labels[valid] % len(colours)]
    out[~valid] = IGNORE_COLOUR
    return out


def png_writer(image: Image.Image) -> Callable[[Path], None]:
    """What writes ``image`` as a PNG to the path it is given."""
    return lambda target: image.save(target, format="PNG")


def save_png(image: Image.Image, path: Path) -> None:
    write_atomically(path, png_writer(image))


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:  # Pillow's own scalable font, where Pillow has FreeType
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def _width(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> int:
    return math.ceil(font.getlength(text))


def _upright_text(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, height: int) -> Image.Image:
    """``text`` written bottom to top: a mask ``height`` wide, as tall as the text is long."""
    mask = Image.new("L", (_width(font, text) + 2, height), 0)
    ImageDraw.Draw(mask).text((1, height // 2), text, fill=255, font=font, anchor="lm")
    return mask.rotate(90, expand=True)


def _shade(value: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1): light cells are rare, dark ones are where pixels go."""
    light, dark = np.array([247, 251, 255]), np.array([8, 48, 107])
    red, green, blue = (int(c) for c in np.rint(light + (dark - light) * float(np.clip(value, 0.0, 1.0))))
    return red, green, blue


def confusion_picture(
    histogram: np.ndarray, mapping: np.ndarray, class_names: Sequence[str], cell: int | None = None
) -> Image.Image:
    """Row-normalised confusion matrix after matching: a row per true class, a column per class
    the clusters were matched to, each cell the share of the row's pixels (numbers written in
    the cells while they fit), full class names on both axes, axis titles and a colour bar.
    ``histogram`` is ``hist[cluster, class]``. Readable from 6 to 171 classes: the cells shrink
    to keep the picture about 1,200 pixels across."""
    size = histogram.shape[0]
    matched = np.zeros_like(histogram, dtype=np.float64)
    matched[mapping] = histogram  # row j: the cluster matched to class j
    by_class = matched.T  # [class, predicted class]
    totals = by_class.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(totals > 0, by_class / np.maximum(totals, 1), 0.0)
    cell = cell or int(np.clip(1200 // max(size, 1), 7, 40))
    names = [str(name) for name in class_names[:size]] + [str(i) for i in range(len(class_names), size)]
    name_font = _font(int(np.clip(cell - 2, 7, 13)))
    title_font = _font(14)
    number_font = _font(max(8, cell // 3))
    bar_font = _font(11)
    show_numbers = cell >= 24
    longest = max((_width(name_font, name) for name in names), default=10)
    title_band = 24
    left = title_band + longest + 8
    top = title_band + longest + 8
    grid = size * cell
    bar_left = left + grid + 24
    width = bar_left + 16 + 8 + _width(bar_font, "100 %") + 12
    height = top + grid + 16
    picture = Image.new("RGB", (max(width, left + _width(title_font, "predicted class") + 16), height), "white")
    draw = ImageDraw.Draw(picture)

    draw.text((left + grid // 2, 4), "predicted class (clusters matched to classes)", fill="black",
              font=title_font, anchor="ma")  # fmt: skip
    true_title = _upright_text("true class", title_font, title_band - 4)
    picture.paste((0, 0, 0), (2, top + max(0, (grid - true_title.height) // 2)), true_title)
    for index, name in enumerate(names):
        middle = index * cell + cell // 2
        draw.text((left - 6, top + middle), name, fill="black", font=name_font, anchor="rm")
        column = _upright_text(name, name_font, cell)
        picture.paste((0, 0, 0), (left + index * cell, top - 6 - column.height), column)
    for row in range(size):
        for col in range(size):
            value = float(normalised[row, col])
            box = (left + col * cell, top + row * cell, left + (col + 1) * cell - 1, top + (row + 1) * cell - 1)
            draw.rectangle(box, fill=_shade(value) if totals[row, 0] > 0 else (220, 220, 220))
            if show_numbers and value >= 0.005:
                centre = (left + col * cell + cell // 2, top + row * cell + cell // 2)
                draw.text(centre, f"{100 * value:.0f}", fill="white" if value > 0.5 else "black",
                          font=number_font, anchor="mm")  # fmt: skip
    draw.rectangle((left - 1, top - 1, left + grid, top + grid), outline=(120, 120, 120))

    # The colour bar: the share of a true class's pixels, top 100 %, bottom 0 %.
    for y in range(grid):
        draw.line((bar_left, top + y, bar_left + 15, top + y), fill=_shade(1 - y / max(grid - 1, 1)))
    draw.rectangle((bar_left - 1, top - 1, bar_left + 16, top + grid), outline=(120, 120, 120))
    for share in (0, 50, 100):
        y = top + round((1 - share / 100) * (grid - 1))
        draw.line((bar_left + 16, y, bar_left + 20, y), fill="black")
        draw.text((bar_left + 24, y), f"{share} %", fill="black", font=bar_font, anchor="lm")
    return picture


def legend_strip(entries: Sequence[tuple[str, Sequence[int]]], width: int) -> Image.Image:
    """Colour swatches with their names, wrapped into rows ``width`` pixels wide."""
    font = _font(12)
    row_height, swatch, gap = 20, 14, 16
    placed: list[tuple[int, int, str, Sequence[int]]] = []
    x, y = 6, 4
    for name, colour in entries:
        needed = swatch + 6 + _width(font, name) + gap
        if x > 6 and x + needed > width:
            x, y = 6, y + row_height
        placed.append((x, y, name, colour))
        x += needed
    picture = Image.new("RGB", (width, y + row_height + 4), "white")
    draw = ImageDraw.Draw(picture)
    for x, y, name, colour in placed:
        draw.rectangle((x, y + 3, x + swatch, y + 3 + swatch), fill=tuple(int(c) for c in colour), outline="black")
        draw.text((x + swatch + 6, y + 3 + swatch // 2), name, fill="black", font=font, anchor="lm")
    return picture


def samples_picture(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    legend: Sequence[tuple[str, Sequence[int]]] = (),
) -> Image.Image:
    """A grid of ``uint8 [H, W, 3]`` pictures, one example per row, with column titles and,
    below, a legend of the colours (``(name, colour)``)."""
    height, width = rows[0][0].shape[:2]
    header = 20
    grid = Image.new("RGB", (width * len(titles), header + height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(titles):
        size = 13
        while size > 7 and _width(_font(size), title) > width - 6:  # small tiles: smaller titles
            size -= 1
        draw.text((col * width + 3, 3), title, fill="black", font=_font(size))
    for row, tiles in enumerate(rows):
        for col, tile in enumerate(tiles):
            grid.paste(Image.fromarray(tile), (col * width, header + row * height))
    if not legend:
        return grid
    strip = legend_strip(legend, grid.width)
    picture = Image.new("RGB", (grid.width, grid.height + strip.height), "white")
    picture.paste(grid, (0, 0))
    picture.paste(strip, (0, grid.height))
    return picture


def legend_picture(names: list[str], colours: np.ndarray) -> Image.Image:
    row = 20
    picture = Image.new("RGB", (220, row * len(names) + 8), "white")
    draw = ImageDraw.Draw(picture)
    for index, name in enumerate(names):
        top = 4 + index * row
        draw.rectangle((6, top, 26, top + row - 4), fill=tuple(int(c) for c in colours[index]))
        draw.text((34, top + 3), name, fill="black")
    return picture
