"""What only a CUDA GPU can show; skipped elsewhere. ``benchmarks/gpu_check.py`` runs them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cause_cli.config import TrainConfig
from cause_cli.data.synthetic import write_scenes
from cause_cli.devices import autocast, compute_dtype, native_bfloat16, use_precision
from cause_cli.inference.evaluate import EvaluationSettings, evaluate_run
from cause_cli.model.bank import ConceptBank
from cause_cli.model.contrastive import concept_contrastive_loss
from cause_cli.model.slow import LoopBank, loop_contrastive_loss
from cause_cli.training import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = torch.device("cuda", 0)


def test_automatic_precision_matches_the_hardware():
    expected = torch.bfloat16 if torch.cuda.get_device_capability(GPU) >= (8, 0) else torch.float16
    assert native_bfloat16(GPU) == (expected == torch.bfloat16)
    assert compute_dtype(GPU) == expected
    with autocast(GPU):
        assert (torch.ones(8, 8, device=GPU) @ torch.ones(8, 8, device=GPU)).dtype == expected


def test_loop_bank_and_ring_bank_agree_on_the_gpu():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8, (64,), generator=generator).to(GPU)
    features = torch.randn(64, 16, generator=generator).to(GPU)
    keys = torch.rand(64, generator=generator).to(GPU)
    ring, loop = ConceptBank(8, 16, 4, GPU), LoopBank(8, 4)
    ring.update(codes, features, keys)
    loop.update(codes, features, keys)
    clusterbook = torch.randn(8, 24, generator=generator).to(GPU)
    normalised = F.normalize(clusterbook, dim=1)
    student, teacher = (
        torch.randn(2, 5, 16, generator=generator).to(GPU),
        torch.randn(2, 5, 16, generator=generator).to(GPU),
    )
    anchors = normalised[torch.randint(0, 8, (2, 5), generator=generator).to(GPU)]
    bank_features, bank_codes = ring.entries()
    fast = concept_contrastive_loss(student, teacher, anchors, bank_features, normalised[bank_codes])
    loop_features, loop_vectors = loop.flat(clusterbook)
    slow = loop_contrastive_loss(student, teacher, anchors, loop_features, loop_vectors)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"), num_train=8, num_val=3, seed=2, size_range=(64, 72))


def _config(scenes, **overrides) -> TrainConfig:
    settings = dict(data_dir=str(scenes), resolution=64, clusterbook_size=16, projection_dim=32, batch_size=4,
                    epochs_clusterbook=1, epochs_front_door=2, epochs_cluster_probe=2, probe_refine=True)  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.mark.parametrize("precision", ["bfloat16", "float16", "float32"])
def test_training_on_the_gpu_gives_finite_weights(scenes, tmp_path, precision):
    run = train(_config(scenes, precision=precision), tmp_path / "run", "cuda")
    for name in ("clusterbook.safetensors", "head.safetensors", "probe.safetensors"):
        for key, value in load_file(str(run.file(name))).items():
            assert torch.isfinite(value).all(), f"{name}: {key}"


def test_a_step_without_batches_on_the_gpu(scenes, tmp_path):
    train(_config(scenes, epochs_front_door=0, epochs_cluster_probe=0), tmp_path / "run", "cuda")


def test_gpu_and_cpu_agree_in_float32(scenes, tmp_path):
    run = train(_config(scenes, precision="float32"), tmp_path / "run", "cpu")
    with use_precision("float32"):
        on_cpu = evaluate_run(run.path, EvaluationSettings(device="cpu", crf=False, baselines=False), write=False)
        on_gpu = evaluate_run(run.path, EvaluationSettings(device="cuda", crf=False, baselines=False), write=False)
    assert abs(on_cpu["pixel_accuracy"] - on_gpu["pixel_accuracy"]) < 0.5


def test_the_torch_crf_on_the_gpu_refines_as_on_the_cpu():
    from cause_cli.inference.crf_torch import dense_crf_batch

    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (48, 64, 3), generator=generator, dtype=torch.uint8) for _ in range(3)]
    scores = [torch.log_softmax(3 * torch.randn(5, 48, 64, generator=generator), dim=0) for _ in images]
    on_cpu = dense_crf_batch(images, scores)
    on_gpu = dense_crf_batch([image.to(GPU) for image in images], [score.to(GPU) for score in scores])
    for expected, actual in zip(on_cpu, on_gpu, strict=True):
        assert actual.device.type == "cuda"
        assert torch.allclose(actual.cpu(), expected, atol=1e-4)
