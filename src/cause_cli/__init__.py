"""CAUSE (Causal Unsupervised Semantic Segmentation) as a command line toolkit, and from Python:

from cause_cli import load_run
labels = load_run("runs/photos").segment("photo.jpg").labels
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .api import CauseModel, Segmentation, load_run

__all__ = ["CauseModel", "Segmentation", "__version__", "load_run"]


def __getattr__(name: str) -> Any:
    # torch loads with the first use of the Python API, not with `import cause_cli` (the CLI's
    # start-up reads __version__ from here).
    if name in ("CauseModel", "Segmentation", "load_run"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
