"""Spherical k-means: the baseline every unsupervised segmentation paper reports, and the
label-free start of the cluster probe (step three).

Points and centroids live on the unit sphere and a point belongs to the centroid of highest
cosine, as the cluster probe assigns pixels. Seeding is greedy k-means++ with the cosine
distance ``1 - cos``: each new centroid is the best of a few points drawn with probability
proportional to their squared distance from the nearest centroid so far. Lloyd's iterations
then alternate assignment and ``centroid = normalise(sum of its points)`` until no point
changes cluster. A centroid that loses all its points moves to the point its cluster fits
worst. Of several restarts, the one with the highest mean cosine between points and their
centroids is kept: a criterion that needs no labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ASSIGN_CHUNK = 65536  # points assigned at a time, so N x K never needs more than this many rows


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [K, d], unit rows
    mean_cosine: float  # mean over points of the cosine with their centroid (higher is better)
    iterations: int


def assign(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit point's centroid of highest cosine and that cosine: ``[N]`` int64, ``[N]``."""
    labels = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    best = torch.empty(points.shape[0], dtype=points.dtype, device=points.device)
    for start in range(0, points.shape[0], ASSIGN_CHUNK):
        cosines = points[start : start + ASSIGN_CHUNK] @ centroids.t()
        best[start : start + ASSIGN_CHUNK], labels[start : start + ASSIGN_CHUNK] = cosines.max(dim=1)
    return labels, best


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` seeds drawn from the unit ``points [N, d]`` by greedy k-means++ with the cosine
    distance: each step draws ``2 + ln k`` candidates with probability proportional to their
    squared distance from the nearest seed so far and keeps the one that leaves the smallest
    total (Arthur and Vassilvitskii's greedy variant, as scikit-learn seeds). One draw a step
    lands in a poor optimum far more often: on one head's features, 8 plain restarts missed
    the best clustering for 3 of 6 seeds."""
    trials = 2 + int(math.log(k))
    first = int(torch.randint(points.shape[0], (1,), generator=generator))
    seeds = [points[first]]
    nearest = (1.0 - points @ points[first]).clamp_min(0)
    for _ in range(1, k):
        weights = nearest.square().cpu()
        if float(weights.sum()) <= 0:  # every point already sits on a seed: any point will do
            weights = torch.ones_like(weights)
        candidates = torch.multinomial(weights.double(), trials, replacement=True, generator=generator)
        distances = (1.0 - points @ points[candidates.to(points.device)].t()).clamp_min(0)  # [N, trials]
        totals = torch.minimum(nearest.unsqueeze(1), distances).square().sum(dim=0)
        best = int(totals.argmin())
        seeds.append(points[int(candidates[best])])
        nearest = torch.minimum(nearest, distances[:, best])
    return torch.stack(seeds)


def update_centroids(
    points: torch.Tensor, labels: torch.Tensor, fit: torch.Tensor, centroids: torch.Tensor
) -> torch.Tensor:
    """``normalise(sum of each cluster's points)``; an empty cluster takes the worst-fitting point."""
    sums = torch.zeros_like(centroids).index_add_(0, labels, points)
    counts = torch.bincount(labels, minlength=centroids.shape[0])
    updated = F.normalize(sums, dim=1)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        worst = fit.argsort()[: empty.numel()]
        updated[empty] = points[worst]
    return updated


def tokens_per_image(points: int, images: int, tokens: int) -> int:
    """How many of each image's ``tokens`` a sample of about ``points`` over ``images`` takes."""
    return max(1, min(tokens, -(-points // max(1, images))))


def draw_tokens(images: int, tokens: int, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """``per_image`` distinct token indices for each of ``images`` images: ``[images, per_image]``."""
    return torch.rand(images, tokens, generator=generator).argsort(dim=1)[:, :per_image]


def gather_tokens(features: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """The ``picked [B, n]`` tokens of every image of ``features [B, P, d]``: ``[B, n, d]``."""
    return features.gather(1, picked.to(features.device).unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """The rows of ``features [N, d]`` scaled to unit length, zero rows left out (they have no direction)."""
    return F.normalize(features.float(), dim=1)[features.float().norm(dim=1) > 0]


def spherical_kmeans(
    features: torch.Tensor,
    k: int,
    generator: torch.Generator,
    restarts: int = 1,
    max_iterations: int = 100,
) -> KMeansResult:
    """Spherical k-means of ``features [N, d]`` (any norm; zero rows are left out) into ``k``
    clusters; the best of ``restarts`` k-means++ starts by mean cosine."""
    points = unit_rows(features)
    if points.shape[0] < k:
        raise ValueError(f"k-means needs at least {k} points, got {points.shape[0]}")
    best: KMeansResult | None = None
    for _ in range(max(1, restarts)):
        centroids = kmeans_plus_plus(points, k, generator)
        labels, fit = assign(points, centroids)
        iterations, changed = 0, True
        while changed and iterations < max_iterations:
            centroids = update_centroids(points, labels, fit, centroids)
            new_labels, fit = assign(points, centroids)
            changed = not torch.equal(new_labels, labels)
            labels, iterations = new_labels, iterations + 1
        result = KMeansResult(centroids, float(fit.mean()), iterations)
        if best is None or result.mean_cosine > best.mean_cosine:
            best = result
    assert best is not None
    return best


def consensus_of(
    unit: torch.Tensor, partitions: list[torch.Tensor], k: int, generator: torch.Generator
) -> KMeansResult:
    """One partition of the unit ``points [N, d]`` from several (``[N]`` cluster ids each): points
    go together when most partitions put them together. Every point's one-hot assignments,
    concatenated, have the same length, and the cosine of two of them is the share of
    partitions that agree on the pair, so spherical k-means of those votes clusters by
    agreement; the centroids are then the normalised means of each consensus cluster's points."""
    votes = torch.cat([F.one_hot(partition, k).to(unit.dtype) for partition in partitions], dim=1)
    together = spherical_kmeans(votes, k, generator, restarts=8)
    groups, agreement = assign(F.normalize(votes, dim=1), together.centroids)
    centroids = update_centroids(unit, groups, agreement, unit.new_zeros(k, unit.shape[1]))
    _, fit = assign(unit, centroids)
    return KMeansResult(centroids, float(fit.mean()), together.iterations)


def consensus_kmeans(features: torch.Tensor, k: int, generator: torch.Generator, fits: int) -> KMeansResult:
    """Spherical k-means of ``features [N, d]`` made ``fits`` times from single starts, then
    their consensus (:func:`consensus_of`). Where classes differ only in texture, k-means has
    many optima of almost the same mean cosine that split the classes differently; the
    consensus does not hinge on which one a fit lands in (docs/quality.md)."""
    unit = unit_rows(features)
    partitions = [assign(unit, spherical_kmeans(unit, k, generator).centroids)[0] for _ in range(fits)]
    return consensus_of(unit, partitions, k, generator)
