"""Nothing a user owns is ever lost (issue: nothing lost, no run file that crashes the machine).

One table of ordinary mistakes: each case sets up a folder as a user would have it, runs one
command, and checks the exit code, the one sentence on stderr, and every file's bytes under the
case's folder before and after (a refused command leaves every file as it was, and makes none).
Then the cases where a command goes ahead: it replaces or removes only what it recorded as its
own, and names what it leaves.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cause_cli.data.synthetic import write_scenes
from cause_cli.inference.manifest import OutputFolder
from cause_cli.owned import LEDGER_FILE, OwnedFolder

from .helpers import invoke, one_sentence


def tree(root: Path) -> dict[str, str]:
    """Every entry below ``root`` with its bytes' hash (links by their target, folders as such)."""
    entries = {}
    for folder, subfolders, files in os.walk(root):
        for name in subfolders + files:
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                entries[relative] = f"link to {os.readlink(path)}"
            elif path.is_dir():
                entries[relative] = "folder"
            else:
                entries[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dataset in the documented layout and a run trained on it (seconds, at 64 px)."""
    root = tmp_path_factory.mktemp("trained")
    scenes = write_scenes(root / "data", num_train=8, num_val=3, seed=5, size_range=(64, 72))
    run = root / "run"
    result = invoke(*train_args(scenes, run))
    assert result.exit_code == 0, result.output
    evaluated = invoke("eval", "--run", run, "--no-crf", "--no-baselines", "--device", "cpu", "-q")
    assert evaluated.exit_code == 0, evaluated.output
    segmented = invoke("segment", scenes / "images" / "val", "--run", run, "--out", root / "out", "-q")
    assert segmented.exit_code == 0, segmented.output
    return scenes, run, root / "out"


def train_args(data: Path, run: Path, *extra: object) -> list[object]:
    return ["train", "--data-dir", data, "--run", run, "--resolution", "64", "--clusterbook-size", "16",
            "--batch-size", "4", "--epochs-front-door", "1", "--min-updates", "0", "--device", "cpu",
            "-q", *extra]  # fmt: skip


@dataclass(frozen=True)
class Case:
    """``setup(home)`` lays out the user's files under ``home`` (copies of the dataset as
    ``data``, the run as ``run``, earlier outputs as ``out``) and returns the command."""

    name: str
    setup: Callable[[Path], list[object]]
    sentence: str


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def segment_into_the_datasets_root(home: Path) -> list[object]:
    return ["segment", home / "data" / "images", "--run", home / "run", "--out", home / "data"]


def segment_overwrite_over_a_hand_corrected_map(home: Path) -> list[object]:
    corrected = next((home / "out" / "labels").glob("*.png"))
    _write(corrected, corrected.read_bytes() + b"hand-corrected")
    return ["segment", home / "data" / "images" / "val", "--run", home / "run", "--out", home / "out", "--overwrite"]


def segment_over_files_it_never_wrote(home: Path) -> list[object]:
    out = home / "mine"
    for image in sorted((home / "data" / "images" / "val").glob("*.png"))[:1]:
        _write(out / "overlays" / image.name, b"my own picture")
    return ["segment", home / "data" / "images" / "val", "--run", home / "run", "--out", out]


def segment_overwrite_into_a_folder_it_never_wrote(home: Path) -> list[object]:
    out = home / "mine"
    _write(out / "summary.json", b'{"mine": true}')
    return ["segment", home / "data" / "images" / "val", "--run", home / "run", "--out", out, "--overwrite"]


def segment_into_the_inputs_folder(home: Path) -> list[object]:
    photos = home / "data" / "images" / "val"
    return ["segment", photos, "--run", home / "run", "--out", photos]


def segment_the_outputs_labels(home: Path) -> list[object]:
    return ["segment", home / "out" / "labels", "--run", home / "run", "--out", home / "out"]


def segment_into_a_symlinked_labels_folder(home: Path) -> list[object]:
    out = home / "linked"
    (home / "elsewhere").mkdir()
    out.mkdir()
    (out / "labels").symlink_to(home / "elsewhere")
    return ["segment", home / "data" / "images" / "val", "--run", home / "run", "--out", out]


def segment_into_a_symlinked_out(home: Path) -> list[object]:
    (home / "elsewhere").mkdir()
    (home / "linked").symlink_to(home / "elsewhere")
    return ["segment", home / "data" / "images" / "val", "--run", home / "run", "--out", home / "linked"]


def segment_where_an_output_folder_is_a_file(home: Path) -> list[object]:
    _write(home / "mine" / "overlays", b"my file called overlays")
    return ["segment", home / "data" / "images" / "val", "--run", home / "run", "--out", home / "mine"]


def segment_out_below_a_file(home: Path) -> list[object]:
    _write(home / "notes.txt", b"notes")
    return ["segment", home / "data" / "images" / "val", "--run", home / "run", "--out", home / "notes.txt" / "out"]


def train_overwrite_with_a_bad_option(home: Path) -> list[object]:
    return train_args(home / "data", home / "run", "--num-classes", "0", "--overwrite")


def train_overwrite_in_a_folder_that_never_was_a_run(home: Path) -> list[object]:
    folder = home / "mine"
    for name in ("run.json", "metrics.json", "samples.png", "confusion.png"):
        _write(folder / name, f"my {name}".encode())
    return train_args(home / "data", folder, "--overwrite")


def train_overwrite_over_a_changed_run_file(home: Path) -> list[object]:
    (home / "run" / "samples.png").write_bytes(b"my own samples")
    return train_args(home / "data", home / "run", "--overwrite")


def train_into_a_file(home: Path) -> list[object]:
    _write(home / "notes.txt", b"notes")
    return train_args(home / "data", home / "notes.txt")


def train_far_more_clusters_than_tokens(home: Path) -> list[object]:
    return train_args(home / "data", home / "new-run", "--num-classes", "100000")


def eval_over_a_changed_metrics_file(home: Path) -> list[object]:
    (home / "run" / "metrics.json").write_text('{"mine": true}')
    return ["eval", "--run", home / "run", "--no-crf", "--no-baselines", "--device", "cpu"]


def export_onto_the_runs_description(home: Path) -> list[object]:
    return ["export", home / "run", "--out", home / "run" / "run.json"]


def export_onto_the_runs_weights(home: Path) -> list[object]:
    return ["export", home / "run", "--out", home / "run" / "head.safetensors"]


def export_onto_a_users_file(home: Path) -> list[object]:
    _write(home / "model.onnx", b"my own graph")
    return ["export", home / "run", "--out", home / "model.onnx"]


def push_a_linked_picture(home: Path) -> list[object]:
    _write(home / "secret.png", b"\x89PNG\r\n\x1a\nsecret")
    (home / "run" / "samples.png").unlink(missing_ok=True)
    (home / "run" / "samples.png").symlink_to(home / "secret.png")
    return ["push", home / "run", "someone/run"]


def push_without_a_weight_file(home: Path) -> list[object]:
    (home / "run" / "probe.safetensors").unlink()
    return ["push", home / "run", "someone/run"]


def train_with_classes_that_are_not_utf8(home: Path) -> list[object]:
    (home / "data" / "classes.txt").write_bytes(b"\xff\xfe sky \x80")
    return train_args(home / "data", home / "new-run")


def push_with_damaged_metrics(home: Path) -> list[object]:
    (home / "run" / "metrics.json").write_text('{"miou": ')
    return ["push", home / "run", "someone/run"]


def push_to_a_bad_repo_id(home: Path) -> list[object]:
    return ["push", home / "run", "not a repo"]


CASES = [
    Case("segment into the dataset's root", segment_into_the_datasets_root, "was not written by cause"),
    Case("segment --overwrite over a hand-corrected map", segment_overwrite_over_a_hand_corrected_map,
         "was changed since cause wrote it"),
    Case("segment over files it never wrote", segment_over_files_it_never_wrote, "was not written by cause"),
    Case("segment --overwrite into a folder it never wrote", segment_overwrite_into_a_folder_it_never_wrote,
         "summary.json was not written by cause"),
    Case("segment into the inputs' folder", segment_into_the_inputs_folder, "is the folder of the inputs"),
    Case("segment its own outputs into their folder", segment_the_outputs_labels, "where cause segment writes"),
    Case("segment into a symlinked labels folder", segment_into_a_symlinked_labels_folder, "is a symbolic link"),
    Case("segment into a symlinked --out", segment_into_a_symlinked_out, "is a symbolic link"),
    Case("segment where an output folder is a file", segment_where_an_output_folder_is_a_file,
         "is a file where cause writes a folder"),
    Case("segment --out below a file", segment_out_below_a_file, "which is a file"),
    Case("train --overwrite with a bad option", train_overwrite_with_a_bad_option, "--num-classes must be at least 2"),
    Case("train --overwrite in a folder that never was a run", train_overwrite_in_a_folder_that_never_was_a_run,
         "run.json was not written by cause"),
    Case("train --overwrite over a changed run file", train_overwrite_over_a_changed_run_file,
         "samples.png was changed since cause wrote it"),
    Case("train into a file", train_into_a_file, "is a file, not a folder"),
    Case("train far more clusters than tokens", train_far_more_clusters_than_tokens, "patch tokens"),
    Case("train with a classes.txt that is not UTF-8", train_with_classes_that_are_not_utf8, "is not UTF-8 text"),
    Case("eval over a changed metrics.json", eval_over_a_changed_metrics_file, "metrics.json was changed since"),
    Case("export onto the run's run.json", export_onto_the_runs_description, "is not a graph cause exported"),
    Case("export onto the run's weights", export_onto_the_runs_weights, "is not a graph cause exported"),
    Case("export onto a user's file", export_onto_a_users_file, "is not a graph cause exported"),
    Case("push a linked picture", push_a_linked_picture, "is a symbolic link"),
    Case("push without a weight file", push_without_a_weight_file, "probe.safetensors is missing"),
    Case("push with a damaged metrics.json", push_with_damaged_metrics, "metrics.json is damaged"),
    Case("push to a bad repo id", push_to_a_bad_repo_id, "is not a Hub repository id"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_refused_command_leaves_every_file_as_it_was(trained, tmp_path, case):
    scenes, run, out = trained
    home = tmp_path / "home"
    shutil.copytree(scenes, home / "data")
    shutil.copytree(run, home / "run", symlinks=True)
    shutil.copytree(out, home / "out")
    command = case.setup(home)
    before = tree(home)
    one_sentence(invoke(*command), case.sentence)
    assert tree(home) == before


def test_segment_overwrite_removes_only_what_it_wrote_and_names_what_it_leaves(trained, tmp_path):
    scenes, run, earlier = trained
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    mine = {
        "labels/notes.txt": b"my notes",
        "labels/corrected/scene.png": b"a map I corrected by hand",
        "overlays/keep.png": b"mine",
    }
    for name, data in mine.items():
        _write(out / name, data)
    ledger = OwnedFolder(out).records()
    # An output of an input that is no longer among the inputs, changed by hand since.
    gone_input = sorted(name for name in ledger if name.startswith("labels/"))[0]
    (out / gone_input).write_bytes(b"corrected, and its image is gone")
    inputs = tmp_path / "inputs"
    shutil.copytree(scenes / "images" / "val", inputs)
    (inputs / Path(gone_input).name).unlink()
    result = invoke("segment", inputs, "--run", run, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    for name, data in mine.items():
        assert (out / name).read_bytes() == data
    assert (out / gone_input).read_bytes() == b"corrected, and its image is gone"
    assert f"left in place: {out / gone_input} was changed since cause wrote it" in result.stderr.replace("\n", "")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == summary["inputs"] == len(list(inputs.iterdir()))


def test_push_to_an_unreachable_hub_is_one_sentence(trained, monkeypatch):
    _, run, _ = trained
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    one_sentence(invoke("push", run, "someone/run"), "could not be reached")


def test_segment_rerun_refuses_a_busy_folder(trained, tmp_path):
    scenes, run, _ = trained
    out = tmp_path / "out"
    with OutputFolder(out).locked():
        result = invoke("segment", scenes / "images" / "val", "--run", run, "--out", out)
    one_sentence(result, "is being written by another cause segment")
    assert not any(out.iterdir())


def test_train_overwrite_removes_the_runs_files_and_keeps_the_users(trained, tmp_path):
    scenes, run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    _write(copy / "my-notes.txt", b"notes")
    before = {name: (copy / name).read_bytes() for name in ("head.safetensors", "run.json")}
    result = invoke(*train_args(scenes, copy, "--overwrite", "--seed", "3"))
    assert result.exit_code == 0, result.output
    assert (copy / "my-notes.txt").read_bytes() == b"notes"
    assert json.loads((copy / "run.json").read_text())["config"]["seed"] == 3
    assert (copy / "head.safetensors").read_bytes() != before["head.safetensors"]
    assert not (copy / "metrics.json").exists()  # the earlier evaluation's, removed with its training
    assert (copy / LEDGER_FILE).is_file()


def test_export_describes_the_graph_beside_it_under_a_name_that_cannot_collide(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    _, run, _ = trained
    graph = tmp_path / "model.json"
    result = invoke("export", run, "--out", graph)
    assert result.exit_code == 0, result.output
    description = json.loads((tmp_path / "model.json.json").read_text())
    assert description["sha256"] == hashlib.sha256(graph.read_bytes()).hexdigest()
    again = invoke("export", run, "--out", graph)  # its own earlier graph: replaced
    assert again.exit_code == 0, again.output


def test_outputs_become_inputs_never(trained, tmp_path):
    """OUT inside the source: the earlier outputs are not inputs of the rerun."""
    scenes, run, _ = trained
    photos = tmp_path / "photos"
    shutil.copytree(scenes / "images" / "val", photos)
    for _ in range(2):
        result = invoke("segment", photos, "--run", run, "--out", photos / "segments", "--json")
        assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["inputs"] == len(list(photos.glob("*.png")))
    assert not (photos / "segments" / "labels" / "segments").exists()


def test_a_kill_between_record_and_rename_leaves_a_file_cause_may_replace(tmp_path):
    folder = OwnedFolder(tmp_path)
    folder.write("a.txt", lambda target: target.write_text("first"))
    assert folder.why_not_ours("a.txt") is None
    # The second version is recorded, then the process dies before the rename.
    folder._append([("a.txt", hashlib.sha256(b"second").hexdigest())])
    fresh = OwnedFolder(tmp_path)
    assert fresh.why_not_ours("a.txt") is None  # the first version's bytes are still its own
    (tmp_path / "a.txt").write_text("edited")
    assert "was changed since cause wrote it" in (fresh.why_not_ours("a.txt") or "")
    (tmp_path / "b.txt").write_text("mine")
    assert "was not written by cause" in (fresh.why_not_ours("b.txt") or "")
    assert fresh.remove() == [f"{tmp_path / 'a.txt'} was changed since cause wrote it"]
    assert (tmp_path / "a.txt").read_text() == "edited" and (tmp_path / "b.txt").read_text() == "mine"


def test_a_label_map_image_is_what_it_was(trained):
    """The table's segment cases copy real outputs: make sure they are label maps."""
    _, _, out = trained
    maps = list((out / "labels").glob("*.png"))
    assert maps and all(np.asarray(Image.open(path)).ndim == 2 for path in maps)


def test_eval_names_what_it_skipped_even_when_quiet(trained, tmp_path):
    scenes, run, _ = trained
    data = tmp_path / "data"
    shutil.copytree(scenes, data)
    broken = sorted((data / "images" / "val").glob("*.png"))[0]
    broken.write_bytes(b"not an image")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for quiet in ("-q", "--json"):
        result = invoke("eval", "--run", copy, "--data-dir", data, "--no-crf", "--no-baselines", "--device", "cpu",
                        quiet)  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"skipped {broken}" in result.stderr.replace("\n", ""), result.stderr
