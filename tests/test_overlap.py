"""The model never waits for the dense CRF: evaluation submits each batch's CRF work to the
workers and goes on with the next batch, so the model runs while the CRF does. Shown by the
order of events (when each model batch and each CRF job ran, on the machine's one monotonic
clock), not by a bound on seconds, which a busy machine would break with no bug at all."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from cause_cli.config import TrainConfig
from cause_cli.data.synthetic import write_scenes
from cause_cli.inference import crf as crf_module
from cause_cli.inference import predict
from cause_cli.inference.evaluate import EvaluationSettings, evaluate_run
from cause_cli.training import train

CRF_SECONDS_PER_IMAGE = 0.2
WORKERS, IMAGES = 4, 16
EVENTS_ENV = "CAUSE_TEST_OVERLAP_EVENTS"  # where the workers (other processes) log their jobs


def log_interval(kind: str, started: float, ended: float) -> None:
    with open(os.environ[EVENTS_ENV], "a") as events:
        events.write(f"{kind} {started!r} {ended!r}\n")


def logged_crf_job(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Module level, so that spawned workers can import it."""
    started = time.monotonic()
    time.sleep(CRF_SECONDS_PER_IMAGE)
    log_interval("crf", started, time.monotonic())
    return scores.argmax(axis=0).astype(np.uint8)


def intervals(path, kind: str) -> list[tuple[float, float]]:
    lines = [line.split() for line in path.read_text().splitlines()]
    return [(float(started), float(ended)) for name, started, ended in lines if name == kind]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap")
    scenes = write_scenes(root / "scenes", num_train=8, num_val=IMAGES, seed=6, size_range=(64, 72))
    config = TrainConfig(data_dir=str(scenes), resolution=64, clusterbook_size=16, projection_dim=32, batch_size=4,
                         epochs_clusterbook=1, epochs_front_door=1, epochs_cluster_probe=0)  # fmt: skip
    return train(config, root / "run", "cpu").path


@pytest.mark.slow
def test_the_model_runs_while_the_crf_does(run, monkeypatch, tmp_path):
    events = tmp_path / "events.txt"
    monkeypatch.setenv(EVENTS_ENV, str(events))
    slow_model = predict.backbone_and_head

    def logged_model(model, images):
        started = time.monotonic()
        result = slow_model(model, images)
        log_interval("model", started, time.monotonic())
        return result

    monkeypatch.setattr(predict, "backbone_and_head", logged_model)
    monkeypatch.setattr(crf_module, "crf_labels", logged_crf_job)
    settings = EvaluationSettings(device="cpu", batch_size=2, baselines=False, crf=True, crf_workers=WORKERS)
    evaluate_run(run, settings, write=False)
    model, crf = intervals(events, "model"), intervals(events, "crf")
    assert len(crf) >= IMAGES and len(model) >= IMAGES // 2
    # Some model batch ran while some CRF job did. Waiting for each batch's CRF before the next
    # batch (no overlap) would put every model batch between CRF jobs, never inside one.
    together = [(m, c) for m in model for c in crf if m[0] < c[1] and c[0] < m[1]]
    assert together, (model, crf)
