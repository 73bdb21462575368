"""A run folder holds one training: continuing it with the same settings finishes what is
missing; other settings are refused in one sentence that names them, and --overwrite trains
it over on purpose."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cause_cli.cli import app
from cause_cli.data.synthetic import write_scenes
from cause_cli.paths import list_files

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

    again = invoke(*train_command(scenes, run, "--loader-workers", "0", "--checkpoint-every", "5"))
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


def strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_metrics_are_strict_json_and_an_evaluation_of_nothing_keeps_them(scenes, tmp_path):
    run = tmp_path / "run"
    # More clusters than the labels' classes: some classes have no pixels, so no IoU.
    assert invoke(*train_command(scenes, run, "--num-classes", "8")).exit_code == 0
    result = invoke("eval", "--run", run, "--device", "cpu", "--no-crf", "--json")
    assert result.exit_code == 0, result.output
    printed = strict_json(result.stdout)
    stored = (run / "metrics.json").read_bytes()
    assert None in printed["iou_per_class"].values()
    strict_json(stored.decode())

    # Labels that ignore every pixel: nothing is evaluated, said in one sentence, and the
    # metrics already there are kept.
    ignored = tmp_path / "ignored"
    shutil.copytree(scenes, ignored)
    for label in (ignored / "labels" / "val").glob("*.png"):
        Image.fromarray(np.full_like(np.asarray(Image.open(label)), 255)).save(label)
    undefined = invoke("eval", "--run", run, "--data-dir", ignored, "--device", "cpu", "--no-crf", "--json")
    assert undefined.exit_code == 1, undefined.output
    assert undefined.stdout == ""
    assert len(undefined.stderr.strip().splitlines()) == 1 and "No pixel of the val split" in undefined.stderr
    assert (run / "metrics.json").read_bytes() == stored

    unreadable = tmp_path / "unreadable"
    for split in ("train", "val"):
        for image in sorted((scenes / "images" / split).glob("*.png")):
            target = unreadable / "images" / split / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"not an image")
            label = unreadable / "labels" / split / image.name
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_bytes((scenes / "labels" / split / image.name).read_bytes())
    nothing = invoke(
        "eval", "--run", run, "--data-dir", unreadable, "--device", "cpu", "--no-crf", "--no-baselines", "-q"
    )
    assert nothing.exit_code == 1
    assert len(nothing.stderr.strip().splitlines()) == 1 and "nothing was evaluated" in nothing.stderr
    assert (run / "metrics.json").read_bytes() == stored


def test_training_on_images_none_of_which_can_be_read_is_refused(scenes, tmp_path):
    broken = tmp_path / "broken"
    for image in sorted((scenes / "images" / "train").glob("*.png")):
        target = broken / "images" / "train" / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"not an image")
    result = invoke(*train_command(broken, tmp_path / "run", "--num-classes", "6"))
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert re.search(r"No training image could be read \(all \d+ tried of \d+ were unreadable, listed in", message)
    assert "nothing was trained" in message
    assert not (tmp_path / "run" / "clusterbook.safetensors").exists()


def test_quiet_training_still_counts_the_files_it_skipped(scenes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(scenes / "images", data / "images")
    (data / "images" / "train" / "scene_0002.png").write_bytes(b"not an image")
    result = invoke(*train_command(data, tmp_path / "run", "--num-classes", "6"))
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable file(s), listed in" in result.stderr


def test_inputs_that_would_share_an_output_name_get_their_whole_name():
    from cause_cli.inference.inputs import output_names

    relatives = [
        Path("a.jpg"),
        Path("a.tif"),
        Path("b.png"),
        Path("sub/a.jpg"),
        Path("d.jpg"),
        Path("d.tif"),
        Path("d.jpg.png"),
    ]
    assert output_names(relatives) == [
        Path("a.jpg.png"), Path("a.tif.png"), Path("b.png"), Path("sub/a.png"), Path("d.jpg.png"), Path("d.tif.png"),
        Path("d.jpg.png-2.png"),
    ]  # fmt: skip


def test_segment_keeps_both_of_two_inputs_with_one_stem(scenes, tmp_path):
    run = tmp_path / "run"
    assert invoke(*train_command(scenes, run)).exit_code == 0
    source = tmp_path / "photos"
    source.mkdir()
    first, second = sorted((scenes / "images" / "val").glob("*.png"))[:2]
    Image.open(first).save(source / "a.png")
    Image.open(second).convert("RGB").save(source / "a.jpg", quality=95)
    out = tmp_path / "out"
    assert invoke("segment", source, "--run", run, "--out", out, "--quiet").exit_code == 0
    assert sorted(path.name for path in (out / "labels").iterdir()) == ["a.jpg.png", "a.png.png"]
    assert sorted(path.name for path in (out / "overlays").iterdir()) == ["a.jpg.png", "a.png.png"]
    renamed = json.loads((out / "summary.json").read_text())["renamed"]
    assert {entry["input"]: entry["output"] for entry in renamed} == {
        "a.jpg": "labels/a.jpg.png",
        "a.png": "labels/a.png.png",
    }


@pytest.mark.parametrize("clusters", [6, 300])
def test_label_maps_hold_every_cluster_id(tmp_path, clusters):
    from types import SimpleNamespace

    import torch

    from cause_cli.inference.inputs import SourceEntry
    from cause_cli.inference.manifest import OutputFolder
    from cause_cli.inference.segmenter import BatchSegmenter

    model = SimpleNamespace(num_classes=clusters, device=torch.device("cpu"))
    folder = OutputFolder(tmp_path)
    segmenter = BatchSegmenter(model, None, None, folder)  # type: ignore[arg-type]
    values = np.arange(12).reshape(3, 4) * (clusters - 1) // 11  # 0 to clusters - 1
    with folder.owned.batch() as files:
        entry = SourceEntry(Path("x.jpg"), Path("x.jpg"), Path("x.png"))
        segmenter.write(files, entry, Image.new("RGB", (4, 3)), values)
    written = Image.open(tmp_path / "labels" / "x.png")
    np.testing.assert_array_equal(np.asarray(written), values)
    assert written.mode == ("P" if clusters <= 256 else "I;16")
    assert Image.open(tmp_path / "overlays" / "x.png").size == (4, 3)


def test_a_second_process_on_a_run_being_written_is_refused(scenes, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "cause_cli", *(str(a) for a in train_command(scenes, run))]
    # A training that cannot end while the test runs, however fast the machine: it is killed.
    command[command.index("--epochs-front-door") + 1] = "100000"
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / "train.log").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, "the first training ended before the second could meet it"
        # Refused at once; without the lock the second would train on (and time out).
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        evaluation = subprocess.run([sys.executable, "-m", "cause_cli", "eval", "--run", str(run), "--no-crf"],
                                    capture_output=True, text=True, timeout=120)  # fmt: skip
        assert first.poll() is None, "the first training ended while the others ran"
        first.send_signal(signal.SIGKILL)  # killed while it holds the lock...
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    for refused in (second, evaluation):
        assert refused.returncode == 1
        message = refused.stderr.strip().splitlines()[-1]
        assert re.search(r"is being written by cause train \(process \d+ on .+\); wait for it to end", message)
    # ...and the lock went with it: the folder can be trained over at once.
    over = invoke(*train_command(scenes, run, "--overwrite"))
    assert over.exit_code == 0, over.output
    assert (run / "probe.safetensors").exists()


def test_ctrl_c_says_and_logs_the_command_that_continues_the_training(scenes, tmp_path):
    run = tmp_path / "run with space"
    command = [sys.executable, "-m", "cause_cli", *(str(a) for a in train_command(scenes, run))]
    command[command.index("--epochs-front-door") + 1] = "100000"  # still training when interrupted
    training = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and training.poll() is None:
            log = run / "train.log"
            if log.exists() and "front door" in log.read_text():
                break
            time.sleep(0.05)
        assert training.poll() is None, "the training ended before it could be interrupted"
        training.send_signal(signal.SIGINT)
        _, errors = training.communicate(timeout=120)
    finally:
        if training.poll() is None:
            training.kill()
    assert training.returncode == 130, errors
    resume = f"cause train --run '{run}' --resume"
    assert errors.strip().splitlines()[-1] == (
        f"interrupted; files already written are complete; continue with: {resume}"
    ), errors
    assert f"interrupted; continue with: {resume}" in (run / "train.log").read_text()


@pytest.mark.parametrize(
    ("value", "dtype", "expected"),
    [
        (200, np.uint8, r"Label value 200 in .*scene_0001\.png would make 201 classes, but only 7 different"),
        (40000, np.uint16, r"Label value 40000 in .*scene_0001\.png is not a class id \(ids go from 0 to 254"),
    ],
    ids=["stray-pixel", "16-bit"],
)
def test_label_values_that_are_not_class_ids_are_refused(scenes, tmp_path, value, dtype, expected):
    data = tmp_path / "data"
    shutil.copytree(scenes / "images", data / "images")
    shutil.copytree(scenes / "labels", data / "labels")
    label_path = data / "labels" / "train" / "scene_0001.png"
    label = np.asarray(Image.open(label_path)).astype(dtype)
    label[0, 0] = value
    Image.fromarray(label).save(label_path)
    result = invoke(*train_command(data, tmp_path / "run"))
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert re.search(expected, result.stderr), result.stderr
    assert "--num-classes" in result.stderr


def test_a_corrupt_label_is_skipped_when_counting_classes(scenes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(scenes / "images", data / "images")
    shutil.copytree(scenes / "labels", data / "labels")
    (data / "labels" / "train" / "scene_0001.png").write_bytes(b"not a label")
    result = invoke(*train_command(data, tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["num_classes"] == 6


def test_labelled_pixels_above_the_declared_classes_are_counted_not_dropped_in_silence(scenes, tmp_path):
    # classes.txt names 6 classes; one training label and one validation label say 7 throughout.
    data = tmp_path / "data"
    shutil.copytree(scenes, data)
    for split in ("train", "val"):
        label_path = data / "labels" / split / "scene_0001.png"
        Image.fromarray(np.full_like(np.asarray(Image.open(label_path)), 7)).save(label_path)
    run = tmp_path / "run"
    trained = invoke(*train_command(data, run))
    assert trained.exit_code == 0, trained.output
    assert "ignored 4,096 labelled pixel(s) with class ids at or above 6" in trained.stderr  # 64 x 64, --quiet
    log = (run / "train.log").read_text()
    assert "4,096 labelled pixel(s) in 1 image(s) hold class id(s) 7, at or above the 6 classes" in log
    assert "train/scene_0001.png" in log and "--num-classes 8" in log

    evaluated = invoke("eval", "--run", run, "--device", "cpu", "--no-crf", "--no-baselines", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    expected = {"pixels": 64 * 64, "images": 1, "class_ids": [7]}
    assert strict_json(evaluated.stdout)["ignored_above_classes"] == expected
    assert json.loads((run / "metrics.json").read_text())["ignored_above_classes"] == expected
    assert "ignored 4,096 labelled pixel(s) with class ids at or above 6" in evaluated.stderr
    table = invoke("eval", "--run", run, "--device", "cpu", "--no-crf", "--no-baselines")
    assert "4,096 labelled pixels with class ids at or above 6 were ignored" in " ".join(table.stdout.split())


def test_temporary_files_left_by_a_killed_write_are_removed_on_the_next_start(scenes, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    leftovers = [run / ".resume.pt.abc123.tmp", run / ".head.safetensors.x9.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a file")
    assert invoke(*train_command(scenes, run)).exit_code == 0
    assert not any(leftover.exists() for leftover in leftovers)
    assert "removed 2 temporary file(s)" in (run / "train.log").read_text()


def test_outputs_get_the_permissions_of_any_new_file(scenes, tmp_path):
    import os

    previous = os.umask(0o022)
    os.umask(previous)
    run = tmp_path / "run"
    assert invoke(*train_command(scenes, run)).exit_code == 0
    for name in ("run.json", "probe.safetensors", "head.safetensors"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~previous, name


def test_an_output_folder_inside_the_source_is_not_read_as_input(scenes, tmp_path):
    run = tmp_path / "run"
    assert invoke(*train_command(scenes, run)).exit_code == 0
    source = tmp_path / "photos"
    shutil.copytree(scenes / "images" / "val", source)
    for _ in range(2):  # the rerun finds the first run's outputs inside SOURCE
        result = invoke("segment", source, "--run", run, "--out", source / "segments", "--quiet")
        assert result.exit_code == 0, result.output
    summary = json.loads((source / "segments" / "summary.json").read_text())
    assert summary["inputs"] == 2 and not summary["skipped"]
    assert sorted(path.name for path in (source / "segments" / "labels").rglob("*.png")) == [
        "scene_0000.png",
        "scene_0001.png",
    ]


def refuse_to_read(monkeypatch, refused: Path) -> None:
    """Make one folder unreadable the way a permission would (chmod 000 means nothing to root)."""
    real_scandir = os.scandir

    def scandir(path=".", *args, **kwargs):
        if Path(path) == refused:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)


def test_dangling_links_and_unreadable_folders_are_listed_not_passed_over(scenes, tmp_path, monkeypatch):
    listing = list_files(scenes / "images")
    assert listing.files and not listing.unreachable

    data = tmp_path / "data"
    shutil.copytree(scenes, data)
    ghost = data / "images" / "train" / "ghost.png"
    ghost.symlink_to(tmp_path / "gone.png")
    locked = data / "images" / "train" / "locked"
    locked.mkdir()
    refuse_to_read(monkeypatch, locked)
    listing = list_files(data / "images")
    assert listing.unreachable == [
        (ghost, f"a symbolic link to {tmp_path / 'gone.png'}, which does not exist"),
        (locked, "the folder could not be read (Permission denied)"),
    ]
    assert ghost not in listing.files

    run = tmp_path / "run"
    trained = invoke(*train_command(data, run))
    assert trained.exit_code == 0, trained.output
    assert "skipped 2 folder(s) or link(s) that could not be read" in trained.stderr
    log = (run / "train.log").read_text()
    assert f"skipped {ghost}: a symbolic link to" in log and f"skipped {locked}: the folder could not be read" in log

    out = tmp_path / "segments"
    segmented = invoke("segment", data / "images" / "train", "--run", run, "--out", out, "--quiet")
    assert segmented.exit_code == 0, segmented.output
    skipped = json.loads((out / "summary.json").read_text())["skipped"]
    assert [entry["input"] for entry in skipped] == ["ghost.png", "locked"]


def test_library_warnings_reach_the_user_as_one_line_notes_once(scenes, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert invoke(*train_command(scenes, run)).exit_code == 0
    source = tmp_path / "photos"
    source.mkdir()
    for index in range(3):  # three images of one size: PIL warns three times, the user reads it once
        Image.fromarray(np.full((40, 50, 3), 60 * index, np.uint8)).save(source / f"photo{index}.png")
    # PIL warns of a possible decompression bomb between its limit and twice its limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    result = invoke("segment", source, "--run", run, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note (PIL): ")]
    assert notes == [
        "note (PIL): Image size (2000 pixels) exceeds limit of 1500 pixels, could be decompression bomb DOS attack."
    ]
    assert "Warning" not in result.stderr and ".py:" not in result.stderr


def test_sizes_below_a_gibibyte_are_given_in_mebibytes():
    from cause_cli.paths import readable_size

    assert readable_size(3 * 2**20) == "3.0 MiB" and readable_size(5 * 2**30) == "5.0 GiB"
