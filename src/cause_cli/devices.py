"""Choosing the device and the precision to compute in."""

from __future__ import annotations

import contextlib

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


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bfloat16 where supported, else float16); float32 on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def gradient_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for float16 mixed precision; a no-op with bfloat16 or on the CPU."""
    float16 = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=float16)
