"""How the cluster probe's scores reach pixel size (ClusterProbe.score_map / label_map)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cause_cli.config import TrainConfig
from cause_cli.errors import CauseError
from cause_cli.inference.baselines import BaselineCentroids, baseline_maps
from cause_cli.model.heads import ClusterProbe
from cause_cli.model.whitening import FeatureWhitening
from cause_cli.resolve import apply_reference_recipe, validated

# A 2 x 2 map upsampled to 4 x 4 (bilinear, half-pixel centres): output pixel (1, 1) sits a
# quarter of the way from token (0, 0) towards token (1, 1) in both directions.
WEIGHTS_OF_PIXEL_1_1 = {(0, 0): 0.75 * 0.75, (0, 1): 0.75 * 0.25, (1, 0): 0.25 * 0.75, (1, 1): 0.25 * 0.25}


def probe_and_map(upsample_scores: bool, spread: bool, seed: int = 0) -> tuple[ClusterProbe, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(500, 6, generator=generator) * torch.linspace(0.2, 2.0, 6) + 0.5
    probe = ClusterProbe(6, 4, FeatureWhitening.fit(features), spread=spread, upsample_scores=upsample_scores)
    probe.centroids.data = torch.randn(4, 6, generator=generator)
    if spread:
        assert probe.precision is not None
        probe.precision.copy_(torch.rand(6, generator=generator) + 0.5)
    return probe, torch.randn(1, 6, 2, 2, generator=generator) * 2 + 0.5


@pytest.mark.parametrize("spread", [False, True], ids=["cosines", "spread"])
def test_upsampled_scores_are_the_bilinear_mean_of_the_tokens_scores(spread):
    probe, feature_map = probe_and_map(upsample_scores=True, spread=spread)
    scores = probe.score_map(feature_map, (4, 4))
    assert scores.shape == (1, 4, 4, 4)
    token_scores = {(y, x): probe.scores(feature_map[0, :, y, x]) for y in range(2) for x in range(2)}
    expected = sum(weight * token_scores[token] for token, weight in WEIGHTS_OF_PIXEL_1_1.items())
    torch.testing.assert_close(scores[0, :, 1, 1], expected)
    torch.testing.assert_close(scores[0, :, 0, 0], token_scores[(0, 0)])  # a corner takes its token's scores


@pytest.mark.parametrize("spread", [False, True], ids=["cosines", "spread"])
def test_upsampled_features_are_scored_as_the_paper_does(spread):
    probe, feature_map = probe_and_map(upsample_scores=False, spread=spread)
    scores = probe.score_map(feature_map, (4, 4))
    feature = sum(weight * feature_map[0, :, y, x] for (y, x), weight in WEIGHTS_OF_PIXEL_1_1.items())
    torch.testing.assert_close(scores[0, :, 1, 1], probe.scores(feature))


@pytest.mark.parametrize("spread", [False, True], ids=["cosines", "spread"])
@pytest.mark.parametrize("upsample_scores", [True, False], ids=["scores upsampled", "features upsampled"])
def test_a_label_map_is_the_argmax_of_the_score_map(upsample_scores, spread):
    probe, _ = probe_and_map(upsample_scores, spread)
    generator = torch.Generator().manual_seed(5)
    # Tokens of very different lengths, where a ranking that leaves lengths out would differ.
    feature_map = torch.randn(2, 6, 5, 7, generator=generator) * torch.rand(2, 1, 5, 7, generator=generator) * 4
    labels = probe.label_map(feature_map, (23, 31))
    assert labels.shape == (2, 23, 31)
    assert torch.equal(labels, probe.score_map(feature_map, (23, 31)).argmax(dim=1))


def test_the_two_upsamplings_differ_where_a_feature_between_two_regions_lands_nearer_a_third():
    probe, feature_map = probe_and_map(upsample_scores=True, spread=True)
    paper, _ = probe_and_map(upsample_scores=False, spread=True)
    generator = torch.Generator().manual_seed(1)
    feature_map = torch.randn(4, 6, 6, 6, generator=generator) * 3
    assert not torch.equal(probe.label_map(feature_map, (24, 24)), paper.label_map(feature_map, (24, 24)))


def test_scores_are_upsampled_by_default_and_the_reference_recipe_and_older_runs_upsample_features():
    assert TrainConfig(data_dir=".").probe_upsampling == "scores"
    reference = apply_reference_recipe(TrainConfig(data_dir=".", recipe="reference"))
    assert reference.probe_upsampling == "features"
    saved = TrainConfig(data_dir=".").to_dict()
    assert TrainConfig.from_dict(saved).probe_upsampling == "scores"
    del saved["probe_upsampling"]  # a run.json written before the choice existed
    assert TrainConfig.from_dict(saved).probe_upsampling == "features"
    with pytest.raises(CauseError, match="Unknown cluster-probe upsampling 'pixels'; choose scores or features"):
        validated(TrainConfig(data_dir=".", probe_upsampling="pixels"))


@pytest.mark.parametrize("upsample_scores", [True, False], ids=["scores upsampled", "features upsampled"])
def test_the_baselines_reach_pixels_as_the_run_does_for_the_head_and_by_cosines_for_the_tokens(upsample_scores):
    generator = torch.Generator().manual_seed(3)
    centroids = BaselineCentroids(
        tokens=torch.randn(5, 8, generator=generator), head=torch.randn(5, 6, generator=generator), images=1, points=1
    )
    tokens = torch.randn(2, 9, 8, generator=generator)
    head_map = torch.randn(2, 6, 3, 3, generator=generator) * torch.rand(2, 1, 3, 3, generator=generator) * 4
    on_tokens, on_head = baseline_maps(centroids, tokens, head_map, (13, 11), upsample_scores)

    def cosines(features, centres):  # [B, d, h, w] with [C, d] -> [B, C, h, w]
        return torch.einsum("bdhw,cd->bchw", F.normalize(features, dim=1), F.normalize(centres, dim=1))

    def upsample(grid):
        return F.interpolate(grid, size=(13, 11), mode="bilinear", align_corners=False)

    token_map = tokens.transpose(1, 2).reshape(2, 8, 3, 3)
    assert torch.equal(on_tokens, upsample(cosines(token_map, centroids.tokens)).argmax(dim=1))
    if upsample_scores:
        expected = upsample(cosines(head_map, centroids.head)).argmax(dim=1)
    else:
        expected = cosines(upsample(head_map), centroids.head).argmax(dim=1)
    assert torch.equal(on_head, expected)
