"""In CI a test that lacks ../shared or pydensecrf fails instead of skipping, whichever way the
CI service spells CI; here (CI unset) it skips."""

from __future__ import annotations

import sys

import pytest

from . import helpers


@pytest.mark.parametrize("value", ["true", "1", "TRUE", "yes"])
def test_missing_shared_folder_fails_in_ci(monkeypatch, tmp_path, value):
    monkeypatch.setattr(helpers, "SHARED", tmp_path / "no-shared-here")
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="no-shared-here"):
        helpers.shared_path("METHOD.md")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_missing_shared_folder_skips_outside_ci(monkeypatch, tmp_path, value):
    monkeypatch.setattr(helpers, "SHARED", tmp_path / "no-shared-here")
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception):
        helpers.shared_path("METHOD.md")


def block_pydensecrf(monkeypatch) -> None:
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_pydensecrf_fails_in_ci(monkeypatch):
    block_pydensecrf(monkeypatch)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="pydensecrf is not installed"):
        helpers.require_pydensecrf()


def test_missing_pydensecrf_skips_outside_ci(monkeypatch):
    block_pydensecrf(monkeypatch)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        helpers.require_pydensecrf()
