"""The baselines every evaluation reports beside the run's own result, so a user sees what
training added: spherical k-means with as many clusters as the run on

* the frozen backbone's patch tokens (the baseline papers in this field report), and
* the trained teacher head's features (what step three could reach by plain k-means).

Both are fitted on a sample of the *training* split of the data evaluated, without its labels
(for a run evaluated on its own data, the images it trained on), then scored on the evaluated
split by the same Hungarian protocol as the run, without the dense CRF (it would triple the
CRF's cost). Head features reach pixel size as the run's cluster probe's do (by default their
cosines are upsampled; the paper's way upsamples the features first); the backbone's tokens
are assigned at their own resolution and the cosines upsampled, which needs ``C`` channels at
pixel size instead of ``D``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import open_dataset
from ..data.loading import LoadReport, iterate_batches
from ..data.transforms import normalise_pixels
from ..devices import autocast
from ..feature_cache import FeatureCache, cache_folder, open_existing_cache
from ..model.heads import ClusterProbe
from ..model.kmeans import draw_tokens, gather_tokens, spherical_kmeans, tokens_per_image
from ..model.ops import cosine_similarity_matrix, map_to_tokens, tokens_to_map
from ..progress import Reporter
from .predict import TrainedModel, backbone_and_head, head_map_of_tokens

BASELINE_IMAGES = 256
BASELINE_POINTS = 100_000
BASELINE_RESTARTS = 8


@dataclass
class BaselineCentroids:
    tokens: torch.Tensor  # [C, D], k-means on the backbone's tokens
    head: torch.Tensor  # [C, r], k-means on the teacher head's features
    images: int  # training images they were fitted on
    points: int  # tokens per fit


@torch.no_grad()
def fit_baselines(
    model: TrainedModel,
    batch_size: int = 16,
    workers: int = 0,
    reporter: Reporter | None = None,
    seed: int = 0,
    run_path: Path | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
) -> BaselineCentroids:
    """k-means centroids on up to ``BASELINE_IMAGES`` training images spread over the split of
    ``dataset`` in ``data_dir`` (each by default the run's own). The tokens the run's training
    cached (in ``run_path``) are read instead of running the backbone again; the images they
    belong to are not even decoded."""
    reporter = reporter or Reporter()
    config = model.config
    dataset, data_dir = dataset or config.dataset, data_dir or config.data_dir
    data = open_dataset(dataset, data_dir, "train", model.resolution, config.val_fraction, crops=True)
    count = min(len(data), BASELINE_IMAGES)
    chosen = np.unique(np.linspace(0, len(data) - 1, count).round().astype(np.int64)).tolist()
    batches = [chosen[start : start + batch_size] for start in range(0, len(chosen), batch_size)]
    tokens = (model.resolution // model.backbone.patch_size) ** 2
    per_image = tokens_per_image(BASELINE_POINTS, len(chosen), tokens)
    chooser = torch.Generator().manual_seed(seed)
    token_rows: list[torch.Tensor] = []
    head_rows: list[torch.Tensor] = []
    cache = None
    if run_path is not None:
        folder = cache_folder(run_path, model.resolution, model.backbone.sha256, getattr(data, "samples", []))
        cache = open_existing_cache(folder, len(data), tokens, model.backbone.dim)
    data.pixels_not_needed = cache.snapshot() if cache is not None else None
    loaded = iterate_batches(data, batch_size, LoadReport(), batches=batches, workers=workers)  # type: ignore[arg-type]
    with reporter.task("baselines: k-means on the training split", len(batches)) as advance:
        for batch in loaded:
            if batch:
                backbone_tokens, head_map = _tokens_and_head(model, batch, cache)
                picked = draw_tokens(backbone_tokens.shape[0], backbone_tokens.shape[1], per_image, chooser)
                token_rows.append(_rows(backbone_tokens, picked))
                head_rows.append(_rows(map_to_tokens(head_map), picked))
            advance(1)
    if not token_rows:
        raise ValueError("no training image could be read for the baselines")
    generator = torch.Generator().manual_seed(seed)
    classes = model.num_classes
    on_tokens = spherical_kmeans(torch.cat(token_rows), classes, generator, BASELINE_RESTARTS)
    on_head = spherical_kmeans(torch.cat(head_rows), classes, generator, BASELINE_RESTARTS)
    points = sum(len(rows) for rows in token_rows)
    return BaselineCentroids(on_tokens.centroids, on_head.centroids, len(chosen), points)


def _tokens_and_head(
    model: TrainedModel, batch: dict[str, torch.Tensor], cache: FeatureCache | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's backbone tokens (from the cache where it has them, whose images were not
    decoded) and the teacher head's feature map."""
    if cache is None or not (cached := torch.from_numpy(cache.has(batch["index"]))).any():
        return backbone_and_head(model, normalise_pixels(batch["image"], model.device))
    tokens = cache.tokens_of(batch["index"], cached).to(model.device)
    if not cached.all():
        with autocast(model.device):
            tokens[~cached] = model.backbone(normalise_pixels(batch["image"][~cached], model.device)).float()
    return tokens, head_map_of_tokens(model, tokens)


def _rows(features: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """The ``picked [B, n]`` tokens of every image of ``features [B, P, d]``, as ``[B * n, d]`` on the CPU."""
    return gather_tokens(features, picked).flatten(0, 1).float().cpu()


@torch.no_grad()
def baseline_maps(
    centroids: BaselineCentroids,
    tokens: torch.Tensor,
    head_map: torch.Tensor,
    size: tuple[int, int],
    upsample_scores: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster maps ``[B, H, W]`` of k-means on tokens ``[B, P, D]`` and on the head map ``[B, r, g, g]``
    (upsampled as a cluster probe with ``upsample_scores`` does)."""
    token_cosines = tokens_to_map(cosine_similarity_matrix(tokens, centroids.tokens.to(tokens.device)))
    on_tokens = F.interpolate(token_cosines, size=size, mode="bilinear", align_corners=False).argmax(dim=1)
    head_probe = ClusterProbe(head_map.shape[1], len(centroids.head), upsample_scores=upsample_scores)
    head_probe.centroids.data = centroids.head.to(head_map.device)
    return on_tokens, head_probe.label_map(head_map, size)
