"""The command line, end to end on small synthetic data and the toy backbone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cause_cli import __version__
from cause_cli.cli import app
from cause_cli.config import TrainConfig
from cause_cli.data.synthetic import write_scenes
from cause_cli.runs import RunDirectory
from cause_cli.training import train

from .helpers import require_pydensecrf, train_small_run

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def small_config(data_dir, **overrides) -> TrainConfig:
    settings = dict(
        data_dir=str(data_dir),
        backbone="toy",
        resolution=64,
        clusterbook_size=64,
        projection_dim=128,
        batch_size=8,
        epochs_clusterbook=1,
        epochs_front_door=1,
        epochs_cluster_probe=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"), num_train=24, num_val=8, seed=1, size_range=(64, 96))


@pytest.fixture(scope="module")
def trained_run(scenes, tmp_path_factory):
    """A run whose cluster probe scores by cosine, as the paper's does (spread_run has the other kind)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    train(small_config(scenes, probe_spread="off"), run, "cpu")
    return run


@pytest.fixture(scope="module")
def spread_run(scenes, tmp_path_factory):
    """A run whose cluster probe has a shared spread (log-density scores, posterior CRF unary)."""
    run = tmp_path_factory.mktemp("runs") / "spread-run"
    train(small_config(scenes, probe_spread="on"), run, "cpu")
    return run


def test_version_and_help():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.stdout
    result = invoke("--help")
    for command in ("info", "fetch", "train", "eval", "segment", "demo"):
        assert command in result.stdout


def test_info_json():
    result = invoke("info", "--json")
    assert result.exit_code == 0
    details = json.loads(result.stdout)
    assert details["cause"] == __version__ and "cpu" in details["devices"]
    assert isinstance(details["dense_crf"], bool)


def test_fetch_toy_and_list(tmp_path, monkeypatch):
    monkeypatch.setenv("CAUSE_HOME", str(tmp_path))
    result = invoke("fetch", "toy")
    assert result.exit_code == 0
    weights = tmp_path / "backbones" / "toy" / "model.safetensors"
    assert weights.is_file()
    first = weights.read_bytes()
    assert invoke("fetch", "toy").exit_code == 0 and weights.read_bytes() == first
    listing = invoke("fetch", "--list")
    assert "dino-vits8" in listing.stdout and "toy" in listing.stdout


def test_unknown_backbone_suggests_a_name():
    result = invoke("fetch", "dino-vit8")
    assert result.exit_code == 1
    assert "Did you mean 'dino-vits8'" in result.stderr
    assert "Traceback" not in result.output


def test_train_command_runs_and_skips_finished_steps(scenes, tmp_path):
    run = tmp_path / "cli-run"
    args = [
        "train",
        "--data-dir",
        scenes,
        "--run",
        run,
        "--resolution",
        "64",
        "--clusterbook-size",
        "32",
        "--batch-size",
        "8",
        "--epochs-front-door",
        "1",
        "--min-updates",
        "0",
        "--device",
        "cpu",
        "--quiet",
    ]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    for name in ("clusterbook.safetensors", "head.safetensors", "probe.safetensors", "run.json", "train.log"):
        assert (run / name).is_file()
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["backbone"] == "toy" and info["num_classes"] == 6 and len(info["backbone"]["sha256"]) == 64
    assert info["schedule"]["front_door"] == {"epochs": 1, "updates": 3, "from": "given"}
    assert info["config"]["positive_threshold"] == 0.5 and info["config"]["negative_threshold"] == 0.3
    stamp = (run / "head.safetensors").stat().st_mtime_ns
    assert invoke(*args).exit_code == 0
    assert (run / "head.safetensors").stat().st_mtime_ns == stamp
    assert "skipped" in (run / "train.log").read_text()


def test_eval_writes_metrics(trained_run):
    result = invoke("eval", "--run", trained_run, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    stored = json.loads((trained_run / "metrics.json").read_text())
    assert printed["miou"] == stored["miou"]
    assert 0 <= stored["miou"] <= 100 and 0 <= stored["pixel_accuracy"] <= 100
    assert 0 <= stored["linear_probe"]["miou"] <= 100
    baselines = stored["baselines"]
    assert 0 <= baselines["kmeans_tokens"]["miou"] <= 100 and 0 <= baselines["kmeans_head"]["miou"] <= 100
    assert baselines["fitted_on"] == {"split": "train", "images": 24, "tokens": 24 * 64, "labels": False}
    assert sorted(stored["cluster_to_class"]) == list(range(6))
    table = invoke("eval", "--run", trained_run, "--device", "cpu", "--quiet")
    assert "mIoU" in table.stdout and "sand" in table.stdout and "k-means on backbone tokens" in table.stdout


def test_eval_fits_the_baselines_on_the_data_folder_given(tmp_path, monkeypatch):
    """A trained run evaluated with --data-dir on its data moved elsewhere fits the k-means
    baselines on that folder's training split, not on the folder it was trained on."""
    scenes, run = train_small_run(tmp_path / "trained", num_val=2, seed=3)
    moved = tmp_path / "moved" / "scenes"
    shutil.move(scenes, moved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke("eval", "--run", run, "--data-dir", moved, "--no-crf", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["images"] == 2 and metrics["data_dir"] == str(moved)
    assert metrics["baselines"]["fitted_on"] == {"split": "train", "images": 8, "tokens": 8 * 64, "labels": False}


def test_segment_skips_bad_files_and_keeps_sizes(trained_run, tmp_path):
    source = tmp_path / "photos"
    (source / "nested" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(source / "odd.png")
    Image.fromarray(rng.integers(0, 256, (70, 20), dtype=np.uint8), "L").save(source / "nested" / "grey.png")
    Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA").save(source / "nested" / "rgba.png")
    Image.new("CMYK", (45, 33), (10, 20, 30, 40)).save(source / "nested" / "deeper" / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (25, 31), dtype=np.uint16)).save(source / "nested" / "deep16.png")
    (source / "nested" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (source / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    result = invoke("segment", source, "--run", trained_run, "--out", out, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.stderr and "notes.txt" in result.stderr
    expected_sizes = {
        "odd.png": (53, 37),
        "nested/grey.png": (20, 70),
        "nested/rgba.png": (40, 30),
        "nested/deeper/cmyk.png": (45, 33),
        "nested/deep16.png": (31, 25),
    }
    for relative, size in expected_sizes.items():
        label = Image.open(out / "labels" / relative)
        assert label.mode == "P" and label.size == size
        assert int(np.asarray(label).max()) < 6
        assert Image.open(out / "overlays" / relative).size == size
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == 7 and summary["written"] == 5
    assert sorted(s["input"] for s in summary["skipped"]) == ["nested/broken.jpg", "notes.txt"]


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["segment", "{tmp}/nowhere", "--run", "{run}"], "does not exist"),
        (["segment", "{tmp}", "--run", "{tmp}/no-run"], "does not exist"),
        (["eval", "--run", "{tmp}"], "is not a run folder"),
        (["train", "--data-dir", "{tmp}/missing"], "does not exist"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_1(trained_run, tmp_path, arguments, fragment):
    filled = [a.format(tmp=tmp_path, run=trained_run) for a in arguments]
    result = invoke(*filled, "--device", "cpu")
    assert result.exit_code == 1
    assert fragment in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "probe",
    [
        {},  # the default step three: a consensus k-means start in the whitened space, no refinement
        {"probe_restarts": 4},  # the k-means restart of best mean cosine
        {"probe_space": "head"},
        {"probe_refine": True},
        {"probe_init": "random", "probe_restarts": 2},
        {"head": "tr", "reduced_dim": 24},
        {"cache_features": "off"},  # the default caches the tokens (auto); this path does not
        {"probe_spread": "on"},  # Gaussians of a shared spread from the consensus partition
    ],
    ids=[
        "kmeans",
        "kmeans-best-restart",
        "kmeans-head-space",
        "kmeans-refined",
        "random",
        "tr-head",
        "no-feature-cache",
        "kmeans-spread",
    ],
)
def test_labels_influence_nothing_but_the_linear_probe(scenes, tmp_path, probe):
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(scenes / "images", unlabelled / "images")
    labelled_run, unlabelled_run = tmp_path / "with", tmp_path / "without"
    train(small_config(scenes, num_classes=6, epochs_cluster_probe=2, **probe), labelled_run, "cpu")
    train(small_config(unlabelled, num_classes=6, epochs_cluster_probe=2, **probe), unlabelled_run, "cpu")
    for name in ("clusterbook.safetensors", "head.safetensors", "probe.safetensors"):
        with_labels = RunDirectory(labelled_run).load_tensors(name)
        without = RunDirectory(unlabelled_run).load_tensors(name)
        assert with_labels.keys() == without.keys(), name
        if name == "probe.safetensors" and probe.get("probe_spread") == "on":
            assert "precision" in with_labels
        if name == "probe.safetensors" and (probe.get("probe_refine") or probe.get("probe_init") == "random"):
            assert "precision" not in with_labels  # modularity refines centroids of cosines, not means
        for key, value in with_labels.items():
            if key.startswith("linear_probe"):
                continue
            assert torch.equal(value, without[key]), f"{name}:{key} depends on the labels"
    # ...while the linear probe did learn from the labels.
    assert not torch.equal(
        RunDirectory(labelled_run).load_tensors("probe.safetensors")["linear_probe.linear.weight"],
        RunDirectory(unlabelled_run).load_tensors("probe.safetensors")["linear_probe.linear.weight"],
    )


def partly_labelled_copy(scenes: Path, target: Path) -> Path:
    """``scenes`` with a share of every label map ignored (255: a band of rows and scattered
    pixels) and every third image's label map wholly ignored (an image without labels)."""
    shutil.copytree(scenes / "images", target / "images")
    shutil.copy(scenes / "classes.txt", target / "classes.txt")
    for index, path in enumerate(sorted((scenes / "labels").rglob("*.png"))):
        label = np.array(Image.open(path))
        if index % 3 == 0:
            label[:] = 255
        else:
            label[np.random.default_rng(index).random(label.shape) < 0.3] = 255
            label[: label.shape[0] // 3] = 255
        destination = target / "labels" / path.relative_to(scenes / "labels")
        destination.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label).save(destination)
    return target


@pytest.mark.parametrize("probe", [{}, {"probe_init": "random", "probe_restarts": 2}], ids=["kmeans", "random"])
def test_partly_labelled_data_trains_what_unlabelled_data_trains(scenes, tmp_path, probe):
    # Which pixels are labelled must not leak into anything but the linear probe either.
    partly = partly_labelled_copy(scenes, tmp_path / "partly")
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(scenes / "images", unlabelled / "images")
    runs = {"partly": tmp_path / "partly-run", "without": tmp_path / "without-run"}
    train(small_config(partly, num_classes=6, epochs_cluster_probe=2, **probe), runs["partly"], "cpu")
    train(small_config(unlabelled, num_classes=6, epochs_cluster_probe=2, **probe), runs["without"], "cpu")
    for name in ("clusterbook.safetensors", "head.safetensors", "probe.safetensors"):
        partly_labelled = RunDirectory(runs["partly"]).load_tensors(name)
        without = RunDirectory(runs["without"]).load_tensors(name)
        assert partly_labelled.keys() - {"linear_probe.linear.weight", "linear_probe.linear.bias"} == (
            without.keys() - {"linear_probe.linear.weight", "linear_probe.linear.bias"}
        ), name
        for key, value in partly_labelled.items():
            if not key.startswith("linear_probe"):
                assert torch.equal(value, without[key]), f"{name}:{key} depends on which pixels are labelled"
    probe_weights = RunDirectory(runs["partly"]).load_tensors("probe.safetensors")
    assert "linear_probe.linear.weight" in probe_weights  # the linear probe did learn from the labels there are


def test_run_with_other_backbone_is_refused(trained_run):
    from cause_cli.errors import CauseError
    from cause_cli.inference.predict import load_trained

    with pytest.raises(CauseError, match="made with backbone 'toy'"):
        load_trained(RunDirectory(trained_run), torch.device("cpu"), backbone="dino-vits8")


def test_tr_head_trains_evaluates_and_segments(scenes, tmp_path):
    run = tmp_path / "tr-run"
    result = invoke("train", "--data-dir", scenes, "--run", run, "--head", "tr", "--resolution", "64",
                    "--clusterbook-size", "32", "--batch-size", "8", "--epochs-front-door", "1", "--min-updates", "0",
                    "--reduced-dim", "24", "--device", "cpu", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["reduced_dim"] == 24
    assert RunDirectory(run).load_tensors("probe.safetensors")["centroids"].shape[1] == 24
    # The paper's 5 cluster-probe epochs after the TR head belong to its random start; the
    # default k-means start is not refined.
    assert info["config"]["head"] == "tr" and info["config"]["epochs_cluster_probe"] == 0
    head = RunDirectory(run).load_tensors("head.safetensors")
    assert head["teacher.query_pos"].shape == (64, 96)  # (64 / 8)^2 tokens, toy width 96
    assert "teacher.clusterbook" not in head
    evaluation = invoke("eval", "--run", run, "--device", "cpu", "--json")
    assert evaluation.exit_code == 0 and 0 <= json.loads(evaluation.stdout)["miou"] <= 100
    out = tmp_path / "segments"
    assert invoke("segment", scenes / "images" / "val", "--run", run, "--out", out, "--quiet").exit_code == 0
    assert len(list((out / "labels").glob("*.png"))) == 8


crf_only = pytest.mark.usefixtures("pydensecrf")


@crf_only
def test_eval_with_crf_writes_both_results_and_pictures(trained_run):
    result = invoke("eval", "--run", trained_run, "--device", "cpu", "--crf", "--crf-workers", "0", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert 0 <= metrics["crf"]["miou"] <= 100 and set(metrics["crf"]["iou_per_class"]) == set(metrics["iou_per_class"])
    assert metrics["class_names"][:2] == ["brick", "water"]
    for picture in ("confusion.png", "samples.png"):
        assert Image.open(trained_run / picture).size[0] > 50
    table = invoke("eval", "--run", trained_run, "--device", "cpu", "--crf", "--crf-workers", "0", "--quiet")
    assert "with CRF" in table.stdout


@crf_only
def test_eval_survives_a_killed_crf_worker(trained_run, tmp_path, monkeypatch):
    from cause_cli.inference import crf
    from tests.test_crf import die_once_labels_job

    monkeypatch.setenv("CAUSE_TEST_CRF_MARKER", str(tmp_path / "marker"))
    monkeypatch.setattr(crf, "crf_labels", die_once_labels_job)
    result = invoke("eval", "--run", trained_run, "--device", "cpu", "--crf", "--crf-workers", "2", "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "marker").exists()  # a worker really died
    assert json.loads(result.stdout)["crf"]["miou"] >= 0


def test_segment_glob_list_legend_and_classes(trained_run, scenes, tmp_path):
    invoke("eval", "--run", trained_run, "--device", "cpu", "--no-crf", "--quiet")  # gives the class matching
    listing = tmp_path / "list.txt"
    val = sorted((scenes / "images" / "val").glob("*.png"))
    listing.write_text("\n".join(str(path) for path in val[:3]) + "\n# a comment\n")
    out = tmp_path / "from-list"
    assert invoke("segment", listing, "--run", trained_run, "--out", out, "--legend", "--quiet").exit_code == 0
    assert sorted(p.name for p in (out / "labels").glob("*.png")) == [p.name for p in val[:3]]
    assert (out / "legend.png").is_file()
    assert json.loads((out / "summary.json").read_text())["labels_are"] == "classes"
    pattern = str(scenes / "images" / "**" / "scene_000[0-1].png")
    out = tmp_path / "from-glob"
    assert invoke("segment", pattern, "--run", trained_run, "--out", out, "--quiet").exit_code == 0
    written = sorted(p.relative_to(out / "labels").as_posix() for p in (out / "labels").rglob("*.png"))
    assert written == ["train/scene_0000.png", "train/scene_0001.png", "val/scene_0000.png", "val/scene_0001.png"]
    missing = invoke("segment", str(tmp_path / "*.nothing"), "--run", trained_run)
    assert missing.exit_code == 1 and "No files match" in missing.stderr


@crf_only
def test_segment_with_crf(trained_run, scenes, tmp_path):
    outputs = {}
    # One image at a time in this process, and batches of three in two worker processes.
    for workers, batch_size in (("0", "1"), ("2", "3")):
        out = tmp_path / f"crf{workers}"
        result = invoke(
            "segment", scenes / "images" / "val", "--run", trained_run, "--out", out, "--crf", "--crf-workers", workers,
            "--batch-size", batch_size, "--quiet",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        outputs[workers] = {path.name: np.asarray(Image.open(path)) for path in (out / "labels").glob("*.png")}
    assert len(outputs["0"]) == 8
    assert outputs["0"].keys() == outputs["2"].keys()
    for name, label in outputs["0"].items():
        np.testing.assert_array_equal(outputs["2"][name], label)


def _run_without_metrics(run, tmp_path):
    """A copy of ``run`` that has not been evaluated, so segment writes cluster ids."""
    copy = tmp_path / "unevaluated"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("metrics.json", "*.png"))
    return copy


@crf_only
def test_eval_crf_result_is_the_dense_crf_of_the_flip_average(trained_run):
    """`cause eval`'s figures against the toolkit's pieces called one by one: the plain result
    is the image's own argmax, the CRF result dense_crf on the image-and-flip average."""
    from cause_cli.data import open_dataset
    from cause_cli.data.loading import LoadReport, iterate_batches
    from cause_cli.data.transforms import denormalise_to_uint8, normalise_pixels
    from cause_cli.inference.crf import dense_crf
    from cause_cli.inference.metrics import MetricAccumulator
    from cause_cli.inference.predict import (
        cluster_scores,
        crf_unary,
        flip_averaged_feature_map,
        head_feature_map,
        linear_logits,
        load_trained,
    )

    result = invoke("eval", "--run", trained_run, "--device", "cpu", "--crf", "--crf-workers", "0", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)

    model = load_trained(RunDirectory(trained_run), torch.device("cpu"))
    config = model.config
    data = open_dataset(config.dataset, config.data_dir, "val", model.resolution, config.val_fraction)
    plain, refined, linear = (MetricAccumulator(model.num_classes) for _ in range(3))
    for batch in iterate_batches(data, 3, LoadReport()):
        images = normalise_pixels(batch["image"], model.device)
        labels = batch["label"]
        size = (int(labels.shape[-2]), int(labels.shape[-1]))
        features = head_feature_map(model, images)
        plain.update(cluster_scores(model, features, size).argmax(dim=1), labels)
        linear.update(linear_logits(model, features, size).argmax(dim=1), labels)
        averaged = flip_averaged_feature_map(model, images, features)
        unary = crf_unary(cluster_scores(model, averaged, size), model.cluster_probe.sharpness)
        maps = [
            dense_crf(image, log_p.numpy()).argmax(axis=0)
            for image, log_p in zip(denormalise_to_uint8(images), unary, strict=True)
        ]
        refined.update(torch.from_numpy(np.stack(maps)).long(), labels)
    assert not torch.equal(plain.histogram, refined.histogram)  # the CRF changed something here
    for reported, expected in ((metrics, plain.scores()), (metrics["crf"], refined.scores())):
        assert reported["miou"] == pytest.approx(expected.miou, abs=1e-9)
        assert reported["pixel_accuracy"] == pytest.approx(expected.pixel_accuracy, abs=1e-9)
    assert metrics["linear_probe"]["miou"] == pytest.approx(linear.scores(match=False).miou, abs=1e-9)


@crf_only
@pytest.mark.parametrize("kind", ["trained_run", "spread_run"], ids=["cosine", "spread"])
def test_segment_crf_labels_are_the_dense_crf_of_the_flip_average(kind, scenes, tmp_path, request):
    from cause_cli.data.transforms import normalise, resize_and_crop
    from cause_cli.inference.crf import dense_crf
    from cause_cli.inference.predict import (
        cluster_scores,
        crf_unary,
        flip_averaged_feature_map,
        head_feature_map,
        load_trained,
    )

    run = _run_without_metrics(request.getfixturevalue(kind), tmp_path)
    out = tmp_path / "segments"
    result = invoke("segment", scenes / "images" / "val", "--run", run, "--out", out, "--crf", "--crf-workers", "0",
                    "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    model = load_trained(RunDirectory(run), torch.device("cpu"))
    changed = 0
    photos = sorted((scenes / "images" / "val").glob("*.png"))
    assert len(photos) == 8
    for photo in photos:
        image = Image.open(photo).convert("RGB")
        batch = normalise(resize_and_crop(image, model.resolution, square_resize=True))[None]
        features = head_feature_map(model, batch)
        size = (image.height, image.width)
        scores = cluster_scores(model, flip_averaged_feature_map(model, batch, features), size)
        unary = crf_unary(scores, model.cluster_probe.sharpness)[0]
        expected = dense_crf(np.asarray(image), unary.numpy()).argmax(axis=0)
        written = np.asarray(Image.open(out / "labels" / photo.name))
        np.testing.assert_array_equal(written, expected, err_msg=photo.name)
        changed += int((expected != unary.argmax(dim=0).numpy()).sum())
    assert changed > 0  # the CRF moved pixels, so an argmax of the unary would not pass
    assert (model.cluster_probe.precision is not None) == (kind == "spread_run")


@pytest.mark.parametrize("crf", [False, True], ids=["no-crf", "crf"])
def test_eval_scores_labels_made_from_the_runs_own_segments_at_100(trained_run, tmp_path, crf):
    """A right answer known by construction: label files that are `cause segment`'s maps of the
    same images (64 px squares, so segment and eval see the same pixels), with the cluster ids
    permuted and some pixels marked to ignore. The matching must undo the permutation and
    every score is 100 %; an evaluation that mirrored, shifted or mixed up its predictions, or
    reported another result in their place, would not reach it."""
    if crf:
        require_pydensecrf()
    data = write_scenes(tmp_path / "squares", num_train=4, num_val=6, seed=9, size_range=(64, 64))
    run = _run_without_metrics(trained_run, tmp_path)
    segments = tmp_path / "segments"
    crf_flags = ["--crf", "--crf-workers", "0"] if crf else []
    result = invoke("segment", data / "images" / "val", "--run", run, "--out", segments, *crf_flags, "--quiet")
    assert result.exit_code == 0, result.output
    classes = 6
    permutation = np.random.default_rng(0).permutation(classes)
    for path in sorted((segments / "labels").glob("*.png")):
        clusters = np.asarray(Image.open(path)).astype(np.int64)
        label = permutation[clusters].astype(np.uint8)
        label[:3, :] = 255  # ignored, whatever the run predicts there
        Image.fromarray(label, "L").save(data / "labels" / "val" / path.name)

    result = invoke("eval", "--run", run, "--data-dir", data, "--device", "cpu", "--json", *crf_flags,
                    *([] if crf else ["--no-crf"]))  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    scored = metrics["crf"] if crf else metrics
    # With the CRF, eval gives it the image as the reference rebuilds it from the normalised
    # tensor (truncated to bytes, a grey level off here and there) and segment the file's own
    # pixels: a handful of pixels may differ between the two, no more.
    floor = 99.9 if crf else 100.0
    assert scored["miou"] >= floor - 1e-9 and scored["pixel_accuracy"] >= floor - 1e-9
    used = {int(value) for path in (segments / "labels").glob("*.png") for value in np.unique(Image.open(path))}
    for cluster in used:
        assert scored["cluster_to_class"][cluster] == permutation[cluster]
    if crf:  # the plain result is another map: below 100 here, since the CRF moved pixels
        assert metrics["miou"] < 100.0
