"""A training run killed partway (a real SIGKILL to a real process) in any of the three steps
and resumed with `cause train --resume` continues from its checkpoint (the batches it had done
are not trained again nor sent through the backbone) and ends with the same weights as an
uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cause_cli.data.synthetic import write_scenes

from .helpers import assert_same_weights, work_record

TRAIN_IMAGES, BATCH = 16, 4
PER_EPOCH = TRAIN_IMAGES // BATCH
EPOCHS = {"clusterbook": 4, "front_door": 6, "cluster_probe": 4}
OUTPUTS = {"clusterbook": "clusterbook", "front_door": "head", "cluster_probe": "probe"}
TITLES = {"clusterbook": "step 1/3 clusterbook", "front_door": "step 2/3 front door",
          "cluster_probe": "step 3/3 cluster probe"}  # fmt: skip


def cause(*args: object) -> list[str]:
    return [sys.executable, "-m", "cause_cli", *[str(a) for a in args]]


def train_args(scenes, run) -> list[object]:
    # A random probe start refined by modularity, with two restarts, so that step three has
    # batches, schedulers and restarts to resume; no feature cache, so that every batch a
    # process trains goes through the backbone and the log counts what it redid.
    return ["train", "--data-dir", scenes, "--run", run, "--resolution", "64", "--clusterbook-size", "32",
            "--batch-size", BATCH, "--epochs-clusterbook", EPOCHS["clusterbook"],
            "--epochs-front-door", EPOCHS["front_door"], "--epochs-cluster-probe", EPOCHS["cluster_probe"],
            "--probe-init", "random", "--probe-restarts", "2", "--cache-features", "off",
            "--checkpoint-every", "0", "--device", "cpu", "--quiet"]  # fmt: skip


CACHE: list[str] = []  # the tests' backbone cache (conftest's), set by the module fixture


def environment() -> dict[str, str]:
    return {**os.environ, "CAUSE_HOME": CACHE[0], "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def scenes_and_whole_run(tmp_path_factory):
    CACHE[:] = [str(tmp_path_factory.getbasetemp() / "cause-home")]
    root = tmp_path_factory.mktemp("resume")
    scenes = write_scenes(root / "scenes", num_train=TRAIN_IMAGES, num_val=2, seed=4, size_range=(64, 72))
    whole = root / "whole"
    subprocess.run(cause(*train_args(scenes, whole)), env=environment(), check=True, capture_output=True)
    return scenes, whole


def kill_during(step: str, scenes, run) -> dict:
    """Start a training, SIGKILL it once a checkpoint of ``step`` exists; return that checkpoint."""
    process = subprocess.Popen(cause(*train_args(scenes, run)), env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            state = run / "resume.pt"
            if state.exists() and not (run / f"{OUTPUTS[step]}.safetensors").exists():
                try:
                    checkpoint_step = torch.load(state, weights_only=True)["step"]
                except Exception:  # replaced while being read
                    continue
                if checkpoint_step == step:
                    process.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run finished before {step} could be killed"
    assert not (run / f"{OUTPUTS[step]}.safetensors").exists(), f"{step} ended before the kill landed"
    json.loads((run / "run.json").read_text())  # the run folder stays readable
    return torch.load(run / "resume.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["clusterbook", "front_door", "cluster_probe"])
def test_a_run_killed_in_any_step_resumes_where_it_stopped_to_the_same_weights(scenes_and_whole_run, tmp_path, step):
    scenes, whole = scenes_and_whole_run
    interrupted = tmp_path / "interrupted"
    checkpoint = kill_during(step, scenes, interrupted)
    assert checkpoint["step"] == step
    done = checkpoint["epoch"] * PER_EPOCH + checkpoint["batch"]
    total = EPOCHS[step] * PER_EPOCH
    assert 0 < done < total

    resumed = subprocess.run(cause("train", "--resume", "--run", interrupted, "--device", "cpu"),
                             env=environment(), capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert not (interrupted / "resume.pt").exists()
    # The resumed process trained only what the checkpoint had not, and sent only that through
    # the backbone; the uninterrupted run trained everything.
    assert work_record(interrupted, TITLES[step]) == (total - done, total, done, total - done)
    assert work_record(whole, TITLES[step]) == (total, total, 0, total)
    assert_same_weights(interrupted, whole, rtol=1e-5, atol=1e-6)
    # The history reads as one training: the rows after the checkpoint were dropped and redone.
    resumed_rows, whole_rows = history_rows(interrupted), history_rows(whole)
    assert [row[:3] for row in resumed_rows] == [row[:3] for row in whole_rows]
    for resumed_row, whole_row in zip(resumed_rows, whole_rows, strict=True):
        np.testing.assert_allclose(resumed_row[3], whole_row[3], rtol=1e-4)


def history_rows(run) -> list[tuple]:
    """(step, update, epoch, loss) of every row of the run's history.csv."""
    with (run / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return [(row["step"], int(row["update"]), int(row["epoch"]), float(row["loss"])) for row in rows]
