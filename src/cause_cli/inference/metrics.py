"""Unsupervised segmentation metrics (METHOD.md section 4).

A ``C x C`` confusion histogram ``hist[cluster, class]`` is accumulated over the whole split
(labels outside ``[0, C)`` ignored); the Hungarian algorithm matches clusters to classes so
that the most pixels agree; then per-class IoU, mIoU over the classes whose IoU is defined,
and pixel accuracy, all in percent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def confusion_histogram(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``hist[p, l]`` = number of pixels predicted ``p`` whose label is ``l`` (float64 ``[C, C]``)."""
    predictions = predictions.reshape(-1).long()
    labels = labels.reshape(-1).long()
    valid = (labels >= 0) & (labels < num_classes) & (predictions >= 0) & (predictions < num_classes)
    flat = predictions[valid] * num_classes + labels[valid]
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).double().cpu()


def hungarian_mapping(histogram: np.ndarray) -> np.ndarray:
    """``mapping[cluster] = class`` maximising the matched pixels."""
    rows, cols = linear_sum_assignment(histogram, maximize=True)
    mapping = np.empty(histogram.shape[0], dtype=np.int64)
    mapping[rows] = cols
    return mapping


@dataclass
class SegmentationScores:
    iou_per_class: np.ndarray  # percent, NaN where undefined
    precision_per_class: np.ndarray
    miou: float
    pixel_accuracy: float
    mapping: np.ndarray  # mapping[cluster] = class

    def as_dict(self, class_names: list[str] | None = None) -> dict:
        names = class_names or [str(index) for index in range(len(self.iou_per_class))]
        return {
            "miou": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "iou_per_class": {
                name: _finite_or_none(value) for name, value in zip(names, self.iou_per_class, strict=True)
            },
            "cluster_to_class": [int(value) for value in self.mapping],
        }


def _finite_or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def scores_from_histogram(histogram: np.ndarray | torch.Tensor, match: bool = True) -> SegmentationScores:
    """Scores of a ``hist[cluster, class]`` histogram; ``match=False`` takes cluster ``i`` as class ``i``."""
    hist = np.asarray(histogram, dtype=np.float64)
    mapping = hungarian_mapping(hist) if match else np.arange(hist.shape[0])
    # Row j of the matched histogram is the cluster assigned to class j.
    matched = np.zeros_like(hist)
    matched[mapping] = hist
    true_positive = np.diag(matched)
    predicted = matched.sum(axis=1)
    actual = matched.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = true_positive / (predicted + actual - true_positive)
        precision = true_positive / predicted
        accuracy = true_positive.sum() / matched.sum()
    defined = ~np.isnan(iou)
    miou = float(iou[defined].mean() * 100) if defined.any() else float("nan")
    return SegmentationScores(iou * 100, precision * 100, miou, float(accuracy * 100), mapping)


class MetricAccumulator:
    """Accumulates the confusion histogram batch by batch."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.histogram = torch.zeros(num_classes, num_classes, dtype=torch.float64)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        self.histogram += confusion_histogram(predictions, labels, self.num_classes)

    def scores(self, match: bool = True) -> SegmentationScores:
        return scores_from_histogram(self.histogram.numpy(), match)
