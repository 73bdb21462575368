"""Progress reporting that library code can use without knowing about the terminal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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

    def render(self, task: Task) -> Text:
        speed = task.speed
        if not speed:
            return Text("", style="progress.data.speed")
        text = f"{speed:.1f} it/s" if speed >= 1 else f"{1 / speed:.1f} s/it"
        return Text(text, style="progress.data.speed")


class Reporter:
    """Silent by default; :class:`RichReporter` draws bars on stderr."""

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
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
    def _bar(self, description: str, total: int | None, *columns: ProgressColumn) -> Iterator[Advance]:
        if self.quiet:
            yield _ignore_progress
            return
        layout = (TextColumn("{task.description}"), BarColumn(), *columns, TextColumn("eta"), TimeRemainingColumn())
        with Progress(*layout, console=self.console, transient=False) as progress:
            task_id = progress.add_task(description, total=total)
            yield lambda steps=1: progress.advance(task_id, steps)  # type: ignore[misc]

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        with self._bar(description, total, MofNCompleteColumn(), RateColumn(), TimeElapsedColumn()) as advance:
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
