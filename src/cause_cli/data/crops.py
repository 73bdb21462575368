"""The training crops of METHOD.md section 0, prepared once as files.

Each training image (full size, before any resizing) gives crops of ``int(H * ratio) x
int(W * ratio)`` pixels: five-crop (top-left, top-right, bottom-left, bottom-right, centre,
as torchvision's ``five_crop``), or ten-crop (those five, then the same five of the
horizontally mirrored image, as ``ten_crop``) for each ratio in turn:

=============================  ==========================  ===============
dataset                        crops                       per image
=============================  ==========================  ===============
cocostuff27, cityscapes        five-crop at 0.5            5
cocostuff81, cocostuff171      ten-crop at 0.5, 0.8        20
voc2012                        ten-crop at 0.3 ... 0.7     50
folder                         five-crop at 0.5            5
=============================  ==========================  ===============

The files follow the reference implementation's layout, so crops it prepared are read here
and the other way round: ``<crop folder>/img/train/<n>.jpg`` (JPEG, quality 75) and
``<crop folder>/label/train/<n>.png`` (class index + 1, 0 = ignore), numbered in image order,
the crops of image ``i`` being ``n = i * per_image + j``. The crop folders are those of the
reference: ``D/cocostuff/cropped/cocostuff_five_crop_0.5``,
``D/cityscapes/cropped/cityscapes_five_crop_0.5``, ``D/cocostuff/cropped/coco81_double_crop_0``,
``D/cocostuff/cropped/coco171_double_crop_0``, ``D/pascalvoc/cropped/pascalvoc_super_crop_0``
(and ``D/cropped/folder_five_crop_0.5`` for a folder dataset).

Preparing writes every crop atomically from a pool of threads, skips images whose crops are
all there already (so an interrupted run resumes), skips unreadable images and lists them at
the end. If some were skipped, the remaining crops are renumbered ``0..N-1`` at the end, as
the reference's reader expects. ``cause-prepare.json`` in the crop folder records the state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import __version__
from ..errors import CauseError
from ..paths import write_atomically, write_json
from ..progress import Reporter
from .base import PairedDataset, PairedSample, SegmentationDataset, UnreadableFile
from .folder import ImageFolderDataset
from .labels import IGNORE, LABEL_MAPS, OUTSIDE, LabelMap, bit_palette

STATUS_FILE = "cause-prepare.json"
JPEG_QUALITY = 75  # PIL's default, which the reference's crops were saved with
Box = tuple[int, int, int, int]  # PIL crop box: left, top, right, bottom


@dataclass(frozen=True)
class CropRecipe:
    kind: str  # the reference's name: five, double (ten-crop at two ratios), super (at five)
    ratios: tuple[float, ...]
    mirrored: bool  # ten-crop: the five crops again on the mirrored image

    @property
    def per_image(self) -> int:
        return 5 * len(self.ratios) * (2 if self.mirrored else 1)

    def describe(self) -> str:
        ratios = ", ".join(f"{ratio:g}" for ratio in self.ratios)
        return f"{'ten' if self.mirrored else 'five'}-crop at {ratios} ({self.per_image} crops per image)"


FIVE = CropRecipe("five", (0.5,), mirrored=False)
RECIPES: dict[str, CropRecipe] = {
    "cocostuff27": FIVE,
    "cityscapes": FIVE,
    "cocostuff81": CropRecipe("double", (0.5, 0.8), mirrored=True),
    "cocostuff171": CropRecipe("double", (0.5, 0.8), mirrored=True),
    "voc2012": CropRecipe("super", (0.3, 0.4, 0.5, 0.6, 0.7), mirrored=True),
    "folder": FIVE,
}
# Where the crops live, below the data folder: the first entry is written; the others are
# read too. The reference's crop_dataset.py writes COCO-Stuff-27 crops to
# cocostuff27/cropped/cocostuff27_five_crop_0.5 while its reader (and this toolkit) reads
# cocostuff/cropped/cocostuff_five_crop_0.5; STEGO writes cropped/<dataset>_five_crop_0.5.
CROP_FOLDERS: dict[str, tuple[str, ...]] = {
    "cocostuff27": (
        "cocostuff/cropped/cocostuff_five_crop_0.5",
        "cocostuff27/cropped/cocostuff27_five_crop_0.5",
        "cropped/cocostuff27_five_crop_0.5",
    ),
    "cityscapes": ("cityscapes/cropped/cityscapes_five_crop_0.5", "cropped/cityscapes_five_crop_0.5"),
    "cocostuff81": ("cocostuff/cropped/coco81_double_crop_0",),
    "cocostuff171": ("cocostuff/cropped/coco171_double_crop_0",),
    "voc2012": ("pascalvoc/cropped/pascalvoc_super_crop_0",),
    "folder": ("cropped/folder_five_crop_0.5",),
}


def five_crop_boxes(width: int, height: int, crop_width: int, crop_height: int) -> list[Box]:
    """Top-left, top-right, bottom-left, bottom-right and centre boxes (torchvision's rounding)."""
    right, bottom = width - crop_width, height - crop_height
    top = round(bottom / 2.0)
    left = round(right / 2.0)
    return [
        (0, 0, crop_width, crop_height),
        (right, 0, width, crop_height),
        (0, bottom, crop_width, height),
        (right, bottom, width, height),
        (left, top, left + crop_width, top + crop_height),
    ]


def crop_plan(width: int, height: int, recipe: CropRecipe) -> list[tuple[Box, bool]]:
    """Every crop of an image as ``(box, on the mirrored image)``, in file order."""
    plan: list[tuple[Box, bool]] = []
    for ratio in recipe.ratios:
        boxes = five_crop_boxes(width, height, int(width * ratio), int(height * ratio))
        plan += [(box, False) for box in boxes]
        if recipe.mirrored:
            plan += [(box, True) for box in boxes]
    return plan


def crop_folders(name: str, data_dir: Path) -> list[Path]:
    return [data_dir / relative for relative in CROP_FOLDERS[name]]


def _read_status(folder: Path) -> dict[str, Any] | None:
    path = folder / STATUS_FILE
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def _numbered(folder: Path, suffix: str) -> dict[int, Path]:
    """``{n: folder/n<suffix>}`` for the numbered files in ``folder``."""
    if not folder.is_dir():
        return {}
    found: dict[int, Path] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, dot, ending = entry.name.partition(".")
            if dot and f".{ending}" == suffix and stem.isdigit():
                found[int(stem)] = Path(entry.path)
    return found


def prepare_hint(name: str, data_dir: Path) -> str:
    return f"cause prepare --dataset {name} --data-dir {data_dir}"


def find_crops(name: str, data_dir: Path) -> tuple[Path | None, str]:
    """The crop folder to train on, or None, and one line saying which and why."""
    folders = crop_folders(name, data_dir)
    for folder in folders:
        if not (folder / "img" / "train").is_dir():
            continue
        status = _read_status(folder)
        if status is not None and not status.get("complete"):
            return None, (
                f"the crops in {folder} are unfinished, so training uses the uncropped training images; "
                f"run `{prepare_hint(name, data_dir)}` again to finish them"
            )
        if _numbered(folder / "img" / "train", ".jpg"):
            return folder, f"training on the prepared crops in {folder}"
    whose = "" if name == "folder" else "the paper's "
    return None, (
        f"no prepared crops in {folders[0]}, so training uses the uncropped training images; "
        f"`{prepare_hint(name, data_dir)}` writes {whose}{RECIPES[name].describe()}"
    )


def crop_label_map(base: LabelMap | None, class_names: list[str] | None) -> LabelMap:
    """Stored crop labels are class + 1 (0 = ignore); for a folder dataset, raw value + 1."""
    table = np.full(256, OUTSIDE, dtype=np.int64)
    table[0] = IGNORE
    if base is not None:
        table[1 : base.num_classes + 1] = np.arange(base.num_classes)
        return LabelMap(base.name, base.class_names, table, base.palette)
    table[1:] = np.arange(255)
    return LabelMap("folder", tuple(class_names or ()), table, bit_palette(256))


def open_crops(folder: Path, name: str, resolution: int, class_names: list[str] | None = None) -> PairedDataset:
    """The prepared crops in ``folder`` as a training set, transformed like the dataset's images."""
    image_dir, label_dir = folder / "img" / "train", folder / "label" / "train"
    images = _numbered(image_dir, ".jpg")
    labels = _numbered(label_dir, ".png")
    if label_dir.is_dir() and images.keys() != labels.keys():
        unpaired = sorted(images.keys() ^ labels.keys())[0]
        missing = label_dir / f"{unpaired}.png" if unpaired in images else image_dir / f"{unpaired}.jpg"
        raise CauseError(
            f"Image/label count mismatch in {folder}: {len(images)} images and {len(labels)} labels; "
            f"the first one missing is {missing}."
        )
    samples = [PairedSample(images[n], labels.get(n), f"crop/{n}") for n in sorted(images)]
    label_map = crop_label_map(LABEL_MAPS.get(name), class_names)
    dataset = PairedDataset(samples, label_map, resolution, square_resize=name == "voc2012", class_names=class_names)
    dataset.note = f"training on the {len(samples):,} prepared crops in {folder}"
    return dataset


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
        return len(_numbered(self.folder / "img" / "train", ".jpg"))

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
    images = _numbered(image_dir, ".jpg")
    labels = _numbered(label_dir, ".png")
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
        if _read_status(candidate) is None and _numbered(candidate / "img" / "train", ".jpg"):
            return CropSummary(candidate, recipe, 0, already_prepared=True, made_elsewhere=True)
    folder = crop_folders(name, data_dir)[0]
    image_dir, label_dir = folder / "img" / "train", folder / "label" / "train"
    status = _read_status(folder)
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
    images = set(_numbered(image_dir, ".jpg"))
    labels = set(_numbered(label_dir, ".png")) if dataset.has_labels else images
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
