"""Batches for training and evaluation that survive bad files.

:func:`iterate_batches` wraps a dataset in a ``DataLoader`` (worker processes, pinned
memory) whose items never raise for an unreadable file: such an item is dropped from its
batch and recorded in a :class:`LoadReport`, as are label ids outside the dataset's label
map. The report lists them once, at the end, however many epochs met them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .base import SegmentationDataset, UnreadableFile

_EXAMPLES = 3


class _Guarded(Dataset):
    def __init__(self, dataset: SegmentationDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            item, unknown = self.dataset.load(index)
        except UnreadableFile as error:
            return {"skipped": error.path, "reason": error.reason}
        return {"item": item, "unknown": unknown}


def _collate(entries: list[dict[str, Any]]) -> dict[str, Any]:
    items = [entry["item"] for entry in entries if "item" in entry]
    return {
        "batch": default_collate(items) if items else None,
        "skipped": [(entry["skipped"], entry["reason"]) for entry in entries if "skipped" in entry],
        "unknown": [(entry["item"]["path"], entry["unknown"]) for entry in entries if entry.get("unknown")],
    }


@dataclass
class LoadReport:
    """Files skipped as unreadable and label ids outside the map, each recorded once."""

    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    unknown_ids: dict[int, list[str]] = field(default_factory=dict)  # id -> items holding it

    def record(self, packed: dict[str, Any]) -> None:
        for path, reason in packed["skipped"]:
            self.skipped.setdefault(path, reason)
        for path, values in packed["unknown"]:
            for value in values:
                holders = self.unknown_ids.setdefault(int(value), [])
                if path not in holders:
                    holders.append(path)

    def __bool__(self) -> bool:
        return bool(self.skipped or self.unknown_ids)

    def lines(self, dataset: str = "dataset") -> list[str]:
        """One line for the count, one per skipped file, one per unknown label id."""
        lines: list[str] = []
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable file(s):")
            lines += [f"  {path}: {reason}" for path, reason in sorted(self.skipped.items())]
        for value, holders in sorted(self.unknown_ids.items()):
            examples = ", ".join(holders[:_EXAMPLES]) + (", ..." if len(holders) > _EXAMPLES else "")
            lines.append(
                f"label id {value} is outside the {dataset} label map (ignored) in {len(holders)} image(s): {examples}"
            )
        return lines


def iterate_batches(
    dataset: SegmentationDataset,
    batch_size: int,
    report: LoadReport,
    *,
    shuffle: bool = False,
    drop_last: bool = False,
    workers: int = 0,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[dict[str, Any]]:
    """Batches ``{"image", "label", "index", "path"}`` of the readable items of ``dataset``.

    A batch may hold fewer items than ``batch_size`` where files were skipped; a batch of
    nothing but unreadable files is left out.
    """
    loader = DataLoader(
        _Guarded(dataset),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=generator,
        collate_fn=_collate,
        persistent_workers=False,
    )
    for packed in loader:
        report.record(packed)
        if packed["batch"] is not None:
            yield packed["batch"]
