"""The model never waits for the dense CRF: evaluation submits each batch's CRF work to the
workers and goes on with the next batch, so the whole takes about the longer of the two, not
their sum. Sleeps stand in for both, so the CPU count of the test machine cannot blur it."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest

from cause_cli.config import TrainConfig
from cause_cli.data.synthetic import write_scenes
from cause_cli.inference import crf as crf_module
from cause_cli.inference import predict
from cause_cli.inference.evaluate import evaluate_run
from cause_cli.progress import Reporter
from cause_cli.training import train

CRF_SECONDS_PER_IMAGE = 0.3
WORKERS, IMAGES = 4, 32


def instant_crf_job(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return scores.argmax(axis=0).astype(np.uint8)


def sleepy_crf_job(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Module level, so that spawned workers can import it."""
    time.sleep(CRF_SECONDS_PER_IMAGE)
    return scores.argmax(axis=0).astype(np.uint8)


class TaskClock(Reporter):
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def task(self, description, total):
        started = time.perf_counter()
        yield lambda steps=1: None
        self.seconds[description] = time.perf_counter() - started


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap")
    scenes = write_scenes(root / "scenes", num_train=8, num_val=IMAGES, seed=6, size_range=(64, 72))
    config = TrainConfig(data_dir=str(scenes), resolution=64, clusterbook_size=16, projection_dim=32, batch_size=4,
                         epochs_clusterbook=1, epochs_front_door=1, epochs_cluster_probe=0)  # fmt: skip
    return train(config, root / "run", "cpu").path


@pytest.mark.slow
def test_evaluation_takes_the_longer_of_model_and_crf_not_their_sum(run, monkeypatch):
    crf_seconds = IMAGES * CRF_SECONDS_PER_IMAGE / WORKERS  # 2.4 s
    slow_model = predict.backbone_and_head

    def slower_model(model, images):
        time.sleep(0.015 * len(images))  # with the real work, about as long as the CRF in all
        return slow_model(model, images)

    monkeypatch.setattr(predict, "backbone_and_head", slower_model)
    settings = dict(device="cpu", batch_size=2, baselines=False, write=False, crf=True)
    model_only, both = TaskClock(), TaskClock()
    monkeypatch.setattr(crf_module, "crf_labels", instant_crf_job)
    evaluate_run(run, reporter=model_only, crf_workers=0, **settings)
    model_seconds = model_only.seconds["evaluating val with CRF"]
    monkeypatch.setattr(crf_module, "crf_labels", sleepy_crf_job)
    evaluate_run(run, reporter=both, crf_workers=WORKERS, **settings)
    took = both.seconds["evaluating val with CRF"]
    print(f"model {model_seconds:.2f} s, CRF {crf_seconds:.2f} s, both {took:.2f} s")
    # Without the overlap it takes the sum (about 4.7 s); with it, about the longer (2.6 s on a
    # quiet machine). The bound leaves room for a busy one: at least half of the shorter part
    # must have run alongside the longer.
    longer, shorter = max(model_seconds, crf_seconds), min(model_seconds, crf_seconds)
    assert took <= longer + 0.5 * shorter, (took, model_seconds, crf_seconds)
