"""The student and teacher heads with their projection heads, and the probes (METHOD.md
sections 2 and 3); the heads a run may name are registered in head_kinds.py.

All modules take and return token-major tensors ``[B, P, C]``. The reference writes its
per-token maps as 1x1 convolutions on ``[B, C, g, g]``; a linear layer on the token axis is
the same map with the same parameters (a 1x1 convolution weight ``[out, in, 1, 1]`` is a
linear weight ``[out, in]``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .head_kinds import HEAD_KINDS, TRHead, build_head
from .head_kinds import MLPHead as MLPHead
from .ops import (
    best_channel,
    cosine_similarity_matrix,
    ema_update_,
    map_to_tokens,
    tokens_to_map,
)
from .spread import spread_ranking, spread_scores
from .whitening import FeatureWhitening

# The dense CRF starts from softmax(3 cos) of the cluster probe (METHOD.md section 4).
CRF_SHARPNESS = 3.0


class ProjectionHead(nn.Module):
    """Per-token linear projection ``r -> projection_dim`` used by the contrastive loss."""

    def __init__(self, reduced_dim: int, projection_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(reduced_dim, projection_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(tokens)


class LinearProbe(nn.Module):
    """Supervised per-token classifier ``r -> C`` returning logits ``[B, C, g, g]``.

    Only for evaluation: it is always trained on detached head features.
    """

    def __init__(self, reduced_dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(reduced_dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens_to_map(self.linear(tokens))


class ClusterProbe(nn.Module):
    """Cluster centroids ``Phi [C, r]`` that assign head features to clusters by cosine, in
    the head's feature space or (with ``whitening``) in its whitened space.

    With ``spread``, the centroids are instead the means of equal-weight Gaussians of one
    shared diagonal covariance (its inverse in ``precision``) over the unit whitened features,
    and a token's scores are their log-densities up to a constant of the token
    (:mod:`.spread`, where step three's k-means fits disagree).

    A map of features becomes pixel scores (:meth:`score_map`) by upsampling the features and
    scoring every pixel (the paper's), or with ``upsample_scores`` by scoring every token and
    upsampling the scores: a feature interpolated between two regions can land nearer a third
    centroid than either, a score interpolated between two cannot.
    """

    precision: torch.Tensor | None

    def __init__(
        self,
        reduced_dim: int,
        num_clusters: int,
        whitening: FeatureWhitening | None = None,
        spread: bool = False,
        upsample_scores: bool = False,
    ) -> None:
        super().__init__()
        self.centroids = nn.Parameter(torch.empty(num_clusters, reduced_dim))
        nn.init.uniform_(self.centroids, -1.0 / num_clusters, 1.0 / num_clusters)
        self.whitening = whitening
        self.register_buffer("precision", torch.ones(reduced_dim) if spread else None)
        self.upsample_scores = upsample_scores

    @property
    def sharpness(self) -> float:
        """What the scores are multiplied by before the softmax that gives the dense CRF its
        probabilities: 3 for cosines (the paper's), 1 for log-densities (their posterior)."""
        return CRF_SHARPNESS if self.precision is None else 1.0

    def space(self, tokens: torch.Tensor) -> torch.Tensor:
        """Head features ``[..., r]`` in the space the centroids live in."""
        return tokens if self.whitening is None else self.whitening(tokens)

    def cosine(self, tokens: torch.Tensor) -> torch.Tensor:
        """``cos(h, Phi_c)`` for every token: ``[..., P, C]``."""
        return cosine_similarity_matrix(self.space(tokens), self.centroids)

    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every token's score for every cluster, ``[..., P, C]``: its cosine, or with a spread
        its log-density."""
        if self.precision is None:
            return self.cosine(tokens)
        return spread_scores(F.normalize(self.space(tokens), dim=-1), self.centroids, self.precision)

    def assign(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cluster index of every token: ``[..., P]``."""
        return self.scores(tokens).argmax(dim=-1)

    def ranking(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scores ``[..., P, C]`` that order the clusters of every token as :meth:`scores`
        does, at a fraction of its cost where only the best cluster is wanted (label maps).

        A token's own length divides all its cosines alike, so it is left out; in the whitened
        space, ``cos(((x / |x|) - mu) W, Phi_c)`` ranks as ``(x / |x|) . m_c + b_c`` with
        ``m_c = W Phi_c / |Phi_c|`` (``W`` is symmetric) and ``b_c = -mu . m_c``: one
        ``r x C`` product per token instead of an ``r x r`` whitening and a second one."""
        if self.precision is not None:
            return spread_ranking(F.normalize(self.space(tokens), dim=-1), self.centroids, self.precision)
        directions = F.normalize(self.centroids, dim=-1)
        if self.whitening is None:
            return tokens @ directions.T
        folded = self.whitening.matrix @ directions.T
        return F.normalize(tokens, dim=-1) @ folded - self.whitening.mean @ folded

    def score_map(self, feature_map: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """Every pixel's :meth:`scores` at ``size`` from a map of head features ``[B, r, h, w]``:
        ``[B, C, H, W]``."""
        if self.upsample_scores:
            return F.interpolate(self._scores_on_map(feature_map), size=size, mode="bilinear", align_corners=False)
        upsampled = F.interpolate(feature_map, size=size, mode="bilinear", align_corners=False)
        return self._scores_on_map(upsampled)

    def label_map(self, feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Every pixel's cluster of highest score, as ``score_map(...).argmax(dim=1)`` gives it:
        ``[B, H, W]``. Scoring pixels only needs the :meth:`ranking`; upsampled scores are not
        ranked alike by it (a cosine's ranking drops a length that differs between tokens)."""
        if self.upsample_scores:
            return best_channel(self.score_map(feature_map, size))
        upsampled = F.interpolate(feature_map, size=size, mode="bilinear", align_corners=False)
        ranking = self.ranking(map_to_tokens(upsampled))  # [B, H*W, C]
        return ranking.argmax(dim=-1).reshape(feature_map.shape[0], *size)

    def _scores_on_map(self, feature_map: torch.Tensor) -> torch.Tensor:
        """:meth:`scores` of every position of ``[B, r, h, w]``: ``[B, C, h, w]``."""
        batch, _, height, width = feature_map.shape
        scores = self.scores(map_to_tokens(feature_map))  # [B, h*w, C]
        return scores.transpose(1, 2).reshape(batch, -1, height, width)


class SegmentationHeads(nn.Module):
    """Student and EMA teacher heads with their projection heads, and the linear probe."""

    def __init__(
        self,
        dim: int,
        reduced_dim: int = 90,
        projection_dim: int = 2048,
        num_classes: int = 27,
        dropout: float = 0.1,
        kind: str = "mlp",
        num_queries: int | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.student = build_head(kind, dim, reduced_dim, num_queries, dropout)
        self.student_projection = ProjectionHead(reduced_dim, projection_dim)
        self.teacher = copy.deepcopy(self.student)
        self.teacher_projection = copy.deepcopy(self.student_projection)
        for parameter in [*self.teacher.parameters(), *self.teacher_projection.parameters()]:
            parameter.requires_grad_(False)
        self.linear_probe = LinearProbe(reduced_dim, num_classes)

    @property
    def per_token(self) -> bool:
        """Whether the head maps each token on its own (so sampling tokens commutes with it)."""
        return HEAD_KINDS[self.kind].per_token

    def set_clusterbook(self, clusterbook: torch.Tensor) -> None:
        for head in (self.student, self.teacher):
            if isinstance(head, TRHead):
                head.set_clusterbook(clusterbook)

    def student_parameters(self) -> list[nn.Parameter]:
        return [*self.student.parameters(), *self.student_projection.parameters()]

    def student_branch(self) -> StudentBranch:
        """The student head and its projection as one module (sharing their parameters)."""
        return StudentBranch(self.student, self.student_projection)

    def update_teacher(self, momentum: float = 0.99) -> None:
        ema_update_(self.teacher, self.student, momentum)
        ema_update_(self.teacher_projection, self.student_projection, momentum)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inference: the teacher head's features ``[B, P, r]``."""
        return self.teacher(tokens)


class StudentBranch(nn.Module):
    """Tokens ``[B, P, D]`` to the student's projections ``[B, S, E]`` (of the tokens at
    ``positions [B, S]``, or of all), with the input dropout of training: what step two
    differentiates, as one module for data-parallel training (so every use of a parameter
    happens in its forward).

    Returns the projections, the head's features ``[B, S, r]`` they were projected from, and,
    given ``candidates`` (tensors of unit vectors ``[N, E]`` the projections are compared with:
    the teacher's projections, the concept bank's entries), each taken back through the
    projection, ``[N, r + 1]`` (``c W`` and ``c . bias``; None when ``r + 1 >= E``): a
    similarity then costs ``r + 1`` multiply-adds instead of ``E`` (see :mod:`.contrastive`).
    The projection runs in float32 whatever the autocast around it, like the loss it feeds.
    """

    def __init__(self, head: nn.Module, projection: ProjectionHead) -> None:
        super().__init__()
        self.head = head
        self.projection = projection

    def forward(
        self,
        tokens: torch.Tensor,
        candidates: Sequence[torch.Tensor] = (),
        positions: torch.Tensor | None = None,
        token_codes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
        features = self.head(tokens, use_dropout=True, positions=positions, token_codes=token_codes)
        linear = self.projection.linear
        with torch.autocast(tokens.device.type, enabled=False):
            features = features.float()
            projected = F.linear(features, linear.weight, linear.bias)
            through_projection = None
            reduced, projected_width = linear.in_features, linear.out_features
            if candidates and reduced + 1 < projected_width:  # else no cheaper
                weight_and_bias = torch.cat([linear.weight, linear.bias[:, None]], dim=1)  # one pass over each
                through_projection = [vectors.float() @ weight_and_bias for vectors in candidates]
        return projected, features, through_projection
