"""A run folder holds one training: continuing it with the same settings finishes what is
missing; other settings are refused in one sentence that names them, and --overwrite trains
it over on purpose."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cause_cli.cli import app
from cause_cli.data.synthetic import write_scenes

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"), num_train=8, num_val=2, seed=2, size_range=(64, 72))


def train_command(scenes, run, *extra: object) -> list[object]:
    return ["train", "--data-dir", scenes, "--run", run, "--resolution", "64", "--clusterbook-size", "16",
            "--batch-size", "4", "--epochs-front-door", "1", "--min-updates", "0", "--device", "cpu", "--quiet",
            *extra]  # fmt: skip


def test_other_settings_are_refused_and_overwrite_trains_over(scenes, tmp_path):
    run = tmp_path / "run"
    assert invoke(*train_command(scenes, run)).exit_code == 0
    weights = (run / "probe.safetensors").read_bytes()

    again = invoke(*train_command(scenes, run, "--workers", "0", "--checkpoint-every", "5"))
    assert again.exit_code == 0, again.output  # the same training: every step is already there
    assert "skipped" in (run / "train.log").read_text()
    assert (run / "probe.safetensors").read_bytes() == weights
    info = (run / "run.json").read_bytes()

    other = invoke(*train_command(scenes, run, "--seed", "1", "--dropout", "0.2"))
    assert other.exit_code == 1
    message = other.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in other.output
    assert "--seed 0 there, 1 here" in message and "--dropout 0.1 there, 0.2 here" in message
    assert "--overwrite" in message
    assert (run / "run.json").read_bytes() == info  # nothing was rewritten
    assert (run / "probe.safetensors").read_bytes() == weights

    over = invoke(*train_command(scenes, run, "--seed", "1", "--overwrite"))
    assert over.exit_code == 0, over.output
    assert json.loads((run / "run.json").read_text())["config"]["seed"] == 1
    assert (run / "probe.safetensors").read_bytes() != weights
    assert "overwritten" in (run / "train.log").read_text()


def test_the_data_folder_is_stored_resolved(scenes, tmp_path, monkeypatch):
    monkeypatch.chdir(scenes.parent)
    run = tmp_path / "relative"
    assert invoke(*train_command(scenes.name, run)).exit_code == 0
    assert json.loads((run / "run.json").read_text())["config"]["data_dir"] == str(scenes.resolve())
    # The same folder named another way is the same training.
    monkeypatch.chdir(tmp_path)
    assert invoke(*train_command(scenes, run)).exit_code == 0


def test_resume_and_overwrite_together_are_refused(tmp_path):
    result = invoke("train", "--run", tmp_path / "r", "--resume", "--overwrite")
    assert result.exit_code == 1 and "give one of them" in result.stderr
