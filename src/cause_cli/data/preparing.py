"""``cause prepare``: the training crops of :mod:`.crops` written once as files.

Preparing writes every crop atomically from a pool of threads, skips images whose crops are
all there already (so an interrupted run resumes), skips unreadable images and lists them at
the end. If some were skipped, the remaining crops are renumbered ``0..N-1`` at the end, as
the reference's reader expects. ``cause-prepare.json`` in the crop folder records the state.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .._version import __version__
from ..errors import CauseError
from ..paths import write_atomically, write_json
from ..progress import Reporter
from .base import PairedDataset, SegmentationDataset, UnreadableFile
from .crops import JPEG_QUALITY, RECIPES, STATUS_FILE, CropRecipe, crop_folders, crop_plan, numbered, read_status
from .folder import ImageFolderDataset


@dataclass
class CropSummary:
    folder: Path
    recipe: CropRecipe
    images: int  # training images
    done_before: int = 0  # images whose crops were already there
    written: int = 0  # images cropped now
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    unknown_ids: dict[int, list[str]] = field(default_factory=dict)  # id -> files holding it
    already_prepared: bool = False
    made_elsewhere: bool = False

    @property
    def crops(self) -> int:
        return len(numbered(self.folder / "img" / "train", ".jpg"))

    def unknown_lines(self, dataset: str, limit: int = 3) -> list[str]:
        lines = []
        for value, files in sorted(self.unknown_ids.items()):
            examples = ", ".join(files[:limit]) + (", ..." if len(files) > limit else "")
            lines.append(f"label id {value} is outside the {dataset} map (ignored) in {len(files)} file(s): {examples}")
        return lines


def _saver(image: Image.Image, kind: str, **options: Any) -> Callable[[Path], None]:
    def save(target: Path) -> None:
        image.save(target, format=kind, **options)

    return save


def _write_crops(
    dataset: SegmentationDataset, index: int, recipe: CropRecipe, image_dir: Path, label_dir: Path
) -> list[int]:
    """Every crop of image ``index``; the unknown label ids of its label file."""
    assert isinstance(dataset, PairedDataset | ImageFolderDataset)
    image, label, unknown = dataset.raw(index)
    plan = crop_plan(image.width, image.height, recipe)
    if any(box[2] <= box[0] or box[3] <= box[1] for box, _ in plan):
        raise UnreadableFile(dataset.samples[index].image, f"{image.size} is too small to crop")
    mirrored_image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if recipe.mirrored else image
    stored = None if label is None else (label + 1).astype(np.uint8)
    mirrored_label = None if stored is None else np.ascontiguousarray(stored[:, ::-1])
    for offset, (box, mirrored) in enumerate(plan):
        number = index * recipe.per_image + offset
        piece = (mirrored_image if mirrored else image).crop(box)
        write_atomically(image_dir / f"{number}.jpg", _saver(piece, "JPEG", quality=JPEG_QUALITY))
        source = mirrored_label if mirrored else stored
        if source is not None:
            left, top, right, bottom = box
            part = Image.fromarray(np.ascontiguousarray(source[top:bottom, left:right]))
            write_atomically(label_dir / f"{number}.png", _saver(part, "PNG"))
    return unknown


def _renumber(image_dir: Path, label_dir: Path) -> None:
    """Close the gaps that skipped images left: crops become 0..N-1, in their order."""
    images = numbered(image_dir, ".jpg")
    labels = numbered(label_dir, ".png")
    for new, old in enumerate(sorted(images)):
        if new != old:
            os.replace(images[old], image_dir / f"{new}.jpg")
            if old in labels:
                os.replace(labels[old], label_dir / f"{new}.png")


def _remove_temporaries(*folders: Path) -> None:
    for folder in folders:
        if folder.is_dir():
            for stale in folder.glob(".*.tmp"):
                stale.unlink(missing_ok=True)


def _source_signature(dataset: SegmentationDataset) -> dict[str, Any]:
    samples = getattr(dataset, "samples", [])
    return {
        "images": len(dataset),
        "first": samples[0].relative if samples else None,
        "last": samples[-1].relative if samples else None,
    }


def prepare_crops(
    name: str,
    data_dir: Path | str,
    workers: int | None = None,
    reporter: Reporter | None = None,
) -> CropSummary:
    """Write the training crops of dataset ``name`` under ``data_dir`` (see the module docstring)."""
    from . import canonical_name, open_dataset

    name = canonical_name(name)
    data_dir = Path(data_dir)
    reporter = reporter or Reporter()
    recipe = RECIPES[name]
    for candidate in crop_folders(name, data_dir):
        if read_status(candidate) is None and numbered(candidate / "img" / "train", ".jpg"):
            return CropSummary(candidate, recipe, 0, already_prepared=True, made_elsewhere=True)
    folder = crop_folders(name, data_dir)[0]
    image_dir, label_dir = folder / "img" / "train", folder / "label" / "train"
    status = read_status(folder)
    if status is not None and status.get("complete"):
        summary = CropSummary(folder, recipe, int(status.get("source", {}).get("images", 0)), already_prepared=True)
        summary.skipped = [(entry["path"], entry["reason"]) for entry in status.get("skipped", [])]
        return summary
    source = open_dataset(name, data_dir, "train", resolution=16)
    summary = CropSummary(folder, recipe, len(source))
    signature = _source_signature(source)
    if status is not None and status.get("source") != signature:
        raise CauseError(
            f"The training images of {data_dir} changed since {folder} was started; delete that folder to start again."
        )
    state: dict[str, Any] = {
        "toolkit_version": __version__,
        "dataset": name,
        "crop_type": recipe.kind,
        "ratios": list(recipe.ratios),
        "mirrored": recipe.mirrored,
        "crops_per_image": recipe.per_image,
        "source": signature,
        "complete": False,
        "renumbering": bool(status and status.get("renumbering")),
        "skipped": list(status.get("skipped", [])) if status else [],
    }
    if not state["renumbering"]:
        write_json(folder / STATUS_FILE, state)
        image_dir.mkdir(parents=True, exist_ok=True)
        if source.has_labels:
            label_dir.mkdir(parents=True, exist_ok=True)
        _remove_temporaries(image_dir, label_dir)
        todo = _unfinished(source, recipe, image_dir, label_dir)
        summary.done_before = len(source) - len(todo)
        threads = max(1, workers or os.cpu_count() or 1)
        reporter.message(
            f"cropping {len(todo):,} of {len(source):,} training images into {folder}: "
            f"{recipe.describe()}, {threads} threads"
        )
        _crop_all(source, todo, recipe, image_dir, label_dir, threads, summary, reporter)
        state["skipped"] = [{"path": path, "reason": reason} for path, reason in summary.skipped]
        if summary.skipped:
            state["renumbering"] = True
            write_json(folder / STATUS_FILE, state)
    else:
        summary.skipped = [(entry["path"], entry["reason"]) for entry in state["skipped"]]
    if state["renumbering"]:
        _renumber(image_dir, label_dir)
    state["renumbering"] = False
    state["complete"] = True
    state["crops"] = summary.crops
    write_json(folder / STATUS_FILE, state)
    return summary


def _unfinished(dataset: SegmentationDataset, recipe: CropRecipe, image_dir: Path, label_dir: Path) -> list[int]:
    images = set(numbered(image_dir, ".jpg"))
    labels = set(numbered(label_dir, ".png")) if dataset.has_labels else images
    todo = []
    for index in range(len(dataset)):
        first = index * recipe.per_image
        numbers = range(first, first + recipe.per_image)
        if not all(n in images and n in labels for n in numbers):
            todo.append(index)
    return todo


def _crop_all(
    dataset: SegmentationDataset,
    todo: list[int],
    recipe: CropRecipe,
    image_dir: Path,
    label_dir: Path,
    threads: int,
    summary: CropSummary,
    reporter: Reporter,
) -> None:
    samples = dataset.samples  # type: ignore[attr-defined]

    def finished(futures: set[Future[list[int]]], index_of: dict[Future[list[int]], int]) -> Iterator[None]:
        for future in futures:
            index = index_of.pop(future)
            try:
                unknown = future.result()
            except UnreadableFile as error:
                summary.skipped.append((error.path, error.reason))
            else:
                summary.written += 1
                for value in unknown:
                    summary.unknown_ids.setdefault(value, []).append(str(samples[index].label))
            yield

    with reporter.task("cropping", len(todo)) as advance:
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cause-crop")
        index_of: dict[Future[list[int]], int] = {}
        pending: set[Future[list[int]]] = set()
        try:
            for index in todo:
                if len(pending) >= 4 * threads:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for _ in finished(done, index_of):
                        advance(1)
                future = pool.submit(_write_crops, dataset, index, recipe, image_dir, label_dir)
                index_of[future] = index
                pending.add(future)
            done, _ = wait(pending)
            for _ in finished(done, index_of):
                advance(1)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    summary.skipped.sort()
