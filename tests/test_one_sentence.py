"""Everyday mistakes end in one sentence on stderr, exit code 1 and no traceback, and leave
nothing half-written (issue: a run folder nobody can corrupt)."""

from __future__ import annotations

import errno
import json
import pickle
import shutil

import pytest
from typer.testing import CliRunner

from cause_cli.cli import app
from cause_cli.data.synthetic import write_scenes

from .helpers import one_sentence

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"), num_train=8, num_val=2, seed=5, size_range=(64, 72))


def train_args(scenes, run) -> list[object]:
    return ["train", "--data-dir", scenes, "--run", run, "--resolution", "64", "--clusterbook-size", "16",
            "--batch-size", "4", "--epochs-front-door", "1", "--min-updates", "0", "--device", "cpu",
            "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def run(scenes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "run"
    assert invoke(*train_args(scenes, folder)).exit_code == 0
    return folder


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--resolution", "0"], "--resolution must be a positive number of pixels, not 0."),
        (["--resolution", "-8"], "--resolution must be a positive number of pixels, not -8."),
        (["--dropout", "2"], "--dropout is a probability from 0 up to (not including) 1, not 2.0."),
        (["--loader-workers", "-1"], "--loader-workers must be at least 0, not -1."),
        (["--backbone", "hf-hub:../.."], "'hf-hub:../..' is not an hf-hub id"),
    ],
)
def test_bad_training_options(scenes, tmp_path, extra, pattern):
    target = tmp_path / "new-run"
    one_sentence(invoke(*train_args(scenes, target), *extra), pattern)
    assert not target.exists() or not (target / "run.json").exists()  # nothing left that looks like a run


@pytest.mark.parametrize(
    ("command", "pattern"),
    [
        (["eval", "--batch-size", "0", "--no-crf"], "--batch-size must be at least 1, not 0."),
        (["eval", "--crf-workers", "-1", "--no-crf"], "--crf-workers must be at least 0, not -1."),
        (["segment", "{val}", "--batch-size", "0", "--out", "{tmp}/out"], "--batch-size must be at least 1, not 0."),
    ],
)
def test_bad_counts_for_eval_and_segment(run, scenes, tmp_path, command, pattern):
    filled = [part.format(val=scenes / "images" / "val", tmp=tmp_path) for part in command]
    one_sentence(invoke(*filled, "--run", run), pattern)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda info: [1, 2], "it holds a list, not an object"),
        (lambda info: {"num_classes": 6}, "its 'config' is missing or not an object"),
        (lambda info: {**info, "config": "x"}, "its 'config' is missing or not an object"),
        (lambda info: {**info, "num_classes": "six"}, "its class count 'six' is not a positive whole number"),
        (lambda info: {**info, "config": {**info["config"], "head": "xl"}}, "unknown head 'xl'"),
    ],
    ids=["list", "no-config", "string-config", "class-count", "head"],
)
def test_a_run_json_this_toolkit_did_not_write(run, tmp_path, change, pattern):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps(change(info)))
    for command in (["eval", "--no-crf"], ["segment", copy, "--out", tmp_path / "out"]):
        one_sentence(invoke(*command, "--run", copy), pattern)


@pytest.mark.parametrize(
    ("metrics", "pattern"),
    [
        ('{"cluster_to_class": [0, 1', "metrics.json is damaged; run cause eval on the run again"),
        (json.dumps({"cluster_to_class": [0, 1], "class_names": ["a", "b"]}), "does not map the run's 6 clusters"),
    ],
    ids=["damaged", "short"],
)
def test_segment_with_damaged_metrics(run, scenes, tmp_path, metrics, pattern):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "metrics.json").write_text(metrics)
    one_sentence(invoke("segment", scenes / "images" / "val", "--run", copy, "--out", tmp_path / "out"), pattern)
    assert not (tmp_path / "out" / "labels").exists()


class Unsafe:
    def __reduce__(self):
        return (print, ("this would run",))


def test_fetch_of_a_pickle_that_is_not_weights_alone(tmp_path):
    checkpoint = tmp_path / "unsafe.pth"
    checkpoint.write_bytes(pickle.dumps({"model": Unsafe()}))
    sentence = one_sentence(invoke("fetch", "dino-vits8", "--from-file", checkpoint), "holds Python objects")
    assert sentence.endswith("and give that.")  # whole, not cut mid-sentence


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/data/run/clusterbook.safetensors")


def test_a_full_disk_during_training(scenes, tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    run = tmp_path / "run"
    one_sentence(invoke(*train_args(scenes, run)), "could not write /data/run/clusterbook.safetensors: No space")
    assert not list(run.glob("*.safetensors")) and not list(run.glob(".*.tmp"))


def test_a_full_disk_during_segment(run, scenes, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image.Image, "save", disk_full)
    out = tmp_path / "out"
    one_sentence(invoke("segment", scenes / "images" / "val", "--run", run, "--out", out, "-q"), "could not write")
    assert not list(out.rglob("*.png")) and not list(out.rglob(".*.tmp"))
