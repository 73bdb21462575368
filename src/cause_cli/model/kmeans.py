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

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ASSIGN_CHUNK = 65536  # points assigned at a time, so N x K never needs more than this many rows
# Each fit of a consensus sees this share of the points, drawn anew for every fit (bagging). On
# the tuning runs whose fits disagree, the consensus of fits on halves, then the spread, scored
# 1.4 points of mIoU higher on average than fits on every point (7 of 10 higher, 1 lower);
# where the fits agree, the same (docs/quality.md).
CONSENSUS_SHARE = 0.5


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [K, d], unit rows
    mean_cosine: float  # mean over points of the cosine with their centroid (higher is better)
    iterations: int
    agreement: float | None = None  # a consensus' fits: their mean partition_agreement


def assign(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit point's centroid of highest cosine and that cosine: ``[N]`` int64, ``[N]``."""
    labels = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    best = torch.empty(points.shape[0], dtype=points.dtype, device=points.device)
    for start in range(0, points.shape[0], ASSIGN_CHUNK):
        cosines = points[start : start + ASSIGN_CHUNK] @ centroids.t()
        best[start : start + ASSIGN_CHUNK], labels[start : start + ASSIGN_CHUNK] = cosines.max(dim=1)
    return labels, best


class UnitRows:
    """Unit points ``[N, d]`` as the k-means loops read them (:class:`Votes` is the other space):
    rows as centroids, ``1 - cos`` to some of them, assignment and update."""

    def __init__(self, points: torch.Tensor) -> None:
        self.points = points

    def __len__(self) -> int:
        return self.points.shape[0]

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        return self.points[indices.to(self.points.device)]

    def distances_to_row(self, row: int) -> torch.Tensor:
        return (1.0 - self.points @ self.points[row]).clamp_min(0)

    def distances_to(self, rows: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.points @ self.points[rows.to(self.points.device)].t()).clamp_min(0)

    def assign(self, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return assign(self.points, centroids)

    def update(self, labels: torch.Tensor, fit: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        return update_centroids(self.points, labels, fit, centroids)


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` seeds drawn from the unit ``points [N, d]`` by greedy k-means++ with the cosine
    distance: each step draws ``2 + ln k`` candidates with probability proportional to their
    squared distance from the nearest seed so far and keeps the one that leaves the smallest
    total (Arthur and Vassilvitskii's greedy variant, as scikit-learn seeds). One draw a step
    lands in a poor optimum far more often: on one head's features, 8 plain restarts missed
    the best clustering for 3 of 6 seeds."""
    return _seeds(UnitRows(points), k, generator)


def _seeds(space: UnitRows | Votes, k: int, generator: torch.Generator) -> torch.Tensor:
    """:func:`kmeans_plus_plus` in ``space``: the seeds as centroids ``[k, d]``."""
    trials = 2 + int(math.log(k))
    first = int(torch.randint(len(space), (1,), generator=generator))
    seeds = [first]
    nearest = space.distances_to_row(first)
    for _ in range(1, k):
        weights = nearest.square().cpu()
        if float(weights.sum()) <= 0:  # every point already sits on a seed: any point will do
            weights = torch.ones_like(weights)
        candidates = torch.multinomial(weights.double(), trials, replacement=True, generator=generator)
        distances = space.distances_to(candidates)  # [N, trials]
        totals = torch.minimum(nearest.unsqueeze(1), distances).square().sum(dim=0)
        best = int(totals.argmin())
        seeds.append(int(candidates[best]))
        nearest = torch.minimum(nearest, distances[:, best])
    return space.rows(torch.tensor(seeds))


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
    centroids, _, fit, iterations = _lloyd(UnitRows(points), k, generator, restarts, max_iterations)
    return KMeansResult(centroids, float(fit.mean()), iterations)


def _lloyd(
    space: UnitRows | Votes, k: int, generator: torch.Generator, restarts: int, max_iterations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Lloyd's iterations in ``space`` from each of ``restarts`` k-means++ starts; the start of
    best mean cosine as its centroids, assignment, every point's cosine and iterations."""
    if len(space) < k:
        raise ValueError(f"k-means needs at least {k} points, got {len(space)}")
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
    for _ in range(max(1, restarts)):
        centroids = _seeds(space, k, generator)
        labels, fit = space.assign(centroids)
        iterations, changed = 0, True
        while changed and iterations < max_iterations:
            centroids = space.update(labels, fit, centroids)
            new_labels, fit = space.assign(centroids)
            changed = not torch.equal(new_labels, labels)
            labels, iterations = new_labels, iterations + 1
        if best is None or float(fit.mean()) > float(best[2].mean()):
            best = (centroids, labels, fit, iterations)
    assert best is not None
    return best


class Votes:
    """Every point's cluster ids in several partitions, ``labels [N, F]``, read as one-hot vote
    vectors of length ``F * A`` (``A`` ids per partition) without writing them out: a vote
    vector has ``F`` ones, so its unit form has ``1 / sqrt(F)`` there, and its cosine with any
    ``[F * A]`` vector is that vector's sum at the point's ``F`` entries over ``sqrt(F)``. At
    100,000 points, 16 partitions and 171 ids the dense votes would take 1.1 GB; this takes
    ``N x F`` ids and ``N x K`` cosines."""

    def __init__(self, partitions: list[torch.Tensor], ids: int) -> None:
        self.ids = ids
        self.labels = torch.stack(partitions, dim=1)  # [N, F]
        self.fits = self.labels.shape[1]
        self.entries = self.labels + ids * torch.arange(self.fits, device=self.labels.device)  # [N, F]
        self.scale = 1.0 / math.sqrt(self.fits)
        # Comparing bytes is several times faster than a product with one-hot vectors.
        self.compact = self.labels.to(torch.uint8 if ids <= 256 else torch.int32)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """The unit vote vectors of the points ``indices``: ``[len(indices), F * A]``."""
        vectors = torch.zeros(len(indices), self.fits * self.ids, device=self.labels.device)
        return vectors.scatter_(1, self.entries[indices.to(self.labels.device)], self.scale)

    def distances_to_row(self, row: int) -> torch.Tensor:
        return self.distances_to(torch.tensor([row]))[:, 0]

    def distances_to(self, rows: torch.Tensor) -> torch.Tensor:
        """``1 - cos`` of every point with the points ``rows``: ``[N, len(rows)]``."""
        agreeing = torch.stack([(self.compact == self.compact[row]).sum(dim=1) for row in rows.tolist()], dim=1)
        return (1.0 - agreeing.float() * (self.scale * self.scale)).clamp_min(0)

    def assign(self, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As :func:`assign` on the unit vote vectors, ``centroids [K, F * A]``."""
        by_entry = centroids.t()  # [F * A, K]
        cosines = by_entry[self.entries[:, 0]]
        for fit in range(1, self.fits):
            cosines += by_entry[self.entries[:, fit]]
        best, labels = (cosines * self.scale).max(dim=1)
        return labels, best

    def update(self, labels: torch.Tensor, fit: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """As :func:`update_centroids`: a cluster's sum of unit votes is its counts of each
        entry times ``1 / sqrt(F)``, and normalising does not see the common factor."""
        width = self.fits * self.ids
        flat = (labels.unsqueeze(1) * width + self.entries).flatten()
        counts = torch.bincount(flat, minlength=len(centroids) * width).view(len(centroids), width)
        updated = F.normalize(counts.to(centroids.dtype), dim=1)
        empty = (counts.sum(dim=1) == 0).nonzero().flatten()
        if empty.numel():
            updated[empty] = self.rows(fit.argsort()[: empty.numel()])
        return updated

    def kmeans(
        self, k: int, generator: torch.Generator, restarts: int = 1, max_iterations: int = 100
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """As :func:`spherical_kmeans` on the unit vote vectors (the same draws from
        ``generator``); returns the best restart's assignment, each point's cosine with its
        centroid and the restart's iterations."""
        _, labels, fit, iterations = _lloyd(self, k, generator, restarts, max_iterations)
        return labels, fit, iterations


def consensus_of(
    unit: torch.Tensor, partitions: list[torch.Tensor], k: int, generator: torch.Generator
) -> KMeansResult:
    """One partition of the unit ``points [N, d]`` from several (``[N]`` cluster ids each): points
    go together when most partitions put them together. Every point's one-hot assignments,
    concatenated, have the same length, and the cosine of two of them is the share of
    partitions that agree on the pair, so spherical k-means of those votes clusters by
    agreement (:class:`Votes`, which never writes the votes out); the centroids are then the
    normalised means of each consensus cluster's points."""
    groups, agreement, iterations = Votes(partitions, k).kmeans(k, generator, restarts=8)
    centroids = update_centroids(unit, groups, agreement, unit.new_zeros(k, unit.shape[1]))
    _, fit = assign(unit, centroids)
    return KMeansResult(centroids, float(fit.mean()), iterations)


def consensus_kmeans(
    features: torch.Tensor, k: int, generator: torch.Generator, fits: int, share: float = CONSENSUS_SHARE
) -> KMeansResult:
    """Spherical k-means of ``features [N, d]`` made ``fits`` times from single starts, each on
    a random ``share`` of the points, then the consensus of the partitions of every point
    (:func:`consensus_of`). Where classes differ only in texture, k-means has many optima of
    almost the same mean cosine that split the classes differently; the consensus does not
    hinge on which one a fit lands in (docs/quality.md)."""
    unit = unit_rows(features)
    drawn = min(len(unit), max(k, round(share * len(unit))))
    partitions = []
    for _ in range(fits):
        subset = torch.randperm(len(unit), generator=generator)[:drawn]
        partitions.append(assign(unit, spherical_kmeans(unit[subset], k, generator).centroids)[0])
    result = consensus_of(unit, partitions, k, generator)
    result.agreement = mean_agreement(partitions, k)
    return result


def partition_agreement(first: torch.Tensor, second: torch.Tensor, k: int) -> float:
    """The share of points two partitions (``[N]`` cluster ids in ``[0, k)``) put together once
    their clusters are matched one to one, by the matching that agrees most."""
    # Imported here, so training loads scipy's own BLAS only when step three measures agreement,
    # not before the data loaders fork their workers.
    from scipy.optimize import linear_sum_assignment

    counts = torch.bincount(first * k + second, minlength=k * k).view(k, k).numpy()
    rows, columns = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, columns].sum() / len(first))


def mean_agreement(partitions: list[torch.Tensor], k: int) -> float:
    """The mean :func:`partition_agreement` over every pair of ``partitions`` (1 for one)."""
    pairs = list(itertools.combinations(partitions, 2))
    return sum(partition_agreement(first, second, k) for first, second in pairs) / len(pairs) if pairs else 1.0
