"""Mixed precision: which dtype runs where, and whole short runs in bfloat16 and float16 under
CPU autocast, so that the code paths a GPU takes run on every CI machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cause_cli.config import TrainConfig
from cause_cli.data.synthetic import write_scenes
from cause_cli.devices import autocast, compute_dtype, gradient_scaler, use_precision
from cause_cli.errors import CauseError
from cause_cli.inference.evaluate import EvaluationSettings, evaluate_run
from cause_cli.training import train
from cause_cli.training.context import restore_cuda_rng

CPU = torch.device("cpu")


def test_auto_is_float32_on_the_cpu_and_a_named_precision_wins():
    assert compute_dtype(CPU) == torch.float32
    with use_precision("bfloat16"):
        assert compute_dtype(CPU) == torch.bfloat16
        with autocast(CPU):
            assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    with use_precision("float16"):
        assert gradient_scaler(CPU).is_enabled()
    assert not gradient_scaler(CPU).is_enabled()
    with pytest.raises(CauseError, match="Unknown precision 'half'"), use_precision("half"):
        pass


@pytest.mark.parametrize(("capability", "expected"), [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                      ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])  # fmt: skip
def test_gpus_that_only_emulate_bfloat16_compute_in_float16(monkeypatch, capability, expected):
    # A V100 (7.0) or T4 (7.5) answers yes to is_bf16_supported() by emulating it, slowly.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert compute_dtype(torch.device("cuda", 0)) == expected


def test_a_checkpoint_from_more_gpus_resumes_on_fewer(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    states = [torch.full((4,), index, dtype=torch.uint8) for index in range(4)]
    restore_cuda_rng({"cuda_rng": states}, torch.device("cuda", 1))
    assert torch.equal(restored[-1][0], states[1])
    restore_cuda_rng({"cuda_rng": states[:1]}, torch.device("cuda", 3))  # that GPU is gone: no IndexError
    restore_cuda_rng({"cuda_rng": states[2]}, torch.device("cuda", 0))  # this toolkit's form: one state
    assert len(restored) == 2 and torch.equal(restored[-1][0], states[2])
    restore_cuda_rng({"cuda_rng": states}, CPU)
    assert len(restored) == 2


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"), num_train=8, num_val=3, seed=2, size_range=(64, 72))


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_a_whole_run_trains_and_evaluates_in_mixed_precision(scenes, tmp_path, precision):
    config = TrainConfig(data_dir=str(scenes), resolution=64, clusterbook_size=16, projection_dim=32, batch_size=4,
                         epochs_clusterbook=1, epochs_front_door=2, epochs_cluster_probe=2, probe_refine=True,
                         precision=precision)  # fmt: skip
    run = train(config, tmp_path / "run", "cpu")
    for name in ("clusterbook.safetensors", "head.safetensors", "probe.safetensors"):
        for key, value in load_file(str(run.file(name))).items():
            assert torch.isfinite(value).all(), f"{name}: {key}"
    assert run.config().precision == precision
    with use_precision(precision):
        result = evaluate_run(run.path, EvaluationSettings(device="cpu", crf=False, baselines=False), write=False)
    assert 0 <= result["miou"] <= 100


def test_a_step_without_batches_still_reports_its_loss(scenes, tmp_path):
    config = TrainConfig(data_dir=str(scenes), resolution=64, clusterbook_size=16, projection_dim=32, batch_size=4,
                         epochs_clusterbook=0, epochs_front_door=0, epochs_cluster_probe=0)  # fmt: skip
    run = train(config, tmp_path / "run", "cpu")
    assert "last modularity loss nan" in run.file("train.log").read_text()


def test_processes_started_by_torchrun_need_one_run_folder(tmp_path):
    environment = {**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2", "CAUSE_HOME": str(tmp_path)}
    refused = subprocess.run(
        [sys.executable, "-m", "cause_cli", "train", "--data-dir", str(tmp_path), "--device", "cpu"],
        env=environment, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "give it with --run" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "runs").exists()


def test_loader_workers_follow_the_device_and_the_cpus_this_process_may_use(monkeypatch):
    from cause_cli import devices

    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert devices.available_cpus() <= 3
    monkeypatch.setattr(devices, "available_cpus", lambda: 16)
    gpu = torch.device("cuda", 0)
    assert devices.loader_workers(None, CPU) == 0
    assert devices.loader_workers(None, gpu) == 8
    assert devices.loader_workers(None, gpu, processes_here=4) == 3
    assert devices.loader_workers(2, gpu) == 2 and devices.loader_workers(5, CPU) == 5


def test_torch_threads_are_capped_at_the_cpus_this_process_may_use(monkeypatch):
    from cause_cli import devices

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)  # what torch would take on an 8-core machine
        monkeypatch.setattr(devices, "available_cpus", lambda: 2)  # a container allowed 2 of them
        devices.resolve_device("cpu")
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(devices, "available_cpus", lambda: 16)  # never raised above torch's own count
        assert devices.use_only_available_cpus() == 2
    finally:
        torch.set_num_threads(before)
