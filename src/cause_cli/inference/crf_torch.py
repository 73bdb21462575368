"""The dense CRF (METHOD.md section 4) in torch: the model and settings of :mod:`.crf`, mean-field
inference with both kernels filtered on a permutohedral lattice (:mod:`.lattice`), on the
device the scores are on, many images at once, with nothing to compile.

As pydensecrf computes it: the unary is ``-log`` of the probabilities clipped at ``1e-5``;
each kernel is normalised symmetrically (its filter of ones ``n``, messages
``n^-1/2 K (n^-1/2 Q)``); Potts compatibilities; ``Q`` starts at the unary's softmax and each
of the iterations sets ``Q = softmax(-unary + w_g K_g Q + w_b K_b Q)``. The kernels' features
are ``(x, y) / sxy`` and ``(x, y) / sxy, (b, g, r) / srgb`` on the image in BGR order, as the
reference hands pydensecrf its image. Images of any sizes share one lattice per kernel (their
index is part of every lattice key), so a batch costs a few large operations, not one small
one per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .crf import (
    BILATERAL_COMPAT,
    BILATERAL_SRGB,
    BILATERAL_SXY,
    GAUSSIAN_COMPAT,
    GAUSSIAN_SXY,
    ITERATIONS,
)
from .lattice import Lattice, build_lattice

UNARY_CLIP = 1e-5  # pydensecrf.utils.unary_from_softmax's floor on probabilities


class _NormalisedKernel:
    """One Gaussian kernel's messages ``n^-1/2 K (n^-1/2 Q)`` over a lattice."""

    def __init__(self, features: torch.Tensor, groups: torch.Tensor, weight: float) -> None:
        self.lattice: Lattice = build_lattice(features, groups)
        ones = features.new_ones(features.shape[0], 1)
        # In double, as pydensecrf computes 1 / sqrt(n + 1e-20).
        self.norm = (1.0 / torch.sqrt(self.lattice.filter(ones).double() + 1e-20)).float()
        self.weight = weight

    def message(self, probabilities: torch.Tensor) -> torch.Tensor:
        return self.weight * (self.lattice.filter(probabilities * self.norm) * self.norm)


def _pixel_features(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every pixel of every image ``uint8 [H, W, 3]`` (RGB): the Gaussian kernel's features
    ``[N, 2]``, the bilateral kernel's ``[N, 5]`` and each pixel's image ``[N]``."""
    positions, bilateral, groups = [], [], []
    for index, image in enumerate(images):
        height, width = image.shape[:2]
        device = image.device
        y, x = torch.meshgrid(
            torch.arange(height, device=device, dtype=torch.float32),
            torch.arange(width, device=device, dtype=torch.float32),
            indexing="ij",
        )
        xy = torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)
        bgr = image.reshape(-1, 3).flip(1).float()
        positions.append(xy / GAUSSIAN_SXY)
        bilateral.append(torch.cat([xy / BILATERAL_SXY, bgr / BILATERAL_SRGB], dim=1))
        groups.append(torch.full((height * width,), index, dtype=torch.long, device=device))
    return torch.cat(positions), torch.cat(bilateral), torch.cat(groups)


@torch.no_grad()
def dense_crf_batch(
    images: Sequence[torch.Tensor], log_probabilities: Sequence[torch.Tensor], iterations: int = ITERATIONS
) -> list[torch.Tensor]:
    """The mean-field marginals ``float32 [C, H, W]`` of each image ``uint8 [H, W, 3]`` (RGB)
    with its ``log_probabilities [C, H, W]``, all refined together where they are."""
    if not images:
        return []
    classes = log_probabilities[0].shape[0]
    gaussian_features, bilateral_features, groups = _pixel_features(images)
    kernels = [
        _NormalisedKernel(gaussian_features, groups, float(GAUSSIAN_COMPAT)),
        _NormalisedKernel(bilateral_features, groups, float(BILATERAL_COMPAT)),
    ]
    # Pixels in rows, classes in columns: the lattice filters rows.
    probabilities = torch.cat(
        [torch.softmax(scores.float(), dim=0).reshape(classes, -1).T for scores in log_probabilities]
    )
    unary = -torch.log(probabilities.clamp(UNARY_CLIP, 1.0))
    marginals = torch.softmax(-unary, dim=1)
    for _ in range(iterations):
        energy = -unary
        for kernel in kernels:
            energy = energy + kernel.message(marginals)
        marginals = torch.softmax(energy, dim=1)
    sizes = [image.shape[0] * image.shape[1] for image in images]
    return [
        part.T.reshape(classes, image.shape[0], image.shape[1])
        for part, image in zip(marginals.split(sizes), images, strict=True)
    ]


def crf_label_maps(images: Sequence[torch.Tensor], log_probabilities: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each image's label map ``[H, W]`` after the dense CRF (the first of equal maxima)."""
    return [marginals.argmax(dim=0) for marginals in dense_crf_batch(images, log_probabilities)]
