"""benchmarks/gpu_check.py runs in CI with --small (CPU, tiny shapes), so it never rots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_small_on_the_cpu(tmp_path):
    environment = {**os.environ, "CAUSE_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--small", "--out", str(tmp_path / "check")],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = done.stdout.split("== summary")[1]
    for part in (
        "train in bfloat16",
        "train in float16",
        "train with --cache-features",
        "evaluate with the CRF",
        "segment",
    ):
        assert f"ok     {part}" in summary
    assert "every trained weight is finite" in done.stdout
    assert "of the backbone's speed and" in done.stdout and "of the I/O floor" in done.stdout
