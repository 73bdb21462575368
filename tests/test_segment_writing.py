"""`cause segment` does the model's work on whole batches and makes the files in writer threads;
what it writes is byte for byte what the one-image-at-a-time path makes, and the writer puts
inputs in place and in the manifest in their order, whatever order the threads finish in."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cause_cli.errors import CauseError
from cause_cli.inference.figures import palette
from cause_cli.inference.manifest import OutputFolder
from cause_cli.inference.outputs import label_image, overlay_image
from cause_cli.inference.predict import cluster_labels, image_features, load_trained
from cause_cli.inference.segment import SegmentSettings, segment_images
from cause_cli.inference.writing import OrderedWriter
from cause_cli.model.ops import best_channel
from cause_cli.runs import open_run

from .helpers import train_small_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    scenes, run = train_small_run(tmp_path_factory.mktemp("segment-writing"), num_val=7, seed=11, size_range=(40, 90))
    return scenes / "images" / "val", run


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def one_at_a_time(run: Path, path: Path) -> tuple[bytes, bytes]:
    """The label map and overlay of one image, from the per-image functions of the Python API."""
    model = load_trained(open_run(run), torch.device("cpu"))
    image = Image.open(path).convert("RGB")
    ((features, size),) = list(image_features(model, [image]))
    clusters = cluster_labels(model, features, size)[0].numpy()
    flat = palette().reshape(-1).tolist()
    label = label_image(clusters, image.size, model.num_classes, flat)
    return png_bytes(label), png_bytes(overlay_image(image, label, palette()))


@pytest.mark.parametrize("writer_threads", [0, 3])
def test_batched_segmenting_writes_the_bytes_of_one_image_at_a_time(trained, tmp_path, writer_threads):
    source, run = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in sorted(source.glob("*.png")):
        (inputs / path.name).write_bytes(path.read_bytes())
    (inputs / "broken.png").write_bytes(b"not an image")  # skipped, between readable ones
    out = tmp_path / "out"
    settings = SegmentSettings(device="cpu", batch_size=3, writer_threads=writer_threads)
    summary = segment_images(inputs, run, out, settings)
    assert summary["written"] == 7 and [entry["input"] for entry in summary["skipped"]] == ["broken.png"]
    for path in sorted(source.glob("*.png")):
        label, overlay = one_at_a_time(run, path)
        assert (out / "labels" / path.name).read_bytes() == label, path.name
        assert (out / "overlays" / path.name).read_bytes() == overlay, path.name
    names = sorted(path.name for path in inputs.iterdir())
    assert [entry["input"] for entry in OutputFolder(out).finished()] == names  # the inputs' order


def test_best_channel_is_argmax_with_the_first_of_equal_maxima():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (2, 7, 5, 6), generator=generator).float()  # many ties
    assert torch.equal(best_channel(scores), scores.argmax(dim=1))
    assert torch.equal(best_channel(torch.zeros(1, 4, 2, 2)), torch.zeros(1, 2, 2, dtype=torch.long))


def slow_job(name: str, seconds: float, finished: list[str]):
    def job(files):
        time.sleep(seconds)
        files.write(f"labels/{name}.txt", lambda target: target.write_text(name))
        finished.append(name)
        return {"input": name, "label": f"labels/{name}.txt"}

    return job


def test_the_writer_commits_in_the_order_given_whatever_order_the_threads_finish(tmp_path):
    folder = OutputFolder(tmp_path)
    finished: list[str] = []
    writer = OrderedWriter(folder, threads=4, limit=100)
    # The first inputs take longest: the threads finish them last.
    writer.submit([slow_job("a", 0.3, finished), slow_job("b", 0.2, finished)])
    writer.submit([slow_job("c", 0.1, finished), slow_job("d", 0.0, finished)])
    writer.finish()
    assert finished[0] != "a"  # the threads did finish out of order
    assert [entry["input"] for entry in folder.finished()] == ["a", "b", "c", "d"]
    assert writer.written == 4
    assert sorted(path.name for path in (tmp_path / "labels").iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt"]
    folder.close()


def test_a_failed_job_stops_the_writer_and_leaves_no_file_of_the_groups_not_committed(tmp_path):
    folder = OutputFolder(tmp_path)
    finished: list[str] = []
    started = threading.Event()

    def failing(files):
        started.wait(5)
        raise CauseError("the disk is full")

    writer = OrderedWriter(folder, threads=2, limit=100)
    writer.submit([slow_job("a", 0.0, finished)])
    while not (tmp_path / "labels" / "a.txt").exists():  # a done group is committed on the next submission
        writer.submit([])
        time.sleep(0.01)
    writer.submit([failing, slow_job("c", 0.0, finished)])
    writer.submit([slow_job("d", 0.0, finished)])
    started.set()
    with pytest.raises(CauseError, match="the disk is full"):
        writer.finish()
    assert [entry["input"] for entry in folder.finished()] == ["a"]
    assert sorted(path.name for path in (tmp_path / "labels").iterdir()) == ["a.txt"]  # no temporary file either
    ledger = [json.loads(line)["file"] for line in (tmp_path / ".cause-files.jsonl").read_text().splitlines()]
    assert "labels/c.txt" not in ledger and "labels/d.txt" not in ledger
    folder.close()


def test_at_most_the_limit_waits_uncommitted(tmp_path):
    folder = OutputFolder(tmp_path)
    writer = OrderedWriter(folder, threads=1, limit=3)
    for index in range(10):
        writer.submit([slow_job(f"{index}", 0.01, [])])
        assert writer._waiting <= 3 + 1  # the newest group and at most the limit before it
    writer.finish()
    assert len(list(folder.finished())) == 10
    folder.close()


def test_label_values_in_the_file_type_and_matched_on_the_device():
    from types import SimpleNamespace

    from cause_cli.inference.segmenter import BatchSegmenter

    for clusters, dtype in ((27, np.uint8), (300, np.int32)):
        model = SimpleNamespace(num_classes=clusters, device=torch.device("cpu"))
        mapping = (np.arange(clusters) * 7) % clusters
        segmenter = BatchSegmenter(model, mapping, None, None)  # type: ignore[arg-type]
        values = segmenter.label_values(torch.tensor([[0, 1], [clusters - 1, 5]]))
        assert values.dtype == dtype
        np.testing.assert_array_equal(values, mapping[[[0, 1], [clusters - 1, 5]]])
        segmenter.close()


def test_overlays_legend_and_pages_use_the_label_maps_own_colours(trained, tmp_path):
    source, run = trained
    out = tmp_path / "out"
    segment_images(source, run, out, SegmentSettings(device="cpu", legend=True))
    written = sorted((out / "labels").glob("*.png"))
    label = Image.open(written[0])
    colours = np.asarray(label.getpalette(), dtype=np.uint8).reshape(-1, 3)  # the label PNG's own palette
    for path in written:
        ids = np.asarray(Image.open(path))
        image = Image.open(source / path.name).convert("RGB")
        expected = Image.blend(image, Image.fromarray(colours[ids], "RGB"), 0.5)
        assert np.array_equal(np.asarray(Image.open(out / "overlays" / path.name)), np.asarray(expected)), path.name
    legend = np.asarray(Image.open(out / "legend.png").convert("RGB"))
    num_classes = load_trained(open_run(run), torch.device("cpu")).num_classes
    for index in range(num_classes):  # each swatch, in the middle of its square
        assert tuple(legend[4 + 20 * index + 8, 16]) == tuple(colours[index]), index
    page = (out / "index.html").read_text(encoding="utf-8")
    for index in range(num_classes):
        red, green, blue = colours[index]
        assert f'rgb({red}, {green}, {blue})"></span>{index}: ' in page, index
