"""Segmentation heads, projection heads and probes (METHOD.md sections 2 and 3).

All modules take and return token-major tensors ``[B, P, C]``. The reference writes its
per-token maps as 1x1 convolutions on ``[B, C, g, g]``; a linear layer on the token axis is
the same map with the same parameters (a 1x1 convolution weight ``[out, in, 1, 1]`` is a
linear weight ``[out, in]``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .ops import cosine_similarity_matrix, ema_update_, tokens_to_map


class MLPHead(nn.Module):
    """CAUSE-MLP head ``h(x) = W1 x + W3 relu(W2 x)``: ``[B, P, D] -> [B, P, r]``.

    During training, dropout acts on the input features, drawn separately for each branch
    as the reference does.
    """

    def __init__(self, dim: int, reduced_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.linear_branch = nn.Linear(dim, reduced_dim)
        self.mlp_branch = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, reduced_dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, use_dropout: bool = False) -> torch.Tensor:
        drop = self.dropout if use_dropout else nn.Identity()
        return self.linear_branch(drop(tokens)) + self.mlp_branch(drop(tokens))


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
    """Cluster centroids ``Phi [C, r]`` that assign head features to clusters by cosine."""

    def __init__(self, reduced_dim: int, num_clusters: int) -> None:
        super().__init__()
        self.centroids = nn.Parameter(torch.empty(num_clusters, reduced_dim))
        nn.init.uniform_(self.centroids, -1.0 / num_clusters, 1.0 / num_clusters)

    def cosine(self, tokens: torch.Tensor) -> torch.Tensor:
        """``cos(h, Phi_c)`` for every token: ``[..., P, C]``."""
        return cosine_similarity_matrix(tokens, self.centroids)

    def assign(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cluster index of every token: ``[..., P]``."""
        return self.cosine(tokens).argmax(dim=-1)


class SegmentationHeads(nn.Module):
    """Student and EMA teacher heads with their projection heads, and the linear probe."""

    def __init__(
        self,
        dim: int,
        reduced_dim: int = 90,
        projection_dim: int = 2048,
        num_classes: int = 27,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.student = MLPHead(dim, reduced_dim, dropout)
        self.student_projection = ProjectionHead(reduced_dim, projection_dim)
        self.teacher = copy.deepcopy(self.student)
        self.teacher_projection = copy.deepcopy(self.student_projection)
        for parameter in [*self.teacher.parameters(), *self.teacher_projection.parameters()]:
            parameter.requires_grad_(False)
        self.linear_probe = LinearProbe(reduced_dim, num_classes)

    def student_parameters(self) -> list[nn.Parameter]:
        return [*self.student.parameters(), *self.student_projection.parameters()]

    def update_teacher(self, momentum: float = 0.99) -> None:
        ema_update_(self.teacher, self.student, momentum)
        ema_update_(self.teacher_projection, self.student_projection, momentum)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inference: the teacher head's features ``[B, P, r]``."""
        return self.teacher(tokens)
