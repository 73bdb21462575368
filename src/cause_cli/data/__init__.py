"""Datasets, transforms, training crops and synthetic scenes."""

from __future__ import annotations

from pathlib import Path

from ..config import DATASET_NAMES
from ..errors import CauseError
from .base import SegmentationDataset, UnreadableFile
from .folder import ImageFolderDataset, read_class_names

DATASETS = DATASET_NAMES
# The reference implementation's names for the same datasets.
ALIASES = {"coco27": "cocostuff27", "coco81": "cocostuff81", "coco171": "cocostuff171", "pascalvoc": "voc2012"}

__all__ = [
    "DATASETS",
    "ImageFolderDataset",
    "SegmentationDataset",
    "UnreadableFile",
    "canonical_name",
    "dataset_class_names",
    "open_dataset",
]


def canonical_name(name: str) -> str:
    """The dataset's name as this toolkit spells it; a clear error for an unknown one."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        raise CauseError(f"Unknown dataset '{name}'; this version reads: {', '.join(DATASETS)}.")
    return key


def dataset_class_names(name: str | None) -> list[str] | None:
    """The class names of a paper dataset; None for ``folder`` (or no name)."""
    from .labels import LABEL_MAPS

    if name is None:
        return None
    label_map = LABEL_MAPS.get(canonical_name(name))
    return list(label_map.class_names) if label_map is not None else None


def open_dataset(
    name: str,
    data_dir: str | Path,
    split: str,
    resolution: int,
    val_fraction: float = 0.2,
    crops: bool = False,
) -> SegmentationDataset:
    """The named dataset's split, transformed at ``resolution``.

    With ``crops=True`` the ``train`` split reads the crops ``cause prepare`` wrote when they
    are there; the dataset's ``note`` then says which data it reads, and why.
    """
    from .crops import find_crops, open_crops
    from .paper import open_paper_dataset

    name = canonical_name(name)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CauseError(f"Data folder {data_dir} does not exist.")
    note = None
    if crops and split == "train":
        folder, note = find_crops(name, data_dir)
        if folder is not None:
            names = read_class_names(data_dir) if name == "folder" else None
            return open_crops(folder, name, resolution, names)
    dataset: SegmentationDataset
    if name == "folder":
        dataset = ImageFolderDataset(data_dir, split, resolution, val_fraction)
    else:
        dataset = open_paper_dataset(name, data_dir, split, resolution)
    dataset.note = note
    return dataset
