"""A disk cache of the frozen backbone's tokens for the training images (``--cache-features``).

The backbone is frozen and, without augmentation, sees the same training images in every
epoch of every step, so its tokens can be computed once and read back. They are kept as
float16 in a memory-mapped file ``[N, P, D]`` per input resolution, beside a flag per image
saying whether its tokens are in; a run that stops halfway keeps what it had computed.
"""

from __future__ import annotations

import mmap
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..errors import CauseError

# Room to leave free on the disk besides the cache itself.
DISK_MARGIN_BYTES = 1 << 30


def cache_bytes(images: int, tokens: int, dim: int) -> int:
    return images * tokens * dim * 2


class FeatureCache:
    """Tokens of dataset items by index, computed once."""

    def __init__(self, folder: Path, images: int, tokens: int, dim: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"tokens_{images}x{tokens}x{dim}.f16"
        flags_path = self.path.with_suffix(".filled")
        needed = cache_bytes(images, tokens, dim)
        if not self.path.exists():
            free = shutil.disk_usage(folder).free
            if free < needed + DISK_MARGIN_BYTES:
                raise CauseError(
                    f"The feature cache needs {needed / 2**30:.1f} GiB in {folder} but only "
                    f"{free / 2**30:.1f} GiB is free; free some space or train without --cache-features."
                )
            with open(self.path, "wb") as created:
                created.truncate(needed)
        with open(self.path, "r+b") as opened:
            self._map = mmap.mmap(opened.fileno(), needed)
        self.tokens = np.ndarray((images, tokens, dim), dtype=np.float16, buffer=self._map)
        self.row_bytes = tokens * dim * 2
        flags_mode: Literal["r+", "w+"] = "r+" if flags_path.exists() else "w+"
        self.filled = np.memmap(flags_path, dtype=np.uint8, mode=flags_mode, shape=(images,))
        self.size_bytes = needed

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

    def put(self, indices: torch.Tensor, tokens: torch.Tensor) -> None:
        rows = indices.cpu().numpy()
        self.tokens[rows] = tokens.detach().to("cpu", torch.float16).numpy()
        self._flush_rows(rows)
        # The flag goes last, so a stop between the two writes leaves the tokens recomputed.
        self.filled[rows] = 1
        self.filled.flush()

    def _flush_rows(self, rows: np.ndarray) -> None:
        """Write these rows' pages to disk, and only those: flushing the whole map would scan
        all of it (gigabytes at the paper's scale) after every batch."""
        for row in np.unique(rows):
            start = int(row) * self.row_bytes
            aligned = start - start % mmap.ALLOCATIONGRANULARITY
            self._map.flush(aligned, start + self.row_bytes - aligned)
