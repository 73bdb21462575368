"""One voice across the commands: one name for each concept, JSON wherever a command has a
result, help that shows what a user types, and what a command did said in words."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from cause_cli.cli import app
from cause_cli.data.synthetic import write_scenes

runner = CliRunner()
COMMANDS = ("info", "fetch", "train", "prepare", "eval", "segment", "import", "export", "push", "demo")


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env={"COLUMNS": "200"})


def help_text(*command: str) -> str:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_what_a_user_types(command):
    text = help_text(command)
    assert "<bool>" not in text  # flags take no value
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage
    # Each concept has one name: loader processes, CRF processes, cropping threads.
    assert not re.search(r"--workers\b", text)


def test_option_names_are_the_same_in_every_command():
    assert "--loader-workers" in help_text("train") and "--loader-workers" in help_text("eval")
    for command in ("eval", "segment"):
        text = help_text(command)
        assert "--crf-workers" in text and "--no-crf" in text
    assert "--threads" in help_text("prepare")
    for command in ("info", "fetch", "train", "eval", "segment", "import"):
        assert "--json" in help_text(command), command
    assert "needed unless --resume" in help_text("train")
    assert "--install-completion" in help_text()


def test_fetch_list_as_json(tmp_path):
    result = invoke("fetch", "--list", "--json", "--cache-dir", tmp_path)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    toy = next(row for row in rows if row["name"] == "toy")
    assert {"family", "patch", "width", "licence", "cached"} <= set(toy)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"), num_train=8, num_val=2, seed=3, size_range=(64, 72))


def train_args(data, run):
    return ["train", "--data-dir", data, "--run", run, "--resolution", "64", "--clusterbook-size", "16",
            "--batch-size", "4", "--epochs-front-door", "1", "--min-updates", "0", "--device", "cpu"]  # fmt: skip


def test_train_and_segment_as_json_and_the_split_said(scenes, tmp_path):
    run = tmp_path / "run"
    trained = invoke(*train_args(scenes, run), "--json")
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.stdout)
    assert summary["run"] == str(run) and summary["num_classes"] == 6
    assert {"run.json", "clusterbook.safetensors", "head.safetensors", "probe.safetensors"} <= set(summary["files"])
    assert summary["config"]["seed"] == 0 and set(summary["schedule"]) == {"clusterbook", "front_door", "cluster_probe"}
    log = (run / "train.log").read_text()
    assert f"data: 8 training images (the train split: the images under {scenes / 'images' / 'train'})" in log

    segmented = invoke("segment", scenes / "images" / "val", "--run", run, "--out", tmp_path / "out", "--json")
    assert segmented.exit_code == 0, segmented.output
    assert json.loads(segmented.stdout) == json.loads((tmp_path / "out" / "summary.json").read_text())

    # Without split folders, the split is a stable hash of each path, and training says so.
    flat = tmp_path / "flat"
    shutil.copytree(scenes / "images" / "train", flat / "images")
    hashed = invoke(*train_args(flat, tmp_path / "flat-run"), "--num-classes", "6", "-q")
    assert hashed.exit_code == 0, hashed.output
    log = (tmp_path / "flat-run" / "train.log").read_text()
    assert re.search(r"data: \d training images \(the train split: 80% of the images, chosen by a stable hash", log)


def test_a_data_dir_that_is_the_images_folder_itself_is_recognised(scenes, tmp_path):
    result = invoke(*train_args(scenes / "images", tmp_path / "run"), "--num-classes", "6")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: Data folder {scenes / 'images'} has no images/ folder, and looks like the images folder itself: "
        f"give its parent, --data-dir {scenes}."
    )
