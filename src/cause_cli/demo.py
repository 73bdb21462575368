"""``cause demo``: the whole pipeline on synthetic scenes and the toy backbone, on a CPU."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .data.synthetic import write_scenes
from .inference.evaluate import EvaluationSettings, evaluate_run
from .inference.segment import SegmentSettings, segment_images
from .progress import Reporter
from .training import train

DEMO_TRAIN_IMAGES = 320
DEMO_VAL_IMAGES = 64
DEMO_SEGMENTED = 8


def demo_config(data_dir: Path) -> TrainConfig:
    """The default pipeline with fewer updates, so the demo runs in about a minute and a half on a 2-core CPU.

    12 front-door epochs (240 updates) instead of the 500 updates a folder gets by default, one
    clusterbook epoch, and the concept thresholds 0.5 / 0.3 that folders get by default (the toy
    backbone's concepts of different classes sit closer together than a trained backbone's:
    with the paper's 0.3 / 0.1 some class pairs become positives and merge into one cluster).
    The cluster probe is the default one: the consensus of 16 k-means fits in the whitened space.
    """
    return TrainConfig(
        data_dir=str(data_dir),
        backbone="toy",
        epochs_clusterbook=1,
        epochs_front_door=12,
        positive_threshold=0.5,
        negative_threshold=0.3,
    )


def run_demo(out: Path, device: str = "auto", reporter: Reporter | None = None, seed: int = 0) -> dict[str, Any]:
    """Make scenes, train, evaluate on held-out scenes, segment a few; return a summary."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    data_dir = out / "data"
    run_dir = out / "run"
    segments_dir = out / "segments"
    reporter.message(f"writing {DEMO_TRAIN_IMAGES} + {DEMO_VAL_IMAGES} synthetic scenes to {data_dir}")
    if not (data_dir / "classes.txt").exists():
        write_scenes(data_dir, DEMO_TRAIN_IMAGES, DEMO_VAL_IMAGES, seed=seed)
    config = demo_config(data_dir).replace(seed=seed)
    train(config, run_dir, device, reporter)
    metrics = evaluate_run(run_dir, EvaluationSettings(device=device, crf_workers=0), reporter)  # CRF in this process
    examples = out / "examples"
    examples.mkdir(parents=True, exist_ok=True)
    for path in sorted((data_dir / "images" / "val").glob("*.png"))[:DEMO_SEGMENTED]:
        target = examples / path.name
        if not target.exists():
            target.write_bytes(path.read_bytes())
    segment_images(examples, run_dir, segments_dir, SegmentSettings(device=device), reporter)
    return {
        "metrics": metrics,
        "seconds": time.perf_counter() - started,
        "run": str(run_dir),
        "segments": str(segments_dir),
    }
