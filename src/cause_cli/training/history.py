"""``history.csv``: the losses of the learnt steps as training goes, and ``curves.png`` drawn
from it at the end.

A row every ``stride`` updates of a step (and at its last), so that a long run keeps about a
thousand rows a step: the step, its update and updates in all, the epoch, the loss terms of
the global batch, the learning rate, the concept bank's entries and the seconds since the
training began. Rows are appended as whole lines and put on disk as they go, so a kill leaves
a readable file (a line it cut short is dropped on the next append); a resumed step first
drops the rows after its checkpoint, which it redoes, so the file reads as one training.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..owned import append_whole_lines, write_synced
from ..paths import write_atomically
from ..runs import CURVES_FILE, HISTORY_FILE, RunDirectory

COLUMNS = ("step", "update", "updates", "epoch", "loss", "probe_loss", "learning_rate", "bank_entries", "seconds")
STEPS = ("front_door", "cluster_probe")  # the learnt steps, in their order (the clusterbook is k-means)
ROWS_PER_STEP = 1000


def history_stride(updates: int) -> int:
    """Updates between two rows: about :data:`ROWS_PER_STEP` rows a step however long it runs."""
    return max(1, math.ceil(updates / ROWS_PER_STEP))


def read_history(path: Path) -> list[dict[str, str]]:
    """The whole rows of a history file (none when it is missing)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.splitlines(keepends=True)
    whole = [line for line in lines if line.endswith("\n")]
    return [row for row in csv.DictReader(io.StringIO("".join(whole))) if None not in row.values()]


class History:
    """The run's history file, written by the process that writes the run."""

    def __init__(self, run: RunDirectory) -> None:
        self.run = run
        self.started = time.monotonic()
        self.seconds_before = 0.0  # the time of the rows a resumed training kept

    @property
    def path(self) -> Path:
        return self.run.file(HISTORY_FILE)

    def due(self, update: int, updates: int) -> bool:
        return update == updates or update % history_stride(updates) == 0

    def start_step(self, step: str, done: int) -> None:
        """Step ``step`` (re)starts after ``done`` updates: rows of later steps and of its own
        later updates go (they will be made again), and the clock goes on from the last kept."""
        if not self.run.writes:
            return
        rows = read_history(self.path)
        order = STEPS.index(step)
        kept = [
            row
            for row in rows
            if row["step"] in STEPS
            and (STEPS.index(row["step"]) < order or (row["step"] == step and int(row["update"]) <= done))
        ]
        self.seconds_before = float(kept[-1]["seconds"]) if kept else 0.0
        self.started = time.monotonic()
        if kept == rows and self.path.exists():
            return
        self.run.owned.record_appended(HISTORY_FILE)
        write_atomically(self.path, partial(write_synced, _csv_text(kept, header=True).encode()))

    def add(self, values: dict[str, object]) -> None:
        """Append one row (the columns it lacks are left empty)."""
        if not self.run.writes:
            return
        values = {**values, "seconds": round(self.seconds_before + time.monotonic() - self.started, 3)}
        self.run.owned.record_appended(HISTORY_FILE)
        append_whole_lines(self.path, _csv_text([values], header=False).encode(), _csv_text([], header=True).encode())


def _csv_text(rows: Sequence[Mapping[str, object]], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(row.get(key)) for key in COLUMNS})
    return buffer.getvalue()


def _cell(value: object) -> object:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


CURVE_COLOURS = {"loss": (31, 119, 180), "probe_loss": (255, 127, 14)}
PANEL = (560, 240)
MARGIN = (64, 28, 16, 36)  # left, top, right, bottom


def curves_picture(rows: list[dict[str, str]]) -> Image.Image | None:
    """One panel a learnt step: each loss term against the step's updates (None without rows)."""
    steps = [step for step in STEPS if any(row["step"] == step for row in rows)]
    if not steps:
        return None
    width, height = PANEL
    picture = Image.new("RGB", (width, height * len(steps)), "white")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for index, step in enumerate(steps):
        top = index * height
        mine = [row for row in rows if row["step"] == step]
        updates = max(1, max(int(row["updates"]) for row in mine))
        series = {
            name: [(int(row["update"]), float(row[name])) for row in mine if row.get(name) not in (None, "")]
            for name in CURVE_COLOURS
        }
        values = [value for points in series.values() for _, value in points if math.isfinite(value)]
        low, high = (min(values), max(values)) if values else (0.0, 1.0)
        if high - low < 1e-12:
            low, high = low - 0.5, high + 0.5
        left, inner_top, right, bottom = MARGIN[0], top + MARGIN[1], width - MARGIN[2], top + height - MARGIN[3]
        draw.rectangle((left, inner_top, right, bottom), outline=(160, 160, 160))
        draw.text(
            (left, top + 6), f"{step.replace('_', ' ')}: loss against updates ({updates:,})", fill="black", font=font
        )
        draw.text((4, inner_top), f"{high:.4g}", fill="black", font=font)
        draw.text((4, bottom - 12), f"{low:.4g}", fill="black", font=font)
        draw.text((left, bottom + 4), "0", fill="black", font=font)
        draw.text((right - 40, bottom + 4), f"{updates:,}", fill="black", font=font)
        legend_x = right - 150
        for name, points in series.items():
            finite = [(update, value) for update, value in points if math.isfinite(value)]
            if not finite:
                continue
            xy = [
                (left + (right - left) * update / updates, bottom - (bottom - inner_top) * (value - low) / (high - low))
                for update, value in finite
            ]
            colour = CURVE_COLOURS[name]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            else:
                draw.ellipse((xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill=colour)
            draw.line((legend_x, top + 12, legend_x + 16, top + 12), fill=colour, width=2)
            draw.text((legend_x + 20, top + 6), name.replace("_", " "), fill="black", font=font)
            legend_x += 80
    return picture


def write_curves(run: RunDirectory) -> None:
    """``curves.png`` from the run's history (nothing when it has no rows)."""
    picture = curves_picture(read_history(run.file(HISTORY_FILE)))
    if picture is not None:
        run.write_file(CURVES_FILE, lambda target: picture.save(target, format="PNG"))
