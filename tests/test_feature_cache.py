"""`--cache-features`: the frozen backbone runs once per training image across all epochs and
steps; `auto` (the default) chooses it where the tokens are read more than once and fit, and
says why; the disk it needs is said up front and a disk that cannot hold it is refused."""

from __future__ import annotations

import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch

from cause_cli.backbones import FrozenBackbone
from cause_cli.config import TrainConfig
from cause_cli.data import base
from cause_cli.data.synthetic import write_scenes
from cause_cli.errors import CauseError
from cause_cli.feature_cache import FeatureCache
from cause_cli.resolve import validated
from cause_cli.runs import RunDirectory
from cause_cli.training import train
from cause_cli.training.feature_cache import choose_feature_cache

from .helpers import assert_same_weights


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

    decoded = []
    original_read = base.read_image

    def counting_reads(path, *args, **kwargs):
        decoded.append(path)
        return original_read(path, *args, **kwargs)

    monkeypatch.setattr(FrozenBackbone, "forward", counting)
    monkeypatch.setattr(base, "read_image", counting_reads)
    train(config(scenes, cache_features="on"), tmp_path / "cached", "cpu")
    # 6 epochs and the cluster probe's k-means pass over 12 images: the backbone saw each once,
    # and each image was decoded once (later epochs read only its label)
    assert sum(images_seen) == 12
    assert len(decoded) == 12 and len(set(decoded)) == 12
    images_seen.clear()
    train(config(scenes, cache_features="off"), tmp_path / "plain", "cpu")
    assert sum(images_seen) == 7 * 12
    assert "feature cache:" in (tmp_path / "cached" / "train.log").read_text()


@pytest.mark.parametrize("setting", ["on", "auto"])
def test_a_cached_run_learns_what_a_run_on_float16_tokens_learns(scenes, tmp_path, monkeypatch, setting):
    """The cache stores float16 tokens: every step of a cached run (asked for, or chosen by the
    default) must see exactly what an uncached run whose backbone rounds its tokens to float16
    sees, so the two runs' weights (clusterbook, heads, cluster probe and its whitening,
    linear probe) agree to float32 rounding; a cache that stored or returned the wrong tokens,
    or other images', would not."""
    cached_config = config(scenes) if setting == "auto" else config(scenes, cache_features=setting)
    train(cached_config, tmp_path / "cached", "cpu")
    why = "each image's tokens are read 7 times" if setting == "auto" else "--cache-features on"
    assert f"; feature cache on ({why}" in (tmp_path / "cached" / "train.log").read_text()
    original = FrozenBackbone.forward
    monkeypatch.setattr(FrozenBackbone, "forward", lambda self, images: original(self, images).half().float())
    train(config(scenes, cache_features="off"), tmp_path / "rounded", "cpu")
    assert_same_weights(tmp_path / "cached", tmp_path / "rounded", rtol=1e-5, atol=1e-6)
    cached = RunDirectory(tmp_path / "cached").load_tensors("probe.safetensors")
    rounded = RunDirectory(tmp_path / "rounded").load_tensors("probe.safetensors")
    assert cached.keys() == rounded.keys() and "whitening.matrix" in cached
    for key in cached:
        torch.testing.assert_close(cached[key], rounded[key], rtol=1e-5, atol=1e-6, msg=key)


def test_auto_leaves_the_cache_off_where_the_disk_cannot_hold_it(scenes, tmp_path, monkeypatch):
    """Where the tokens do not fit, `auto` trains without the cache (the backbone runs in every
    epoch) and says so and why, where `on` refuses before anything is written."""
    images_seen = []
    original = FrozenBackbone.forward

    def counting(self, images):
        images_seen.append(images.shape[0])
        return original(self, images)

    monkeypatch.setattr(FrozenBackbone, "forward", counting)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))
    train(config(scenes), tmp_path / "small-disk", "cpu")
    log = (tmp_path / "small-disk" / "train.log").read_text()
    assert "; feature cache off (the 0.1 MiB it needs and 1.0 GiB to spare are more than the 1.0 MiB free" in log
    assert sum(images_seen) == 7 * 12
    assert not (tmp_path / "small-disk" / "feature-cache").exists()
    with pytest.raises(CauseError, match="The feature cache needs"):
        train(config(scenes, cache_features="on"), tmp_path / "asked", "cpu")


@pytest.mark.parametrize(
    ("setting", "reads", "needed", "free_disk", "device", "free_memory", "chosen", "why"),
    [
        ("auto", 7, 2**20, 2**40, "cpu", None, True, "each image's tokens are read 7 times; 1.0 MiB on disk"),
        ("auto", 1, 2**20, 2**40, "cpu", None, False, "each image's tokens are read once"),
        ("auto", 0.5, 2**20, 2**40, "cpu", None, False, "each image's tokens are read once"),
        ("auto", 3, 2**35, 2**35 + 2**31, "cpu", None, False, "is more than half of the 34.0 GiB free"),
        ("auto", 3, 2**20, 2**30, "cpu", None, False, "1.0 GiB to spare are more than the 1.0 GiB free"),
        ("auto", 3, 2**34, 2**40, "cuda", 2**36, True, "read 3 times; 16.0 GiB on disk"),
        ("auto", 3, 2**34, 2**40, "cuda", 2**34, False, "over half the free memory (16.0 GiB)"),
        ("auto", 3, 2**34, 2**40, "cuda", None, False, "over half the free memory (unknown)"),
        ("on", 1, 2**20, 2**30, "cpu", None, True, "--cache-features on"),
        ("off", 9, 2**20, 2**40, "cpu", None, False, "--cache-features off"),
    ],
)
def test_the_cache_choice(setting, reads, needed, free_disk, device, free_memory, chosen, why):
    decided, reason = choose_feature_cache(setting, reads, needed, free_disk, device, free_memory)
    assert decided is chosen and why in reason


def test_every_pass_over_the_images_is_counted_at_its_resolution(scenes):
    plain = validated(config(scenes, resolution=64))
    assert plain.passes_over_images() == {64: 2 + 2 + 2 + 1}  # three steps and the k-means sample
    split = validated(config(scenes, resolution=64, front_door_resolution=32, epoch_fraction=0.5))
    assert split.passes_over_images() == {64: 1.0, 32: 1.0 + 1.0 + 1}


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
    with pytest.raises(CauseError, match=r"needs .* GiB .* only .* --cache-features off"):
        FeatureCache(tmp_path, images=1000, tokens=1600, dim=384)


class _FlushRecorder:
    """Stands in for the cache's mmap to record which byte ranges each write flushes."""

    def __init__(self, real):
        self.real, self.ranges = real, []

    def flush(self, offset=0, size=None):
        self.ranges.append((offset, size))
        return self.real.flush(offset, size)


def test_a_write_flushes_only_the_rows_it_wrote(tmp_path):
    cache = FeatureCache(tmp_path, images=64, tokens=16, dim=32)
    recorder = _FlushRecorder(cache._map)
    cache._map = recorder
    tokens = torch.randn(2, 16, 32)
    cache.put(torch.tensor([40, 3]), tokens)
    row_bytes = 16 * 32 * 2
    assert len(recorder.ranges) == 2 and all(size is not None for _, size in recorder.ranges)
    covered = sorted((offset, offset + size) for offset, size in recorder.ranges)
    for row in (3, 40):
        assert any(start <= row * row_bytes and (row + 1) * row_bytes <= end for start, end in covered)
    assert sum(size for _, size in recorder.ranges) < 64 * row_bytes / 4
    reopened = FeatureCache(tmp_path, images=64, tokens=16, dim=32)
    torch.testing.assert_close(reopened.get(torch.tensor([40, 3])), tokens.half().float())


def test_a_cache_cut_short_is_made_again(tmp_path):
    cache = FeatureCache(tmp_path, images=4, tokens=8, dim=6)
    cache.put(torch.tensor([0, 1, 2, 3]), torch.randn(4, 8, 6))
    del cache
    (path,) = tmp_path.glob("*.f16")
    with open(path, "r+b") as opened:
        opened.truncate(path.stat().st_size // 2)
    reopened = FeatureCache(tmp_path, images=4, tokens=8, dim=6)
    assert reopened.damaged == 4 and not reopened.has(torch.arange(4)).any()
    assert path.stat().st_size == 4 * 8 * 6 * 2
    assert reopened.get(torch.tensor([0])) is None


def test_changed_bytes_in_the_cache_are_found_and_only_their_image_computed_again(tmp_path):
    values = torch.randn(4, 8, 6)
    cache = FeatureCache(tmp_path, images=4, tokens=8, dim=6)
    cache.put(torch.tensor([0, 1, 2, 3]), values)
    del cache
    (path,) = tmp_path.glob("*.f16")
    with open(path, "r+b") as opened:
        opened.seek(2 * 8 * 6 * 2 + 10)  # inside image 2's tokens
        opened.write(b"\x00\x7c")
    reopened = FeatureCache(tmp_path, images=4, tokens=8, dim=6)
    assert reopened.damaged == 1
    assert reopened.has(torch.arange(4)).tolist() == [True, True, False, True]
    assert reopened.get(torch.tensor([2])) is None
    torch.testing.assert_close(reopened.get(torch.tensor([3, 0])), values[[3, 0]].half().float())


def test_eval_baselines_read_the_tokens_the_training_cached(scenes, tmp_path, monkeypatch):
    """k-means baselines on the training split read the run's cached tokens instead of running
    the backbone again, and fit what the backbone's float16-rounded tokens give; images the
    cache lacks are computed, and only those."""
    from cause_cli.inference.baselines import fit_baselines
    from cause_cli.inference.predict import load_trained
    from cause_cli.runs import open_run

    run = train(config(scenes, cache_features="on"), tmp_path / "cached", "cpu")
    model = load_trained(open_run(run.path), torch.device("cpu"))
    images_seen = []
    original = FrozenBackbone.forward

    def rounding(self, images):
        images_seen.append(images.shape[0])
        return original(self, images).half().float()

    monkeypatch.setattr(FrozenBackbone, "forward", rounding)
    from_cache = fit_baselines(model, batch_size=4, run_path=run.path)
    assert images_seen == []
    recomputed = fit_baselines(model, batch_size=4)
    assert sum(images_seen) == 12
    torch.testing.assert_close(from_cache.tokens, recomputed.tokens)
    torch.testing.assert_close(from_cache.head, recomputed.head)

    (flags,) = (run.path / "feature-cache").rglob("*.filled")
    lacking = np.fromfile(flags, dtype=np.uint8)
    lacking[[2, 7]] = 0
    lacking.tofile(flags)
    images_seen.clear()
    partly = fit_baselines(model, batch_size=4, run_path=run.path)
    assert sum(images_seen) == 2
    torch.testing.assert_close(partly.tokens, recomputed.tokens)
    torch.testing.assert_close(partly.head, recomputed.head)
