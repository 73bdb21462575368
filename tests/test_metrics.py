"""Confusion histogram, Hungarian matching, IoU, mIoU and pixel accuracy: against the
reference's NiceTool (shared/parity/nicetool.npz) and against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cause_cli.inference.metrics import MetricAccumulator, confusion_histogram, hungarian_mapping, scores_from_histogram

from .helpers import assert_close


@pytest.mark.parametrize("scenario", ["A", "B"])
def test_matches_reference_nicetool(parity, scenario):
    data = parity("nicetool")
    accumulator = MetricAccumulator(27)
    for batch in range(3):
        prediction = torch.from_numpy(data[f"{scenario}_pred_{batch}"])
        label = torch.from_numpy(data[f"{scenario}_label_{batch}"])
        accumulator.update(prediction, label)
        assert_close(accumulator.histogram, data[f"{scenario}_histogram_{batch}"].astype(np.float64))
        scores = accumulator.scores()
        assert np.array_equal(
            scores.mapping[data[f"{scenario}_assign_rows_{batch}"]], data[f"{scenario}_assign_cols_{batch}"]
        )
        assert scores.miou == pytest.approx(float(data[f"{scenario}_mIoU_{batch}"]), rel=1e-5)
        assert scores.pixel_accuracy == pytest.approx(float(data[f"{scenario}_Acc_{batch}"]), rel=1e-5)
        expected_iou = data[f"{scenario}_iou_per_class_{batch}"].astype(np.float64)
        assert np.array_equal(np.isnan(scores.iou_per_class), np.isnan(expected_iou))
        np.testing.assert_allclose(scores.iou_per_class, expected_iou, rtol=1e-5, equal_nan=True)
        np.testing.assert_allclose(
            scores.precision_per_class, data[f"{scenario}_prc_per_class_{batch}"], rtol=1e-5, equal_nan=True
        )
        mapped = torch.from_numpy(scores.mapping)[prediction]
        assert torch.equal(mapped, torch.from_numpy(data[f"{scenario}_hungarian_pred_{batch}"]))


def test_scenario_b_has_undefined_classes_left_out_of_the_mean(parity):
    data = parity("nicetool")
    accumulator = MetricAccumulator(27)
    for batch in range(3):
        accumulator.update(torch.from_numpy(data[f"B_pred_{batch}"]), torch.from_numpy(data[f"B_label_{batch}"]))
    scores = accumulator.scores()
    assert np.isnan(scores.iou_per_class).any()
    assert scores.miou == pytest.approx(np.nanmean(scores.iou_per_class))


def brute_force_best(histogram: np.ndarray) -> tuple[float, float]:
    """Try every assignment of clusters to classes; return (best matched pixels, its mIoU)."""
    size = histogram.shape[0]
    best = (-1.0, 0.0)
    for permutation in itertools.permutations(range(size)):
        matched = sum(histogram[cluster, permutation[cluster]] for cluster in range(size))
        if matched > best[0]:
            ious = []
            for cluster in range(size):
                cls = permutation[cluster]
                tp = histogram[cluster, cls]
                union = histogram[cluster].sum() + histogram[:, cls].sum() - tp
                if union > 0:
                    ious.append(tp / union)
            best = (matched, 100 * float(np.mean(ious)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(rng.integers(0, 5, size=(3, 20, 20)))
    predictions = torch.from_numpy(rng.permutation(5)[labels.numpy()])
    noise = torch.from_numpy(rng.random((3, 20, 20)) < 0.4)
    predictions[noise] = torch.from_numpy(rng.integers(0, 5, size=int(noise.sum())))
    histogram = confusion_histogram(predictions, labels, 5).numpy()
    best_matched, best_miou = brute_force_best(histogram)
    scores = scores_from_histogram(histogram)
    mapping = hungarian_mapping(histogram)
    assert sum(histogram[c, mapping[c]] for c in range(5)) == best_matched
    assert scores.miou == pytest.approx(best_miou)
    assert scores.pixel_accuracy == pytest.approx(100 * best_matched / histogram.sum())


def test_hand_computed_case():
    # Two clusters swapped relative to the classes; one ignored pixel (255) and one -1.
    labels = torch.tensor([[0, 0, 1, 1], [1, 1, 255, -1]])
    predictions = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0]])
    histogram = confusion_histogram(predictions, labels, 2).numpy()
    assert histogram.tolist() == [[0, 3], [2, 1]]  # hist[cluster, class]
    scores = scores_from_histogram(histogram)
    assert scores.mapping.tolist() == [1, 0]
    # class 0: tp 2, union 2 + 3 - 2 = 3; class 1: tp 3, union 3 + 4 - 3 = 4
    assert scores.iou_per_class.tolist() == pytest.approx([200 / 3, 75.0])
    assert scores.pixel_accuracy == pytest.approx(500 / 6)
