"""history.csv and curves.png: a row every stride of each learnt step with its loss terms, about
a thousand rows a step however long, a file a kill leaves readable, and rows a resumed step
redoes dropped first (the kill-and-resume test in test_resume.py checks that end to end)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from PIL import Image

from cause_cli.runs import RunDirectory
from cause_cli.training.history import PANEL, History, history_stride, read_history

from .helpers import train_small_run


def test_a_toy_run_has_a_row_per_update_with_its_losses_and_a_panel_of_curves(tmp_path):
    _, run = train_small_run(tmp_path, num_val=2, seed=1)
    with (run / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    front_door = [row for row in rows if row["step"] == "front_door"]
    updates = int(front_door[-1]["updates"])
    assert [int(row["update"]) for row in front_door] == list(range(1, updates + 1))  # stride 1 on a short run
    assert all(math.isfinite(float(row["loss"])) for row in front_door)
    assert all(float(row["learning_rate"]) > 0 and int(row["bank_entries"]) > 0 for row in front_door)
    seconds = [float(row["seconds"]) for row in front_door]
    assert seconds == sorted(seconds)
    curves = Image.open(run / "curves.png")
    steps = len({row["step"] for row in rows})
    assert curves.size == (PANEL[0], PANEL[1] * steps)
    assert ".cause-files.jsonl" in {path.name for path in run.iterdir()}
    assert '"history.csv"' in (run / ".cause-files.jsonl").read_text()  # the run's own, --overwrite removes it


def test_long_steps_keep_about_a_thousand_rows_and_their_last_update():
    history = History(RunDirectory(Path("unused")))
    for updates in (1, 999, 1000, 1001, 123_457):
        due = [update for update in range(1, updates + 1) if history.due(update, updates)]
        assert len(due) <= 1001 and due[-1] == updates
        assert history_stride(updates) == max(1, math.ceil(updates / 1000))


def test_a_restarted_step_drops_its_later_rows_and_a_torn_line_is_left_out(tmp_path):
    run = RunDirectory(tmp_path)
    history = History(run)
    history.start_step("front_door", 0)
    for update in range(1, 6):
        history.add({"step": "front_door", "update": update, "updates": 5, "epoch": 1, "loss": 1.0 / update})
    history.start_step("cluster_probe", 0)
    history.add({"step": "cluster_probe", "update": 1, "updates": 2, "epoch": 1, "loss": 0.5})
    with (tmp_path / "history.csv").open("a") as handle:
        handle.write("cluster_probe,2,2,1,0.4")  # a kill in the middle of a line
    assert [row["update"] for row in read_history(tmp_path / "history.csv")] == ["1", "2", "3", "4", "5", "1"]
    history.add({"step": "cluster_probe", "update": 2, "updates": 2, "epoch": 1, "loss": 0.375})
    rows = read_history(tmp_path / "history.csv")
    assert [row["update"] for row in rows] == ["1", "2", "3", "4", "5", "1", "2"] and rows[-1]["loss"] == "0.375"

    History(run).start_step("front_door", 3)  # resumed after update 3 of the front door
    kept = read_history(tmp_path / "history.csv")
    assert [(row["step"], row["update"]) for row in kept] == [("front_door", str(update)) for update in (1, 2, 3)]
    resumed = History(run)
    resumed.start_step("front_door", 3)
    resumed.add({"step": "front_door", "update": 4, "updates": 5, "epoch": 1, "loss": 0.25})
    rows = read_history(tmp_path / "history.csv")
    assert [row["update"] for row in rows] == ["1", "2", "3", "4"]
    assert float(rows[-1]["seconds"]) >= float(rows[-2]["seconds"])  # the clock goes on from the kept rows
