"""`cause demo` end to end: the full pipeline on synthetic scenes must segment them well."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cause_cli.cli import app


@pytest.mark.slow
def test_demo_reaches_sixty_percent_miou(tmp_path):
    result = CliRunner().invoke(
        app, ["demo", "--out", str(tmp_path), "--device", "cpu", "--quiet"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["miou"] >= 60.0, metrics
    assert len(list((tmp_path / "segments" / "labels").glob("*.png"))) == 8
    assert "mIoU" in result.stdout
