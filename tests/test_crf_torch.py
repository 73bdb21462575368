"""The dense CRF in torch: its permutohedral lattice is a Gaussian filter, it refines as
pydensecrf does on real photos, and the backend switch chooses and refuses as it says."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from cause_cli.errors import CauseError
from cause_cli.inference import crf as crf_module
from cause_cli.inference.crf import TorchCRF, choose_crf_backend, crf_labels, dense_crf
from cause_cli.inference.crf_torch import crf_label_maps, dense_crf_batch
from cause_cli.inference.lattice import build_lattice

from .helpers import invoke, label_maps, require_pydensecrf, shared_path, train_small_run
from .test_crf import degraded_log_probabilities, voc_pairs
from .test_datasets import make_voc


def gaussian_filtered(features: torch.Tensor, values: torch.Tensor, std: float) -> torch.Tensor:
    """The slow obvious filter: every point's values weighted by exp(-|f_i - f_j|^2 / 2 std^2)."""
    weights = torch.exp(-(torch.cdist(features.double(), features.double()) ** 2) / (2 * std**2))
    return weights @ values.double()


@pytest.mark.parametrize(("dimensions", "spread"), [(2, 4.0), (2, 10.0), (5, 3.0)])
def test_the_lattice_filter_is_a_gaussian_of_standard_deviation_one(dimensions, spread):
    generator = torch.Generator().manual_seed(dimensions)
    features = torch.rand(400, dimensions, generator=generator) * spread
    values = torch.rand(400, 3, generator=generator)
    lattice = build_lattice(features)
    # The lattice's filter is the Gaussian's up to a scale, which normalising by the filtered ones removes.
    normalised = (lattice.filter(values) / lattice.filter(torch.ones(400, 1))).double()

    def error(std: float) -> torch.Tensor:
        exact = gaussian_filtered(features, values, std) / gaussian_filtered(features, torch.ones(400, 1), std)
        return (normalised - exact).abs()

    # Stated tolerance: the lattice approximates the Gaussian to 1 % on average, 5 % at worst,
    # and a Gaussian half or twice as wide fits it clearly worse.
    assert error(1.0).mean() < 0.01 and error(1.0).max() < 0.05
    assert error(0.5).mean() > 2 * error(1.0).mean() and error(2.0).mean() > 2 * error(1.0).mean()


def test_each_point_spreads_to_distinct_corners_with_weights_that_sum_to_one():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(500, 5, generator=generator) * 20
    lattice = build_lattice(features)
    assert torch.allclose(lattice.weights.sum(dim=1), torch.ones(500), atol=1e-5)
    assert (lattice.weights >= -1e-6).all()
    assert all(len(set(row.tolist())) == 6 for row in lattice.corners)
    assert lattice.corners.min() >= 1 and lattice.corners.max() <= lattice.points


def test_images_refined_together_equal_each_refined_alone():
    generator = torch.Generator().manual_seed(1)
    images = [
        torch.randint(0, 256, size, generator=generator, dtype=torch.uint8) for size in ((30, 41, 3), (25, 19, 3))
    ]
    scores = [torch.log_softmax(3 * torch.randn(4, *image.shape[:2], generator=generator), 0) for image in images]
    together = dense_crf_batch(images, scores)
    for image, score, refined in zip(images, scores, together, strict=True):
        (alone,) = dense_crf_batch([image], [score])
        assert torch.allclose(refined, alone, atol=1e-5)
        assert torch.allclose(refined.sum(dim=0), torch.ones(image.shape[:2]), atol=1e-5)


def test_the_torch_crf_gives_pydensecrfs_label_maps_on_real_photos():
    require_pydensecrf()
    pairs = voc_pairs()
    unaries = [degraded_log_probabilities(label, seed) for seed, (_, label) in enumerate(pairs)]
    expected = [crf_labels(image, unary) for (image, _), unary in zip(pairs, unaries, strict=True)]
    refined = crf_label_maps(
        [torch.from_numpy(image.copy()) for image, _ in pairs], [torch.from_numpy(u) for u in unaries]
    )
    same = sum(int((mine.numpy() == theirs).sum()) for mine, theirs in zip(refined, expected, strict=True))
    total = sum(theirs.size for theirs in expected)
    changed = sum(int((unary.argmax(0) != theirs).sum()) for unary, theirs in zip(unaries, expected, strict=True))
    print(
        f"torch CRF agrees with pydensecrf on {same / total:.4%} of {total:,} pixels ({changed:,} changed by the CRF)"
    )
    assert changed > total * 0.02  # the CRF does move pixels here, so agreeing means something
    assert same / total >= 0.995


def test_the_torch_crfs_marginals_are_pydensecrfs_to_float_rounding():
    require_pydensecrf()
    for seed, (image, label) in enumerate(voc_pairs()[:3]):
        unary = degraded_log_probabilities(label, seed)
        if seed == 2:  # confident enough that probabilities fall below the unary's floor of 1e-5
            unary = torch.log_softmax(4 * torch.from_numpy(unary), dim=0).numpy()
        (mine,) = dense_crf_batch([torch.from_numpy(image.copy())], [torch.from_numpy(unary)])
        difference = np.abs(mine.numpy() - dense_crf(image, unary))
        assert difference.max() < 1e-5, f"photo {seed}: marginals differ by up to {difference.max():.2e}"


def test_auto_is_torch_on_a_gpu_and_pydensecrf_on_a_cpu_where_it_is_installed(monkeypatch):
    monkeypatch.setattr(crf_module, "crf_available", lambda: True)
    assert choose_crf_backend("auto", torch.device("cuda")) == "torch"
    assert choose_crf_backend("auto", torch.device("cpu")) == "pydensecrf"
    assert choose_crf_backend("torch", torch.device("cpu")) == "torch"
    monkeypatch.setattr(crf_module, "crf_available", lambda: False)
    assert choose_crf_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(CauseError, match="--crf-backend torch"):
        choose_crf_backend("pydensecrf", torch.device("cpu"))
    with pytest.raises(CauseError, match="takes one of auto, pydensecrf, torch"):
        choose_crf_backend("fast", torch.device("cpu"))


def test_the_torch_backend_keeps_the_pools_interface():
    refiner = TorchCRF(torch.device("cpu"))
    image = np.zeros((5, 6, 3), dtype=np.uint8)
    scores = np.log(np.full((3, 5, 6), 1 / 3, dtype=np.float32))
    scores[1] += 1.0
    (labels,) = refiner.run([image], [scores])
    assert labels.shape == (5, 6) and (labels == 1).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_small_run(tmp_path_factory.mktemp("crf-torch"), num_val=6, seed=4)


@pytest.mark.slow
def test_segment_and_eval_agree_between_the_backends(trained, tmp_path):
    require_pydensecrf()
    _, run = trained
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted(shared_path("data", "real", "voc2012", "images").glob("*.png"))[:4]:
        (photos / path.name).write_bytes(path.read_bytes())
    maps, figures = {}, {}
    for backend in ("pydensecrf", "torch"):
        out = tmp_path / backend
        result = invoke("segment", photos, "--run", run, "--out", out, "--crf", "--crf-backend", backend, "-q")
        assert result.exit_code == 0, result.output
        assert json.loads((out / "summary.json").read_text())["crf_backend"] == backend
        maps[backend] = label_maps(out)
    voc = tmp_path / "voc"
    make_voc(voc)
    for backend in ("pydensecrf", "torch"):  # after both segmentations, which must both write clusters
        result = invoke("eval", "--run", run, "--dataset", "voc2012", "--data-dir", voc, "--crf", "--crf-backend",
                        backend, "--no-baselines", "--json", "-q")  # fmt: skip
        assert result.exit_code == 0, result.output
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["crf_backend"] == backend
        figures[backend] = metrics["crf"]["miou"]
    pixels = same = 0
    for name, expected in maps["pydensecrf"].items():
        mine, theirs = np.asarray(maps["torch"][name]), np.asarray(expected)
        pixels, same = pixels + theirs.size, same + int((mine == theirs).sum())
    print(f"segment --crf: torch agrees with pydensecrf on {same / pixels:.4%} of {pixels:,} pixels; "
          f"eval --crf on the real VOC photos: mIoU {figures['pydensecrf']:.2f} (pydensecrf) and "
          f"{figures['torch']:.2f} (torch)")  # fmt: skip
    assert same / pixels >= 0.995
    assert abs(figures["torch"] - figures["pydensecrf"]) <= 0.2


def test_without_pydensecrf_the_crf_runs_in_torch_and_asking_for_it_is_one_sentence(trained, tmp_path, monkeypatch):
    _, run = trained
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)
    photo = sorted(shared_path("data", "real", "voc2012", "images").glob("*.png"))[0]
    out = tmp_path / "out"
    refused = invoke("segment", photo, "--run", run, "--out", out, "--crf", "--crf-backend", "pydensecrf", "-q")
    assert refused.exit_code != 0 and "--crf-backend torch" in refused.output
    assert not out.exists()  # refused before anything was written
    done = invoke("segment", photo, "--run", run, "--out", out, "--crf", "-q")
    assert done.exit_code == 0, done.output
    assert json.loads((out / "summary.json").read_text())["crf_backend"] == "torch"
