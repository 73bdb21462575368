"""`cause segment` is a batch job that can be killed at any moment and rerun: every input is
written exactly once, the outputs equal an uninterrupted run's, and two models' outputs never
mix in one folder."""

from __future__ import annotations

import collections
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cause_cli.inference.manifest import MANIFEST_FILE, OutputFolder

from .helpers import invoke, train_small_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    scenes, run = train_small_run(tmp_path_factory.mktemp("segment-resume"), num_val=200, seed=5, size_range=(48, 64))
    return scenes / "images" / "val", run


def files_below(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*.png"))}


def segment_command(source: Path, run: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cause_cli", "segment", str(source), "--run", str(run), "--out", str(out),
            "--batch-size", "1", "--device", "cpu", "-q"]  # fmt: skip


def test_a_killed_segmentation_rerun_equals_an_uninterrupted_one(trained, tmp_path):
    source, run = trained
    whole = tmp_path / "whole"
    subprocess.run(segment_command(source, run, whole), check=True, capture_output=True, timeout=600)

    out = tmp_path / "killed"
    process = subprocess.Popen(segment_command(source, run, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        manifest = out / MANIFEST_FILE
        while time.monotonic() < deadline and process.poll() is None:
            if manifest.exists() and manifest.read_bytes().count(b"\n") >= 20:
                break
            time.sleep(0.01)
        assert process.poll() is None, "the segmentation ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    finished_before = len(list(OutputFolder(out).finished()))
    assert 20 <= finished_before < 200

    rerun = subprocess.run(segment_command(source, run, out), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert files_below(out / "labels") == files_below(whole / "labels")
    assert files_below(out / "overlays") == files_below(whole / "overlays")
    assert len(files_below(out / "labels")) == 200

    inputs = [entry["input"] for entry in OutputFolder(out).finished()]
    assert len(inputs) == 200 and max(collections.Counter(inputs).values()) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done_before"] >= finished_before and summary["inputs"] == 200
    assert summary["written"] == 200 and summary["written_now"] == 200 - summary["done_before"]


def test_outputs_of_another_run_or_settings_are_not_mixed_in(trained, tmp_path):
    source, run = trained
    out = tmp_path / "out"
    assert invoke("segment", source / "scene_0000.png", "--run", run, "--out", out, "-q").exit_code == 0
    again = invoke("segment", source / "scene_0000.png", "--run", run, "--out", out, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["written_now"] == 0  # already done

    other = tmp_path / "other-run"
    shutil.copytree(run, other)
    (other / "probe.safetensors").write_bytes((other / "probe.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    refused = invoke("segment", source / "scene_0000.png", "--run", other, "--out", out)
    assert refused.exit_code == 1
    message = refused.stderr.strip()
    assert len(message.splitlines()) == 1 and "holds the outputs of another segmentation" in message
    assert "the run's weights or cluster-to-class matching differ" in message and "--overwrite" in message

    replaced = invoke("segment", source / "scene_0000.png", "--run", other, "--out", out, "--overwrite", "--json")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(replaced.stdout)["written_now"] == 1


def test_a_line_cut_short_by_a_kill_is_dropped_and_the_next_line_starts_clean(tmp_path):
    folder = OutputFolder(tmp_path)
    folder.record([{"input": "a.png", "label": "labels/a.png", "overlay": "overlays/a.png"}])
    folder.close()
    with (tmp_path / MANIFEST_FILE).open("a") as manifest:
        manifest.write('{"input": "b.png", "lab')  # killed mid-line
    assert [entry["input"] for entry in folder.finished()] == ["a.png"]
    folder.record([{"input": "b.png", "label": "labels/b.png", "overlay": "overlays/b.png"}])
    folder.close()
    assert [entry["input"] for entry in folder.finished()] == ["a.png", "b.png"]


def test_save_chooses_the_outputs_and_scores_hold_the_best_clusters_probability_and_lead(trained, tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from cause_cli.data.transforms import normalise, resize_and_crop
    from cause_cli.inference.predict import cluster_scores, head_feature_map, load_trained
    from cause_cli.inference.segment import labels_of
    from cause_cli.runs import open_run

    source, run = trained
    image_path = source / "scene_0003.png"
    out = tmp_path / "out"
    result = invoke("segment", image_path, "--run", run, "--out", out, "--save", "labels,scores", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["written"] == 1
    (entry,) = OutputFolder(out).finished()
    assert set(entry) == {"input", "label", "scores"} and not (out / "overlays").exists()
    with np.load(out / "scores" / "scene_0003.npz") as saved:
        confidence, margin = saved["confidence"], saved["margin"]
    image = Image.open(image_path).convert("RGB")
    assert confidence.dtype == np.float16 and confidence.shape == margin.shape == (image.height, image.width)

    model = load_trained(open_run(run), torch.device("cpu"))
    batch = torch.stack([normalise(resize_and_crop(image, model.resolution, square_resize=True))])
    scores = cluster_scores(model, head_feature_map(model, batch), (image.height, image.width))[0]
    # softmax(3 cos), or with a spread the posterior: what the dense CRF would start from
    sharpness = 3.0 if model.cluster_probe.precision is None else 1.0
    top = torch.softmax(sharpness * scores, dim=0).topk(2, dim=0).values.numpy()
    np.testing.assert_allclose(confidence, top[0], atol=2e-3)
    np.testing.assert_allclose(margin, top[0] - top[1], atol=2e-3)
    # The label map is the scores' best cluster, as the run names it (classes once evaluated).
    mapping, _ = labels_of(open_run(run), model.num_classes)
    best = scores.argmax(dim=0).numpy()
    expected = best if mapping is None else mapping[best]
    assert (np.asarray(Image.open(out / entry["label"])) == expected).mean() > 0.999

    refused = invoke("segment", image_path, "--run", run, "--out", tmp_path / "o2", "--save", "labels,masks")
    assert refused.exit_code == 1
    assert refused.stderr.strip() == (
        "error: --save takes a comma-separated list of labels, overlays, scores, not 'labels,masks'."
    )


def test_loader_workers_decode_in_other_processes_and_change_nothing(trained, tmp_path):
    source, run = trained
    outputs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"workers{workers}"
        result = invoke("segment", source, "--run", run, "--out", out, "--loader-workers", workers, "--batch-size", "7",
                        "-q")  # fmt: skip
        assert result.exit_code == 0, result.output
        outputs[workers] = (files_below(out / "labels"), [entry["input"] for entry in OutputFolder(out).finished()])
    assert outputs["0"] == outputs["2"]  # the same files, finished in the same order
    assert len(outputs["0"][1]) == 200


def test_a_rerun_in_the_same_order_keeps_nothing_but_counts(trained, tmp_path):
    from cause_cli.inference.inputs import iter_inputs, pending_inputs

    source, _ = trained
    names = [entry.relative.as_posix() for entry in iter_inputs(source)]
    pending, total, left = pending_inputs(source, None, iter(names[:60]))
    assert (total, left, pending.skip_first, pending.done) == (200, 140, 60, frozenset())
    assert [entry.relative.as_posix() for entry in pending] == names[60:]
    # Finished in another order (another tool, another sort): the rest is remembered by name.
    shuffled = names[:50] + names[55:60] + names[50:55]
    pending, total, left = pending_inputs(source, None, iter(shuffled))
    assert (left, pending.skip_first) == (140, 50) and len(pending.done) == 10
    assert [entry.relative.as_posix() for entry in pending] == names[60:]


def test_two_gloo_processes_write_what_one_process_writes_each_input_once(trained, tmp_path):
    source, run = trained
    one, two = tmp_path / "one", tmp_path / "two"
    single = invoke("segment", source, "--run", run, "--out", one, "--device", "cpu", "-q")
    assert single.exit_code == 0, single.output
    shared = subprocess.run(
        [sys.executable, "-m", "cause_cli", "segment", str(source), "--run", str(run), "--out", str(two), "--gpus", "2",
         "--device", "cpu", "--batch-size", "3", "-q"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert shared.returncode == 0, shared.stderr
    assert files_below(two / "labels") == files_below(one / "labels")
    assert files_below(two / "overlays") == files_below(one / "overlays")
    folder = OutputFolder(two)
    parts = folder.parts()
    assert [part.name for part in parts] == ["manifest.0-of-2.jsonl", "manifest.1-of-2.jsonl"]
    handled = [[entry["input"] for entry in folder.finished(part)] for part in parts]
    assert len(handled[0]) == len(handled[1]) == 100  # each process did its half...
    everything = handled[0] + handled[1]
    assert len(set(everything)) == len(everything) == 200  # ...and no input was done twice
    summary = json.loads((two / "summary.json").read_text())
    assert summary["written"] == summary["written_now"] == 200 and summary["inputs"] == 200

    # A rerun shared another way would mix two layouts of manifests: refused.
    other = invoke("segment", source, "--run", run, "--out", two, "--device", "cpu")
    assert other.exit_code == 1 and "give --gpus 2" in other.stderr
