"""Progress reporting that library code can use without knowing about the terminal."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import PurePath

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

Advance = Callable[[int], None]


def _ignore_progress(steps: int = 1) -> None:
    pass


class RateColumn(ProgressColumn):
    """Items per second, or seconds per item when slower than one a second."""

    def __init__(self, unit: str = "it") -> None:
        super().__init__()
        self.unit = unit
        self.one = unit[:-1] if unit.endswith("s") and unit != "s" else unit

    def render(self, task: Task) -> Text:
        speed = task.speed
        if not speed:
            return Text("", style="progress.data.speed")
        text = f"{speed:.1f} {self.unit}/s" if speed >= 1 else f"{1 / speed:.1f} s/{self.one}"
        return Text(text, style="progress.data.speed")


class Reporter:
    """Silent by default; :class:`RichReporter` draws bars on stderr."""

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = "it", done: int = 0) -> Iterator[Advance]:
        """Progress of ``total`` steps (``unit`` names them in the rate shown), ``done`` of them
        before (a resumed step: they count toward the bar, not toward the pace)."""
        yield _ignore_progress

    @contextmanager
    def download(self, description: str, total_bytes: int | None) -> Iterator[Advance]:
        """Like :meth:`task`, counting bytes."""
        yield _ignore_progress

    def message(self, text: str) -> None:
        pass

    def quiet_summary(self, text: str) -> None:
        """A line shown only with --quiet, in place of the messages it hides."""


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None, quiet: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet

    @contextmanager
    def _bar(self, description: str, total: int | None, *columns: ProgressColumn, done: int = 0) -> Iterator[Advance]:
        if self.quiet:
            yield _ignore_progress
            return
        layout = (TextColumn("{task.description}"), BarColumn(), *columns, TextColumn("eta"), TimeRemainingColumn())
        with Progress(*layout, console=self.console, transient=False) as progress:
            # Done before, not advanced: the pace, and so the time left, counts this run's steps only.
            task_id = progress.add_task(description, total=total, completed=done)
            yield lambda steps=1: progress.advance(task_id, steps)  # type: ignore[misc]

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = "it", done: int = 0) -> Iterator[Advance]:
        columns = (MofNCompleteColumn(), RateColumn(unit), TimeElapsedColumn())
        with self._bar(description, total, *columns, done=done) as advance:
            yield advance

    @contextmanager
    def download(self, description: str, total_bytes: int | None) -> Iterator[Advance]:
        with self._bar(description, total_bytes, DownloadColumn(), TransferSpeedColumn()) as advance:
            yield advance

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    def quiet_summary(self, text: str) -> None:
        if self.quiet:
            self.console.print(text)


def warning_source(category: type[Warning], filename: str) -> str:
    """The library a warning comes from: its category's package (``PIL`` for PIL's own
    warnings), else the package of the file that issued it."""
    module = getattr(category, "__module__", "builtins")
    if module != "builtins":
        return module.split(".")[0]
    parts = PurePath(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return PurePath(parts[parts.index(marker) + 1]).stem
    if "cause_cli" in parts:
        return "cause"
    return PurePath(filename).stem or "python"


def show_warnings_as_notes(console: Console) -> None:
    """Warnings of the libraries underneath (PIL, torch, timm) reach the user as one-line
    notes in the toolkit's voice, each once, instead of Python's two-line form with a file
    path and source line."""
    shown: set[tuple[str, str]] = set()

    def note(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: object = None,
        line: str | None = None,
    ) -> None:
        lines = str(message).strip().splitlines()
        text = lines[0] if lines else category.__name__
        key = (warning_source(category, filename), text)
        if key not in shown:
            shown.add(key)
            console.print(f"note ({key[0]}): {text}", markup=False, highlight=False, soft_wrap=True)

    warnings.showwarning = note
