"""cause push: a trained run onto a Hub served on 127.0.0.1, then used from there in a fresh
cache exactly as the local run; the card shows the metrics; tokens and licences are checked."""

from __future__ import annotations

import time

import pytest

from cause_cli.runs import HUB_RUN_FILES

from .fake_hub import FakeHub, forbid_remote_connections, point_hub_at
from .helpers import invoke, label_maps, train_small_run


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    scenes, run = train_small_run(tmp_path_factory.mktemp("push"), num_val=3, seed=8)
    assert invoke("eval", "--run", run, "--device", "cpu", "--no-crf", "--no-baselines", "-q").exit_code == 0
    (run / "resume.pt").write_bytes(b"a checkpoint that must stay home")
    return scenes / "images" / "val", run


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub._commit_api as commit_api

    # hf_xet would upload by the Xet protocol, which this server does not speak; the Hub's LFS path is the same API.
    monkeypatch.setattr(commit_api, "is_xet_available", lambda: False)
    forbid_remote_connections(monkeypatch)
    server = FakeHub().start()
    point_hub_at(monkeypatch, server.url, tmp_path / "hf-cache")
    yield server
    server.stop()


def test_a_pushed_run_segments_from_the_hub_as_it_does_locally(evaluated, hub, tmp_path, monkeypatch):
    source, run = evaluated
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    pushed = invoke("push", run, "me/scenes-cause", "--message", "first run")
    assert pushed.exit_code == 0, pushed.output
    files = {name for repo, name in hub.files if repo == "me/scenes-cause"}
    assert files == {*HUB_RUN_FILES, "metrics.json", "confusion.png", "samples.png", "curves.png", "README.md"}
    assert "resume.pt" not in files and "train.log" not in files
    assert {oid for oid in hub.lfs_objects} == {
        __import__("hashlib").sha256((run / name).read_bytes()).hexdigest()
        for name in HUB_RUN_FILES
        if name.endswith(".safetensors")
    }  # the weights went by LFS
    assert hub.commits[-1]["header"]["summary"] == "first run"
    card = hub.files[("me/scenes-cause", "README.md")].decode()
    assert "library_name: cause-cli" in card and "- unsupervised-semantic-segmentation" in card
    assert "| clusters (Hungarian matching) |" in card and "cause segment ./photos --run hf-hub:me/scenes-cause" in card

    local = invoke("segment", source, "--run", run, "--out", tmp_path / "local", "-q")
    remote = invoke("segment", source, "--run", "hf-hub:me/scenes-cause", "--out", tmp_path / "remote", "-q")
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    assert label_maps(tmp_path / "remote") == label_maps(tmp_path / "local")
    described = __import__("json").loads(hub.files[("me/scenes-cause", "run.json")])
    assert set(described["weights_sha256"]) == {"clusterbook.safetensors", "head.safetensors", "probe.safetensors"}

    # Offline afterwards: the cached run still works; a run never fetched is one sentence, at once.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = invoke("segment", source, "--run", "hf-hub:me/scenes-cause", "--out", tmp_path / "offline", "-q")
    assert again.exit_code == 0, again.output
    assert label_maps(tmp_path / "offline") == label_maps(tmp_path / "local")
    started = time.monotonic()
    uncached = invoke("segment", source, "--run", "hf-hub:me/never-pushed", "--out", tmp_path / "none")
    assert time.monotonic() - started < 5
    assert uncached.exit_code == 1 and len(uncached.stderr.strip().splitlines()) == 1


def test_weights_that_are_not_the_ones_run_json_describes_are_refused(evaluated, hub, tmp_path, monkeypatch):
    _, run = evaluated
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert invoke("push", run, "me/mixed").exit_code == 0
    probe = hub.files[("me/mixed", "probe.safetensors")]
    hub.add("me/mixed", "probe.safetensors", probe[:-4] + b"\0\0\0\0")  # another run's probe pushed over it
    mixed = invoke("segment", run, "--run", "hf-hub:me/mixed", "--out", tmp_path / "o")
    assert mixed.exit_code == 1
    assert "probe.safetensors of hf-hub:me/mixed is not the file its run.json describes" in mixed.stderr


def test_tokens_and_restricted_licences_are_one_sentence(evaluated, hub, monkeypatch, tmp_path):
    _, run = evaluated
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))  # no token stored by `hf auth login` either
    missing = invoke("push", run, "me/no-token")
    assert missing.exit_code == 1 and "needs a Hugging Face token that may write; set HF_TOKEN" in missing.stderr
    assert not [request for request in hub.requests if request.method == "POST"]  # refused before any request
    hub.read_only.add("hf_reader")
    monkeypatch.setenv("HF_TOKEN", "hf_reader")
    read_only = invoke("push", run, "me/read-only")
    assert read_only.exit_code == 1 and "may not write to me/read-only" in read_only.stderr
    for result in (missing, read_only):
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output

    from cause_cli.sharing import model_card, restricted

    assert restricted("CC-BY-NC-4.0") and restricted("DINOv3 gated") and not restricted("Apache-2.0")
    info = {"config": {"backbone": "mae-vitb16", "head": "mlp", "resolution": 224, "dataset": "folder",
                       "recipe": "default"}, "backbone": {"name": "mae-vitb16"}, "num_classes": 6}  # fmt: skip
    card = model_card(info, None, "me/x", [])
    assert "license: cc-by-nc-4.0" in card and "**The backbone's licence is CC-BY-NC-4.0**" in card


def test_a_private_push_makes_a_private_repository_and_its_card_shows_the_runs_figures(evaluated, hub, monkeypatch):
    _, run = evaluated
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert invoke("push", run, "me/private-run", "--private").exit_code == 0
    assert invoke("push", run, "me/public-run").exit_code == 0
    assert hub.created == {"me/private-run": True, "me/public-run": False}
    metrics = __import__("json").loads((run / "metrics.json").read_text())
    card = hub.files[("me/private-run", "README.md")].decode()
    row = next(line for line in card.splitlines() if line.startswith("| clusters (Hungarian matching) |"))
    assert row == f"| clusters (Hungarian matching) | {metrics['miou']:.1f} | {metrics['pixel_accuracy']:.1f} |"
