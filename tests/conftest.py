"""Shared fixtures; see helpers.py for how tests find ../shared."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .helpers import require_pydensecrf, shared_path


@pytest.fixture
def parity():
    """Load one of the reference's .npz fixtures by stem: parity('heads')['mlp_seg_feat']."""

    def load(stem: str) -> dict[str, np.ndarray]:
        with np.load(shared_path("parity", f"{stem}.npz")) as data:
            return {key: data[key] for key in data.files}

    return load


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests share one backbone cache in pytest's temporary folder, never the user's, and start seeded."""
    cache = tmp_path_factory.getbasetemp() / "cause-home"
    monkeypatch.setenv("CAUSE_HOME", str(cache))
    torch.manual_seed(0)


@pytest.fixture
def pydensecrf():
    """For tests of the dense CRF: skips without pydensecrf, fails in CI."""
    require_pydensecrf()
