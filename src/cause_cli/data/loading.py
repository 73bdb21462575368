"""Batches for training and evaluation that survive bad files.

:func:`iterate_batches` wraps a dataset in a ``DataLoader`` (worker processes, pinned
memory) whose items never raise for an unreadable file: such an item is dropped from its
batch and recorded in a :class:`LoadReport`, as are label ids outside the dataset's label
map and labelled pixels whose class id is at or above the classes the run has (ignored by every
loss and score, so a user must hear of them). The report lists them once, at the end, however
many epochs met them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ..interrupts import raise_if_interrupted
from .base import SegmentationDataset, UnreadableFile

_EXAMPLES = 3


class _Guarded(Dataset):
    def __init__(self, dataset: SegmentationDataset, num_classes: int | None = None) -> None:
        self.dataset = dataset
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            item, unknown = self.dataset.load(index)
        except UnreadableFile as error:
            return {"skipped": error.path, "reason": error.reason}
        return {"item": item, "unknown": unknown, "above": self._above_classes(item["label"])}

    def _above_classes(self, label: torch.Tensor) -> dict[int, int]:
        """Pixels per class id at or above ``num_classes`` in an item's class-index label."""
        if self.num_classes is None:
            return {}
        above = label[label >= self.num_classes]
        if not above.numel():
            return {}
        ids, counts = above.unique(return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist(), strict=True))


def _collate(entries: list[dict[str, Any]]) -> dict[str, Any]:
    items = [entry["item"] for entry in entries if "item" in entry]
    return {
        "batch": default_collate(items) if items else None,
        "skipped": [(entry["skipped"], entry["reason"]) for entry in entries if "skipped" in entry],
        "unknown": [(entry["item"]["path"], entry["unknown"]) for entry in entries if entry.get("unknown")],
        "above": [(entry["item"]["path"], entry["above"]) for entry in entries if entry.get("above")],
    }


@dataclass
class LoadReport:
    """Files skipped as unreadable, label ids outside the map and labelled pixels above the
    classes, each file recorded once."""

    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    unknown_ids: dict[int, list[str]] = field(default_factory=dict)  # id -> items holding it
    above_classes: dict[str, dict[int, int]] = field(default_factory=dict)  # item -> {class id: pixels}

    def record(self, packed: dict[str, Any]) -> None:
        for path, reason in packed["skipped"]:
            self.skipped.setdefault(path, reason)
        for path, values in packed["unknown"]:
            for value in values:
                holders = self.unknown_ids.setdefault(int(value), [])
                if path not in holders:
                    holders.append(path)
        for path, pixels in packed.get("above", []):
            self.above_classes.setdefault(path, pixels)

    def merge(self, other: LoadReport) -> None:
        for path, reason in other.skipped.items():
            self.skipped.setdefault(path, reason)
        for value, holders in other.unknown_ids.items():
            mine = self.unknown_ids.setdefault(value, [])
            mine += [path for path in holders if path not in mine]
        for path, pixels in other.above_classes.items():
            self.above_classes.setdefault(path, pixels)

    def __bool__(self) -> bool:
        return bool(self.skipped or self.unknown_ids or self.above_classes)

    def ignored_above(self) -> dict[str, Any] | None:
        """How many labelled pixels, in how many items, had class ids at or above the classes."""
        if not self.above_classes:
            return None
        ids = sorted({value for pixels in self.above_classes.values() for value in pixels})
        return {
            "pixels": sum(sum(pixels.values()) for pixels in self.above_classes.values()),
            "images": len(self.above_classes),
            "class_ids": ids,
        }

    def lines(self, dataset: str = "dataset", num_classes: int | None = None) -> list[str]:
        """One line for the count, one per skipped file, one per unknown label id, one for the
        pixels above the ``num_classes`` classes."""
        lines: list[str] = []
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable file(s):")
            lines += [f"  {path}: {reason}" for path, reason in sorted(self.skipped.items())]
        for value, holders in sorted(self.unknown_ids.items()):
            examples = _examples(holders)
            lines.append(
                f"label id {value} is outside the {dataset} label map (ignored) in {len(holders)} image(s): {examples}"
            )
        ignored = self.ignored_above()
        if ignored is not None:
            examples = _examples(sorted(self.above_classes))
            classes = f"the {num_classes} classes" if num_classes is not None else "the classes"
            ids = ", ".join(str(value) for value in ignored["class_ids"])
            lines.append(
                f"{ignored['pixels']:,} labelled pixel(s) in {ignored['images']} image(s) hold class id(s) {ids}, at "
                f"or above {classes}, and were ignored; give --num-classes {ignored['class_ids'][-1] + 1} (or name "
                f"every class in classes.txt) to count them: {examples}"
            )
        return lines


def _examples(holders: list[str]) -> str:
    """The first few of ``holders``, and "..." when there are more."""
    return ", ".join(holders[:_EXAMPLES]) + (", ..." if len(holders) > _EXAMPLES else "")


class ShuffledBatches(Sampler[list[int]]):
    """One process's training batches of an epoch.

    The items are shuffled by ``(seed, epoch)`` and cut into global batches of ``batch_size``
    x ``world_size`` items (the last, incomplete one dropped); process ``rank`` takes the
    ``rank``-th contiguous part of each. Put together in rank order, the parts are the batches
    one process with a ``world_size`` times larger batch trains on. When the data holds less
    than one global batch, all of it is the one batch, shared out as evenly as it goes.
    Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if size < world_size:
            raise ValueError(f"{size} items cannot be shared among {world_size} processes")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, self.size // (self.batch_size * self.world_size))

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        per_step = self.batch_size * self.world_size
        if self.size < per_step:
            yield order.tensor_split(self.world_size)[self.rank].tolist()
            return
        for start in range(0, len(self) * per_step, per_step):
            first = start + self.rank * self.batch_size
            yield order[first : first + self.batch_size].tolist()


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
    batches: Sampler[list[int]] | None = None,
    keep_empty: bool = False,
    num_classes: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Batches ``{"image", "label", "index", "path"}`` of the readable items of ``dataset``,
    in the order ``batches`` gives (else ``batch_size`` at a time, shuffled or not).

    A batch may hold fewer items than asked for where files were skipped; a batch of nothing
    but unreadable files is left out, or comes as an empty dict with ``keep_empty`` (so that
    processes training together stay in step). With ``num_classes``, labelled pixels of class
    ids at or above it are counted in ``report``.
    """
    sizing: dict[str, Any] = (
        {"batch_sampler": batches}
        if batches is not None
        else {"batch_size": batch_size, "shuffle": shuffle, "drop_last": drop_last}
    )
    loader = DataLoader(
        _Guarded(dataset, num_classes),
        # With a generator of its own the loader never draws from the global one, which
        # dropout uses and a resumed run restores.
        generator=generator or torch.Generator().manual_seed(0),
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=_collate,
        persistent_workers=False,
        **sizing,
    )
    for packed in loader:
        raise_if_interrupted()
        report.record(packed)
        if packed["batch"] is not None:
            yield packed["batch"]
        elif keep_empty:
            yield {}
    raise_if_interrupted()  # a Ctrl-C while the loader's workers were shut down
