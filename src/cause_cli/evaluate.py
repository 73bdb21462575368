"""``cause eval``: a trained run against a labelled split."""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .data import open_dataset
from .devices import resolve_device
from .errors import CauseError
from .metrics import MetricAccumulator
from .predict import cluster_cosines, head_feature_map, linear_logits, load_trained
from .progress import Reporter
from .runs import METRICS_FILE, open_run


def evaluate_run(
    run_path: Path | str,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "val",
    device: str = "auto",
    batch_size: int = 16,
    workers: int = 0,
    reporter: Reporter | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Cluster and linear-probe mIoU and pixel accuracy of a run; written to ``metrics.json``."""
    reporter = reporter or Reporter()
    run = open_run(run_path)
    torch_device = resolve_device(device)
    model = load_trained(run, torch_device)
    config = model.config
    dataset_name = dataset or config.dataset
    root = data_dir or config.data_dir
    data = open_dataset(dataset_name, root, split, model.resolution, config.val_fraction)
    if not data.has_labels:
        raise CauseError(f"The {split} split of {root} has no labels to evaluate against.")
    loader = DataLoader(
        data, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=torch_device.type == "cuda"
    )
    clusters = MetricAccumulator(model.num_classes)
    linear = MetricAccumulator(model.num_classes)
    started = time.perf_counter()
    with reporter.task(f"evaluating {split}", len(loader)) as advance:
        for batch in loader:
            images = batch["image"].to(torch_device)
            labels = batch["label"].to(torch_device)
            size = tuple(labels.shape[-2:])
            features = head_feature_map(model, images)
            clusters.update(cluster_cosines(model, features, size).argmax(dim=1), labels)
            with torch.no_grad():
                linear.update(linear_logits(model, features, size).argmax(dim=1), labels)
            advance(1)
    cluster_scores = clusters.scores(match=True)
    linear_scores = linear.scores(match=False)
    names = model.class_names
    result: dict[str, Any] = {
        **cluster_scores.as_dict(names),
        "linear_probe": {
            "miou": linear_scores.miou,
            "pixel_accuracy": linear_scores.pixel_accuracy,
            "iou_per_class": linear_scores.as_dict(names)["iou_per_class"],
        },
        "images": len(data),
        "split": split,
        "dataset": dataset_name,
        "data_dir": str(root),
        "backbone": config.backbone,
        "num_classes": model.num_classes,
        "seconds": round(time.perf_counter() - started, 2),
        "evaluated_at": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    if write:
        from .paths import write_json

        write_json(run.file(METRICS_FILE), result)
    return result
