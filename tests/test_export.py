"""cause export: one ONNX graph from normalised images to cluster scores and labels, whose
labels ONNX Runtime computes as the toolkit does, on the shared real photos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cause_cli.data.transforms import normalise, resize_and_crop
from cause_cli.inference.predict import cluster_labels, image_features, load_trained
from cause_cli.runs import open_run

from .helpers import invoke, shared_path, train_small_run

onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    _, run = train_small_run(tmp_path_factory.mktemp("export"), num_val=2, seed=6)
    assert invoke("eval", "--run", run, "--device", "cpu", "--no-crf", "--no-baselines", "-q").exit_code == 0
    return run


def test_onnx_runtime_labels_the_shared_photos_as_the_toolkit_does(evaluated_run, tmp_path):
    target = tmp_path / "model.onnx"
    result = invoke("export", evaluated_run, "--out", target, "--json")
    assert result.exit_code == 0, result.output
    description = json.loads(result.stdout)
    assert description == json.loads(target.with_name(target.name + ".json").read_text())
    assert description["labels_are"] == "classes" and description["check"]["pixels_agreeing"] >= 0.999

    model = load_trained(open_run(evaluated_run), torch.device("cpu"))
    if model.cluster_probe.precision is None:
        assert description["scores_are"] == "cosines" and description["crf_starts_from"] == "softmax(3 * scores)"
    else:  # the fits disagreed on these photos: the graph gives the spread's log-densities
        assert description["scores_are"] == "log-densities" and description["crf_starts_from"] == "softmax(1 * scores)"
    mapping = np.array(json.loads((evaluated_run / "metrics.json").read_text())["cluster_to_class"])
    root = shared_path("data", "real")
    photos = sorted((root / "voc2012" / "images").glob("*.png")) + sorted(root.glob("cityscapes/leftImg8bit/**/*.png"))
    assert len(photos) == 11
    squares = [
        resize_and_crop(Image.open(path).convert("RGB"), model.resolution, square_resize=True) for path in photos
    ]
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    batch = torch.stack([normalise(square) for square in squares]).numpy()  # one batch of 11: the batch is dynamic
    exported = session.run(["labels"], {"images": batch})[0]
    with torch.no_grad():
        toolkit = np.stack(
            [mapping[cluster_labels(model, *given)[0].numpy()] for given in image_features(model, squares)]
        )
    assert exported.shape == toolkit.shape == (11, model.resolution, model.resolution)
    assert (exported == toolkit).mean() >= 0.999


def test_an_unknown_format_is_one_sentence(evaluated_run):
    result = invoke("export", evaluated_run, "--format", "tflite")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: Unknown export format 'tflite'; this version writes onnx."


def test_a_graph_that_disagrees_on_one_percent_of_pixels_is_refused_and_nothing_is_left(
    evaluated_run, tmp_path, monkeypatch
):
    real_run = onnxruntime.InferenceSession.run

    def disagreeing(self, outputs, feed, *rest):
        results = real_run(self, outputs, feed, *rest)
        labels = results[0].copy()
        flat = labels.reshape(-1)
        flat[::100] = flat[::100] + 1  # one pixel in a hundred gets another label
        return [labels, *results[1:]]

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", disagreeing)
    target = tmp_path / "model.onnx"
    refused = invoke("export", evaluated_run, "--out", target)
    assert refused.exit_code == 1 and "agrees with the toolkit on only 99.00% of pixels" in refused.output
    assert list(tmp_path.iterdir()) == []  # neither the graph, its description nor a temporary file
