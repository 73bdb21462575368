"""A cluster model with a spread, for step three where k-means' fits disagree.

Spherical k-means gives every cluster the same spread in every direction. Where classes differ
only in texture, its single-start fits land in many near-equal optima and agree on far fewer
points than where classes differ in colour (docs/quality.md: 66-82 % of training tokens
against 90-100 %). There, a Gaussian mixture whose components share one diagonal covariance
(each direction its own spread, the same for every cluster) and have equal weights, fitted by
EM from the k-means partition on the unit feature vectors, finds the textures more often: a
cluster's score is ``-1/2 sum_d (z_d - mu_cd)^2 / s_d^2``. The covariance is shrunk halfway to
its mean: on the tuning runs that scored a little higher than no shrinkage, a floor on the
variances or hard assignments. Where the fits agree, k-means' partition is kept
(the mixture there costs 1-3 points). The threshold and the shrinkage were chosen on the
tuning families only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kmeans import ASSIGN_CHUNK

# Below this mean agreement between the k-means fits, step three uses the spread model.
AGREEMENT_THRESHOLD = 0.85
SPREAD_ITERATIONS = 30
SPREAD_SHRINKAGE = 0.5


def uses_spread(setting: str, agreement: float | None) -> bool:
    """Whether step three's clusters get a spread: ``setting`` ``"on"``, or ``"auto"`` and the
    consensus' fits (``agreement``, None without a consensus) agree on too few points."""
    if setting == "auto":
        return agreement is not None and agreement < AGREEMENT_THRESHOLD
    return setting == "on"


@dataclass
class SharedSpreadModel:
    means: torch.Tensor  # [K, d]
    precision: torch.Tensor  # [d], one over each direction's variance, shared by every cluster


def spread_ranking(unit: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """:func:`spread_scores` less each point's own ``-1/2 sum_d z_d^2 p_d``, the same for every
    cluster: it orders the clusters (and gives the posterior) as the scores do."""
    weighted = means * precision
    return unit @ weighted.T - 0.5 * (means * weighted).sum(-1)


def spread_scores(unit: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``-1/2 sum_d (z_d - mu_cd)^2 p_d`` of every unit point ``z [..., d]`` and cluster:
    ``[..., K]``, expanded so that no ``[..., K, d]`` difference is formed."""
    return spread_ranking(unit, means, precision) - 0.5 * (unit.square() @ precision)[..., None]


def fit_shared_spread(
    unit: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    iterations: int = SPREAD_ITERATIONS,
    shrinkage: float = SPREAD_SHRINKAGE,
) -> SharedSpreadModel:
    """EM for equal-weight Gaussians of one shared diagonal covariance on ``unit [N, d]``,
    started from the partition ``labels [N]``: responsibilities, then each cluster's weighted
    mean and the pooled within-cluster variance of each direction (shrunk toward their mean
    by ``shrinkage``), ``iterations`` times."""
    responsibilities = torch.zeros(len(unit), k, dtype=unit.dtype).scatter_(1, labels[:, None], 1.0)
    model = SharedSpreadModel(unit.new_zeros(k, unit.shape[1]), unit.new_ones(unit.shape[1]))
    squares = unit.square().sum(0)
    for _ in range(iterations):
        weights = responsibilities.sum(0).clamp_min(1e-6)
        means = responsibilities.T @ unit / weights[:, None]
        # Pooled over clusters, sum_c sum_n r_nc (z_n - mu_c)^2 = sum_n z_n^2 - sum_c w_c mu_c^2.
        variance = (squares - (weights[:, None] * means.square()).sum(0)) / weights.sum()
        variance = ((1 - shrinkage) * variance + shrinkage * variance.mean()).clamp_min(1e-12)
        model = SharedSpreadModel(means, 1.0 / variance)
        responsibilities = torch.cat(
            [
                torch.softmax(spread_ranking(unit[start : start + ASSIGN_CHUNK], means, model.precision), dim=1)
                for start in range(0, len(unit), ASSIGN_CHUNK)
            ]
        )
    return model
