"""The dense CRF: the paper's settings on real photos, and a worker pool that never hangs."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cause_cli.errors import CauseError
from cause_cli.inference import crf as crf_module
from cause_cli.inference.crf import CRFPool, crf_labels, dense_crf
from cause_cli.inference.metrics import MetricAccumulator

from .helpers import shared_path

pytestmark = pytest.mark.usefixtures("pydensecrf")

VOC_CLASSES = 21


def degraded_log_probabilities(label: np.ndarray, seed: int, factor: int = 16, noise: float = 0.5) -> np.ndarray:
    """A poor unary made from the ground truth: one-hot, downsampled, blurred back up, noisy."""
    one_hot = F.one_hot(torch.from_numpy(np.where(label == 255, 0, label)).long(), VOC_CLASSES)
    one_hot = one_hot.permute(2, 0, 1)[None].float()
    height, width = label.shape
    small = F.avg_pool2d(one_hot, factor)
    blurred = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)[0]
    generator = torch.Generator().manual_seed(seed)
    scores = 4.0 * blurred + noise * torch.randn(blurred.shape, generator=generator)
    return torch.log_softmax(scores, dim=0).numpy()


def voc_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    root = shared_path("data", "real", "voc2012")
    pairs = []
    for image_path in sorted((root / "images").glob("*.png")):
        image = np.asarray(Image.open(image_path).convert("RGB").resize((256, 256), Image.Resampling.BILINEAR))
        label = np.asarray(
            Image.open(root / "SegmentationClass" / image_path.name).resize((256, 256), Image.Resampling.NEAREST)
        )
        pairs.append((image, label.astype(np.int64)))
    return pairs


def crf_before_and_after(workers: int = 0) -> tuple[float, float]:
    before, after = MetricAccumulator(VOC_CLASSES), MetricAccumulator(VOC_CLASSES)
    pairs = voc_pairs()
    unaries = [degraded_log_probabilities(label, seed) for seed, (_, label) in enumerate(pairs)]
    with CRFPool(workers) as pool:
        refined = pool.run([image for image, _ in pairs], unaries)
    for (_, label), unary, refined_labels in zip(pairs, unaries, refined, strict=True):
        label_t = torch.from_numpy(np.where(label == 255, -1, label))
        before.update(torch.from_numpy(unary.argmax(axis=0)), label_t)
        after.update(torch.from_numpy(refined_labels.astype(np.int64)), label_t)
    return before.scores(match=False).miou, after.scores(match=False).miou


def test_crf_improves_a_degraded_unary_on_real_voc_photos():
    before, after = crf_before_and_after(workers=2)
    print(f"VOC real photos, degraded unary: mIoU {before:.1f} before CRF, {after:.1f} after")
    assert after > before + 10.0


def test_dense_crf_returns_marginals():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    scores = torch.log_softmax(torch.randn(4, 20, 30), dim=0).numpy()
    marginals = dense_crf(image, scores)
    assert marginals.shape == (4, 20, 30) and marginals.dtype == np.float32
    np.testing.assert_allclose(marginals.sum(axis=0), 1.0, rtol=1e-4)


def test_confident_unary_survives_a_flat_image():
    image = np.full((16, 16, 3), 128, dtype=np.uint8)
    scores = np.full((2, 16, 16), np.log(0.1), dtype=np.float32)
    scores[1] = np.log(0.9)
    assert (dense_crf(image, scores).argmax(axis=0) == 1).all()


# Jobs for the pool tests; module level so that spawned workers can import them.
def die_once_job(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    marker = Path(os.environ["CAUSE_TEST_CRF_MARKER"])
    if not marker.exists():
        marker.write_text("died once")
        os.kill(os.getpid(), signal.SIGKILL)
    return dense_crf(image, scores)


def die_once_labels_job(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    die_once_job(image, scores)
    return crf_labels(image, scores)


def always_die_job(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def hang_job(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    time.sleep(600)
    raise AssertionError("unreachable")


def small_inputs(count: int = 3):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(count)]
    scores = [torch.log_softmax(torch.randn(3, 12, 12), dim=0).numpy() for _ in range(count)]
    return images, scores


def test_a_killed_worker_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("CAUSE_TEST_CRF_MARKER", str(tmp_path / "marker"))
    images, scores = small_inputs()
    with CRFPool(workers=2, job=die_once_job) as pool:
        results = pool.run(images, scores)
    assert (tmp_path / "marker").exists()
    for result, expected in zip(results, [dense_crf(i, s) for i, s in zip(images, scores, strict=True)], strict=True):
        np.testing.assert_allclose(result, expected, rtol=1e-6)


def test_workers_that_keep_dying_fail_with_one_sentence():
    images, scores = small_inputs()
    started = time.monotonic()
    with CRFPool(workers=2, job=always_die_job) as pool, pytest.raises(CauseError, match="died twice"):
        pool.run(images, scores)
    assert time.monotonic() - started < 60


def test_a_hung_worker_is_stopped():
    images, scores = small_inputs(1)
    started = time.monotonic()
    with CRFPool(workers=1, job=hang_job, seconds_per_image=3) as pool, pytest.raises(CauseError, match="longer than"):
        pool.run(images, scores)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("pydensecrf", [None])  # this test runs with or without the module
def test_missing_pydensecrf_is_one_sentence(monkeypatch, pydensecrf):
    # As if the module were not installed: an import of it raises ImportError.
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)
    assert not crf_module.crf_available()
    with pytest.raises(CauseError, match="pip install cause-cli\\[crf\\]") as refused:
        CRFPool(0)
    assert str(refused.value).count(". ") == 0 and str(refused.value).endswith(".")


def reference_crf_image(normalised: torch.Tensor) -> np.ndarray:
    """The reference's image for the CRF, through torchvision itself: to_pil_image(invTrans(x))
    with invTrans two Normalize steps (divide by 1 / std, then subtract -mean)."""
    from torchvision import transforms

    inverse = transforms.Compose(
        [
            transforms.Normalize(mean=[0.0, 0.0, 0.0], std=[1 / 0.229, 1 / 0.224, 1 / 0.225]),
            transforms.Normalize(mean=[-0.485, -0.456, -0.406], std=[1.0, 1.0, 1.0]),
        ]
    )
    return np.asarray(transforms.functional.to_pil_image(inverse(normalised.clone())))


def test_crf_maps_of_real_photos_equal_the_reference_arithmetic_on_every_pixel():
    from cause_cli.data.transforms import denormalise_to_uint8, normalise, resize_and_crop

    root = shared_path("data", "real")
    photos = sorted((root / "voc2012" / "images").glob("*.png")) + sorted(root.glob("cityscapes/leftImg8bit/**/*.png"))
    assert len(photos) == 11
    naive_differs = 0
    for seed, path in enumerate(photos):
        normalised = normalise(resize_and_crop(Image.open(path).convert("RGB"), 320))
        ours = denormalise_to_uint8(normalised[None])[0]
        reference = reference_crf_image(normalised)
        np.testing.assert_array_equal(ours, reference)
        naive = ((normalised * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
                  + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)).clamp(0, 1) * 255).to(torch.uint8)  # fmt: skip
        naive_differs += int((naive.permute(1, 2, 0).numpy() != reference).any())
        scores = torch.log_softmax(torch.randn(5, 320, 320, generator=torch.Generator().manual_seed(seed)), 0).numpy()
        np.testing.assert_array_equal(crf_labels(ours, scores), crf_labels(reference, scores))
    assert naive_differs > 0, "x * std + mean should round some pixel differently on these photos"


def test_dense_crf_uses_the_papers_settings_on_the_bgr_image(monkeypatch):
    """METHOD.md section 4: 10 mean-field iterations, a Gaussian kernel (sxy 1, compat 3), a
    bilateral kernel (sxy 67, srgb 3, compat 4) on the 8-bit image in BGR order, and the
    unary -log softmax of the given log-probabilities."""
    import pydensecrf.densecrf as dcrf

    calls: dict[str, object] = {}
    real_crf = dcrf.DenseCRF2D

    class RecordingCRF:
        def __init__(self, width, height, classes):
            calls["shape"] = (width, height, classes)
            self.model = real_crf(width, height, classes)

        def setUnaryEnergy(self, unary):
            calls["unary"] = np.array(unary)
            self.model.setUnaryEnergy(unary)

        def addPairwiseGaussian(self, **settings):
            calls["gaussian"] = settings
            self.model.addPairwiseGaussian(**settings)

        def addPairwiseBilateral(self, **settings):
            calls["bilateral"] = {key: value for key, value in settings.items() if key != "rgbim"}
            calls["image"] = np.array(settings["rgbim"])
            self.model.addPairwiseBilateral(**settings)

        def inference(self, iterations):
            calls["iterations"] = iterations
            return self.model.inference(iterations)

    monkeypatch.setattr(dcrf, "DenseCRF2D", RecordingCRF)
    generator = np.random.default_rng(0)
    image = generator.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    log_probabilities = np.log(generator.dirichlet(np.ones(4), size=(5, 7)).transpose(2, 0, 1)).astype(np.float32)
    dense_crf(image, log_probabilities)
    assert calls["shape"] == (7, 5, 4)
    assert calls["iterations"] == 10
    assert calls["gaussian"] == {"sxy": 1, "compat": 3}
    assert calls["bilateral"] == {"sxy": 67, "srgb": 3, "compat": 4}
    np.testing.assert_array_equal(calls["image"], image[:, :, ::-1])
    np.testing.assert_allclose(calls["unary"], -log_probabilities.reshape(4, -1), rtol=1e-5, atol=1e-5)
