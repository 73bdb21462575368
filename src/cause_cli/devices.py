"""Choosing the device and the precision to compute in."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from .errors import CauseError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
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


PRECISIONS = ("auto", "float32", "bfloat16", "float16")
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
