"""The Python API: docs/python.md's examples run in order and give the labels `cause segment`
writes; bad input is one sentence."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cause_cli import load_run
from cause_cli.errors import CauseError

from .helpers import invoke, train_small_run

PAGE = Path(__file__).resolve().parents[1] / "docs" / "python.md"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder laid out as the page assumes: runs/photos (trained, evaluated) and photos/."""
    root = tmp_path_factory.mktemp("python-api")
    scenes, trained = train_small_run(root, num_val=3, seed=4, size_range=(64, 80))
    run = root / "runs" / "photos"
    run.parent.mkdir()
    trained.rename(run)
    assert invoke("eval", "--run", run, "--device", "cpu", "--no-crf", "--no-baselines", "-q").exit_code == 0
    photos = root / "photos"
    photos.mkdir()
    for name, scene in (("beach", "scene_0000"), ("forest", "scene_0001")):
        shutil.copy(scenes / "images" / "val" / f"{scene}.png", photos / f"{name}.png")
    segmented = invoke("segment", photos, "--run", run, "--out", root / "segments", "--device", "cpu", "-q")
    assert segmented.exit_code == 0, segmented.output
    return root


def test_the_pages_examples_run_and_give_cause_segments_labels(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)  # the page's own code, as a reader runs it
    written = np.asarray(Image.open(workspace / "segments" / "labels" / "beach.png"))
    np.testing.assert_array_equal(namespace["result"].labels, written)
    assert namespace["model"].labels_are == "classes"
    for path, segmentation in zip(namespace["paths"], namespace["results"], strict=True):
        expected = np.asarray(Image.open(workspace / "segments" / "labels" / Path(path).name))
        np.testing.assert_array_equal(segmentation.labels, expected)
    assert (
        Image.open(workspace / "beach-labels.png").tobytes()
        == Image.open(workspace / "segments" / "labels" / "beach.png").tobytes()
    )
    assert Image.open(workspace / "beach-overlay.png").size == Image.open(workspace / "photos" / "beach.png").size


def test_a_batch_array_gives_a_list_and_bad_input_is_one_sentence(workspace):
    model = load_run(workspace / "runs" / "photos", device="cpu")
    picture = np.asarray(Image.open(workspace / "photos" / "beach.png").convert("RGB"))
    batch = model.segment(np.stack([picture, picture[:, ::-1]]))
    assert isinstance(batch, list) and len(batch) == 2
    np.testing.assert_array_equal(batch[0].labels, model.segment(picture).labels)
    with pytest.raises(CauseError, match=r"An image array must be uint8 \[H, W, 3\] \(or grey \[H, W\]\), not float64"):
        model.segment(picture.astype(np.float64))
    with pytest.raises(CauseError, match="Cannot segment a dict"):
        model.segment({})  # type: ignore[arg-type]
