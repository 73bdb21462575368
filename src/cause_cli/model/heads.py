"""Segmentation heads, projection heads and probes (METHOD.md sections 2 and 3).

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

from .ops import (
    best_channel,
    cosine_similarity_matrix,
    ema_update_,
    map_to_tokens,
    nearest_code,
    take_tokens,
    tokens_to_map,
)
from .spread import spread_ranking, spread_scores
from .whitening import FeatureWhitening

# The dense CRF starts from softmax(3 cos) of the cluster probe (METHOD.md section 4).
CRF_SHARPNESS = 3.0


class DualProjection(nn.Module):
    """``W1 x + W3 relu(W2 x)``: ``[..., D] -> [..., r]``, the last stage of both heads.

    With an input dropout, it is drawn separately for each branch, as the reference does.
    """

    def __init__(self, dim: int, reduced_dim: int) -> None:
        super().__init__()
        self.linear_branch = nn.Linear(dim, reduced_dim)
        self.mlp_branch = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, reduced_dim))

    def forward(self, tokens: torch.Tensor, dropout: nn.Module | None = None) -> torch.Tensor:
        drop = dropout if dropout is not None else nn.Identity()
        return self.linear_branch(drop(tokens)) + self.mlp_branch(drop(tokens))


class MLPHead(nn.Module):
    """CAUSE-MLP head ``h(x) = W1 x + W3 relu(W2 x)``: ``[B, P, D] -> [B, P, r]``.

    During training, dropout acts on the input features.
    """

    def __init__(self, dim: int, reduced_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = DualProjection(dim, reduced_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        tokens: torch.Tensor,
        use_dropout: bool = False,
        positions: torch.Tensor | None = None,
        token_codes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The features of every token, or of the tokens at ``positions [B, S]`` (each token
        on its own: the others are not read). ``token_codes`` is for the TR head's signature."""
        if positions is not None:
            tokens = take_tokens(tokens, positions)
        return self.projection(tokens, self.dropout if use_dropout else None)


class TRHead(nn.Module):
    """CAUSE-TR head (METHOD.md section 2): ``[B, P, D] -> [B, P, r]``.

    Queries are the backbone tokens vector-quantised by the clusterbook. One post-norm decoder
    layer: single-head self-attention on the queries plus learned positions, single-head
    cross-attention to the backbone tokens, a ReLU FFN of width ``hidden_dim``; then the
    backbone tokens are added back (``F + LayerNorm(tgt)``) and projected like the MLP head.
    Dropout inside the layer follows ``train()``; ``use_dropout`` adds the input dropout of
    the final projection.
    """

    def __init__(
        self, dim: int, reduced_dim: int, num_queries: int, hidden_dim: int = 2048, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.query_pos = nn.Parameter(torch.randn(num_queries, dim))
        self.self_attn = nn.MultiheadAttention(dim, 1, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, 1, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ffn_dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.projection = DualProjection(dim, reduced_dim)
        self.dropout = nn.Dropout(dropout)
        # The clusterbook is step one's result, not a parameter of this head: not saved with it.
        self.register_buffer("clusterbook", torch.zeros(0, dim), persistent=False)

    def set_clusterbook(self, clusterbook: torch.Tensor) -> None:
        self.clusterbook = clusterbook.detach().to(self.query_pos.device, self.query_pos.dtype)

    def decode(
        self,
        tokens: torch.Tensor,
        attention_weights: bool = True,
        positions: torch.Tensor | None = None,
        token_codes: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Every intermediate of the decoder layer, for inspection and tests. Without
        ``attention_weights`` the attention runs fused (``scaled_dot_product_attention``: flash
        or memory-efficient kernels on GPUs) and the weights come back as None.

        With ``positions [B, S]``, only the queries at those positions are decoded: every
        query still attends to all the queries and tokens, and everything after the
        attention acts on each query alone, so the result is those rows of the full decoding
        (at a fraction of its cost when S is a sixteenth of P, as in training).
        ``token_codes [B, P]``, the nearest clusterbook code of every token, saves finding
        them again when the caller has them."""
        if self.clusterbook.shape[0] == 0:
            raise RuntimeError("TRHead needs its clusterbook: call set_clusterbook first")
        if tokens.shape[1] != self.query_pos.shape[0]:
            raise ValueError(f"TRHead was built for {self.query_pos.shape[0]} tokens per image, got {tokens.shape[1]}")
        if token_codes is None:
            token_codes = nearest_code(tokens, self.clusterbook)
        queries = self.clusterbook[token_codes]
        with_pos = queries + self.query_pos
        if positions is None:
            asking, asking_queries, asking_pos, own_tokens = with_pos, queries, self.query_pos, tokens
        else:
            asking, asking_queries = take_tokens(with_pos, positions), take_tokens(queries, positions)
            asking_pos, own_tokens = self.query_pos[positions.to(tokens.device)], take_tokens(tokens, positions)
        self_out, self_weights = self.self_attn(asking, with_pos, queries, need_weights=attention_weights)
        norm1_out = self.norm1(asking_queries + self.dropout1(self_out))
        cross_out, cross_weights = self.cross_attn(
            norm1_out + asking_pos, tokens, tokens, need_weights=attention_weights
        )
        norm2_out = self.norm2(norm1_out + self.dropout2(cross_out))
        linear2_out = self.linear2(self.ffn_dropout(torch.relu(self.linear1(norm2_out))))
        norm3_out = self.norm3(norm2_out + self.dropout3(linear2_out))
        return {
            "self_attn_out": self_out,
            "self_attn_weights": self_weights,
            "norm1_out": norm1_out,
            "cross_attn_out": cross_out,
            "cross_attn_weights": cross_weights,
            "norm2_out": norm2_out,
            "linear2_out": linear2_out,
            "norm3_out": norm3_out,
            "output": own_tokens + norm3_out,
        }

    def forward(
        self,
        tokens: torch.Tensor,
        use_dropout: bool = False,
        positions: torch.Tensor | None = None,
        token_codes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The features of every token, or of the tokens at ``positions [B, S]`` (see :meth:`decode`)."""
        decoded = self.decode(tokens, False, positions, token_codes)["output"]
        assert decoded is not None
        return self.projection(decoded, self.dropout if use_dropout else None)


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


def build_head(kind: str, dim: int, reduced_dim: int, num_queries: int | None, dropout: float) -> nn.Module:
    """A segmentation head: ``"mlp"``, or ``"tr"`` (which needs the tokens per image)."""
    if kind == "mlp":
        return MLPHead(dim, reduced_dim, dropout)
    if kind == "tr":
        if num_queries is None:
            raise ValueError("the TR head needs the number of tokens per image")
        return TRHead(dim, reduced_dim, num_queries, dropout=dropout)
    raise ValueError(f"unknown head '{kind}'")


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
        return self.kind == "mlp"

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
