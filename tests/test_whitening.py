"""The cluster probe's whitened space (docs/quality.md): a PCA whitening of unit-length head
features, fitted without labels, saved with the centroids and applied at inference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cause_cli.config import DEFAULT_PROBE_CONSENSUS, TrainConfig
from cause_cli.data.synthetic import write_scenes
from cause_cli.errors import CauseError
from cause_cli.inference.predict import load_trained
from cause_cli.model.heads import ClusterProbe
from cause_cli.model.ops import cosine_similarity_matrix
from cause_cli.model.whitening import FeatureWhitening
from cause_cli.resolve import apply_reference_recipe, validated
from cause_cli.runs import RunDirectory
from cause_cli.training import train

from .test_cli import small_config


def test_whitened_sample_has_zero_mean_and_unit_covariance():
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    features = torch.randn(20_000, 6, generator=generator) * scales + torch.tensor([3.0, 0, 0, 0, 0, 0])
    whitening = FeatureWhitening.fit(features, floor=1e-12)
    whitened = whitening(features).double()
    assert whitened.mean(dim=0).abs().max() < 1e-4
    covariance = torch.cov(whitened.T)
    torch.testing.assert_close(covariance, torch.eye(6, dtype=torch.float64), atol=1e-3, rtol=0)


def test_whitening_by_hand_on_two_directions():
    # Unit vectors at angles +-a around the x axis: mean (cos a, 0), variance sin(a)^2 along y
    # only, so the y coordinate is divided by sqrt(sin(a)^2 * n / (n - 1) + floor * that).
    angle = 0.3
    features = torch.tensor([[math.cos(angle), math.sin(angle)], [math.cos(angle), -math.sin(angle)]] * 50)
    floor = 1e-3
    whitening = FeatureWhitening.fit(features * 7.0, floor=floor)  # lengths do not matter
    variance = math.sin(angle) ** 2 * 100 / 99
    expected_y = math.sin(angle) / math.sqrt(variance * (1 + floor))
    whitened = whitening(features[:2])
    torch.testing.assert_close(whitened[:, 1].abs(), torch.full((2,), expected_y), rtol=1e-5, atol=1e-6)
    # The x direction has no variance: it is divided by the floor alone, and centred to 0.
    torch.testing.assert_close(whitened[:, 0], torch.zeros(2), rtol=0, atol=1e-3)


def test_probe_cosines_are_taken_in_the_whitened_space():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(500, 8, generator=generator) * torch.linspace(0.1, 3.0, 8)
    whitening = FeatureWhitening.fit(features)
    probe = ClusterProbe(8, 4, whitening)
    tokens = torch.randn(2, 10, 8, generator=generator)
    slow = F.normalize((F.normalize(tokens, dim=-1) - whitening.mean) @ whitening.matrix, dim=-1)
    expected = slow @ F.normalize(probe.centroids, dim=-1).T
    torch.testing.assert_close(probe.cosine(tokens), expected, rtol=1e-5, atol=1e-6)
    plain = ClusterProbe(8, 4)
    assert torch.equal(plain.cosine(tokens), cosine_similarity_matrix(tokens, plain.centroids))
    assert set(probe.state_dict()) == {"centroids", "whitening.mean", "whitening.matrix"}
    assert set(plain.state_dict()) == {"centroids"}


@pytest.mark.parametrize("whitened", [True, False], ids=["whitened", "head space"])
def test_the_label_maps_cheap_ranking_picks_the_cluster_of_highest_cosine(whitened):
    # Label maps take the argmax of ClusterProbe.ranking instead of the cosines: it must be
    # the same cluster for every token, its scores the cosines times the token's length in
    # the probe's space (the same for every cluster, so the order is the cosines').
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2_000, 12, generator=generator) * torch.linspace(0.05, 2.0, 12) + 0.7
    probe = ClusterProbe(12, 7, FeatureWhitening.fit(features) if whitened else None)
    probe.centroids.data = torch.randn(7, 12, generator=generator) * torch.linspace(0.5, 3.0, 7)[:, None]
    tokens = (torch.randn(3, 4_000, 12, generator=generator) * torch.linspace(0.05, 2.0, 12) + 0.7) * 5
    cosines, ranking = probe.cosine(tokens), probe.ranking(tokens)
    assert torch.equal(ranking.argmax(dim=-1), cosines.argmax(dim=-1))
    length = probe.space(tokens).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(ranking, cosines * length, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"), num_train=16, num_val=4, seed=3, size_range=(64, 80))


def test_the_default_run_saves_its_whitening_and_inference_applies_it(scenes, tmp_path):
    whitened, head = tmp_path / "whitened", tmp_path / "head"
    train(small_config(scenes), whitened, "cpu")
    train(small_config(scenes, probe_space="head", probe_upsampling="features"), head, "cpu")
    probe_file = RunDirectory(whitened).load_tensors("probe.safetensors")
    model = load_trained(RunDirectory(whitened), torch.device("cpu"))
    assert model.cluster_probe.whitening is not None
    assert model.cluster_probe.upsample_scores  # the run's default, which inference follows
    assert torch.equal(model.cluster_probe.whitening.matrix, probe_file["whitening.matrix"])
    assert torch.equal(model.cluster_probe.whitening.mean, probe_file["whitening.mean"])
    # Step three saw the same head features in both runs; only the space differs.
    assert set(RunDirectory(head).load_tensors("probe.safetensors")) == {"centroids"} | {
        key for key in probe_file if key.startswith("linear_probe.")
    }
    head_probe = load_trained(RunDirectory(head), torch.device("cpu")).cluster_probe
    assert head_probe.whitening is None and not head_probe.upsample_scores
    assert torch.equal(
        RunDirectory(head).load_tensors("head.safetensors")["teacher.projection.linear_branch.weight"],
        RunDirectory(whitened).load_tensors("head.safetensors")["teacher.projection.linear_branch.weight"],
    )


def test_head_space_and_the_reference_recipe_do_not_whiten():
    assert TrainConfig(data_dir=".").probe_space == "whitened"
    reference = apply_reference_recipe(TrainConfig(data_dir=".", recipe="reference"))
    assert reference.probe_space == "head"


def test_the_consensus_start_reaches_the_saved_probe(scenes, tmp_path):
    consensus = tmp_path / "consensus"
    train(small_config(scenes, probe_consensus=4, probe_spread="off"), consensus, "cpu")
    log = (consensus / "train.log").read_text()
    assert "k-means start, consensus of 4 single-start fits" in log
    model = load_trained(RunDirectory(consensus), torch.device("cpu"))
    assert model.cluster_probe.whitening is not None
    torch.testing.assert_close(model.cluster_probe.centroids.norm(dim=1), torch.ones(model.num_classes))


def resolved(**settings) -> TrainConfig:
    """Settings resolved in the order training resolves them: checked, the recipe, checked again."""
    return validated(apply_reference_recipe(validated(TrainConfig(data_dir=".", **settings))))


def test_the_consensus_is_the_default_k_means_start_and_restarts_alone_turn_it_off():
    assert resolved().probe_consensus == DEFAULT_PROBE_CONSENSUS == 16
    assert (resolved(probe_restarts=32).probe_consensus, resolved(probe_restarts=32).probe_restarts) == (0, 32)
    assert resolved(probe_restarts=32, probe_consensus=8).probe_consensus == 8
    assert resolved(probe_init="random").probe_consensus == 0
    assert resolved(recipe="reference").probe_consensus == 0
    with pytest.raises(CauseError, match="needs the k-means start"):
        validated(TrainConfig(data_dir=".", probe_init="random", probe_consensus=4))
    with pytest.raises(CauseError, match="at least 0"):
        validated(TrainConfig(data_dir=".", probe_consensus=-1))


def test_the_default_floor_is_a_thousandth_of_the_largest_variance():
    # As docs/train.md documents it: a direction without variance is divided by sqrt(1e-3 * the largest).
    angle = 0.3
    features = torch.tensor([[math.cos(angle), math.sin(angle)], [math.cos(angle), -math.sin(angle)]] * 50)
    whitening = FeatureWhitening.fit(features)
    variance = math.sin(angle) ** 2 * 100 / 99
    scale_without_variance = whitening.matrix.double().abs().max().item()  # the largest scale
    assert scale_without_variance == pytest.approx(1 / math.sqrt(1e-3 * variance), rel=1e-5)
