"""Whether a training keeps its backbone tokens on disk (``--cache-features auto|on|off``), for
each input resolution it reads; the cache itself is :mod:`cause_cli.feature_cache`, below
training and inference (``cause eval``'s baselines read a cache a training left)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..devices import available_memory
from ..feature_cache import DISK_MARGIN_BYTES, cache_bytes
from ..paths import readable_size


def choose_feature_cache(
    setting: str, reads: float, needed: int, free_disk: int, device_type: str, free_memory: int | None
) -> tuple[bool, str]:
    """Whether to cache the tokens (``--cache-features auto|on|off``), and why, in a few words.

    ``auto`` caches them when the training reads each image's tokens more than once
    (``reads``, in passes over the images) and the ``needed`` bytes fit: at most half the
    ``free_disk``, with :data:`DISK_MARGIN_BYTES` to spare; on a GPU also at most half the
    ``free_memory``, so that they are read back from the page cache: a GPU's backbone outruns
    a disk, where a CPU's (seconds an image) is slower than any disk (megabytes an image).
    """
    size = readable_size(needed)
    if setting != "auto":
        return setting == "on", f"--cache-features {setting}"
    if reads <= 1:
        return False, "each image's tokens are read once"
    free = readable_size(free_disk)
    if needed + DISK_MARGIN_BYTES > free_disk:
        spare = readable_size(DISK_MARGIN_BYTES)
        return False, f"the {size} it needs and {spare} to spare are more than the {free} free on the disk"
    if 2 * needed > free_disk:
        return False, f"the {size} it needs is more than half of the {free} free on the disk"
    if device_type == "cuda" and (free_memory is None or 2 * needed > free_memory):
        memory = "unknown" if free_memory is None else readable_size(free_memory)
        half = f"over half the free memory ({memory})"
        return False, f"a GPU's backbone outruns a disk, and the {size} it needs is {half}"
    return True, f"each image's tokens are read {reads:g} times; {size} on disk"


def decide_feature_caches(
    setting: str,
    passes: dict[int, float],
    images: int,
    patch_size: int,
    dim: int,
    folder: Path,
    device_type: str,
    across_machines: bool = False,
) -> dict[int, tuple[bool, str]]:
    """For each input resolution the training reads (``passes`` over the images at it):
    whether its tokens are cached, and why (:func:`choose_feature_cache`). The caches share
    the disk of ``folder``, so each is weighed against what the ones before it left free."""
    decisions: dict[int, tuple[bool, str]] = {}
    free_disk = shutil.disk_usage(_existing(folder)).free
    free_memory = available_memory()
    for resolution, reads in passes.items():
        needed = cache_bytes(images, (resolution // patch_size) ** 2, dim)
        if across_machines and setting == "auto":
            decisions[resolution] = (False, "the processes run on several machines")
            continue
        decisions[resolution] = choose_feature_cache(setting, reads, needed, free_disk, device_type, free_memory)
        if decisions[resolution][0]:
            free_disk -= needed
    return decisions


def describe_feature_caches(decisions: dict[int, tuple[bool, str]]) -> str:
    """``feature cache on (why)``, or one clause per resolution where there are two."""
    if len(decisions) == 1:
        ((on, why),) = decisions.values()
        return f"feature cache {'on' if on else 'off'} ({why})"
    return "feature cache " + ", ".join(
        f"at {resolution} px {'on' if on else 'off'} ({why})" for resolution, (on, why) in decisions.items()
    )


def _existing(folder: Path) -> Path:
    """``folder`` or its nearest existing parent (the run folder may not be made yet)."""
    folder = folder.expanduser().absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder
