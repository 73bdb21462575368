"""``cause segment``: images in, label maps and overlays out.

The source is an image file, a folder (searched recursively), a glob pattern, or a text file
listing image paths, one per line. For every readable image, keeping its path relative to the
source: ``OUT/labels/<path>.png`` (a palette PNG of the image's own size) and
``OUT/overlays/<path>.png`` (the image with the colours blended in). Label values are
clusters, or classes when the run has been evaluated (``metrics.json`` holds the matching of
clusters to classes). Files that are not readable images are skipped and listed, never fatal.
``OUT/summary.json`` records what was done.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.base import UnreadableFile, read_image
from ..data.transforms import normalise, resize_and_crop
from ..devices import resolve_device
from ..errors import CauseError
from ..paths import list_files, write_atomically, write_json
from ..progress import Reporter
from ..runs import METRICS_FILE, RunDirectory, open_run
from .crf import CRFPool, CRFQueue, require_crf
from .figures import palette, save_png
from .manifest import SUMMARY_FILE, OutputFolder, run_fingerprint
from .predict import (
    CRF_SHARPNESS,
    TrainedModel,
    cluster_cosines,
    crf_unary,
    flip_averaged_feature_map,
    head_feature_map,
    load_trained,
)

# Cosines are computed at most at this size (longest side), then label maps are resized to
# the image's own size, so a 40-megapixel photo costs no more memory than a small one.
MAX_PREDICTION_SIDE = 1024
OVERLAY_OPACITY = 0.5
LIST_SUFFIXES = {".txt", ".lst"}
PALETTE_IDS = 256  # the ids a palette PNG holds; more clusters get 16-bit greyscale label maps
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


def confidence_and_margin(cosines: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of one image's ``[1, C, H, W]`` cosines: the probability of its best cluster
    (``softmax(3 cos)``, the distribution the dense CRF starts from) and how far it leads the
    second best, both ``float16 [H, W]``."""
    probabilities = torch.softmax(CRF_SHARPNESS * cosines[0].float(), dim=0)
    top = probabilities.topk(min(2, probabilities.shape[0]), dim=0).values
    margin = top[0] - top[1] if top.shape[0] > 1 else top[0]
    return top[0].cpu().numpy().astype(np.float16), margin.cpu().numpy().astype(np.float16)


@dataclass
class SegmentSummary:
    """What this process did; the summary of the folder comes from its manifest."""

    inputs: int = 0
    written: int = 0
    done_before: int = 0
    seconds: float = 0.0

    def as_dict(self, out: Path, finished: list[dict[str, Any]], unreachable: list[dict[str, str]]) -> dict[str, Any]:
        per_image = self.seconds / self.written if self.written else None
        return {
            "inputs": self.inputs,
            "outputs": [
                {key: value if key == "input" else str(out / value) for key, value in entry.items()}
                for entry in finished
                if "skipped" not in entry
            ],
            "skipped": unreachable
            + [{"input": entry["input"], "reason": entry["skipped"]} for entry in finished if "skipped" in entry],
            "done_before": self.done_before,
            "written_now": self.written,
            "seconds": round(self.seconds, 3),
            "seconds_per_image": round(per_image, 4) if per_image is not None else None,
        }


def _common_parent(paths: list[Path]) -> Path:
    parents = [path.resolve().parent for path in paths]
    common = parents[0]
    for parent in parents[1:]:
        while common not in (parent, *parent.parents):
            common = common.parent
    return common


def _relative_to_parent(paths: list[Path]) -> list[tuple[Path, Path]]:
    if not paths:
        return []
    parent = _common_parent(paths)
    return [(path, path.resolve().relative_to(parent)) for path in paths]


def collect_inputs(source: Path | str) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """``(file, path for the outputs)`` for every input named by ``source``, and what could
    not be looked at (folders that cannot be read, dangling links) with the reason.

    A folder gives every non-hidden file below it; a glob pattern its matches; a ``.txt``
    file the paths it lists (relative ones from the list's folder); otherwise one image file.
    """
    text = str(source)
    path = Path(source)
    if path.is_dir():
        listing = list_files(path, skip_hidden=True)
        unreachable = [(where.relative_to(path), reason) for where, reason in listing.unreachable]
        return [(file, file.relative_to(path)) for file in listing.files], unreachable
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        listed = []
        for line in path.read_text().splitlines():
            entry = line.strip()
            if entry and not entry.startswith("#"):
                item = Path(entry).expanduser()
                listed.append(item if item.is_absolute() else path.parent / item)
        return _relative_to_parent(listed), []
    if path.is_file():
        return [(path, Path(path.name))], []
    if glob.has_magic(text):
        matches = [Path(match) for match in sorted(glob.glob(text, recursive=True))]
        files = [match for match in matches if match.is_file()]
        dangling = [match for match in matches if match.is_symlink() and not match.exists()]
        if not files and not dangling:
            raise CauseError(f"No files match {text}.")
        return _relative_to_parent(files), [
            (link, f"a symbolic link to {os.readlink(link)}, which does not exist") for link in dangling
        ]
    raise CauseError(f"{source} does not exist.")


def _prediction_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, MAX_PREDICTION_SIDE / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def class_mapping(run: RunDirectory) -> tuple[np.ndarray, list[str]] | None:
    """The evaluated run's cluster-to-class matching and class names, if it has them."""
    if not run.has(METRICS_FILE):
        return None
    path = run.file(METRICS_FILE)
    damaged = f"{path} is damaged; run cause eval on the run again (or delete the file to write cluster ids)"
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CauseError(f"{damaged}.") from error
    if not isinstance(metrics, dict):
        raise CauseError(f"{damaged}.")
    mapping, names = metrics.get("cluster_to_class"), metrics.get("class_names")
    if not mapping or not names:
        return None
    clusters = int(run.read_run_info()["num_classes"])
    if (
        not isinstance(mapping, list)
        or len(mapping) != clusters
        or not all(isinstance(value, int) and 0 <= value < len(names) for value in mapping)
    ):
        raise CauseError(f"{damaged}: its cluster_to_class does not map the run's {clusters} clusters to its classes.")
    return np.asarray(mapping, dtype=np.int64), list(names)


def legend_picture(names: list[str], colours: np.ndarray) -> Image.Image:
    row = 20
    picture = Image.new("RGB", (220, row * len(names) + 8), "white")
    draw = ImageDraw.Draw(picture)
    for index, name in enumerate(names):
        top = 4 + index * row
        draw.rectangle((6, top, 26, top + row - 4), fill=tuple(int(c) for c in colours[index]))
        draw.text((34, top + 3), name, fill="black")
    return picture


@dataclass(frozen=True)
class _Input:
    relative: Path  # the input's path below the source, as the summary names it
    output: Path  # its label and overlay files' path below labels/ and overlays/


@dataclass
class _Segmenter:
    model: TrainedModel
    out: Path
    mapping: np.ndarray | None
    pool: CRFPool | None
    summary: SegmentSummary
    folder: OutputFolder
    save: tuple[str, ...] = DEFAULT_SAVE

    def __post_init__(self) -> None:
        self.colours = palette()
        self.flat_palette = self.colours.reshape(-1).tolist()
        # Earlier batches are refined in the CRF workers while later ones go through the model.
        self.in_flight = CRFQueue(2 * max(1, self.pool.workers if self.pool else 1))

    def batch(self, pending: list[tuple[_Input, Image.Image]]) -> None:
        model = self.model
        resized = [resize_and_crop(image, model.resolution, square_resize=True) for _, image in pending]
        batch = torch.stack([normalise(image) for image in resized]).to(model.device)
        features = head_feature_map(model, batch)
        if self.pool is not None:
            features = flip_averaged_feature_map(model, batch, features)
        cluster_maps: list[np.ndarray] = []
        crf_images: list[np.ndarray] = []
        crf_unaries: list[np.ndarray] = []
        scores: list[tuple[np.ndarray, np.ndarray] | None] = []
        for index, (_, image) in enumerate(pending):
            size = _prediction_size(image.width, image.height)
            cosines = cluster_cosines(model, features[index : index + 1], size)
            scores.append(confidence_and_margin(cosines) if "scores" in self.save else None)
            if self.pool is None:
                cluster_maps.append(cosines.argmax(dim=1)[0].cpu().numpy())
            else:
                crf_images.append(np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR)))
                crf_unaries.append(crf_unary(cosines)[0].cpu().numpy())
        if self.pool is None:
            self.write_all(list(pending), scores, cluster_maps)
        else:
            # The whole batch at once, so the pool's workers refine several images together.
            self.in_flight.put(
                self.pool.submit(crf_images, crf_unaries), partial(self.write_all, list(pending), scores)
            )

    def finish(self) -> None:
        self.in_flight.drain()

    def write_all(
        self,
        pending: list[tuple[_Input, Image.Image]],
        scores: list[tuple[np.ndarray, np.ndarray] | None],
        cluster_maps: list[np.ndarray],
    ) -> None:
        finished = []
        for (item, image), clusters, image_scores in zip(pending, cluster_maps, scores, strict=True):
            values = self.mapping[clusters] if self.mapping is not None else clusters
            finished.append(self.write(item, image, values, image_scores))
        self.folder.record(finished)  # after the files are complete: a kill in between redoes them

    def write(
        self,
        item: _Input,
        image: Image.Image,
        values: np.ndarray,
        scores: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> dict[str, str]:
        """The input's outputs, each complete before this returns; its manifest entry."""
        if self.model.num_classes <= PALETTE_IDS:
            label = Image.fromarray(values.astype(np.uint8), "P")
            label.putpalette(self.flat_palette)
        else:  # ids past 255 do not fit a palette PNG: 16-bit greyscale, the colours only on the overlay
            label = Image.fromarray(values.astype(np.uint16))
        label = label.resize(image.size, Image.Resampling.NEAREST)
        entry = {"input": item.relative.as_posix()}
        name = item.output.as_posix()
        if "labels" in self.save:
            save_png(label, self.out / "labels" / item.output)
            entry["label"] = f"labels/{name}"
        if "overlays" in self.save:
            tint = Image.fromarray(self.colours[np.asarray(label, dtype=np.int64) % len(self.colours)], "RGB")
            save_png(Image.blend(image, tint, OVERLAY_OPACITY), self.out / "overlays" / item.output)
            entry["overlay"] = f"overlays/{name}"
        if scores is not None:
            confidence, margin = scores
            scores_name = item.output.with_suffix(".npz")
            write_atomically(self.out / "scores" / scores_name, partial(_save_scores, confidence, margin))
            entry["scores"] = f"scores/{scores_name.as_posix()}"
        self.summary.written += 1
        return entry


def _save_scores(confidence: np.ndarray, margin: np.ndarray, target: Path) -> None:
    with target.open("wb") as handle:  # a handle: given a path, numpy would add ".npz" to the temporary name
        np.savez_compressed(handle, confidence=confidence, margin=margin)


def output_names(relatives: list[Path]) -> list[Path]:
    """The label file's path (below ``labels/``) of each input: its name with ``.png``, or,
    where two inputs would share one (``a.jpg`` and ``a.tif``), its whole name plus ``.png``
    (``a.jpg.png``), numbered if even that is taken."""
    wanted = collections.Counter(relative.with_suffix(".png") for relative in relatives)
    taken: set[Path] = set()
    names = []
    for relative in relatives:
        name = relative.with_suffix(".png")
        if wanted[name] > 1:
            name = relative.with_name(relative.name + ".png")
        number = 2
        while name in taken:
            name = relative.with_name(f"{relative.name}-{number}.png")
            number += 1
        taken.add(name)
        names.append(name)
    return names


def segment_images(
    source: Path | str,
    run_path: Path | str,
    out: Path | str,
    device: str = "auto",
    batch_size: int = 8,
    reporter: Reporter | None = None,
    crf: bool = False,
    crf_workers: int = 0,
    legend: bool = False,
    backbone: str | None = None,
    overwrite: bool = False,
    save: tuple[str, ...] = DEFAULT_SAVE,
) -> dict[str, Any]:
    """Segment every image named by ``source`` with the run's model into ``out``; inputs a
    previous call finished there are skipped (``overwrite`` redoes everything)."""
    reporter = reporter or Reporter()
    run = open_run(run_path)
    out = Path(out)
    inside = out.resolve()
    # An OUT inside SOURCE: a rerun must not take the earlier outputs for inputs.
    found, unreachable = collect_inputs(source)
    files = [(path, relative) for path, relative in found if inside not in path.resolve().parents]
    outputs = output_names([relative for _, relative in files])
    if crf:
        require_crf()
    model = load_trained(run, resolve_device(device), backbone)
    matched = class_mapping(run)
    mapping, names = matched if matched else (None, [f"cluster {i}" for i in range(model.num_classes)])
    label_format = "8-bit palette PNG" if model.num_classes <= PALETTE_IDS else "16-bit greyscale PNG"
    folder = OutputFolder(out)
    if overwrite:
        folder.clear()
    folder.claim(
        {
            "run": str(run.path.resolve()),
            "run_sha256": run_fingerprint(run),
            "labels_are": "classes" if mapping is not None else "clusters",
            "crf": crf,
            "label_format": label_format,
            "save": list(save),
        }
    )
    done = {entry["input"] for entry in folder.finished()}
    todo = [
        (path, relative, output)
        for (path, relative), output in zip(files, outputs, strict=True)
        if relative.as_posix() not in done
    ]
    summary = SegmentSummary(inputs=len(files), done_before=len(files) - len(todo))
    if summary.done_before:
        reporter.message(f"{summary.done_before:,} of the {len(files):,} inputs were done before; going on")
    started = time.perf_counter()
    pool = CRFPool(crf_workers) if crf else None
    if pool is not None:
        pool.start()
    segmenter = _Segmenter(model, out, mapping, pool, summary, folder, save)
    pending: list[tuple[_Input, Image.Image]] = []
    try:
        with reporter.task("segmenting", len(todo), unit="images") as advance:
            for path, relative, output in todo:
                try:
                    pending.append((_Input(relative, output), read_image(path, upright=True)))
                except UnreadableFile as error:
                    folder.record([{"input": relative.as_posix(), "skipped": error.reason}])
                if len(pending) >= batch_size:
                    segmenter.batch(pending)
                    pending.clear()
                advance(1)
            if pending:
                segmenter.batch(pending)
            segmenter.finish()
    finally:
        if pool is not None:
            pool.close()
        folder.close()
    summary.seconds = time.perf_counter() - started
    if legend:
        save_png(legend_picture(names, segmenter.colours), out / "legend.png")
    skipped_here = [{"input": where.as_posix(), "reason": reason} for where, reason in unreachable]
    result = summary.as_dict(out, folder.finished(), skipped_here)
    result.update(
        {
            "labels_are": "classes" if mapping is not None else "clusters",
            "run": str(run.path),
            "backbone": model.config.backbone,
            "renamed": [
                {"input": relative.as_posix(), "label": f"labels/{output.as_posix()}"}
                for (_, relative), output in zip(files, outputs, strict=True)
                if output != relative.with_suffix(".png")
            ],
            "label_format": label_format,
        }
    )
    write_json(out / SUMMARY_FILE, result)
    return result
