"""The ``cause`` command line. Each command parses its options and calls one library function."""

from __future__ import annotations

from . import basics, evaluate, segment, share, train  # noqa: F401  (each registers its commands)
from .base import app

__all__ = ["app", "run"]


def run() -> None:
    app()
