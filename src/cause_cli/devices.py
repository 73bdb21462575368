"""Choosing the device and the precision to compute in."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .config import PRECISIONS
from .errors import CauseError


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, and the container's CPU quota (cgroup
    v2) where one is set; ``os.cpu_count()`` counts the whole machine."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, int(quota) // int(period))
    except (OSError, ValueError):
        pass
    return max(1, count)


def loader_workers(requested: int | None, device: torch.device, processes_here: int = 1) -> int:
    """Image-loading processes: as asked, else none on the CPU (they would compete with the
    model for the same cores) and up to 8 per GPU process on CUDA, within the CPUs there are."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    return max(0, min(8, available_cpus() // max(1, processes_here) - 1))


def use_only_available_cpus() -> int:
    """Cap torch's threads at the CPUs this process may use: torch counts the machine's cores,
    so in a container limited to 2 of 64 CPUs it would run 64 threads on 2 and slow to a crawl.
    Returns the thread count."""
    threads = min(torch.get_num_threads(), available_cpus())
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU. Every command that
    computes resolves its device first, so torch's threads are capped here too."""
    use_only_available_cpus()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CauseError(f"Unknown device '{name}'; use auto, cpu, cuda or cuda:N.") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CauseError(f"Device '{name}' was asked for but this machine has no usable CUDA GPU.")
    if device.type not in ("cpu", "cuda"):
        raise CauseError(f"Device '{name}' is not supported; use auto, cpu, cuda or cuda:N.")
    return device


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_precision: contextvars.ContextVar[str] = contextvars.ContextVar("cause_precision", default="auto")


@contextlib.contextmanager
def use_precision(precision: str) -> Iterator[None]:
    """Compute in ``precision`` (one of :data:`PRECISIONS`) inside the block: ``auto`` is
    float32 on the CPU, bfloat16 on GPUs that have it in hardware, float16 on the others."""
    if precision not in PRECISIONS:
        raise CauseError(f"Unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}.")
    token = _precision.set(precision)
    try:
        yield
    finally:
        _precision.reset(token)


def native_bfloat16(device: torch.device) -> bool:
    """Whether the GPU computes bfloat16 in hardware (Ampere and later). A V100 or T4 only
    emulates it, slower than float16, though ``torch.cuda.is_bf16_supported()`` says yes."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype mixed-precision regions compute in on ``device`` (float32: none)."""
    precision = _precision.get()
    if precision != "auto":
        return _DTYPES[precision]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bfloat16(device) else torch.float16


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision in :func:`compute_dtype`; nothing to do for float32."""
    dtype = compute_dtype(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def gradient_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for float16 (whose small gradients would underflow); a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=compute_dtype(device) == torch.float16)


def load_tensors_only(path: Path, allowed: tuple[type, ...] = ()) -> Any:
    """``torch.load`` that unpickles tensors (and the ``allowed`` types) only, nothing that
    could run code. Files written by other code with a newer pickle protocol are read the
    same way, so torch's note that it expected protocol 2 is not passed on."""
    with warnings.catch_warnings(), torch.serialization.safe_globals(list(allowed)):
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux's MemAvailable, else the
    free pages), or None where neither can be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# glibc's mallopt parameters (malloc.h): memory freed below the trim threshold stays with the
# process; blocks above the mmap threshold are mapped afresh on every allocation.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEPT_BYTES = 2**31 - 1  # the largest value mallopt's int takes


def keep_freed_memory() -> bool:
    """Let glibc reuse the large blocks a training step frees instead of giving them back to
    the system: by default each block above 32 MiB (the front door's ``[rows, entries]``
    tensors) is mapped anew and its pages faulted in at every update, a fifth of a CPU
    update's time (docs/performance.md). Returns whether it could (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEPT_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEPT_BYTES))
