"""Datasets, transforms and synthetic scenes."""

from __future__ import annotations

from pathlib import Path

from ..errors import CauseError
from .folder import ImageFolderDataset

DATASETS = ("folder",)


def open_dataset(
    name: str, data_dir: str | Path, split: str, resolution: int, val_fraction: float = 0.2
) -> ImageFolderDataset:
    """The named dataset's split, transformed at ``resolution``."""
    if name == "folder":
        return ImageFolderDataset(data_dir, split, resolution, val_fraction)
    raise CauseError(f"Unknown dataset '{name}'; this version reads: {', '.join(DATASETS)}.")
