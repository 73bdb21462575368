"""Helpers for the tests. Tests that need ../shared find it from the repository root; when it
is missing they skip locally and fail under CI=true, so a wrong path can never pass silently."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"{path} is missing (the shared folder belongs beside the repository root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def assert_close(actual, expected, rtol: float = 1e-5, atol: float | None = None) -> None:
    """Element-wise ``rtol``, plus an absolute slack of ``rtol`` times the largest expected
    magnitude, so that elements near zero in an array of scale 1 are judged on that scale
    (float32 rounding of a sum of terms of size 1 is about 1e-7 whatever the sum's value)."""
    actual_t = torch.as_tensor(np.asarray(actual) if not isinstance(actual, torch.Tensor) else actual.detach())
    expected_t = torch.as_tensor(np.asarray(expected))
    if atol is None:
        scale = float(expected_t.abs().max()) if expected_t.numel() else 0.0
        atol = max(rtol * scale, 1e-8)
    torch.testing.assert_close(actual_t.to(expected_t.dtype), expected_t, rtol=rtol, atol=atol)


TRAINED_FILES = ("clusterbook.safetensors", "head.safetensors", "probe.safetensors")


def assert_same_weights(actual_run: Path, expected_run: Path, rtol: float, atol: float) -> None:
    """The two runs' clusterbook, heads and cluster probe agree tensor by tensor."""
    from cause_cli.runs import RunDirectory

    for name in TRAINED_FILES:
        expected = RunDirectory(expected_run).load_tensors(name)
        actual = RunDirectory(actual_run).load_tensors(name)
        assert expected.keys() == actual.keys(), name
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=rtol, atol=atol, msg=f"{name}:{key}")
