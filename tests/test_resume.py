"""A training run killed partway (a real SIGKILL to a real process) and resumed with
`cause train --resume` ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cause_cli.data.synthetic import write_scenes

from .helpers import assert_same_weights


def cause(*args: object, env: dict[str, str]) -> list[str]:
    return [sys.executable, "-m", "cause_cli", *[str(a) for a in args]]


def train_args(scenes, run) -> list[object]:
    return ["train", "--data-dir", scenes, "--run", run, "--resolution", "64", "--clusterbook-size", "32",
            "--batch-size", "4", "--epochs-clusterbook", "2", "--epochs-front-door", "6",
            "--epochs-cluster-probe", "2", "--checkpoint-every", "0", "--device", "cpu", "--quiet"]  # fmt: skip


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    scenes = write_scenes(tmp_path / "scenes", num_train=16, num_val=2, seed=4, size_range=(64, 72))
    env = {**os.environ, "CAUSE_HOME": os.environ["CAUSE_HOME"], "OMP_NUM_THREADS": "1"}
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    subprocess.run(cause(*train_args(scenes, whole), env=env), env=env, check=True, capture_output=True)

    process = subprocess.Popen(cause(*train_args(scenes, interrupted), env=env), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    killed_in_step_two = False
    while time.monotonic() < deadline and process.poll() is None:
        state = interrupted / "resume.pt"
        if (interrupted / "clusterbook.safetensors").exists() and state.exists():
            try:
                step = torch.load(state, weights_only=True)["step"]
            except Exception:  # replaced while being read
                continue
            if step == "front_door":
                process.send_signal(signal.SIGKILL)
                killed_in_step_two = True
                break
        time.sleep(0.01)
    process.wait(timeout=60)
    assert killed_in_step_two, "the run finished step two before it could be killed"
    assert not (interrupted / "head.safetensors").exists()
    json.loads((interrupted / "run.json").read_text())  # the run folder stays readable

    resumed = subprocess.run(cause("train", "--resume", "--run", interrupted, "--device", "cpu", env=env), env=env,
                             capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at epoch" in (interrupted / "train.log").read_text()
    assert not (interrupted / "resume.pt").exists()
    assert_same_weights(interrupted, whole, rtol=1e-5, atol=1e-6)
