"""The image-folder dataset: a user's own images, with labels when they have them.

Layout under the data folder ``D``::

    D/images/**/<name>.<jpg|jpeg|png|bmp|tif|tiff|webp>   the images, in any sub-folders
    D/labels/**/<name>.png                               optional; same relative stem,
                                                         single channel, 255 = ignore
    D/classes.txt                                        optional; one class name per line

Split: when ``D/images/train`` and ``D/images/val`` both exist they are the splits.
Otherwise every image is assigned by a stable hash of its relative path: the first eight hex
digits of its SHA-1, read as a fraction of 2**32, below ``val_fraction`` (0.2) put it in
``val``, the rest is ``train``. The split ``all`` takes every image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import CauseError
from ..paths import list_files
from .base import Item, SegmentationDataset, no_label, read_image, read_label
from .labels import IGNORE_ID
from .transforms import label_tensor, resize_and_crop

# Class ids counted from the labels must fit the 8-bit labels this layout stores (255 is
# ignore), and must be nearly consecutive: 0-5 and one stray 200 are not 201 classes.
MAX_INFERRED_CLASSES = 255
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SPLITS = ("train", "val", "all")
DEFAULT_VAL_FRACTION = 0.2


def has_image_suffix(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def hashed_split(relative: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
    """``"val"`` or ``"train"`` for an image's relative path, stable across machines."""
    fraction = int(hashlib.sha1(relative.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    return "val" if fraction < val_fraction else "train"


def read_class_names(root: Path) -> list[str] | None:
    """The names in ``root/classes.txt``, one a line; None without that file."""
    names_file = root / "classes.txt"
    if not names_file.is_file():
        return None
    try:
        text = names_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CauseError(f"{names_file} is not UTF-8 text; save it as UTF-8, one class name a line.") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    return names or None


@dataclass(frozen=True)
class Sample:
    image: Path
    label: Path | None
    relative: str  # path below the images folder, with the suffix


class ImageFolderDataset(SegmentationDataset):
    """Images (and labels) of one split, transformed as METHOD.md section 0 says."""

    def __init__(
        self,
        root: Path | str,
        split: str = "train",
        resolution: int = 320,
        val_fraction: float = DEFAULT_VAL_FRACTION,
    ) -> None:
        self.root = Path(root)
        self.resolution = resolution
        self.split = split
        if split not in SPLITS:
            raise CauseError(f"Unknown split '{split}'; use one of {', '.join(SPLITS)}.")
        images_dir = self.root / "images"
        if not self.root.is_dir():
            raise CauseError(f"Data folder {self.root} does not exist.")
        if not images_dir.is_dir():
            if self.root.name == "images":
                raise CauseError(
                    f"Data folder {self.root} has no images/ folder, and looks like the images folder itself: "
                    f"give its parent, --data-dir {self.root.parent}."
                )
            raise CauseError(
                f"Data folder {self.root} has no images/ folder; put the images in {images_dir} "
                f"(and labels, if you have them, in {self.root / 'labels'})."
            )
        labels_dir = self.root / "labels"
        self.has_labels = labels_dir.is_dir()

        listing = list_files(images_dir)
        has_split_folders = (images_dir / "train").is_dir() and (images_dir / "val").is_dir()

        def in_split(path: Path) -> bool:
            relative = path.relative_to(images_dir).as_posix()
            if split == "all":
                return True
            if has_split_folders:
                return relative.startswith(f"{split}/")
            return hashed_split(relative, val_fraction) == split

        chosen = [path for path in listing.files if has_image_suffix(path) and in_split(path)]
        if split == "all":
            self.split_rule = "every image, train and val"
        elif has_split_folders:
            self.split_rule = f"the {split} split: the images under {images_dir / split}"
        else:
            share = val_fraction if split == "val" else 1 - val_fraction
            self.split_rule = (
                f"the {split} split: {share:.0%} of the images, chosen by a stable hash of their paths "
                f"(no images/train and images/val folders)"
            )
        # A folder that cannot be read may hold images of any split; a dangling link is an
        # image only by its name.
        self.unreachable = tuple(
            (path, reason)
            for path, reason in listing.unreachable
            if not path.is_symlink() or (has_image_suffix(path) and in_split(path))
        )
        if not chosen:
            raise CauseError(f"No images for split '{split}' under {images_dir}.")

        self.samples = [self._pair(path, images_dir, labels_dir) for path in chosen]
        self.class_names = read_class_names(self.root)

    def _pair(self, image: Path, images_dir: Path, labels_dir: Path) -> Sample:
        relative = image.relative_to(images_dir)
        if not self.has_labels:
            return Sample(image, None, relative.as_posix())
        label = (labels_dir / relative).with_suffix(".png")
        if not label.is_file():
            raise CauseError(f"Image {image} has no label {label}; every image needs one when {labels_dir} exists.")
        return Sample(image, label, relative.as_posix())

    def infer_num_classes(self) -> int | None:
        """Number of classes: from classes.txt, else the largest label value + 1 (refused when
        the values are not plausible class ids), else None."""
        if self.class_names:
            return len(self.class_names)
        if not self.has_labels:
            return None
        first_seen: dict[int, str] = {}  # each label value and the first file holding it
        for sample in self.samples:
            assert sample.label is not None
            try:
                with Image.open(sample.label) as opened:
                    values = np.unique(np.asarray(opened))
            except (OSError, ValueError, SyntaxError):  # training skips it too, and lists it
                continue
            for value in values[values != IGNORE_ID].tolist():
                first_seen.setdefault(int(value), str(sample.label))
        if not first_seen:
            return None
        refuse_values_that_are_not_class_ids(first_seen)
        return max(first_seen) + 1

    def __len__(self) -> int:
        return len(self.samples)

    def raw(self, index: int) -> tuple[Image.Image, np.ndarray | None, list[int]]:
        """Full-size RGB image and its label (``-1`` ignore); no label map, so no unknown ids."""
        sample = self.samples[index]
        image = read_image(sample.image)
        if sample.label is None:
            return image, None, []
        label = label_tensor(read_label(sample.label, sample.image, image.size)).numpy()
        return image, label, []

    def load(self, index: int) -> tuple[Item, list[int]]:
        sample = self.samples[index]
        image_pixels, size = self.pixels_at(sample.image, index, self.resolution)
        if sample.label is not None:
            opened = read_label(sample.label, sample.image, size)
            label = label_tensor(resize_and_crop(opened, self.resolution))
        else:
            label = no_label(self.resolution)
        return {"image": image_pixels, "label": label, "index": index, "path": sample.relative}, []


def refuse_values_that_are_not_class_ids(first_seen: dict[int, str]) -> None:
    """One sentence, naming a file and a value, when the label values present cannot be the
    class ids 0..C-1 of one set of classes."""
    largest = max(first_seen)
    advice = "give --num-classes N (values at or above N are then ignored) or the class names in classes.txt"
    if largest >= MAX_INFERRED_CLASSES:
        raise CauseError(
            f"Label value {largest} in {first_seen[largest]} is not a class id (ids go from 0 to "
            f"{MAX_INFERRED_CLASSES - 1}, {IGNORE_ID} = ignore); {advice}."
        )
    if largest + 1 > 2 * len(first_seen) and largest >= 8:
        raise CauseError(
            f"Label value {largest} in {first_seen[largest]} would make {largest + 1} classes, but only "
            f"{len(first_seen)} different values occur in the labels; {advice}."
        )
