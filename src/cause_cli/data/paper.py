"""Readers for the paper's datasets, in the layouts their downloads unpack to.

Under the data folder ``D``:

COCO-Stuff (``cocostuff27``, ``cocostuff81``, ``cocostuff171``)::

    D/cocostuff/images/{train2017,val2017}/<id>.jpg
    D/cocostuff/annotations/{train2017,val2017}/<id>.png      ids 0-181, 255 unlabelled
    D/cocostuff/curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse.txt
    D/cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt   COCO-Stuff-27 validation

Cityscapes (``cityscapes``)::

    D/cityscapes/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
    D/cityscapes/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png

Pascal VOC 2012 (``voc2012``), the first of ``D/VOCdevkit/VOC2012``,
``D/pascalvoc/VOCdevkit/VOC2012`` and ``D/pascalvoc`` that has ``JPEGImages``::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png                 0-20, 255 boundary
    SegmentationClassAug/<id>.png              optional; used instead when present
    ImageSets/Segmentation/{train,val}.txt     train_aug.txt instead of train.txt when
                                               SegmentationClassAug and it are present

The split ``all`` is train and val together. Images are listed in split-file order
(Cityscapes: sorted by city and name).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CauseError
from .base import PairedDataset, PairedSample
from .labels import LABEL_MAPS

SPLITS = ("train", "val", "all")
COCO_LIST = "Coco164kFull_Stuff_Coarse.txt"
COCO27_VAL_LIST = "Coco164kFull_Stuff_Coarse_7.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def coco_layout(data_dir: Path) -> str:
    root = data_dir / "cocostuff"
    return (
        f"COCO-Stuff is expected as {root}/images/{{train2017,val2017}}/<id>.jpg, "
        f"{root}/annotations/{{train2017,val2017}}/<id>.png and "
        f"{root}/curated/{{train2017,val2017}}/{COCO_LIST} (plus curated/val2017/{COCO27_VAL_LIST} for cocostuff27)"
    )


def cityscapes_layout(data_dir: Path) -> str:
    root = data_dir / "cityscapes"
    return (
        f"Cityscapes is expected as {root}/leftImg8bit/{{train,val}}/<city>/<name>_leftImg8bit.png and "
        f"{root}/gtFine/{{train,val}}/<city>/<name>_gtFine_labelIds.png"
    )


def voc_layout(data_dir: Path) -> str:
    return (
        f"Pascal VOC 2012 is expected as {data_dir}/VOCdevkit/VOC2012 (or {data_dir}/pascalvoc) holding "
        "JPEGImages/<id>.jpg, SegmentationClass/<id>.png and ImageSets/Segmentation/{train,val}.txt"
    )


def _check_split(split: str) -> list[str]:
    if split not in SPLITS:
        raise CauseError(f"Unknown split '{split}'; use one of {', '.join(SPLITS)}.")
    return ["train", "val"] if split == "all" else [split]


def _require_dir(path: Path, layout: str) -> None:
    if not path.is_dir():
        raise CauseError(f"Folder {path} is missing; {layout}.")


def _require_file(path: Path, layout: str) -> None:
    if not path.is_file():
        raise CauseError(f"Split file {path} is missing; {layout}.")


def _read_ids(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CauseError(f"Split file {path} is not UTF-8 text; it lists one image id a line.") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _mismatch(root: Path, images: int, labels: int, missing: Path, listed: str = "") -> CauseError:
    return CauseError(
        f"Image/label count mismatch in {root}: {images} images and {labels} labels{listed}; "
        f"the first one missing is {missing}."
    )


def _pair_listed(
    root: Path, ids: list[str], image_dir: Path, label_dirs: list[Path], list_file: Path
) -> list[PairedSample]:
    """Image and label of every listed id (the label from the first of ``label_dirs`` that
    has it); a clear error when some are missing."""
    images = set(os.listdir(image_dir))
    labels = [set(os.listdir(folder)) for folder in label_dirs]
    samples: list[PairedSample] = []
    missing: list[Path] = []
    found_images = found_labels = 0
    for name in ids:
        image_name = next((f"{name}{s}" for s in IMAGE_SUFFIXES if f"{name}{s}" in images), None)
        label_dir = next((d for d, names in zip(label_dirs, labels, strict=True) if f"{name}.png" in names), None)
        found_images += image_name is not None
        found_labels += label_dir is not None
        if label_dir is None:
            missing.append(label_dirs[0] / f"{name}.png")
        if image_name is None:
            missing.append(image_dir / f"{name}.jpg")
        if image_name is not None and label_dir is not None:
            samples.append(PairedSample(image_dir / image_name, label_dir / f"{name}.png", f"{image_dir.name}/{name}"))
    if missing:
        listed = f" for the {len(ids)} ids in {list_file}"
        raise _mismatch(root, found_images, found_labels, missing[0], listed)
    return samples


def cocostuff_samples(data_dir: Path, split: str, variant: str) -> list[PairedSample]:
    root = data_dir / "cocostuff"
    layout = coco_layout(data_dir)
    _require_dir(root, layout)
    samples: list[PairedSample] = []
    for part in _check_split(split):
        folder = f"{part}2017"
        list_name = COCO27_VAL_LIST if variant == "cocostuff27" and part == "val" else COCO_LIST
        list_file = root / "curated" / folder / list_name
        image_dir, label_dir = root / "images" / folder, root / "annotations" / folder
        _require_dir(image_dir, layout)
        _require_dir(label_dir, layout)
        _require_file(list_file, layout)
        ids = _read_ids(list_file)
        if not ids:
            raise CauseError(f"Split file {list_file} lists no images.")
        samples += _pair_listed(root, ids, image_dir, [label_dir], list_file)
    return samples


def cityscapes_samples(data_dir: Path, split: str) -> list[PairedSample]:
    root = data_dir / "cityscapes"
    layout = cityscapes_layout(data_dir)
    _require_dir(root, layout)
    samples: list[PairedSample] = []
    for part in _check_split(split):
        image_root, label_root = root / "leftImg8bit" / part, root / "gtFine" / part
        _require_dir(image_root, layout)
        _require_dir(label_root, layout)
        images = {
            path.relative_to(image_root).as_posix().removesuffix("_leftImg8bit.png"): path
            for path in image_root.glob("*/*_leftImg8bit.png")
        }
        labels = {
            path.relative_to(label_root).as_posix().removesuffix("_gtFine_labelIds.png"): path
            for path in label_root.glob("*/*_gtFine_labelIds.png")
        }
        if not images:
            raise CauseError(f"No *_leftImg8bit.png images under {image_root}/<city>/; {layout}.")
        unpaired = sorted(images.keys() ^ labels.keys())
        if unpaired:
            key = unpaired[0]
            missing = (
                label_root / f"{key}_gtFine_labelIds.png" if key in images else image_root / f"{key}_leftImg8bit.png"
            )
            raise _mismatch(root, len(images), len(labels), missing)
        samples += [PairedSample(images[key], labels[key], f"{part}/{key}") for key in sorted(images)]
    return samples


def voc_root(data_dir: Path) -> Path:
    """The folder holding ``JPEGImages``: the first candidate that exists."""
    candidates = (
        data_dir / "VOCdevkit" / "VOC2012",
        data_dir / "pascalvoc" / "VOCdevkit" / "VOC2012",
        data_dir / "pascalvoc",
    )
    for candidate in candidates:
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise CauseError(f"No JPEGImages folder in {', '.join(map(str, candidates))}; {voc_layout(data_dir)}.")


def voc_samples(data_dir: Path, split: str) -> list[PairedSample]:
    root = voc_root(data_dir)
    layout = voc_layout(data_dir)
    image_dir = root / "JPEGImages"
    augmented = root / "SegmentationClassAug"
    plain = root / "SegmentationClass"
    label_dir = augmented if augmented.is_dir() else plain
    _require_dir(label_dir, layout)
    samples: list[PairedSample] = []
    for part in _check_split(split):
        list_file = root / "ImageSets" / "Segmentation" / f"{part}.txt"
        aug_list = list_file.with_name(f"{part}_aug.txt")
        if label_dir == augmented and aug_list.is_file():
            list_file = aug_list
        _require_file(list_file, layout)
        ids = _read_ids(list_file)
        if not ids:
            raise CauseError(f"Split file {list_file} lists no images.")
        # SegmentationClassAug may lack a few official labels: those come from SegmentationClass.
        label_dirs = [label_dir, plain] if label_dir == augmented and plain.is_dir() else [label_dir]
        samples += _pair_listed(root, ids, image_dir, label_dirs, list_file)
    return samples


def open_paper_dataset(name: str, data_dir: Path, split: str, resolution: int) -> PairedDataset:
    """One of ``cocostuff27|cocostuff81|cocostuff171|cityscapes|voc2012``."""
    label_map = LABEL_MAPS[name]
    if name.startswith("cocostuff"):
        return PairedDataset(cocostuff_samples(data_dir, split, name), label_map, resolution)
    if name == "cityscapes":
        return PairedDataset(cityscapes_samples(data_dir, split), label_map, resolution)
    if name == "voc2012":
        return PairedDataset(voc_samples(data_dir, split), label_map, resolution, square_resize=True)
    raise CauseError(f"Unknown dataset '{name}'.")
