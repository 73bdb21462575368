"""Helpers for the tests. Tests that need ../shared find it from the repository root, and
tests of the dense CRF need pydensecrf; when either is missing they skip locally and fail in
CI (CI set to true, 1 or yes, as CI services set it), so nothing can pass there by skipping."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def skip_or_fail_in_ci(message: str) -> None:
    """Skip the test here, but fail it in CI, where everything the tests need is installed."""
    if under_ci():
        pytest.fail(f"{message} (in CI this is a failure, not a skip)")
    pytest.skip(message)


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        skip_or_fail_in_ci(f"{path} is missing (the shared folder belongs beside the repository root)")
    return path


def require_pydensecrf() -> None:
    from cause_cli.inference.crf import crf_available

    if not crf_available():
        skip_or_fail_in_ci("pydensecrf is not installed")


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


def work_record(run: Path, title: str) -> tuple[int, int, int, int]:
    """(batches trained, batches in the step, done before, backbone passes) of the step titled
    ``title`` (e.g. "step 2/3 front door"), from its last record in the run's train.log."""
    pattern = re.escape(title) + r": (\d+) of (\d+) batches trained here \((\d+) done before\), (\d+) backbone"
    records = re.findall(pattern, (run / "train.log").read_text())
    assert records, f"no work record of {title!r} in {run / 'train.log'}"
    trained, total, before, passes = (int(value) for value in records[-1])
    return trained, total, before, passes


def invoke(*args: object):
    """``cause ARGS`` in this process, as a user would type it (paths as strings)."""
    from typer.testing import CliRunner

    from cause_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_sentence(result, pattern: str) -> str:
    """The command failed as a user's mistake should: exit code 1, no traceback, one line on
    stderr that holds ``pattern``; that line."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert pattern in lines[0], lines[0]
    return lines[0]


def train_small_run(root: Path, num_val: int, seed: int, size_range: tuple[int, int] = (64, 72)) -> tuple[Path, Path]:
    """Synthetic scenes under ``root/scenes`` and a run trained on them in seconds (64 px, 16
    concepts, one front-door epoch) at ``root/run``: ``(scenes, run)``."""
    from cause_cli.data.synthetic import write_scenes

    scenes = write_scenes(root / "scenes", num_train=8, num_val=num_val, seed=seed, size_range=size_range)
    run = root / "run"
    result = invoke("train", "--data-dir", scenes, "--run", run, "--resolution", "64", "--clusterbook-size", "16",
                    "--batch-size", "4", "--epochs-front-door", "1", "--min-updates", "0", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    return scenes, run


def label_maps(out: Path) -> dict[str, list]:
    """The label maps `cause segment` wrote under ``out/labels``, by file name (as lists, so
    that two folders compare with ``==``)."""
    from PIL import Image

    return {path.name: np.asarray(Image.open(path)).tolist() for path in sorted((out / "labels").glob("*.png"))}
