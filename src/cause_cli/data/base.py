"""What every dataset shares: the item it returns, reading files, and image/label pairs.

Every dataset returns items ``{"image": uint8 [3, R, R] (normalised on the device by
:func:`.transforms.normalise_pixels`), "label": int64 [R, R] (-1 = ignore), "index": int,
"path": str}`` and tells whether it has labels, its class names
(or None) and its number of classes. A file that cannot be read raises
:class:`UnreadableFile`; :mod:`.loading` turns that into a skipped item for training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ..errors import CauseError
from .labels import LabelMap, bit_palette
from .transforms import pixels, resize_and_crop

Item = dict[str, Any]
LABEL_MODES = ("L", "P", "I", "I;16")
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnreadableFile(CauseError):
    """An image or label file that is missing, truncated, corrupt or of the wrong kind."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason.rstrip(".")
        super().__init__(f"Cannot read {self.path}: {self.reason}.")


_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


def as_rgb(image: Image.Image) -> Image.Image:
    """Any mode PIL reads (grey, palette, RGBA, CMYK, 16-bit, float) as 8-bit RGB.

    A 16-bit or float image is scaled to 8 bits rather than clipped, which would turn it white.
    """
    if image.mode in _HIGH_DEPTH_MODES:
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((np.clip(array / top, 0, 1) * 255).round().astype(np.uint8), "L")
    return image.convert("RGB")


def read_image(path: Path, upright: bool = False) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, fully decoded; ``upright`` applies its EXIF rotation
    (not for dataset images, whose labels follow the stored pixels)."""
    try:
        with Image.open(path) as opened:  # leaving it closes the file, the pixels stay
            opened.load()
            if upright:
                ImageOps.exif_transpose(opened, in_place=True)  # not copied when it is upright already
            # An 8-bit RGB image decoded into memory of its own is kept as it is: convert would copy it.
            return opened if opened.mode == "RGB" and not opened.readonly else as_rgb(opened)
    except _READ_ERRORS as error:
        raise UnreadableFile(path, str(error) or type(error).__name__) from error


def read_label(path: Path, image: Path, image_size: tuple[int, int]) -> Image.Image:
    """The single-channel label at ``path``, checked to have its image's size."""
    try:
        with Image.open(path) as opened:
            opened.load()
            label = opened.copy()
    except _READ_ERRORS as error:
        raise UnreadableFile(path, str(error) or type(error).__name__) from error
    if label.mode not in LABEL_MODES:
        raise UnreadableFile(path, f"a label must be a single-channel image of class ids, this one is {label.mode}")
    if label.size != image_size:
        raise UnreadableFile(path, f"the label is {label.size}, its image {image} is {image_size}")
    return label


def image_size(path: Path) -> tuple[int, int]:
    """The stored size of the image at ``path``, from its header (nothing decoded)."""
    try:
        with Image.open(path) as opened:
            return opened.size
    except _READ_ERRORS as error:
        raise UnreadableFile(path, str(error) or type(error).__name__) from error


def no_label(resolution: int) -> torch.Tensor:
    return torch.full((resolution, resolution), -1, dtype=torch.long)


class SegmentationDataset(Dataset):
    """The interface :func:`..open_dataset` returns; see the module docstring for the item."""

    has_labels: bool = False
    class_names: list[str] | None = None
    # One line about where the data comes from (e.g. prepared crops), for the training log.
    note: str | None = None
    # How the split was chosen, said to the user where it is not the dataset's standard one.
    split_rule: str | None = None
    # Dangling links to images and folders that could not be read, each with the reason.
    unreachable: tuple[tuple[Path, str], ...] = ()

    # Items whose pixels the reader has another way (rows of the feature cache), per index:
    # their images are not decoded and come as zeros. The training context sets it each epoch.
    pixels_not_needed: np.ndarray | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def needs_pixels(self, index: int) -> bool:
        return self.pixels_not_needed is None or not bool(self.pixels_not_needed[index])

    def pixels_at(
        self, path: Path, index: int, resolution: int, square_resize: bool = False
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The item's ``uint8 [3, R, R]`` pixels and its image's stored size; zeros (and the
        size from the header) when its pixels are not needed."""
        if not self.needs_pixels(index):
            return torch.zeros(3, resolution, resolution, dtype=torch.uint8), image_size(path)
        image = read_image(path)
        return pixels(resize_and_crop(image, resolution, square_resize)), image.size

    def __getitem__(self, index: int) -> Item:
        return self.load(index)[0]

    def load(self, index: int) -> tuple[Item, list[int]]:
        """The item and the label ids found in its file that the label map does not know."""
        raise NotImplementedError

    def infer_num_classes(self) -> int | None:
        raise NotImplementedError

    @property
    def palette(self) -> np.ndarray:
        """``uint8 [N, 3]`` colours of the classes."""
        return bit_palette(256)


@dataclass(frozen=True)
class PairedSample:
    image: Path
    label: Path | None
    relative: str  # a short name for messages and outputs


class PairedDataset(SegmentationDataset):
    """Listed image/label pairs whose stored label ids go through a :class:`LabelMap`."""

    def __init__(
        self,
        samples: list[PairedSample],
        label_map: LabelMap,
        resolution: int,
        square_resize: bool = False,
        class_names: list[str] | None = None,
    ) -> None:
        self.samples = samples
        self.label_map = label_map
        self.resolution = resolution
        self.square_resize = square_resize
        self.has_labels = any(sample.label is not None for sample in samples)
        names = class_names if class_names is not None else list(label_map.class_names)
        self.class_names = names or None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def palette(self) -> np.ndarray:
        return self.label_map.palette

    def raw(self, index: int) -> tuple[Image.Image, np.ndarray | None, list[int]]:
        """Full-size RGB image, its class-index label (``-1`` ignore) and the unknown ids."""
        sample = self.samples[index]
        image = read_image(sample.image)
        if sample.label is None:
            return image, None, []
        stored = np.asarray(read_label(sample.label, sample.image, image.size))
        return image, self.label_map.apply(stored), self.label_map.unknown_ids(stored)

    def load(self, index: int) -> tuple[Item, list[int]]:
        sample = self.samples[index]
        image_pixels, size = self.pixels_at(sample.image, index, self.resolution, self.square_resize)
        unknown: list[int] = []
        if sample.label is None:
            label = no_label(self.resolution)
        else:
            opened = read_label(sample.label, sample.image, size)
            unknown = self.label_map.unknown_ids(np.asarray(opened))
            small = resize_and_crop(opened, self.resolution, self.square_resize)
            label = torch.from_numpy(self.label_map.apply(np.asarray(small)))
        return {"image": image_pixels, "label": label, "index": index, "path": sample.relative}, unknown

    def infer_num_classes(self) -> int | None:
        """The map's number of classes; for a map without names, the largest label + 1."""
        if self.class_names:
            return len(self.class_names)
        largest = -1
        for sample in self.samples:
            if sample.label is None:
                continue
            with Image.open(sample.label) as opened:
                mapped = self.label_map.apply(np.asarray(opened))
            largest = max(largest, int(mapped.max()))
        return largest + 1 if largest >= 0 else None
