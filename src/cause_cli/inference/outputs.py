"""What ``cause segment`` writes for one image: its label map, its overlay and its scores, and
their names below the output folder.

Everything of the image's own size stays in 8-bit pixels and is worked a band of rows at a
time, so a big photo costs a few bytes a pixel (``benchmarks/segment_memory.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import CauseError
from .figures import palette
from .inputs import SourceEntry

OVERLAY_OPACITY = 0.5
PALETTE_IDS = 256  # the ids a palette PNG holds; more clusters get 16-bit greyscale label maps
OVERLAY_BAND_PIXELS = 1 << 20  # an overlay is blended this many pixels (whole rows) at a time
OUTPUT_KINDS = ("labels", "overlays", "scores")
DEFAULT_SAVE = ("labels", "overlays")


def parse_save(text: str) -> tuple[str, ...]:
    """``"labels,scores"`` as the outputs to write, in their fixed order; one sentence for a
    name that is not an output."""
    wanted = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(wanted - set(OUTPUT_KINDS))
    if unknown or not wanted:
        raise CauseError(f"--save takes a comma-separated list of {', '.join(OUTPUT_KINDS)}, not '{text}'.")
    return tuple(kind for kind in OUTPUT_KINDS if kind in wanted)


def label_image(
    values: np.ndarray, size: tuple[int, int], num_classes: int, flat_palette: list[int] | None = None
) -> Image.Image:
    """A label map as the PNG ``cause segment`` writes, at ``size`` (width, height): palette
    colours up to 256 ids, 16-bit greyscale past them (a palette holds 256)."""
    if num_classes <= PALETTE_IDS:
        label = Image.fromarray(values.astype(np.uint8), "P")
        label.putpalette(flat_palette if flat_palette is not None else palette().reshape(-1).tolist())
    else:
        label = Image.fromarray(values.astype(np.uint16))
    return label.resize(size, Image.Resampling.NEAREST)


def overlay_image(
    image: Image.Image,
    labels: np.ndarray | Image.Image,
    colours: np.ndarray,
    opacity: float = OVERLAY_OPACITY,
    *,
    in_place: bool = False,
) -> Image.Image:
    """``image`` with the colour of each pixel's label blended in; ``labels`` are ``[H, W]`` ids,
    or the label map :func:`label_image` makes (ids past the colours wrap around). A big image
    is blended a band of rows at a time, so nothing of its size is made but the result, in 8-bit
    pixels; ``in_place`` blends into ``image`` itself (returned), one nobody needs afterwards."""
    width, height = image.size
    rows = max(1, OVERLAY_BAND_PIXELS // max(1, width))
    if rows >= height and not in_place:
        return Image.blend(image, _tint(np.asarray(labels), colours), opacity)
    out = image if in_place else Image.new(image.mode, image.size)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        band = labels.crop((0, top, width, bottom)) if isinstance(labels, Image.Image) else labels[top:bottom]
        box = (0, top, width, bottom)
        out.paste(Image.blend(image.crop(box), _tint(np.asarray(band), colours), opacity), box)
    return out


def _tint(labels: np.ndarray, colours: np.ndarray) -> Image.Image:
    """The colour of each id of ``labels`` as an RGB image; a palette map's 8-bit ids index 256
    colours as they are."""
    if not (labels.dtype == np.uint8 and len(colours) >= 256):
        labels = labels.astype(np.int64, copy=False) % len(colours)
    return Image.fromarray(colours[labels].astype(np.uint8, copy=False), "RGB")


def save_scores(confidence: np.ndarray, margin: np.ndarray, target: Path) -> None:
    with target.open("wb") as handle:  # a handle: given a path, numpy would add ".npz" to the temporary name
        np.savez_compressed(handle, confidence=confidence, margin=margin)


def output_names(entry: SourceEntry, save: tuple[str, ...]) -> list[str]:
    """The files the input ``entry`` gets, below the output folder."""
    names = {"labels": f"labels/{entry.output.as_posix()}", "overlays": f"overlays/{entry.output.as_posix()}",
             "scores": f"scores/{entry.output.with_suffix('.npz').as_posix()}"}  # fmt: skip
    return [names[kind] for kind in save]
