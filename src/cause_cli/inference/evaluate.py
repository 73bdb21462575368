"""``cause eval``: a trained run against a labelled split, in one pass over the data.

The protocol is the reference's (METHOD.md section 4): without CRF, the image's teacher
features are upsampled and assigned; with CRF, the image and its horizontal flip both go
through backbone and head, the two feature maps are averaged, and the dense CRF refines
``log_softmax(3 * cos)``. Both results come from the same pass: the backbone sees each image
once and its flip once, never more.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import open_dataset
from ..data.loading import LoadReport, iterate_batches
from ..data.transforms import denormalise_to_uint8, normalise_pixels
from ..devices import loader_workers, resolve_device
from ..errors import CauseError
from ..progress import Reporter
from ..runs import EVALUATION_FILES, METRICS_FILE, RunDirectory, open_run
from .baselines import baseline_maps, fit_baselines
from .crf import CRFQueue, choose_crf_backend, default_workers, open_crf
from .figures import colourise, confusion_picture, palette, png_writer, samples_picture
from .metrics import MetricAccumulator, SegmentationScores
from .predict import load_trained, predict_batch, stack_label_maps
from .report import write_report

SAMPLES_SHOWN = 4


@dataclass(frozen=True)
class EvaluationSettings:
    """How ``cause eval`` evaluates, named and defaulted as its options are."""

    dataset: str | None = None  # None: the run's
    data_dir: str | None = None  # None: the run's
    split: str = "val"
    device: str = "auto"
    batch_size: int = 16
    crf: bool | None = None  # None: on
    crf_workers: int | None = None  # None: one per CPU (crf.default_workers)
    crf_backend: str = "auto"
    loader_workers: int | None = None  # None: none on the CPU, up to 8 on a GPU
    baselines: bool = True
    backbone: str | None = None  # only checks the run's


def evaluate_run(
    run_path: Path | str,
    settings: EvaluationSettings | None = None,
    reporter: Reporter | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Cluster (and linear-probe) mIoU and pixel accuracy of a run, with and without CRF, and
    (``settings.baselines``) those of k-means on the backbone's tokens and on the head's
    features, fitted on the training split of the data evaluated.

    ``settings.crf=None`` runs the CRF (``crf_backend``: :func:`.crf.choose_crf_backend`; it is
    there whether or not ``pydensecrf`` is installed). Writes ``metrics.json``,
    ``confusion.png`` and ``samples.png`` into the run folder unless ``write=False``.
    """
    settings = settings or EvaluationSettings()
    split, batch_size = settings.split, settings.batch_size
    reporter = reporter or Reporter()
    run = open_run(run_path)
    if run.hub_id is not None and write:
        raise CauseError(
            f"cause eval writes its metrics into the run folder, and {run.hub_id} is read from the Hub's cache; "
            f"copy it to a folder first (hf download {run.hub_id[len('hf-hub:') :].split('@')[0]} --local-dir RUN) "
            "and evaluate that."
        )
    # The run folder is locked while this evaluation reads and writes it.
    with run.writing("eval") if write else contextlib.nullcontext():
        if write:  # before anything is computed: the files it will write must be the run's own
            run.owned.refuse_unless_ours(
                EVALUATION_FILES, f"move it away, or evaluate a copy of {run.path} (cause writes only its own files)"
            )
        crf = True if settings.crf is None else settings.crf
        crf_workers = default_workers(settings.crf_workers)
        torch_device = resolve_device(settings.device)
        backend = choose_crf_backend(settings.crf_backend, torch_device) if crf else None
        workers = loader_workers(settings.loader_workers, torch_device)
        model = load_trained(run, torch_device, settings.backbone)
        config = model.config
        dataset_name = settings.dataset or config.dataset
        root = settings.data_dir or config.data_dir
        data = open_dataset(dataset_name, root, split, model.resolution, config.val_fraction)
        if not data.has_labels:
            raise CauseError(f"The {split} split of {root} has no labels to evaluate against.")
        # The baselines' training split is that of the data evaluated: an imported run has no data folder of its own.
        fitted = (
            fit_baselines(model, batch_size, workers, reporter, config.seed, run.path, dataset_name, root)
            if settings.baselines
            else None
        )
        report = LoadReport()
        batches = iterate_batches(
            data,
            batch_size,
            report,
            workers=workers,
            pin_memory=torch_device.type == "cuda",
            num_classes=model.num_classes,
        )
        steps = (len(data) + batch_size - 1) // batch_size
        clusters = MetricAccumulator(model.num_classes)
        linear = MetricAccumulator(model.num_classes)
        refined = MetricAccumulator(model.num_classes)
        kmeans_tokens = MetricAccumulator(model.num_classes)
        kmeans_head = MetricAccumulator(model.num_classes)
        samples: list[list[np.ndarray]] = []
        started = time.perf_counter()
        pool = open_crf(backend, crf_workers, torch_device) if backend is not None else None
        # The CRF of earlier batches runs in the workers while the next batches go through the model.
        in_flight = CRFQueue(2 * max(1, crf_workers))
        try:
            with reporter.task(f"evaluating {split}" + (f" with CRF ({backend})" if crf else ""), steps) as advance:
                for batch in batches:
                    images = normalise_pixels(batch["image"], torch_device)
                    labels = batch["label"].to(torch_device)
                    size = (int(labels.shape[-2]), int(labels.shape[-1]))
                    predicted = predict_batch(model, images, size, pool)
                    clusters.update(predicted.clusters, labels)
                    linear.update(predicted.linear, labels)
                    if fitted is not None:
                        on_tokens, on_head = baseline_maps(
                            fitted, predicted.tokens, predicted.features, size, model.cluster_probe.upsample_scores
                        )
                        kmeans_tokens.update(on_tokens, labels)
                        kmeans_head.update(on_head, labels)
                    shown = _keep_samples(samples, images, labels, predicted.clusters)
                    if predicted.refining is not None:
                        in_flight.put(predicted.refining, partial(_record_refined, refined, labels, shown))
                    advance(1)
                in_flight.drain()
        finally:
            if pool is not None:
                pool.close()

        for path, reason in data.unreachable:
            reporter.message(f"skipped {path}: {reason}")
        for line in report.lines(dataset_name, model.num_classes):
            reporter.message(line)
        ignored = report.ignored_above()
        if ignored is not None:
            reporter.quiet_summary(
                f"ignored {ignored['pixels']:,} labelled pixel(s) with class ids at or above {model.num_classes}"
            )
        if len(report.skipped) >= len(data):
            raise CauseError(
                f"None of the {len(data)} images of the {split} split of {root} could be read, so nothing was "
                f"evaluated and {_kept(run)}."
            )
        if float(clusters.histogram.sum()) == 0:
            raise CauseError(
                f"No pixel of the {split} split of {root} is labelled (every label is 255, ignore, or the class "
                f"ids are all at or above {model.num_classes}), so nothing was evaluated and {_kept(run)}."
            )
        # What was skipped is said even with --quiet (or --json: on stderr), never passed over.
        for skipped, reason in [*sorted(report.skipped.items()), *data.unreachable]:
            reporter.quiet_summary(f"skipped {skipped}: {reason}")
        names = list(model.class_names or data.class_names or [])[: model.num_classes]
        # More clusters than named classes (--num-classes above the data's): the rest by number.
        names += [str(index) for index in range(len(names), model.num_classes)]
        cluster_scores = clusters.scores(match=True)
        linear_scores = linear.scores(match=False)
        result: dict[str, Any] = {
            **cluster_scores.as_dict(names),
            "crf": refined.scores(match=True).as_dict(names) if crf else None,
            "crf_backend": backend,
            "linear_probe": _summary(linear_scores, names),
            "baselines": None
            if fitted is None
            else {
                "kmeans_tokens": _summary(kmeans_tokens.scores(match=True), names),
                "kmeans_head": _summary(kmeans_head.scores(match=True), names),
                "fitted_on": {"split": "train", "images": fitted.images, "tokens": fitted.points, "labels": False},
            },
            "class_names": names,
            "images": len(data) - len(report.skipped),
            "skipped": [{"input": path, "reason": reason} for path, reason in sorted(report.skipped.items())]
            + [{"input": str(path), "reason": reason} for path, reason in data.unreachable],
            "ignored_above_classes": ignored,
            "split": split,
            "dataset": dataset_name,
            "data_dir": str(root),
            "backbone": config.backbone,
            "head": config.head,
            "num_classes": model.num_classes,
            "protocol": "no CRF: image only; CRF: image and flip averaged, then dense CRF (the reference's)",
            "seconds": round(time.perf_counter() - started, 2),
            "evaluated_at": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        if write:
            run.write_json(METRICS_FILE, result)
            final = refined.scores(match=True) if crf else cluster_scores
            confusion = confusion_picture(clusters.histogram.numpy(), cluster_scores.mapping, names)
            run.write_file("confusion.png", png_writer(confusion))
            if samples:
                run.write_file("samples.png", png_writer(_samples_figure(samples, final.mapping, crf, names)))
            write_report(run)
        return result


def _kept(run: RunDirectory) -> str:
    """What became of the run's metrics when nothing was evaluated."""
    return f"{run.file(METRICS_FILE)} was left as it was" if run.has(METRICS_FILE) else "no metrics were written"


def _summary(scores: SegmentationScores, names: list[str]) -> dict[str, Any]:
    full = scores.as_dict(names)
    return {key: full[key] for key in ("miou", "pixel_accuracy", "iou_per_class")}


def _keep_samples(
    samples: list[list[np.ndarray]], images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor
) -> list[list[np.ndarray]]:
    """Keep the first images for the figure; the entries added (the CRF's map comes later)."""
    missing = SAMPLES_SHOWN - len(samples)
    if missing <= 0:
        return []
    rgb = denormalise_to_uint8(images[:missing])
    added = [
        [rgb[index], labels[index].cpu().numpy(), predictions[index].cpu().numpy()]
        for index in range(min(missing, len(rgb)))
    ]
    samples.extend(added)
    return added


def _record_refined(
    accumulator: MetricAccumulator, labels: torch.Tensor, shown: list[list[np.ndarray]], maps: list[np.ndarray]
) -> None:
    accumulator.update(stack_label_maps(maps, labels.device), labels)
    for entry, refined in zip(shown, maps, strict=False):
        entry.append(refined)


def _samples_figure(samples: list[list[np.ndarray]], mapping: np.ndarray, crf: bool, class_names: list[str]) -> Any:
    colours = palette()
    rows = []
    shown: set[int] = set()
    for image, label, *predicted in samples:
        tiles = [image, colourise(label, colours)]
        tiles.extend(colourise(mapping[prediction], colours) for prediction in predicted)
        rows.append(tiles)
        shown.update(int(value) for value in np.unique(label) if value >= 0)
        shown.update(int(value) for prediction in predicted for value in np.unique(mapping[prediction]))
    titles = ["image", "ground truth", "prediction"] + (["with CRF"] if crf else [])
    # Ground truth may hold ids above the classes (ignored by the scores, still drawn).
    legend = [
        (class_names[index] if index < len(class_names) else f"{index} (not a class)", colours[index % len(colours)])
        for index in sorted(shown)
    ]
    return samples_picture(rows, titles, legend)
