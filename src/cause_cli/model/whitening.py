"""The whitening of the head's features that step three's cluster probe clusters in
(docs/quality.md: "The whitened cluster probe")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The smallest variance whitening divides by, as a share of the largest: directions the head
# keeps almost nothing in are not blown up into noise (1e-2 to 1e-4 measured alike).
WHITENING_FLOOR = 1e-3


class FeatureWhitening(nn.Module):
    """ZCA whitening of unit-length features: ``x -> (x / |x| - mu) V diag(1 / sqrt(lambda)) V^T``.

    Fitted without labels on a sample of the teacher head's features, it gives every direction
    of the head's feature space the same variance. The front door concentrates the features in
    a narrow cone (mean cosine to their cluster's centre above 0.98) where the directions that
    separate similar classes carry little variance; spherical k-means on the whitened features
    finds them (docs/quality.md).
    """

    mean: torch.Tensor
    matrix: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("matrix", torch.eye(dim))

    @classmethod
    def fit(cls, features: torch.Tensor, floor: float = WHITENING_FLOOR) -> FeatureWhitening:
        """The whitening of ``features [N, r]`` (float64 arithmetic, float32 result)."""
        unit = F.normalize(features.double(), dim=-1)
        mean = unit.mean(dim=0)
        centred = unit - mean
        covariance = centred.T @ centred / max(1, len(unit) - 1)
        variances, directions = torch.linalg.eigh(covariance)
        variances = variances.clamp_min(0) + floor * variances.max().clamp_min(torch.finfo(torch.float64).tiny)
        whitening = cls(features.shape[-1])
        whitening.mean.copy_(mean.float())
        # ZCA form: the result does not depend on the signs (or, for equal variances, the
        # rotation) of the eigenvectors, so runs that sample the same features agree on it.
        whitening.matrix.copy_(((directions / variances.sqrt()) @ directions.T).float())
        return whitening

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (F.normalize(features, dim=-1) - self.mean) @ self.matrix
