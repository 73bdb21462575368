"""A disk cache of the frozen backbone's tokens for the training images (``--cache-features``).

The backbone is frozen and, without augmentation, sees the same training images in every
epoch of every step, so its tokens can be computed once and read back. They are kept as
float16 in a memory-mapped file ``[N, P, D]`` per input resolution, beside a flag per image
saying whether its tokens are in and a CRC-32 of each image's tokens; a run that stops
halfway keeps what it had computed, and tokens damaged on disk (a file cut short, changed
bytes) are found when the cache is opened and computed again.

Below training and inference: a training fills it, and ``cause eval``'s baselines read what a
training left. Whether a training keeps one is decided in training/feature_cache.py.
"""

from __future__ import annotations

import hashlib
import mmap
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .errors import CauseError
from .paths import readable_size

# Room to leave free on the disk besides the cache itself.
DISK_MARGIN_BYTES = 1 << 30


def cache_bytes(images: int, tokens: int, dim: int) -> int:
    return images * tokens * dim * 2


def cache_folder(run_path: Path, resolution: int, backbone_sha256: str | None, samples: Sequence[object]) -> Path:
    """Where a run keeps the tokens of these training images at ``resolution``: the folder
    names the backbone's weights and the images, so other data never reads these tokens."""
    listing = "\n".join(str(sample) for sample in samples)
    fingerprint = hashlib.sha1(f"{backbone_sha256}\n{listing}".encode()).hexdigest()[:12]
    return run_path / "feature-cache" / f"{resolution}-{fingerprint}"


def open_existing_cache(folder: Path, images: int, tokens: int, dim: int) -> FeatureCache | None:
    """The cache a training left in ``folder``, whole, or None (nothing is made here)."""
    probe = FeatureCache.file_sizes(folder, images, tokens, dim)
    if not all(path.is_file() and path.stat().st_size == size for path, size in probe):
        return None
    return FeatureCache(folder, images, tokens, dim)


class FeatureCache:
    """Tokens of dataset items by index, computed once."""

    @staticmethod
    def file_sizes(folder: Path, images: int, tokens: int, dim: int) -> tuple[tuple[Path, int], ...]:
        """The cache's three files and their sizes: the tokens, a flag and a CRC-32 per image."""
        path = folder / f"tokens_{images}x{tokens}x{dim}.f16"
        needed = cache_bytes(images, tokens, dim)
        return ((path, needed), (path.with_suffix(".filled"), images), (path.with_suffix(".crc32"), 4 * images))

    def __init__(self, folder: Path, images: int, tokens: int, dim: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        expected_sizes = self.file_sizes(folder, images, tokens, dim)
        (self.path, needed), (flags_path, _), (sums_path, _) = expected_sizes
        self.damaged = 0  # rows found damaged on opening, to be computed again
        if any(path.exists() for path, _ in expected_sizes) and any(
            not path.exists() or path.stat().st_size != size for path, size in expected_sizes
        ):
            # Cut short (a full disk, a copy stopped halfway) or from an older version: start over.
            self.damaged = images
            for path, _ in expected_sizes:
                path.unlink(missing_ok=True)
        if not self.path.exists():
            free = shutil.disk_usage(folder).free
            if free < needed + DISK_MARGIN_BYTES:
                raise CauseError(
                    f"The feature cache needs {readable_size(needed)} in {folder} (and "
                    f"{readable_size(DISK_MARGIN_BYTES)} to spare) but only {readable_size(free)} is free; "
                    "free some space or train with --cache-features off."
                )
            with open(self.path, "wb") as created:
                created.truncate(needed)
        with open(self.path, "r+b") as opened:
            self._map = mmap.mmap(opened.fileno(), needed)
        self.tokens = np.ndarray((images, tokens, dim), dtype=np.float16, buffer=self._map)
        self.row_bytes = tokens * dim * 2
        flags_mode: Literal["r+", "w+"] = "r+" if flags_path.exists() else "w+"
        self.filled = np.memmap(flags_path, dtype=np.uint8, mode=flags_mode, shape=(images,))
        self.sums = np.memmap(sums_path, dtype=np.uint32, mode=flags_mode, shape=(images,))
        self.size_bytes = needed
        self._forget_damaged_rows()

    def _row_sum(self, row: int) -> int:
        return zlib.crc32(self.tokens[row].tobytes())

    def _forget_damaged_rows(self) -> None:
        """Clear the flag of every filled row whose tokens no longer match their checksum."""
        damaged = [row for row in np.flatnonzero(self.filled).tolist() if self._row_sum(row) != int(self.sums[row])]
        if damaged:
            self.filled[damaged] = 0
            self.filled.flush()
            self.damaged = max(self.damaged, len(damaged))

    def has(self, indices: torch.Tensor) -> np.ndarray:
        """Whether each of these items' tokens are in, ``bool [B]``."""
        return self.filled[indices.cpu().numpy()].astype(bool)

    def snapshot(self) -> np.ndarray:
        """Whether each item's tokens are in, ``bool [N]``, as of now."""
        return np.array(self.filled, dtype=bool)

    def get(self, indices: torch.Tensor) -> torch.Tensor | None:
        """The cached tokens of these items ``[B, P, D]`` (float32), or None if any is missing."""
        rows = indices.cpu().numpy()
        if not bool(self.filled[rows].all()):
            return None
        return torch.from_numpy(np.asarray(self.tokens[rows], dtype=np.float32))

    def tokens_of(self, indices: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        """``[B, P, D]`` float32: the cached tokens of the items marked ``cached``, zeros for
        the others (to be computed by the caller)."""
        rows = indices.cpu().numpy()
        tokens = torch.zeros(len(rows), *self.tokens.shape[1:])
        chosen = cached.cpu().numpy()
        tokens[torch.from_numpy(chosen)] = torch.from_numpy(np.asarray(self.tokens[rows[chosen]], dtype=np.float32))
        return tokens

    def put(self, indices: torch.Tensor, tokens: torch.Tensor) -> None:
        rows = indices.cpu().numpy()
        self.tokens[rows] = tokens.detach().to("cpu", torch.float16).numpy()
        self._flush_rows(rows)
        for row in np.unique(rows).tolist():
            self.sums[row] = self._row_sum(row)
        self.sums.flush()
        # The flag goes last, so a stop between the writes leaves the tokens recomputed.
        self.filled[rows] = 1
        self.filled.flush()

    def _flush_rows(self, rows: np.ndarray) -> None:
        """Write these rows' pages to disk, and only those: flushing the whole map would scan
        all of it (gigabytes at the paper's scale) after every batch."""
        for row in np.unique(rows):
            start = int(row) * self.row_bytes
            aligned = start - start % mmap.ALLOCATIONGRANULARITY
            self._map.flush(aligned, start + self.row_bytes - aligned)
