"""`--recipe reference` copies the reference's training recipe (METHOD.md section 7), label
leak included; the default recipe keeps labels out (see test_cli for that side)."""

from __future__ import annotations

import json

import pytest
import torch

from cause_cli.config import TrainConfig, apply_reference_recipe
from cause_cli.data.synthetic import write_scenes
from cause_cli.errors import CauseError
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
    config = TrainConfig(data_dir="", dataset=dataset, head=head, recipe="reference")
    apply_reference_recipe(config)
    assert config.learning_rate == pytest.approx(4e-3) and config.epoch_fraction == 0.25
    assert config.grad_clip == clip and config.weight_decay == weight_decay
    assert config.front_door_resolution == front_door_resolution
    assert config.epochs_cluster_probe == (1 if head == "mlp" else 5)


def test_default_recipe_is_untouched():
    config = TrainConfig(data_dir="")
    apply_reference_recipe(config)
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


def test_reference_recipe_trains_a_quarter_of_each_epoch(scenes, tmp_path):
    from cause_cli.progress import Reporter

    class Counting(Reporter):
        def __init__(self) -> None:
            self.totals: dict[str, int | None] = {}

        def task(self, description, total):
            self.totals[description] = total
            return super().task(description, total)

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
