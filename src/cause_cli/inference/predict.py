"""From images to cluster maps (METHOD.md section 4).

The teacher head's features are upsampled bilinearly to the output size, then every pixel
goes to the centroid of highest cosine (the paper's; by default the tokens are scored and
their scores upsampled instead, see :meth:`ClusterProbe.score_map`). Optionally the image
and its horizontal flip both go through backbone and head, and the two feature maps are
averaged (the flipped one flipped back) before upsampling. For the dense CRF the unary is
``log_softmax(3 * cos)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..backbones import FrozenBackbone, load_backbone, refuse_other_backbone
from ..config import TrainConfig
from ..data.transforms import denormalised_pixels, normalise, resize_and_crop
from ..devices import autocast
from ..errors import CauseError
from ..model.heads import CRF_SHARPNESS, ClusterProbe, LinearProbe, SegmentationHeads
from ..model.ops import map_to_tokens, tokens_to_map
from ..runs import RUN_FILE, RunDirectory
from ..trained import load_weights
from .crf import CRFPool, PendingResults, RefinedNow, TorchCRF


@dataclass
class TrainedModel:
    """Everything inference needs, loaded from a run folder."""

    config: TrainConfig
    backbone: FrozenBackbone
    heads: SegmentationHeads
    cluster_probe: ClusterProbe
    linear_probe: LinearProbe
    num_classes: int
    class_names: list[str] | None
    device: torch.device

    @property
    def resolution(self) -> int:
        assert self.config.resolution is not None
        return self.config.resolution


def load_trained(run: RunDirectory, device: torch.device, backbone: str | None = None) -> TrainedModel:
    """The trained model of ``run``; refuses a backbone other than the one it was trained with."""
    info = run.read_run_info()
    config = run.config()
    if backbone is not None:
        refuse_other_backbone(run.path, info, backbone)
    loaded_backbone = load_backbone(config.backbone, device, pos_embed=config.pos_embed)
    refuse_other_backbone(run.path, info, loaded_backbone)
    num_classes = int(info["num_classes"])  # checked with the rest of run.json: run_checks.py
    assert config.resolution is not None  # idem
    if config.resolution % loaded_backbone.patch_size:
        raise CauseError(
            f"{run.file(RUN_FILE)} is not a run description this toolkit wrote: its config's 'resolution' "
            f"{config.resolution} is not a multiple of the patch size {loaded_backbone.patch_size} of backbone "
            f"'{config.backbone}'; train the run again."
        )
    weights = load_weights(run, config, loaded_backbone.dim, loaded_backbone.patch_size, num_classes, device)
    return TrainedModel(
        config,
        loaded_backbone,
        weights.heads,
        weights.cluster_probe,
        weights.linear_probe,
        num_classes,
        info.get("class_names"),
        device,
    )


@torch.no_grad()
def backbone_and_head(model: TrainedModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's tokens ``[B, P, D]`` and the teacher head's feature map ``[B, r, g, g]``
    of normalised images ``[B, 3, R, R]``."""
    with autocast(model.device):
        tokens = model.backbone(images)
    return tokens.float(), head_map_of_tokens(model, tokens)


@torch.no_grad()
def head_map_of_tokens(model: TrainedModel, tokens: torch.Tensor) -> torch.Tensor:
    """The teacher head's feature map ``[B, r, g, g]`` of backbone tokens ``[B, P, D]``."""
    with autocast(model.device):
        features = tokens_to_map(model.heads.teacher(tokens).float())
    return features.float()


@torch.no_grad()
def head_feature_map(model: TrainedModel, images: torch.Tensor) -> torch.Tensor:
    """Teacher head features ``[B, r, g, g]`` of normalised images ``[B, 3, R, R]``."""
    return backbone_and_head(model, images)[1]


@torch.no_grad()
def flip_averaged_feature_map(model: TrainedModel, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The mean of ``features`` (the images' own) and the flipped images' features flipped back."""
    flipped = head_feature_map(model, images.flip(dims=[3]))
    return (features + flipped.flip(dims=[3])) / 2


@torch.no_grad()
def cluster_scores(model: TrainedModel, feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Every pixel's score for every cluster (a cosine with each centroid, or with a spread a
    log-density), upsampled as the run says (:meth:`ClusterProbe.score_map`): ``[B, C, H, W]``."""
    return model.cluster_probe.score_map(feature_map, size)


@torch.no_grad()
def cluster_labels(model: TrainedModel, feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Every pixel's cluster of highest score, as ``cluster_scores(...).argmax(dim=1)`` gives
    it: ``[B, H, W]``."""
    return model.cluster_probe.label_map(feature_map, size)


@torch.no_grad()
def linear_logits(model: TrainedModel, feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Linear-probe logits upsampled to ``size``: ``[B, C, H, W]``."""
    logits = model.linear_probe(map_to_tokens(feature_map))
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def crf_unary(scores: torch.Tensor, sharpness: float = CRF_SHARPNESS) -> torch.Tensor:
    """Log-probabilities the dense CRF starts from: ``log_softmax(3 * cos)`` over clusters, or
    with a spread (``sharpness`` 1, :attr:`ClusterProbe.sharpness`) the log-densities' posterior."""
    return torch.log_softmax(sharpness * scores, dim=1)


@dataclass
class BatchPredictions:
    """Cluster maps ``[B, H, W]`` of one batch: from the image alone (``clusters``) and from
    the linear probe; the dense CRF's maps of the image-and-flip average, still being computed
    (``refining``; :meth:`refined` waits for them); and the features they came from
    (``tokens [B, P, D]``, ``features [B, r, g, g]``)."""

    clusters: torch.Tensor
    linear: torch.Tensor
    refining: PendingResults | RefinedNow | None
    tokens: torch.Tensor
    features: torch.Tensor

    def refined(self) -> torch.Tensor | None:
        if self.refining is None:
            return None
        return stack_label_maps(self.refining.result(), self.clusters.device)


def stack_label_maps(maps: list[np.ndarray] | list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The CRF's label maps (arrays from the workers, or tensors) as one ``[B, H, W]`` long
    tensor on ``device``."""
    return torch.stack([torch.as_tensor(labels) for labels in maps]).long().to(device)


@torch.no_grad()
def predict_batch(
    model: TrainedModel, images: torch.Tensor, size: tuple[int, int], pool: CRFPool | TorchCRF | None
) -> BatchPredictions:
    """Every prediction evaluation reports, in one pass: the image's own features serve both
    the plain maps and the flip average, so the backbone runs twice per image (the reference
    runs it three times, in two passes). The CRF work is submitted to ``pool`` and not waited
    for."""
    tokens, features = backbone_and_head(model, images)
    clusters = cluster_labels(model, features, size)
    linear = linear_logits(model, features, size).argmax(dim=1)
    refining = None
    if pool is not None:
        averaged = flip_averaged_feature_map(model, images, features)
        unary = crf_unary(cluster_scores(model, averaged, size), model.cluster_probe.sharpness)
        # Made where the images are: the torch CRF refines them there, the workers get arrays.
        refining = pool.submit(list(denormalised_pixels(images)), list(unary))
    return BatchPredictions(clusters, linear, refining, tokens, features)


# Cosines are computed at most at this size (longest side), then label maps are resized to
# the image's own size, so a 40-megapixel photo costs no more memory than a small one.
MAX_PREDICTION_SIDE = 1024


def prediction_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, MAX_PREDICTION_SIDE / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def image_features(
    model: TrainedModel, images: list[Image.Image], flip: bool = False
) -> Iterator[tuple[torch.Tensor, tuple[int, int]]]:
    """Each image's head feature map ``[1, r, g, g]`` and its prediction size (its own, up to
    1,024 pixels on the longest side), from one batch through backbone and head; ``flip``
    averages the features with the mirrored image's, as the CRF path of evaluation does. Give
    them to :func:`cluster_labels`, or to :func:`cluster_scores` for the scores."""
    resized = [resize_and_crop(image, model.resolution, square_resize=True) for image in images]
    batch = torch.stack([normalise(image) for image in resized]).to(model.device)
    features = head_feature_map(model, batch)
    if flip:
        features = flip_averaged_feature_map(model, batch, features)
    for index, image in enumerate(images):
        yield features[index : index + 1], prediction_size(image.width, image.height)


def crf_image(image: Image.Image, scores: torch.Tensor) -> np.ndarray:
    """The image at its scores' size, as the dense CRF's pairwise terms read it."""
    height, width = scores.shape[-2:]
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


def confidence_and_margin(scores: torch.Tensor, sharpness: float = CRF_SHARPNESS) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of one image's ``[1, C, H, W]`` scores: the probability of its best cluster
    (``softmax(3 cos)``, or the posterior with a spread: the distribution the dense CRF starts
    from) and how far it leads the second best, both ``float16 [H, W]``."""
    probabilities = torch.softmax(sharpness * scores[0].float(), dim=0)
    top = probabilities.topk(min(2, probabilities.shape[0]), dim=0).values
    margin = top[0] - top[1] if top.shape[0] > 1 else top[0]
    return top[0].cpu().numpy().astype(np.float16), margin.cpu().numpy().astype(np.float16)
