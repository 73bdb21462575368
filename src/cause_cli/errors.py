"""Errors a user can cause. The CLI prints their message as one sentence and exits 1."""

from __future__ import annotations


class CauseError(Exception):
    """A problem with the user's input, files or environment, not a bug in the toolkit."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a command that can be continued; the message says how."""
