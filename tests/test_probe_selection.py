"""Step three's selections, tested by their effect (issue 33's sweep found them unpinned): which
random start is kept, how the refinement's learning rate falls, that the features k-means sees
are the ones inference computes, that a refined probe never keeps a spread, that the seed
reaches the k-means start, that a spread's probe holds the Gaussians' means, and that a run's
linear probe and upsampling are loaded as trained."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from cause_cli.config import TrainConfig
from cause_cli.data.synthetic import write_scenes
from cause_cli.inference.predict import load_trained
from cause_cli.model.kmeans import unit_rows
from cause_cli.model.spread import spread_ranking
from cause_cli.progress import Reporter
from cause_cli.runs import RunDirectory
from cause_cli.trained import build_heads, load_heads
from cause_cli.training import train
from cause_cli.training.cluster_probe import sample_teacher_features
from cause_cli.training.history import read_history
from cause_cli.training.pipeline import prepare
from cause_cli.training.probe_kinds import kmeans_start

from .test_cli import small_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"), num_train=16, num_val=2, seed=11, size_range=(64, 72))


def test_random_starts_keep_the_one_of_least_modularity_loss_and_the_rate_halves_every_second_epoch(scenes, tmp_path):
    run = tmp_path / "random"
    train(small_config(scenes, probe_init="random", probe_restarts=3, epochs_cluster_probe=3), run, "cpu")
    log = (run / "train.log").read_text()
    losses, kept, starts = re.search(r"last-epoch modularity loss ([-\d., ]+); kept start (\d+) of (\d+)", log).groups()
    losses = [float(value) for value in losses.split(", ")]
    assert int(starts) == len(losses) == 3
    assert int(kept) == 1 + min(range(3), key=losses.__getitem__)
    rates = {}
    for row in read_history(RunDirectory(run).file("history.csv")):
        if row["step"] == "cluster_probe":
            rates.setdefault(int(row["epoch"]), set()).add(float(row["learning_rate"]))
    assert rates == {1: {1e-3}, 2: {1e-3}, 3: {5e-4}}  # StepLR(step_size=2, gamma=0.5), as the reference's


@pytest.mark.parametrize("head", ["mlp", "tr"])
def test_the_sampled_features_are_those_inference_computes(scenes, tmp_path, head):
    config = small_config(scenes, num_classes=6, head=head)
    context = prepare(config, RunDirectory(tmp_path / "run"), "cpu", Reporter())
    heads = build_heads(context.config, context.backbone.dim, context.backbone.patch_size, context.num_classes)
    heads.set_clusterbook(torch.randn(context.config.clusterbook_size, context.backbone.dim))
    heads.train()  # as step three holds them: dropout on (the TR head's layers follow train())
    sampled = sample_teacher_features(context, heads, "sample")
    assert heads.training  # left as it was
    heads.eval()
    torch.testing.assert_close(sample_teacher_features(context, heads, "sample"), sampled, rtol=0, atol=0)


def test_kmeans_clusters_the_whitened_features_the_probe_scores(scenes, tmp_path):
    """The k-means start's centroids are a fixed point of k-means on the sample as the probe
    sees it, whitened: each centroid is the direction of the mean of the points it claims."""
    run = tmp_path / "run"
    train(small_config(scenes, num_classes=6, probe_spread="off"), run, "cpu")
    config = RunDirectory(run).config()
    context = prepare(config, RunDirectory(tmp_path / "again"), "cpu", Reporter())
    heads = load_heads(RunDirectory(run), config, context.backbone.dim, context.backbone.patch_size, 6, CPU)
    points = sample_teacher_features(context, heads.train(), "sample")  # the sample step three drew
    probe = load_trained(RunDirectory(run), CPU).cluster_probe
    assert probe.whitening is not None
    with torch.no_grad():
        unit = unit_rows(probe.whitening(points))
        centroids = probe.centroids.detach()
        claimed = (unit @ centroids.T).argmax(1)
        directions = unit_rows(torch.stack([unit[claimed == cluster].mean(0) for cluster in range(6)]))
    assert (directions * centroids).sum(1).min() > 0.99


def spread_everywhere(monkeypatch):
    monkeypatch.setattr("cause_cli.training.probe_kinds.uses_spread", lambda choice, agreement: True)


def test_a_refined_kmeans_probe_never_keeps_a_spread(scenes, tmp_path, monkeypatch):
    spread_everywhere(monkeypatch)  # as if the fits disagreed
    refined, fixed = tmp_path / "refined", tmp_path / "fixed"
    train(small_config(scenes, probe_refine=True), refined, "cpu")
    train(small_config(scenes, probe_upsampling="features"), fixed, "cpu")
    assert "precision" not in RunDirectory(refined).load_tensors("probe.safetensors")
    assert "precision" in RunDirectory(fixed).load_tensors("probe.safetensors")  # the patch does reach it
    # The run's upsampling reaches the probe inference loads, and its linear probe is the file's.
    for run, upsample_scores in ((refined, True), (fixed, False)):
        model = load_trained(RunDirectory(run), CPU)
        assert model.cluster_probe.upsample_scores is upsample_scores
        saved = RunDirectory(run).load_tensors("probe.safetensors")
        for key, value in model.linear_probe.state_dict().items():
            torch.testing.assert_close(value, saved[f"linear_probe.{key}"], rtol=0, atol=0)


def start_context(seed: int = 0, spread: str = "off") -> SimpleNamespace:
    config = TrainConfig(
        data_dir=".", reduced_dim=8, seed=seed, probe_restarts=1, probe_consensus=0, probe_spread=spread
    )
    return SimpleNamespace(config=config, num_classes=5, run=SimpleNamespace(log=lambda line: None))


def test_the_seed_reaches_the_kmeans_start():
    points = torch.randn(600, 8, generator=torch.Generator().manual_seed(0))  # no clusters: the start decides
    first = kmeans_start(start_context(seed=0), points, None).centroids
    torch.testing.assert_close(kmeans_start(start_context(seed=0), points, None).centroids, first, rtol=0, atol=0)
    assert not torch.allclose(kmeans_start(start_context(seed=1), points, None).centroids, first)


def test_with_a_spread_the_probe_holds_the_gaussians_means():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 8, generator=generator) * 3
    points = (centres[:, None] + torch.randn(5, 120, 8, generator=generator)).flatten(0, 1)
    probe = kmeans_start(start_context(spread="on"), points, None)
    assert probe.precision is not None
    unit = unit_rows(points)
    labels = spread_ranking(unit, probe.centroids.detach(), probe.precision).argmax(1)
    means = torch.stack([unit[labels == cluster].mean(0) for cluster in range(5)])
    torch.testing.assert_close(probe.centroids.detach(), means, rtol=0, atol=0.02)
    assert probe.centroids.norm(dim=1).max() < 0.99  # means of unit vectors, not unit k-means centroids
