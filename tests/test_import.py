"""`cause import`: the reference's checkpoints (shared/parity/ckpt) become a run whose outputs
equal the reference's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cause_cli.backbones import build_model, file_sha256, resolve_spec, weights_path
from cause_cli.cli import app
from cause_cli.inference.predict import load_trained
from cause_cli.paths import write_json
from cause_cli.runs import RunDirectory

from .helpers import assert_close, shared_path

runner = CliRunner()


@pytest.fixture(scope="module")
def vits8_in_cache(tmp_path_factory):
    """Random weights in the architecture of dino-vits8, stored in the cache as a fetch would."""
    import os

    cache = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("CAUSE_HOME")
    os.environ["CAUSE_HOME"] = str(cache)
    spec = resolve_spec("dino-vits8")
    torch.manual_seed(0)
    model = build_model(spec)
    path = weights_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    write_json(path.with_name("backbone.json"), {"name": spec.name, "sha256": file_sha256(path)})
    yield cache
    if previous is None:
        os.environ.pop("CAUSE_HOME", None)
    else:
        os.environ["CAUSE_HOME"] = previous


@pytest.fixture
def cache_env(vits8_in_cache, monkeypatch):
    monkeypatch.setenv("CAUSE_HOME", str(vits8_in_cache))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_imported_run_reproduces_reference_outputs(cache_env, tmp_path, parity, kind):
    run = tmp_path / "run"
    result = invoke("import", shared_path("parity", "ckpt"), "--backbone", "dino-vits8", "--head", kind, "--run", run)
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["head"] == kind and info["num_classes"] == 27 and info["config"]["clusterbook_size"] == 64
    assert info["config"]["backbone"] == "dino-vits8-12heads" and info["backbone"]["num_heads"] == 12
    model = load_trained(RunDirectory(run), torch.device("cpu"))
    if kind == "tr":
        assert model.resolution == 64  # 64 queries: an 8 x 8 grid of patch-8 tokens
    expected = parity("heads")
    feat = torch.from_numpy(parity("inputs")["feat"])
    with torch.no_grad():
        features = model.heads.teacher(feat)
        assert_close(features, expected[f"{kind}_seg_feat_ema"])
        assert_close(model.heads.student(feat), expected[f"{kind}_seg_feat"])
        assert_close(model.linear_probe(features), expected[f"{kind}_linear_logits"])
        assignment = model.cluster_probe.assign(features).reshape(4, 8, 8)
    assert torch.equal(assignment, torch.from_numpy(expected[f"{kind}_cluster_preds"]))


def test_reference_folder_layout_is_found(cache_env, tmp_path):
    ckpt = shared_path("parity", "ckpt")
    root = tmp_path / "CAUSE" / "cocostuff27"
    (root / "dino_vit_small_8" / "64").mkdir(parents=True)
    (root / "modularity" / "dino_vit_small_8" / "64").mkdir(parents=True)
    for name in ("segment_tr.pth", "cluster_tr.pth"):
        shutil.copy(ckpt / name, root / "dino_vit_small_8" / "64" / name)
    shutil.copy(ckpt / "modular.npy", root / "modularity" / "dino_vit_small_8" / "64" / "modular.npy")
    result = invoke("import", tmp_path / "CAUSE", "--backbone", "dino-vits8", "--run", tmp_path / "run")
    assert result.exit_code == 0, result.output
    clusterbook = RunDirectory(tmp_path / "run").load_tensors("clusterbook.safetensors")["clusterbook"]
    assert torch.equal(clusterbook, torch.from_numpy(np.load(ckpt / "modular.npy")))


def test_a_backbone_of_another_width_is_named(tmp_path):
    result = invoke(
        "import", shared_path("parity", "ckpt"), "--backbone", "toy", "--head", "mlp", "--run", tmp_path / "r"
    )
    assert result.exit_code == 1
    assert "width 384" in result.stderr and "toy has 96" in result.stderr
    assert not (tmp_path / "r" / "head.safetensors").exists()


def test_both_heads_present_needs_a_choice(cache_env, tmp_path):
    result = invoke("import", shared_path("parity", "ckpt"), "--backbone", "dino-vits8", "--run", tmp_path / "r")
    assert result.exit_code == 1 and "Several" in result.stderr


def test_missing_modular_is_named(cache_env, tmp_path):
    shutil.copy(shared_path("parity", "ckpt", "segment_mlp.pth"), tmp_path / "segment_mlp.pth")
    shutil.copy(shared_path("parity", "ckpt", "cluster_mlp.pth"), tmp_path / "cluster_mlp.pth")
    result = invoke("import", tmp_path, "--backbone", "dino-vits8", "--run", tmp_path / "r")
    assert result.exit_code == 1 and "modular.npy" in result.stderr


def test_import_json_describes_the_new_run(cache_env, tmp_path):
    run = tmp_path / "run"
    result = invoke(
        "import", shared_path("parity", "ckpt"), "--backbone", "dino-vits8", "--head", "mlp", "--run", run, "--json"
    )
    assert result.exit_code == 0, result.output
    described = json.loads(result.stdout)
    assert described["run"] == str(run) and described["head"] == "mlp"
    stored = json.loads((run / "run.json").read_text())
    assert described["config"] == stored["config"] and described["backbone"] == stored["backbone"]
