"""`--cache-features`: the frozen backbone runs once per training image across all epochs and
steps; the disk it needs is said up front and a disk that cannot hold it is refused."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch

from cause_cli.backbones import FrozenBackbone
from cause_cli.config import TrainConfig
from cause_cli.data.synthetic import write_scenes
from cause_cli.errors import CauseError
from cause_cli.runs import RunDirectory
from cause_cli.training import train
from cause_cli.training.feature_cache import FeatureCache


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"), num_train=12, num_val=2, seed=5, size_range=(64, 72))


def config(scenes, **overrides) -> TrainConfig:
    settings = dict(data_dir=str(scenes), resolution=64, clusterbook_size=16, projection_dim=32, batch_size=4,
                    epochs_clusterbook=2, epochs_front_door=2, epochs_cluster_probe=2)  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def test_backbone_runs_once_per_image(scenes, tmp_path, monkeypatch):
    images_seen = []
    original = FrozenBackbone.forward

    def counting(self, images):
        images_seen.append(images.shape[0])
        return original(self, images)

    monkeypatch.setattr(FrozenBackbone, "forward", counting)
    train(config(scenes, cache_features=True), tmp_path / "cached", "cpu")
    # 6 epochs and the cluster probe's k-means pass over 12 images: the backbone saw each once
    assert sum(images_seen) == 12
    images_seen.clear()
    train(config(scenes), tmp_path / "plain", "cpu")
    assert sum(images_seen) == 7 * 12
    assert "feature cache:" in (tmp_path / "cached" / "train.log").read_text()
    cached = RunDirectory(tmp_path / "cached").load_tensors("clusterbook.safetensors")["clusterbook"]
    plain = RunDirectory(tmp_path / "plain").load_tensors("clusterbook.safetensors")["clusterbook"]
    # float16 tokens: close to, not equal to, the float32 run
    torch.testing.assert_close(cached, plain, rtol=0.05, atol=1e-3)


def test_cache_round_trip(tmp_path):
    cache = FeatureCache(tmp_path, images=5, tokens=4, dim=3)
    assert cache.get(torch.tensor([0, 1])) is None
    values = torch.randn(2, 4, 3)
    cache.put(torch.tensor([3, 1]), values)
    torch.testing.assert_close(cache.get(torch.tensor([3, 1])), values.half().float())
    assert cache.get(torch.tensor([1, 2])) is None
    reopened = FeatureCache(tmp_path, images=5, tokens=4, dim=3)  # what a resumed run finds
    torch.testing.assert_close(reopened.get(torch.tensor([1])), values[1:].half().float())


def test_a_disk_too_small_is_refused(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 1000))
    with pytest.raises(CauseError, match=r"needs .* GiB .* only"):
        FeatureCache(tmp_path, images=1000, tokens=1600, dim=384)
