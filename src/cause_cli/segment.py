"""``cause segment``: folders of images in, label maps and overlays out.

For every readable image under the source: ``OUT/labels/<relative path>.png`` (a palette PNG
of the image's own size, one value per cluster) and ``OUT/overlays/<relative path>.png``
(the image with the clusters' colours blended in). Files that are not readable images are
skipped and listed, never fatal. ``OUT/summary.json`` records what was done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .data.transforms import normalise, resize_and_crop
from .devices import resolve_device
from .errors import CauseError
from .paths import write_atomically, write_json
from .predict import cluster_cosines, head_feature_map, load_trained
from .progress import Reporter
from .runs import open_run

# Cosines are computed at most at this size (longest side), then label maps are resized to
# the image's own size, so a 40-megapixel photo costs no more memory than a small one.
MAX_PREDICTION_SIDE = 1024
OVERLAY_OPACITY = 0.5


def palette(num_colours: int = 256) -> np.ndarray:
    """Distinct colours ``uint8 [N, 3]``: the Pascal VOC bit-interleaved colour map."""
    index = np.arange(num_colours)
    colours = np.zeros((num_colours, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colours[:, channel] |= ((index >> channel) & 1) << shift
        index = index >> 3
    return colours.astype(np.uint8)


@dataclass
class SegmentSummary:
    inputs: int = 0
    written: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self, run: Path, backbone: str) -> dict[str, Any]:
        per_image = self.seconds / len(self.written) if self.written else None
        return {
            "inputs": self.inputs,
            "outputs": self.written,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "seconds_per_image": round(per_image, 4) if per_image is not None else None,
            "run": str(run),
            "backbone": backbone,
        }


def collect_inputs(source: Path) -> list[tuple[Path, Path]]:
    """``(file, path relative to the source)`` for every non-hidden file under ``source``."""
    if source.is_file():
        return [(source, Path(source.name))]
    if not source.is_dir():
        raise CauseError(f"{source} does not exist.")
    files = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append((path, relative))
    return files


def read_rgb(path: Path) -> Image.Image:
    """Any image PIL reads (grey, palette, RGBA, CMYK, 16-bit...) as 8-bit RGB, upright."""
    with Image.open(path) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((np.clip(array / top, 0, 1) * 255).round().astype(np.uint8), "L")
    return image.convert("RGB")


def _prediction_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, MAX_PREDICTION_SIDE / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def segment_images(
    source: Path | str,
    run_path: Path | str,
    out: Path | str,
    device: str = "auto",
    batch_size: int = 8,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Segment every image under ``source`` with the run's model into ``out``."""
    reporter = reporter or Reporter()
    run = open_run(run_path)
    source = Path(source)
    out = Path(out)
    files = collect_inputs(source)
    torch_device = resolve_device(device)
    model = load_trained(run, torch_device)
    colours = palette()
    flat_palette = colours.reshape(-1).tolist()
    summary = SegmentSummary(inputs=len(files))
    started = time.perf_counter()

    pending: list[tuple[Path, Image.Image]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack(
            [normalise(resize_and_crop(image, model.resolution, square_resize=True)) for _, image in pending]
        ).to(torch_device)
        features = head_feature_map(model, batch)
        for index, (relative, image) in enumerate(pending):
            size = _prediction_size(image.width, image.height)
            clusters = cluster_cosines(model, features[index : index + 1], size).argmax(dim=1)[0]
            label = Image.fromarray(clusters.to(torch.uint8).cpu().numpy(), "P")
            label.putpalette(flat_palette)
            label = label.resize(image.size, Image.Resampling.NEAREST)
            label_path = out / "labels" / relative.with_suffix(".png")
            overlay_path = out / "overlays" / relative.with_suffix(".png")
            _save(label, label_path)
            tint = Image.fromarray(colours[np.asarray(label)], "RGB")
            _save(Image.blend(image, tint, OVERLAY_OPACITY), overlay_path)
            summary.written.append(
                {"input": relative.as_posix(), "label": str(label_path), "overlay": str(overlay_path)}
            )
        pending.clear()

    with reporter.task("segmenting", len(files)) as advance:
        for path, relative in files:
            try:
                pending.append((relative, read_rgb(path)))
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
                summary.skipped.append({"input": relative.as_posix(), "reason": _reason(error)})
            if len(pending) >= batch_size:
                flush()
            advance(1)
        flush()
    summary.seconds = time.perf_counter() - started
    result = summary.as_dict(run.path, model.config.backbone)
    write_json(out / "summary.json", result)
    return result


def _reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image this toolkit can read"
    return f"unreadable image ({type(error).__name__}: {error})"


def _save(image: Image.Image, path: Path) -> None:
    write_atomically(path, lambda target: image.save(target, format="PNG"))
