"""Data-parallel training: processes started by torchrun (gloo on this CPU) train exactly as
one process with their combined batch, and only rank 0 writes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cause_cli.data.loading import ShuffledBatches
from cause_cli.data.synthetic import write_scenes
from cause_cli.distributed import from_environment, start, stop
from cause_cli.model.contrastive import (
    BankByCode,
    ContrastiveSettings,
    concept_contrastive_loss,
    concept_contrastive_terms,
)
from cause_cli.model.modularity import ModularityObjective, modularity_loss
from cause_cli.runs import RunDirectory

from .helpers import assert_same_weights, work_record
from .test_cli import partly_labelled_copy

# --- sampling -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 19])
def test_processes_batches_put_together_are_the_combined_batches(size):
    one = ShuffledBatches(size, batch_size=6, seed=3)
    parts = [ShuffledBatches(size, batch_size=3, seed=3, rank=rank, world_size=2) for rank in range(2)]
    for epoch in (0, 1):
        for sampler in (one, *parts):
            sampler.set_epoch(epoch)
        combined = [first + second for first, second in zip(*parts, strict=True)]
        assert combined == list(one)
        assert len(combined) == len(one) == size // 6
    one.set_epoch(0)
    first_epoch = list(one)
    one.set_epoch(1)
    assert list(one) != first_epoch  # reshuffled per epoch


def test_data_smaller_than_one_global_batch_is_shared_out():
    parts = [list(ShuffledBatches(5, batch_size=4, seed=0, rank=rank, world_size=2)) for rank in range(2)]
    assert [len(batches) for batches in parts] == [1, 1]
    assert sorted(parts[0][0] + parts[1][0]) == list(range(5))
    with pytest.raises(ValueError):
        ShuffledBatches(1, batch_size=4, seed=0, rank=0, world_size=2)


# --- the loss over a global batch, from its parts --------------------------------------------


def test_contrastive_terms_against_the_gathered_batch_make_the_combined_loss():
    generator = torch.Generator().manual_seed(0)
    batch, tokens, codes = 5, 9, 6
    student = torch.randn(batch, tokens, 16, generator=generator)
    teacher = torch.randn(batch, tokens, 16, generator=generator)
    code_vectors = torch.nn.functional.normalize(torch.randn(codes, 8, generator=generator), dim=1)
    token_codes = torch.randint(codes, (batch, tokens), generator=generator)
    bank = torch.nn.functional.normalize(torch.randn(20, 16, generator=generator), dim=1)
    bank_codes = torch.randint(codes, (20,), generator=generator)
    settings = ContrastiveSettings(positive_threshold=0.2, negative_threshold=0.0)
    combined = concept_contrastive_loss(
        student, teacher, code_vectors[token_codes], bank, code_vectors[bank_codes], settings
    )

    total, count = torch.tensor(0.0), 0
    for first, size in ((0, 2), (2, 3)):  # two processes holding 2 and 3 of the images
        values, defined = concept_contrastive_terms(
            student[first : first + size],
            code_vectors[token_codes[first : first + size]],
            teacher,
            code_vectors[token_codes],
            first,
            BankByCode.of_entries(bank, code_vectors[bank_codes]),
            settings,
        )
        total, count = total + values[defined].sum(), count + int(defined.sum())
    torch.testing.assert_close(total / count, combined)


# --- real processes: gather, and gradients averaged by DistributedDataParallel ---------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tokens() -> torch.Tensor:
    return torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(1))


def _centres() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(5, 8, generator=torch.Generator().manual_seed(2)))


def _process(rank: int, world_size: int, port: int, folder: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )  # fmt: skip
    group = from_environment()
    device = start(group, torch.device("cpu"))
    try:
        sizes = group.batch_sizes(rank + 1, device)  # unequal parts: 1 and 2 images
        first = sum(sizes[:rank])
        mine = _tokens()[first : first + sizes[rank]]
        gathered = group.gather_rows(mine, sizes)
        centres = _centres()
        objective = group.parallel(ModularityObjective([centres]), device)
        share = sizes[rank] * world_size / sum(sizes)
        (objective(mine)[0] * share).backward()
        torch.save({"sizes": sizes, "gathered": gathered, "gradient": centres.grad}, Path(folder) / f"{rank}.pt")
    finally:
        stop(group)


def test_gloo_processes_gather_the_global_batch_and_average_its_gradient(tmp_path):
    mp.spawn(_process, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    centres = _centres()
    modularity_loss(centres, _tokens()).backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert result["sizes"] == [1, 2]
        torch.testing.assert_close(result["gathered"], _tokens())
        torch.testing.assert_close(result["gradient"], centres.grad, rtol=1e-5, atol=1e-7)


# --- the whole command ---------------------------------------------------------------------


# Two processes sum a batch's gradients in another order than one process. Adam divides a
# gradient by its own running size, so a rounding difference in a near-zero gradient becomes a
# few percent of a step (lr 1e-3): 3.5e-5 on some CPUs after six updates. A process whose
# share of the batch is weighted wrongly, or that skips the averaging, is off by whole steps.
ACROSS_PROCESSES_ATOL = 1e-4


def _cause(*args: object) -> list[str]:
    return [sys.executable, "-m", "cause_cli", *[str(a) for a in args]]


def _train_arguments(scenes: Path, run: Path, batch_size: int) -> list[object]:
    return ["train", "--data-dir", scenes, "--run", run, "--resolution", "64", "--clusterbook-size", "32",
            "--batch-size", batch_size, "--epochs-clusterbook", "2", "--epochs-front-door", "3",
            "--epochs-cluster-probe", "2", "--probe-restarts", "2", "--dropout", "0", "--device", "cpu",
            "--quiet"]  # fmt: skip


@pytest.mark.slow
def test_two_gloo_processes_reach_the_weights_of_one_process_with_the_combined_batch(tmp_path):
    scenes = write_scenes(tmp_path / "scenes", num_train=16, num_val=2, seed=4, size_range=(64, 72))
    # An unreadable image leaves one process a smaller part of its global batch.
    (scenes / "images" / "train" / "scene_0003.png").write_bytes(b"not an image")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run(_cause(*_train_arguments(scenes, one, 4)), env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    launched = subprocess.run(
        _cause(*_train_arguments(scenes, two, 2), "--gpus", "2"), env=env, capture_output=True, text=True
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr

    assert_same_weights(two, one, rtol=1e-4, atol=ACROSS_PROCESSES_ATOL)
    log = (two / "train.log").read_text()
    assert log.count("step 3/3 cluster probe: done") == 1  # rank 0 alone writes
    assert log.count("skipped 1 unreadable file(s)") == 1
    assert launched.stderr.count("run written to") == 1
    assert not (two / "resume.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("labelled", ["fully", "partly"])
def test_labels_influence_nothing_but_the_linear_probe_with_two_processes(tmp_path, labelled):
    scenes = write_scenes(tmp_path / "scenes", num_train=8, num_val=2, seed=6, size_range=(64, 72))
    if labelled == "partly":  # a share of every label map ignored, some images wholly
        scenes = partly_labelled_copy(scenes, tmp_path / "partly")
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(scenes / "images", unlabelled / "images")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"with": tmp_path / "with", "without": tmp_path / "without"}
    for data, run in ((scenes, runs["with"]), (unlabelled, runs["without"])):
        arguments = [*_train_arguments(data, run, 2), "--num-classes", "6", "--dropout", "0.1", "--gpus", "2"]
        done = subprocess.run(_cause(*arguments), env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    for name in ("clusterbook.safetensors", "head.safetensors", "probe.safetensors"):
        with_labels = RunDirectory(runs["with"]).load_tensors(name)
        without = RunDirectory(runs["without"]).load_tensors(name)
        assert with_labels.keys() == without.keys(), name
        for key, value in with_labels.items():
            if not key.startswith("linear_probe"):
                assert torch.equal(value, without[key]), f"{name}:{key} depends on the labels"
    assert "linear_probe.linear.weight" in RunDirectory(runs["with"]).load_tensors("probe.safetensors")


@pytest.mark.slow
def test_processes_share_one_feature_cache(tmp_path):
    scenes = write_scenes(tmp_path / "scenes", num_train=8, num_val=1, seed=2, size_range=(64, 72))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    for run, batch, extra in ((one, 4, []), (two, 2, ["--gpus", "2"])):
        arguments = [*_train_arguments(scenes, run, batch), "--cache-features", "on", *extra]
        done = subprocess.run(_cause(*arguments), env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    (flags,) = (two / "feature-cache").glob("*/*.filled")
    assert np.fromfile(flags, dtype=np.uint8).tolist() == [1] * 8  # each process filled in its images
    assert_same_weights(two, one, rtol=1e-4, atol=ACROSS_PROCESSES_ATOL)


def _kill_processes_training(run: Path) -> int:
    """SIGKILL every process whose command line names ``run``; how many there were."""
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run).encode() in arguments and b"train" in arguments:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


@pytest.mark.slow
def test_killed_processes_resume_to_the_weights_of_an_uninterrupted_run(tmp_path):
    scenes = write_scenes(tmp_path / "scenes", num_train=16, num_val=2, seed=4, size_range=(64, 72))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"

    def arguments(run: Path) -> list[object]:
        return [*_train_arguments(scenes, run, 2), "--epochs-front-door", "8", "--checkpoint-every", "0", "--gpus", "2",
                "--cache-features", "off"]  # every batch through the backbone: the log counts what was redone

    subprocess.run(_cause(*arguments(whole)), env=env, check=True, capture_output=True)
    launcher = subprocess.Popen(
        _cause(*arguments(interrupted)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline, killed = time.monotonic() + 120, 0
    while time.monotonic() < deadline and launcher.poll() is None and not killed:
        try:
            state = torch.load(interrupted / "resume.pt", weights_only=True)
        except Exception:  # not there yet, or replaced while being read
            time.sleep(0.01)
            continue
        if state["step"] == "front_door" and state["epoch"] >= 1:
            killed = _kill_processes_training(interrupted)  # the launcher, torchrun and both workers
    launcher.wait(timeout=60)
    assert killed >= 2, "step two finished before the processes could be killed"
    assert not (interrupted / "head.safetensors").exists()
    checkpoint = torch.load(interrupted / "resume.pt", weights_only=True)

    resumed = subprocess.run(
        _cause("train", "--resume", "--run", interrupted, "--device", "cpu", "--gpus", "2"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "front_door: resumed at epoch" in (interrupted / "train.log").read_text()
    # Rank 0 trained (and ran the backbone on) only the batches after the checkpoint's position.
    trained, total, before, passes = work_record(interrupted, "step 2/3 front door")
    assert work_record(whole, "step 2/3 front door") == (total, total, 0, total)
    per_epoch = total // 8
    assert before == checkpoint["epoch"] * per_epoch + checkpoint["batch"] > 0
    assert trained == passes == total - before
    assert_same_weights(interrupted, whole, rtol=1e-4, atol=2e-5)


def test_gpus_without_gpus_is_refused_in_one_sentence(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    scenes = write_scenes(tmp_path / "scenes", num_train=4, num_val=1, seed=0, size_range=(64, 72))
    refused = subprocess.run(
        _cause("train", "--data-dir", scenes, "--run", tmp_path / "run", "--gpus", "2"), capture_output=True, text=True
    )
    assert refused.returncode == 1
    assert "--device cpu" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "run").exists()


def test_reference_recipe_is_refused_with_several_processes(tmp_path):
    refused = subprocess.run(
        _cause("train", "--data-dir", tmp_path, "--recipe", "reference", "--gpus", "2", "--device", "cpu"),
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1
    assert "without --gpus" in refused.stderr
