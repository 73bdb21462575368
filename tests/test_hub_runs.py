"""Runs from the Hub: `--run hf-hub:OWNER/NAME[@REVISION]` downloads what a run needs once, and
segments exactly as the local run does, offline afterwards too."""

from __future__ import annotations

import time

import pytest

from cause_cli import load_run
from cause_cli.runs import HUB_RUN_FILES

from .fake_hub import FakeHub, forbid_remote_connections, point_hub_at
from .helpers import invoke, label_maps, train_small_run


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    scenes, run = train_small_run(tmp_path_factory.mktemp("hub-runs"), num_val=3, seed=7)
    assert invoke("eval", "--run", run, "--device", "cpu", "--no-crf", "--no-baselines", "-q").exit_code == 0
    return scenes / "images" / "val", run


@pytest.fixture
def hub(evaluated):
    _, run = evaluated
    server = FakeHub()
    for name in (*HUB_RUN_FILES, "metrics.json"):
        server.add("someone/scenes-run", name, (run / name).read_bytes())
    server.start()
    yield server
    server.stop()


def test_a_run_from_the_hub_segments_as_the_local_run_then_offline(evaluated, hub, tmp_path, monkeypatch):
    source, run = evaluated
    forbid_remote_connections(monkeypatch)
    point_hub_at(monkeypatch, hub.url, tmp_path / "hf-cache")
    local = invoke("segment", source, "--run", run, "--out", tmp_path / "local", "--device", "cpu", "-q")
    assert local.exit_code == 0, local.output
    remote = invoke("segment", source, "--run", "hf-hub:someone/scenes-run", "--out", tmp_path / "remote", "-q")
    assert remote.exit_code == 0, remote.output
    assert label_maps(tmp_path / "remote") == label_maps(tmp_path / "local")  # classes: metrics.json came too
    downloaded = {request.path.rsplit("/", 1)[-1] for request in hub.requests if request.method == "GET"}
    assert downloaded == {*HUB_RUN_FILES, "metrics.json"}  # only what a run needs

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    model = load_run("hf-hub:someone/scenes-run", device="cpu")
    picture = sorted(source.glob("*.png"))[0]
    assert model.segment(picture).labels.tolist() == label_maps(tmp_path / "local")[picture.name]
    assert not hub.requests  # read from the cache

    started = time.monotonic()
    uncached = invoke("segment", source, "--run", "hf-hub:someone/never-fetched", "--out", tmp_path / "none")
    assert time.monotonic() - started < 5
    assert uncached.exit_code == 1 and len(uncached.stderr.strip().splitlines()) == 1
    assert "not cached and HF_HUB_OFFLINE is set" in uncached.stderr


def test_missing_private_and_unknown_revisions_are_one_sentence(evaluated, hub, tmp_path, monkeypatch):
    source, _ = evaluated
    point_hub_at(monkeypatch, hub.url, tmp_path / "hf-cache")
    hub.private.add("someone/secret-run")
    cases = {
        "hf-hub:someone/no-such-run": "someone/no-such-run",
        "hf-hub:someone/secret-run": "someone/secret-run",
        "hf-hub:someone/scenes-run@v9": "v9",
        "hf-hub:../x": "is not a run on the Hub",
    }
    for spec, named in cases.items():
        result = invoke("segment", source, "--run", spec, "--out", tmp_path / "o")
        assert result.exit_code == 1, spec
        assert len(result.stderr.strip().splitlines()) == 1 and named in result.stderr, result.stderr
        assert "Traceback" not in result.output


def test_a_hub_run_is_evaluated_without_writing_into_the_cache(evaluated, hub, tmp_path, monkeypatch):
    import json

    from cause_cli.errors import CauseError
    from cause_cli.inference.evaluate import EvaluationSettings, evaluate_run

    source, run = evaluated
    point_hub_at(monkeypatch, hub.url, tmp_path / "hf-cache")
    data = source.parent.parent  # the scenes folder the run was trained on
    local = json.loads((run / "metrics.json").read_text())
    result = invoke("eval", "--run", "hf-hub:someone/scenes-run", "--data-dir", data, "--device", "cpu", "--no-crf",
                    "--no-baselines", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["miou"] == local["miou"]
    snapshots = list((tmp_path / "hf-cache").rglob("metrics.json"))
    assert all(json.loads(path.read_text()) == local for path in snapshots)  # the cache's copy untouched
    assert not list((tmp_path / "hf-cache").rglob("confusion.png"))
    with pytest.raises(CauseError, match="copy it to a folder first"):
        evaluate_run("hf-hub:someone/scenes-run", EvaluationSettings(device="cpu", crf=False, baselines=False))
