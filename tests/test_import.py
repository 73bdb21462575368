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
from cause_cli.model.reference import load_reference_file
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


def voc_reference_files(folder):
    """The reference's MLP files for a 21-class (VOC) run: the parity checkpoint's probes cut to 21 rows."""
    ckpt = shared_path("parity", "ckpt")
    folder.mkdir(parents=True)
    segment = load_reference_file(ckpt / "segment_mlp.pth")
    for key in ("linear.f.weight", "linear.f.bias"):
        segment[key] = segment[key][:21]
    cluster = load_reference_file(ckpt / "cluster_mlp.pth")
    cluster["cluster_probe"] = cluster["cluster_probe"][:21]
    torch.save({key: value.clone() for key, value in segment.items()}, folder / "segment_mlp.pth")
    torch.save({key: value.clone() for key, value in cluster.items()}, folder / "cluster_mlp.pth")
    shutil.copy(ckpt / "modular.npy", folder / "modular.npy")
    return folder


def test_an_imported_run_is_evaluated_with_baselines_on_the_data_folder_given(cache_env, tmp_path, monkeypatch):
    """docs/reproduce.md: `cause eval --run R --dataset voc2012 --data-dir D` on an imported run
    (whose own data folder is empty) fits the k-means baselines on D's training split, from
    any working directory."""
    from .test_datasets import make_voc

    data = tmp_path / "datasets"
    ids = make_voc(data, train=2)
    (data / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").write_text("\n".join(ids[:2]) + "\n")
    run = tmp_path / "run"
    files = voc_reference_files(tmp_path / "reference")
    imported = invoke("import", files, "--backbone", "dino-vits8", "--dataset", "voc2012", "--run", run)
    assert imported.exit_code == 0, imported.output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke("eval", "--run", run, "--dataset", "voc2012", "--data-dir", data, "--no-crf", "--device", "cpu",
                    "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["images"] == 2 and metrics["data_dir"] == str(data)
    assert metrics["baselines"]["fitted_on"] == {"split": "train", "images": 2, "tokens": 2 * 40 * 40, "labels": False}
    assert 0 <= metrics["baselines"]["kmeans_tokens"]["miou"] <= 100
