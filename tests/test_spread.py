"""Step three's shared-spread clusters (model/spread.py) and the gate that chooses them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cause_cli.model.heads import CRF_SHARPNESS, ClusterProbe
from cause_cli.model.kmeans import mean_agreement, partition_agreement
from cause_cli.model.spread import AGREEMENT_THRESHOLD, fit_shared_spread, spread_scores, uses_spread
from cause_cli.model.whitening import FeatureWhitening


def slow_shared_spread(unit, labels, k, iterations, shrinkage):
    """EM written the obvious way: per-cluster variances pooled by weight, then each point's
    posterior from its explicit squared differences."""
    responsibilities = F.one_hot(labels, k).double()
    for _ in range(iterations):
        means, variances, weights = [], [], []
        for cluster in range(k):
            weight = responsibilities[:, cluster]
            mean = (weight[:, None] * unit).sum(0) / weight.sum()
            means.append(mean)
            variances.append((weight[:, None] * (unit - mean) ** 2).sum(0))
            weights.append(weight.sum())
        pooled = torch.stack(variances).sum(0) / torch.stack(weights).sum()
        pooled = (1 - shrinkage) * pooled + shrinkage * pooled.mean()
        centre = torch.stack(means)
        log_density = torch.stack([-0.5 * (((point - centre) ** 2) / pooled).sum(-1) for point in unit])  # [N, K]
        responsibilities = torch.softmax(log_density, dim=1)
    return centre, 1 / pooled


def points_in_blobs(seed, count=300, dim=6, k=3, spread=0.6):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, k, (count,), generator=generator)
    widths = torch.rand(dim, generator=generator, dtype=torch.float64) * spread + 0.1
    points = centres[labels] + torch.randn(count, dim, generator=generator, dtype=torch.float64) * widths
    return F.normalize(points, dim=-1), labels


@pytest.mark.parametrize("shrinkage", [0.0, 0.5])
def test_shared_spread_em_is_the_obvious_em(shrinkage):
    unit, labels = points_in_blobs(0)
    # A start that is not the answer, so the iterations have work to do.
    start = torch.where(torch.arange(len(labels)) % 7 == 0, (labels + 1) % 3, labels)
    fitted = fit_shared_spread(unit, start, 3, iterations=5, shrinkage=shrinkage)
    means, precision = slow_shared_spread(unit, start, 3, 5, shrinkage)
    torch.testing.assert_close(fitted.means, means)
    torch.testing.assert_close(fitted.precision, precision)


def test_spread_scores_are_log_densities_of_one_shared_diagonal_covariance():
    generator = torch.Generator().manual_seed(1)
    unit = F.normalize(torch.randn(2, 5, 4, generator=generator, dtype=torch.float64), dim=-1)
    means = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    precision = torch.rand(4, generator=generator, dtype=torch.float64) + 0.5
    expected = -0.5 * (((unit[..., None, :] - means) ** 2) * precision).sum(-1)
    torch.testing.assert_close(spread_scores(unit, means, precision), expected)


def spread_probe(seed=2, dim=6, k=4):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(200, dim, generator=generator)
    probe = ClusterProbe(dim, k, FeatureWhitening.fit(features), spread=True)
    assert probe.precision is not None
    probe.centroids.data.copy_(torch.randn(k, dim, generator=generator) * 0.3)
    probe.precision.copy_(torch.rand(dim, generator=generator) * 4 + 1)
    return probe, torch.randn(3, 50, dim, generator=generator)


def test_a_probe_with_a_spread_scores_and_ranks_its_unit_whitened_tokens():
    probe, tokens = spread_probe()
    assert probe.precision is not None
    unit = F.normalize(probe.whitening(tokens), dim=-1)
    expected = -0.5 * (((unit[..., None, :] - probe.centroids) ** 2) * probe.precision).sum(-1)
    torch.testing.assert_close(probe.scores(tokens), expected)
    assert torch.equal(probe.assign(tokens), expected.argmax(-1))
    # The ranking leaves out a constant of each token, so it orders the clusters alike.
    difference = probe.ranking(tokens) - probe.scores(tokens)
    torch.testing.assert_close(difference, difference[..., :1].expand_as(difference))
    assert torch.equal(probe.ranking(tokens).argmax(-1), expected.argmax(-1))
    # The dense CRF starts from the posterior, not from softmax(3 x log-density).
    assert probe.sharpness == 1.0 and ClusterProbe(6, 4).sharpness == CRF_SHARPNESS


def test_a_probe_with_a_spread_saves_and_loads_it():
    probe, tokens = spread_probe()
    state = probe.state_dict()
    assert "precision" in state and "precision" not in ClusterProbe(6, 4, FeatureWhitening(6)).state_dict()
    loaded = ClusterProbe(6, 4, FeatureWhitening(6), spread="precision" in state)
    loaded.load_state_dict(state)
    torch.testing.assert_close(loaded.scores(tokens), probe.scores(tokens))


def test_partition_agreement_matches_clusters_one_to_one():
    first = torch.tensor([0, 0, 1, 1, 2])
    second = torch.tensor([1, 1, 0, 2, 2])
    # 0 -> 1 (2 points), 1 -> 0 (1), 2 -> 2 (1): 4 of 5 points.
    assert partition_agreement(first, second, 3) == pytest.approx(0.8)
    relabelled = (first + 1) % 3
    assert mean_agreement([first, relabelled, first], 3) == pytest.approx(1.0)
    assert mean_agreement([first, second, first], 3) == pytest.approx((0.8 + 1.0 + 0.8) / 3)


def test_the_spread_is_used_where_the_fits_agree_on_too_few_points():
    assert uses_spread("auto", AGREEMENT_THRESHOLD - 0.01)
    assert not uses_spread("auto", AGREEMENT_THRESHOLD + 0.01)
    assert not uses_spread("auto", None)  # no consensus, no agreement measured
    assert uses_spread("on", 1.0) and not uses_spread("off", 0.0)
