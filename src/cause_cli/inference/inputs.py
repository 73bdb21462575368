"""The inputs of ``cause segment``, read lazily in a stable order, and their decoding in loader
worker processes.

A folder is walked one directory at a time (sorted, hidden entries left out), so memory does
not grow with the number of images; the outputs of one directory's files are named together
(two files can only collide within a directory: ``a.jpg`` and ``a.tif`` both want ``a.png``).
A ``.txt`` list is read twice, once for the folder its entries share, once to give them; its
output names are remembered to keep them unique (about a hundred bytes an input). A glob
pattern's matches are sorted, so they are listed at once.
"""

from __future__ import annotations

import collections
import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data.base import UnreadableFile, read_image
from ..data.transforms import resize_and_crop
from ..errors import CauseError
from ..interrupts import raise_if_interrupted
from ..paths import dangling_link, walk_folders

LIST_SUFFIXES = {".txt", ".lst"}
PIXEL_BAND_PIXELS = 1 << 20  # a big image's pixels are copied this many (whole rows) at a time


@dataclass(frozen=True)
class SourceEntry:
    """One input: the file, its path below the source (as the summary names it) and the name
    of its outputs below ``labels/``; or, with ``problem``, something that could not be read."""

    path: Path
    relative: Path
    output: Path
    problem: str | None = None


def output_names(relatives: list[Path]) -> list[Path]:
    """The label file's path (below ``labels/``) of each input: its name with ``.png``, or,
    where two inputs would share one (``a.jpg`` and ``a.tif``), its whole name plus ``.png``
    (``a.jpg.png``), numbered if even that is taken."""
    wanted = collections.Counter(relative.with_suffix(".png") for relative in relatives)
    taken: set[Path] = set()
    return [_free_name(relative, taken, whole_name=wanted[relative.with_suffix(".png")] > 1) for relative in relatives]


def _free_name(relative: Path, taken: set[Path], whole_name: bool) -> Path:
    """``relative`` with ``.png`` (or, with ``whole_name``, its whole name plus ``.png``),
    numbered while that is taken; the name is added to ``taken``."""
    name = relative.with_name(relative.name + ".png") if whole_name else relative.with_suffix(".png")
    number = 2
    while name in taken:
        name = relative.with_name(f"{relative.name}-{number}.png")
        number += 1
    taken.add(name)
    return name


def _walk(root: Path, leave_out: Path | None) -> Iterator[SourceEntry]:
    # An OUT inside SOURCE is left out: a rerun must not take the earlier outputs for inputs.
    for files, unreachable in walk_folders(root, skip_hidden=True, leave_out=leave_out):
        relatives = [path.relative_to(root) for path in files]
        for relative, output in zip(relatives, output_names(relatives), strict=True):
            yield SourceEntry(root / relative, relative, output)
        for path, reason in unreachable:
            relative = path.relative_to(root) if path != root else Path(path.name)
            yield SourceEntry(path, relative, relative, reason)


def _listed(list_file: Path) -> Iterator[Path]:
    with list_file.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                item = Path(entry).expanduser()
                yield item if item.is_absolute() else list_file.parent / item


def _common_parent(paths: Iterator[Path]) -> Path | None:
    common: Path | None = None
    for path in paths:
        parent = path.resolve().parent
        if common is None:
            common = parent
        while common not in (parent, *parent.parents):
            common = common.parent
    return common


def _named_below(paths: Iterator[Path], parent: Path) -> Iterator[SourceEntry]:
    taken: set[Path] = set()
    for path in paths:
        relative = path.resolve().relative_to(parent)
        yield SourceEntry(path, relative, _free_name(relative, taken, relative.with_suffix(".png") in taken))


def iter_inputs(source: Path | str, leave_out: Path | None = None) -> Iterator[SourceEntry]:
    """Every input named by ``source``, in a stable order: a folder gives every non-hidden file
    below it (not those under ``leave_out``), a ``.txt`` list the paths it names (relative
    ones from the list's folder), a glob pattern its matches, an image file itself."""
    text = str(source)
    path = Path(source)
    leave_out = leave_out.resolve() if leave_out is not None else None
    if path.is_dir():
        yield from _walk(path, leave_out)
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        parent = _common_parent(_listed(path))
        if parent is not None:
            yield from _named_below(_listed(path), parent)
    elif path.is_file():
        yield SourceEntry(path, Path(path.name), Path(path.name).with_suffix(".png"))
    elif glob.has_magic(text):
        matches = [Path(match) for match in sorted(glob.glob(text, recursive=True))]
        files = [match for match in matches if match.is_file()]
        dangling = [match for match in matches if match.is_symlink() and not match.exists()]
        if not files and not dangling:
            raise CauseError(f"No files match {text}.")
        parent = _common_parent(iter(files))
        if parent is not None:
            yield from _named_below(iter(files), parent)
        for link in dangling:
            yield SourceEntry(link, Path(link.name), Path(link.name), dangling_link(link))
    else:
        raise CauseError(f"{source} does not exist.")


@dataclass(frozen=True)
class PendingInputs:
    """The inputs still to do: those of ``source`` after the first ``skip_first`` (finished in
    this order before) and any in ``done`` (finished in another order). Iterating it lists the
    source again, so loader workers can each read it (it pickles as a few paths)."""

    source: str
    leave_out: Path | None = None
    skip_first: int = 0
    done: frozenset[str] = frozenset()
    rank: int = 0
    processes: int = 1

    def __iter__(self) -> Iterator[SourceEntry]:
        for index, entry in enumerate(shard(iter_inputs(self.source, self.leave_out), self.rank, self.processes)):
            if index >= self.skip_first and entry.relative.as_posix() not in self.done:
                yield entry


def shard(entries: Iterator[SourceEntry], rank: int, processes: int) -> Iterator[SourceEntry]:
    """Process ``rank``'s share of the inputs: every ``processes``-th, from the ``rank``-th (a
    stable rule, so a rerun gives each process the inputs it had)."""
    for index, entry in enumerate(entries):
        if index % processes == rank:
            yield entry


def pending_inputs(
    source: Path | str, leave_out: Path | None, finished: Iterator[str], rank: int = 0, processes: int = 1
) -> tuple[PendingInputs, int, int]:
    """What is left of ``source`` given the inputs ``finished`` before (in the order they
    finished), with the number of inputs in all and the number left to process ``rank`` of
    ``processes``. One pass over both: when the earlier run went through the same inputs in
    the same order (the usual case, however many there are), nothing is kept in memory but
    two counts."""
    total = skip_first = 0
    matching = True
    rest: set[str] = set()
    for index, entry in enumerate(iter_inputs(source, leave_out)):
        total += 1
        if index % processes != rank:
            continue
        if matching:
            earlier = next(finished, None)
            if earlier == entry.relative.as_posix():
                skip_first += 1
                continue
            matching = False
            if earlier is not None:
                rest.add(earlier)
    rest.update(finished)
    pending = PendingInputs(str(source), leave_out, skip_first, frozenset(rest), rank, processes)
    mine = len(range(rank, total, processes))
    left = sum(1 for _ in pending) if rest else mine - skip_first
    return pending, total, left


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """The ``uint8 [H, W, 3]`` pixels of an RGB image, copied a band of rows at a time from a
    big one (``np.asarray`` would hold its pixels twice more while it copies them)."""
    width, height = image.size
    rows = max(1, PIXEL_BAND_PIXELS // max(1, width))
    if rows >= height:
        return np.asarray(image)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, rows):
        pixels[top : top + rows] = np.asarray(image.crop((0, top, width, min(height, top + rows))))
    return pixels


@dataclass
class DecodedInput:
    """One input as the loader workers hand it over: its RGB pixels ``uint8 [H, W, 3]`` and,
    when a model resolution was given, the model's square input resized from them
    (``uint8 [R, R, 3]``); or, with ``problem``, why it could not be read."""

    entry: SourceEntry
    pixels: np.ndarray | None = None
    model_input: np.ndarray | None = None
    problem: str | None = None


class _Decoded(IterableDataset):
    """The pending inputs, each decoded (and resized for the model); worker ``i`` of ``n``
    decodes entries ``i, i + n, ...``, which the loader's round-robin puts back in order."""

    def __init__(self, inputs: PendingInputs, resolution: int | None = None) -> None:
        self.inputs = inputs
        self.resolution = resolution

    def __iter__(self) -> Iterator[DecodedInput]:
        worker = get_worker_info()
        share, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for index, entry in enumerate(self.inputs):
            if index % workers != share:
                continue
            if entry.problem is not None:
                yield DecodedInput(entry, problem=entry.problem)
                continue
            try:
                image = read_image(entry.path, upright=True)
            except UnreadableFile as error:
                yield DecodedInput(entry, problem=error.reason)
                continue
            model_input = None
            if self.resolution is not None:  # here, in the workers, not in the process that runs the model
                model_input = np.asarray(resize_and_crop(image, self.resolution, square_resize=True))
            yield DecodedInput(entry, rgb_pixels(image), model_input)


def decoded_inputs(inputs: PendingInputs, workers: int, resolution: int | None = None) -> Iterator[DecodedInput]:
    """Every pending input decoded, in the inputs' order, in ``workers`` loader processes (0:
    in this one); with ``resolution``, each also resized to the model's square input."""
    if workers == 0:
        yield from _Decoded(inputs, resolution)
        return
    loader: DataLoader[Any] = DataLoader(
        _Decoded(inputs, resolution),
        batch_size=None,
        num_workers=workers,
        collate_fn=_keep,
        prefetch_factor=4,
        generator=torch.Generator().manual_seed(0),
    )
    for decoded in loader:
        raise_if_interrupted()
        yield decoded
    raise_if_interrupted()  # a Ctrl-C while the loader's workers were shut down


def _keep(item: Any) -> Any:
    return item
