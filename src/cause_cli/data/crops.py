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

``cause prepare`` writes them (:mod:`.preparing`); this module plans and reads them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CauseError
from .base import PairedDataset, PairedSample
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


def read_status(folder: Path) -> dict[str, Any] | None:
    path = folder / STATUS_FILE
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def numbered(folder: Path, suffix: str) -> dict[int, Path]:
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
        status = read_status(folder)
        if status is not None and not status.get("complete"):
            return None, (
                f"the crops in {folder} are unfinished, so training uses the uncropped training images; "
                f"run `{prepare_hint(name, data_dir)}` again to finish them"
            )
        if numbered(folder / "img" / "train", ".jpg"):
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
    images = numbered(image_dir, ".jpg")
    labels = numbered(label_dir, ".png")
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
