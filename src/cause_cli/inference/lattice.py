"""The permutohedral lattice (Adams, Baek and Davis 2010) in torch operations: a Gaussian filter
over points in a feature space of ``d`` dimensions that costs a few gathers per point,
whatever the filter's width.

Each point is lifted onto the plane ``sum(x) = 0`` of ``d + 1`` dimensions, which the lattice
of integer points whose coordinates are all equal modulo ``d + 1`` tiles with simplices. A
point's value is spread to the ``d + 1`` corners of its simplex with its barycentric weights
(splat), every corner is blurred with ``[1/2, 1, 1/2]`` (a ``[1, 2, 1] / 2`` kernel's weights,
unnormalised) along each of the ``d + 1`` lattice directions in turn, and the values are read
back at the points with the same weights (slice), scaled by ``1 / (1 + 2^-d)``.

The lift, the rounding to the nearest remainder-0 point, the ranks, the weights and the
scaling match Krähenbühl's implementation in pydensecrf (its SSE path: rounding to nearest,
ties to even), so the two filters agree to float rounding; corners are found by sorting
packed integer keys instead of a hash table, and many images are filtered in one lattice
whose keys carry the image's index, so that no two images share a corner.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch


def _scale_factors(dimensions: int) -> list[float]:
    """The diagonal of the lift's scaling (p. 5 of Adams et al.), for a filter of standard
    deviation 1 in every feature, in float32 as pydensecrf rounds them."""
    inverse_std = float(np.float32(math.sqrt(2.0 / 3.0) * (dimensions + 1)))
    return [float(np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inverse_std)) for i in range(dimensions)]


@dataclass
class Lattice:
    """The lattice of a set of points: each point's ``d + 1`` corners (``corners [N, d + 1]``,
    rows of the values table, 0 being an empty row that is always zero) and their weights
    (``weights [N, d + 1]``), and each lattice point's two neighbours along every direction
    (``neighbours [d + 1, 2, M + 1]``, 0 where the neighbour holds no value)."""

    corners: torch.Tensor
    weights: torch.Tensor
    neighbours: torch.Tensor
    points: int

    def __post_init__(self) -> None:
        # The three steps as sparse matrices (splat [M + 1, N], each blur [M + 1, M + 1], slice
        # [N, M + 1]): a sparse product sums each row in one pass, without the atomic or serial
        # scatter an index_add would make (four to six times as fast on a CPU).
        count, corners = self.corners.shape
        table_rows = self.points + 1
        pixels = torch.arange(count, device=self.corners.device).repeat_interleave(corners)
        flat_corners, flat_weights = self.corners.reshape(-1), self.weights.reshape(-1)
        alpha = float(np.float32(1.0) / (np.float32(1.0) + np.float32(2.0 ** -self.dimensions)))
        self._splat = _csr(flat_corners, pixels, flat_weights, (table_rows, count))
        self._slice = _csr(pixels, flat_corners, flat_weights * alpha, (count, table_rows))
        self._blurs = []
        rows = torch.arange(1, table_rows, device=self.corners.device)
        for before, after in self.neighbours:
            neighbour_rows, neighbour_columns = [rows], [rows]
            for side in (before[1:], after[1:]):
                present = side > 0
                neighbour_rows.append(rows[present])
                neighbour_columns.append(side[present])
            halves = torch.full((sum(len(part) for part in neighbour_rows[1:]),), 0.5, device=rows.device)
            values = torch.cat([torch.ones(len(rows), device=rows.device), halves])
            self._blurs.append(
                _csr(torch.cat(neighbour_rows), torch.cat(neighbour_columns), values, (table_rows, table_rows))
            )

    @property
    def dimensions(self) -> int:
        return self.corners.shape[1] - 1

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """The Gaussian-filtered ``values [N, C]`` (the point's own value included)."""
        table = self._splat @ values
        for blur in self._blurs:  # each lattice direction in turn: old + (before + after) / 2
            table = blur @ table
        return self._slice @ table


def _csr(rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The sparse CSR matrix of distinct ``(row, column)`` entries."""
    order = torch.argsort(rows * shape[1] + columns)
    counts = torch.bincount(rows, minlength=shape[0])
    row_starts = torch.zeros(shape[0] + 1, dtype=torch.long, device=rows.device)
    row_starts[1:] = torch.cumsum(counts, dim=0)
    with warnings.catch_warnings():  # torch calls its sparse CSR support beta
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(row_starts, columns[order], values[order], shape, check_invariants=False)


def build_lattice(features: torch.Tensor, groups: torch.Tensor | None = None) -> Lattice:
    """The lattice of points ``features [N, d]`` (already divided by the filter's widths); points
    of different ``groups [N]`` (an image's index) never share a corner."""
    count, dimensions = features.shape
    device = features.device
    features = features.float()
    scale = _scale_factors(dimensions)
    # Lift onto the plane (y = E p), summing from the last feature as pydensecrf does.
    elevated = features.new_empty(count, dimensions + 1)
    running = features.new_zeros(count)
    for j in range(dimensions, 0, -1):
        scaled = features[:, j - 1] * scale[j - 1]
        elevated[:, j] = running - j * scaled
        running = running + scaled
    elevated[:, 0] = running
    # The nearest point whose coordinates are multiples of d + 1, then the simplex it lies in.
    down = float(np.float32(1.0 / (dimensions + 1)))
    nearest = torch.round(elevated * down)  # ties to even, as SSE rounds
    remainder_zero = nearest * (dimensions + 1)
    off_plane = nearest.sum(dim=1, keepdim=True)
    residual = elevated - remainder_zero
    # rank[i]: how many coordinates lie further along than i (ties go to the later coordinate).
    later = torch.arange(dimensions + 1, device=device)
    is_later = later[None, :] > later[:, None]  # [i, j]: j after i
    smaller = residual[:, :, None] < residual[:, None, :]  # [N, i, j]: residual i < residual j
    rank = (smaller & is_later).sum(dim=2) + (~smaller.transpose(1, 2) & is_later.T).sum(dim=2)
    rank = rank.to(elevated.dtype) + off_plane
    below, above = rank < 0, rank >= dimensions + 1
    shift = (below.to(rank.dtype) - above.to(rank.dtype)) * (dimensions + 1)
    rank, remainder_zero = rank + shift, remainder_zero + shift
    rank = rank.long()
    # Barycentric weights (p. 10 of Adams et al.).
    share = (elevated - remainder_zero) * down
    barycentric = features.new_zeros(count, dimensions + 2)
    barycentric.scatter_add_(1, dimensions - rank, share)
    barycentric.scatter_add_(1, dimensions - rank + 1, -share)
    barycentric[:, 0] += 1 + barycentric[:, dimensions + 1]
    weights = barycentric[:, : dimensions + 1].contiguous()
    # Each corner: the remainder-0 point moved by the canonical simplex's vertex.
    origin = remainder_zero[:, :dimensions].long()
    ranks = rank[:, :dimensions]
    vertex = torch.arange(dimensions + 1, device=device)[:, None, None]  # [d + 1, 1, 1]
    keys = origin[None] + torch.where(ranks[None] <= dimensions - vertex, vertex, vertex - dimensions - 1)
    keys = keys.permute(1, 0, 2)  # [N, d + 1 corners, d]
    group = groups.long() if groups is not None else torch.zeros(count, dtype=torch.long, device=device)
    packing = _Packing.of(keys, group, margin=dimensions + 1)
    codes = packing.pack(keys, group[:, None])
    unique, corner_rows = torch.unique(codes.reshape(-1), sorted=True, return_inverse=True)
    corners = corner_rows.reshape(count, dimensions + 1) + 1
    # The two neighbours of every lattice point along each direction.
    point_keys, point_groups = packing.unpack(unique)
    neighbours = torch.zeros(dimensions + 1, 2, unique.numel() + 1, dtype=torch.long, device=device)
    for direction in range(dimensions + 1):
        for side, step in enumerate((-1, 1)):
            moved = point_keys + step
            if direction < dimensions:
                moved[:, direction] = point_keys[:, direction] - step * dimensions
            wanted = packing.pack(moved, point_groups)
            found = torch.searchsorted(unique, wanted).clamp(max=unique.numel() - 1)
            neighbours[direction, side, 1:] = torch.where(unique[found] == wanted, found + 1, 0)
    return Lattice(corners, weights, neighbours, unique.numel())


@dataclass
class _Packing:
    """Integer keys (and a group) packed into one int64 each, digit by digit."""

    lowest: torch.Tensor  # [d]
    spans: list[int]  # each digit's span, the group's last

    @classmethod
    def of(cls, keys: torch.Tensor, group: torch.Tensor, margin: int) -> _Packing:
        flat = keys.reshape(-1, keys.shape[-1])
        lowest = flat.min(dim=0).values - margin
        spans = [int(span) + 2 * margin + 1 for span in (flat.max(dim=0).values - flat.min(dim=0).values).tolist()]
        spans.append(int(group.max()) + 1 if group.numel() else 1)
        if math.prod(spans) >= 2**62:
            raise ValueError("the lattice's keys do not fit 64 bits; filter fewer images at once")
        return cls(lowest, spans)

    def pack(self, keys: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        code = group.expand(keys.shape[:-1]).clone()
        for digit in range(keys.shape[-1]):
            code = code * self.spans[digit] + (keys[..., digit] - self.lowest[digit])
        return code

    def unpack(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.empty(codes.numel(), len(self.spans) - 1, dtype=torch.long, device=codes.device)
        rest = codes.clone()
        for digit in range(len(self.spans) - 2, -1, -1):
            keys[:, digit] = rest % self.spans[digit] + self.lowest[digit]
            rest = rest // self.spans[digit]
        return keys, rest
