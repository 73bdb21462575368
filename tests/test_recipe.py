"""`--recipe reference` copies the reference's training recipe (METHOD.md section 7), label
leak included; the default recipe keeps labels out (see test_cli for that side)."""

from __future__ import annotations

import json

import pytest
import torch

from cause_cli.config import TrainConfig
from cause_cli.data.synthetic import write_scenes
from cause_cli.errors import CauseError
from cause_cli.resolve import apply_reference_recipe, resolve_schedule, resolve_thresholds, validated
from cause_cli.runs import RunDirectory
from cause_cli.training import train


@pytest.mark.parametrize(
    ("head", "dataset", "clip", "front_door_resolution", "weight_decay"),
    [
        ("mlp", "cocostuff27", 0.1, 224, 1e-4),
        ("tr", "cocostuff27", 2.0, None, 1e-4),
        ("mlp", "cityscapes", 1.0, 224, 0.0),
        ("tr", "cityscapes", 1.0, None, 0.0),
        ("tr", "voc2012", 2.0, None, 1e-4),
    ],
)
def test_reference_recipe_settings(head, dataset, clip, front_door_resolution, weight_decay):
    config = apply_reference_recipe(TrainConfig(data_dir="", dataset=dataset, head=head, recipe="reference"))
    assert config.learning_rate == pytest.approx(4e-3) and config.epoch_fraction == 0.25
    assert config.grad_clip == clip and config.weight_decay == weight_decay
    assert config.front_door_resolution == front_door_resolution
    assert config.epochs_cluster_probe == (1 if head == "mlp" else 5)


def test_default_recipe_is_untouched():
    config = apply_reference_recipe(TrainConfig(data_dir=""))
    assert config.learning_rate == 1e-3 and config.epoch_fraction == 1.0 and config.front_door_resolution is None


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"), num_train=32, num_val=4, seed=3, size_range=(64, 80))


def small(scenes, **overrides) -> TrainConfig:
    settings = dict(data_dir=str(scenes), resolution=64, clusterbook_size=32, projection_dim=64, batch_size=4)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_reference_recipe_lets_labels_train_the_teacher(scenes, tmp_path):
    run = tmp_path / "reference"
    train(small(scenes, recipe="reference", head="mlp"), run, "cpu")
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["recipe"] == "reference" and info["config"]["front_door_resolution"] == 224
    log = (run / "train.log").read_text()
    assert "step 3/3" in log
    directory = RunDirectory(run)
    before = directory.load_tensors("head_front_door.safetensors")
    after = directory.load_tensors("head.safetensors")
    changed = [key for key in after if key.startswith("teacher.") and not torch.equal(after[key], before[key])]
    assert changed, "step three should have trained the teacher"
    assert all(torch.equal(after[key], before[key]) for key in after if key.startswith("student."))


def test_in_step_three_labels_reach_the_teacher_in_the_reference_recipe_only(scenes, tmp_path, monkeypatch):
    """The leak the recipe copies: step three's linear-probe loss flows into the teacher's
    features undetached in the reference recipe, and detached (labels train only the linear
    probe) in the default one."""
    import cause_cli.training.cluster_probe as step_three

    detached = []
    real = step_three.linear_probe_loss

    def recording(context, probe, features, labels, detach):
        detached.append((context.reference_recipe, detach))
        return real(context, probe, features, labels, detach=detach)

    monkeypatch.setattr(step_three, "linear_probe_loss", recording)
    train(small(scenes, recipe="reference", head="mlp"), tmp_path / "reference", "cpu")
    train(small(scenes, probe_init="random"), tmp_path / "default", "cpu")
    assert {True: {False}, False: {True}} == {
        recipe: {flag for made_in, flag in detached if made_in == recipe} for recipe in (True, False)
    }


def test_reference_recipe_trains_a_quarter_of_each_epoch(scenes, tmp_path):
    from cause_cli.progress import Reporter

    class Counting(Reporter):
        def __init__(self) -> None:
            self.totals: dict[str, int | None] = {}

        def task(self, description, total, unit="it", done=0):
            self.totals[description] = total
            return super().task(description, total, unit, done)

    counting = Counting()
    train(small(scenes, recipe="reference", head="tr"), tmp_path / "quarter", "cpu", counting)
    steps_per_epoch = 32 // 4
    assert counting.totals["step 1/3 clusterbook"] == steps_per_epoch // 4
    assert counting.totals["step 2/3 front door"] == 2 * steps_per_epoch // 4


def test_reference_recipe_needs_labels(scenes, tmp_path):
    import shutil

    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(scenes / "images", unlabelled / "images")
    with pytest.raises(CauseError, match="trains with labels"):
        train(small(unlabelled, recipe="reference", num_classes=6), tmp_path / "run", "cpu")


@pytest.mark.parametrize(
    ("dataset", "given", "batches", "expected"),
    [
        ("folder", {}, 20, {"clusterbook": 1, "front_door": 25, "cluster_probe": 0}),
        ("folder", {}, 1000, {"clusterbook": 1, "front_door": 2, "cluster_probe": 0}),  # the paper's suffice
        ("folder", {"probe_init": "random"}, 20, {"clusterbook": 1, "front_door": 25, "cluster_probe": 25}),
        ("folder", {"epochs_front_door": 3}, 20, {"clusterbook": 1, "front_door": 3, "cluster_probe": 0}),
        ("folder", {"min_updates": 0}, 20, {"clusterbook": 1, "front_door": 2, "cluster_probe": 0}),
        ("cocostuff27", {}, 20, {"clusterbook": 1, "front_door": 2, "cluster_probe": 0}),
        ("cocostuff27", {"probe_init": "random", "head": "tr"}, 20,
         {"clusterbook": 1, "front_door": 2, "cluster_probe": 5}),
    ],
)  # fmt: skip
def test_schedule_gives_folders_enough_updates(dataset, given, batches, expected):
    config = validated(TrainConfig(data_dir="", dataset=dataset, **given))
    config, schedule = resolve_schedule(config, batches, paper_dataset=dataset != "folder")
    assert {step: plan["epochs"] for step, plan in schedule.items()} == expected
    assert config.epochs_front_door == expected["front_door"]
    assert schedule["front_door"]["updates"] == expected["front_door"] * batches


def test_reference_recipe_keeps_the_papers_schedule_and_thresholds_on_a_folder():
    config = apply_reference_recipe(validated(TrainConfig(data_dir="", recipe="reference")))
    config = resolve_thresholds(config, paper_dataset=False)
    config, schedule = resolve_schedule(config, 20, paper_dataset=False)
    assert {step: plan["epochs"] for step, plan in schedule.items()} == {
        "clusterbook": 1,
        "front_door": 2,
        "cluster_probe": 1,
    }
    assert (config.positive_threshold, config.negative_threshold) == (0.3, 0.1)
    assert (config.probe_init, config.probe_restarts) == ("random", 1)


@pytest.mark.parametrize(
    ("paper_dataset", "given", "expected"),
    [
        (True, {}, (0.3, 0.1)),
        (False, {}, (0.5, 0.3)),
        (False, {"positive_threshold": 0.2}, (0.2, 0.2)),  # a given value is kept, the other made to fit
        (False, {"negative_threshold": 0.6}, (0.6, 0.6)),
        (True, {"positive_threshold": 0.55, "negative_threshold": 0.1}, (0.55, 0.1)),
    ],
)
def test_concept_thresholds_fit_the_data(paper_dataset, given, expected):
    config = resolve_thresholds(TrainConfig(data_dir="", **given), paper_dataset)
    assert (config.positive_threshold, config.negative_threshold) == expected
