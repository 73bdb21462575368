"""``cause segment``: images in, label maps and overlays out.

The source is an image file, a folder (searched recursively), a glob pattern, or a text file
listing image paths, one per line. For every readable image, keeping its path relative to the
source: ``OUT/labels/<path>.png`` (a palette PNG of the image's own size) and
``OUT/overlays/<path>.png`` (the image with the colours blended in). Label values are
clusters, or classes when the run has been evaluated (``metrics.json`` holds the matching of
clusters to classes). Files that are not readable images are skipped and listed, never fatal.
``OUT/summary.json`` records what was done.
"""

from __future__ import annotations

import contextlib
import glob
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image

from ..devices import loader_workers as workers_for
from ..devices import resolve_device
from ..errors import CauseError
from ..owned import WriteBatch
from ..paths import refuse_unusable_folder
from ..progress import Reporter
from ..run_checks import MAX_METRICS_JSON_BYTES, metrics_problem, read_json
from ..runs import METRICS_FILE, RunDirectory, open_run
from ..training.distributed import ProcessGroup, from_environment, start, stop
from .crf import CRFPool, CRFQueue, require_crf
from .figures import legend_picture, palette, png_writer
from .inputs import decoded_inputs, pending_inputs
from .manifest import (
    LEGEND_FILE,
    MANIFEST_FILE,
    SUMMARY_FILE,
    OutputFolder,
    check_before_writing,
    refuse_outputs_among_inputs,
    run_fingerprint,
)
from .outputs import DEFAULT_SAVE, PALETTE_IDS, label_image, overlay_image, save_scores
from .predict import (
    TrainedModel,
    cluster_labels,
    cluster_scores,
    confidence_and_margin,
    crf_image,
    crf_unary,
    image_features,
    load_trained,
)


@dataclass
class SegmentSummary:
    """What this process did; the summary of the folder comes from its manifest."""

    inputs: int = 0
    written: int = 0
    done_before: int = 0
    seconds: float = 0.0

    def as_dict(self, finished: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """The folder's summary, read from its manifest entries as they stream by: counts, and
        the few inputs that were skipped or renamed (never a list as long as the inputs)."""
        written = 0
        skipped, renamed = [], []
        seen: set[str] = set()  # an input recorded twice (by two segmentations at once, before the lock) counts once
        for entry in finished:
            if entry["input"] in seen:
                continue
            seen.add(entry["input"])
            if "skipped" in entry:
                skipped.append({"input": entry["input"], "reason": entry["skipped"]})
                continue
            written += 1
            if entry.get("renamed"):
                first = next(entry[key] for key in ("label", "overlay", "scores") if key in entry)
                renamed.append({"input": entry["input"], "output": first})
        per_image = self.seconds / self.written if self.written else None
        return {
            "inputs": self.inputs,
            "written": written,
            "skipped": skipped,
            "renamed": renamed,
            "done_before": self.done_before,
            "written_now": self.written,
            "seconds": round(self.seconds, 3),
            "seconds_per_image": round(per_image, 4) if per_image is not None else None,
            "manifest": MANIFEST_FILE,
        }


def labels_of(run: RunDirectory, num_clusters: int) -> tuple[np.ndarray | None, list[str]]:
    """What a run's label maps hold: the matching of clusters to classes and the class names
    once it has been evaluated; before, no matching and the clusters' names."""
    matched = class_mapping(run)
    return matched if matched else (None, [f"cluster {i}" for i in range(num_clusters)])


def class_mapping(run: RunDirectory) -> tuple[np.ndarray, list[str]] | None:
    """The evaluated run's cluster-to-class matching and class names, if it has them."""
    if not run.has(METRICS_FILE):
        return None
    path = run.file(METRICS_FILE)
    damaged = f"{path} is damaged; run cause eval on the run again (or delete the file to write cluster ids)"
    clusters = int(run.read_run_info()["num_classes"])
    metrics, problem = read_json(path, MAX_METRICS_JSON_BYTES)
    if problem is None:
        problem = metrics_problem(metrics, clusters)  # every field by type and range
    if problem:
        raise CauseError(f"{damaged}: {problem}.")
    mapping, names = metrics.get("cluster_to_class"), metrics.get("class_names")
    if not mapping or not names:
        return None
    return np.asarray(mapping, dtype=np.int64), list(names)


@dataclass(frozen=True)
class _Input:
    relative: Path  # the input's path below the source, as the summary names it
    output: Path  # its label and overlay files' path below labels/ and overlays/


@dataclass
class _Segmenter:
    model: TrainedModel
    out: Path
    mapping: np.ndarray | None
    pool: CRFPool | None
    summary: SegmentSummary
    folder: OutputFolder
    save: tuple[str, ...] = DEFAULT_SAVE

    def __post_init__(self) -> None:
        self.colours = palette()
        self.flat_palette = self.colours.reshape(-1).tolist()
        # Earlier batches are refined in the CRF workers while later ones go through the model.
        self.in_flight = CRFQueue(2 * max(1, self.pool.workers if self.pool else 1))

    def batch(self, pending: list[tuple[_Input, Image.Image | None, str | None]]) -> None:
        """Segment the batch's images; its entries are written (or recorded as skipped, with
        the reason) in their order, after the batches before it."""
        model = self.model
        images = [image for _, image, _ in pending if image is not None]
        if not images:
            self.in_flight.drain()
            self.write_all(list(pending), [], [])
            return
        cluster_maps: list[np.ndarray] = []
        crf_images: list[np.ndarray] = []
        crf_unaries: list[np.ndarray] = []
        scores: list[tuple[np.ndarray, np.ndarray] | None] = []
        sharpness = model.cluster_probe.sharpness
        for image, (features, size) in zip(images, image_features(model, images, self.pool is not None), strict=True):
            scores_map = (
                cluster_scores(model, features, size) if self.pool is not None or "scores" in self.save else None
            )
            scores.append(
                confidence_and_margin(scores_map, sharpness)
                if scores_map is not None and "scores" in self.save
                else None
            )
            if self.pool is None:
                labels = cluster_labels(model, features, size) if scores_map is None else scores_map.argmax(dim=1)
                cluster_maps.append(labels[0].cpu().numpy())
            else:
                assert scores_map is not None
                crf_images.append(crf_image(image, scores_map))
                crf_unaries.append(crf_unary(scores_map, sharpness)[0].cpu().numpy())
        if self.pool is None:
            self.write_all(list(pending), scores, cluster_maps)
        else:
            # The whole batch at once, so the pool's workers refine several images together.
            write = partial(self.write_all, list(pending), scores)
            self.in_flight.put(self.pool.submit(crf_images, crf_unaries), write)

    def finish(self) -> None:
        self.in_flight.drain()

    def write_all(
        self,
        pending: list[tuple[_Input, Image.Image | None, str | None]],
        scores: list[tuple[np.ndarray, np.ndarray] | None],
        cluster_maps: list[np.ndarray],
    ) -> None:
        finished = []
        results = iter(zip(cluster_maps, scores, strict=True))
        with self.folder.owned.batch() as files:
            for item, image, problem in pending:
                if image is None:
                    finished.append({"input": item.relative.as_posix(), "skipped": problem or "unreadable"})
                    continue
                clusters, image_scores = next(results)
                values = self.mapping[clusters] if self.mapping is not None else clusters
                finished.append(self.write(files, item, image, values, image_scores))
        self.folder.record(finished)  # after the files are complete: a kill in between redoes them

    def write(
        self,
        files: WriteBatch,
        item: _Input,
        image: Image.Image,
        values: np.ndarray,
        scores: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """The input's outputs, each made in ``files`` (in place once the batch is); its
        manifest entry."""
        label = label_image(values, image.size, self.model.num_classes, self.flat_palette)
        entry: dict[str, Any] = {"input": item.relative.as_posix()}
        if item.output != item.relative.with_suffix(".png"):
            entry["renamed"] = True
        name = item.output.as_posix()
        if "labels" in self.save:
            entry["label"] = f"labels/{name}"
            files.write(entry["label"], png_writer(label))
        if "overlays" in self.save:
            overlay = overlay_image(image, label, self.colours, in_place=True)  # the image is not needed after
            entry["overlay"] = f"overlays/{name}"
            files.write(entry["overlay"], png_writer(overlay))
        if scores is not None:
            confidence, margin = scores
            entry["scores"] = f"scores/{item.output.with_suffix('.npz').as_posix()}"
            files.write(entry["scores"], partial(save_scores, confidence, margin))
        self.summary.written += 1
        return entry


def segment_images(
    source: Path | str,
    run_path: Path | str,
    out: Path | str,
    device: str = "auto",
    batch_size: int = 8,
    reporter: Reporter | None = None,
    crf: bool = False,
    crf_workers: int = 0,
    legend: bool = False,
    backbone: str | None = None,
    overwrite: bool = False,
    save: tuple[str, ...] = DEFAULT_SAVE,
    loader_workers: int | None = None,
) -> dict[str, Any]:
    """Segment every image named by ``source`` with the run's model into ``out``; inputs a
    previous call finished there are skipped (``overwrite`` redoes everything). Inputs are
    listed lazily and decoded in ``loader_workers`` processes, so memory does not grow with
    their number."""
    group = from_environment()
    try:
        return _segment(source, run_path, Path(out), device, batch_size, reporter or Reporter(), group, crf,
                        crf_workers, legend, backbone, overwrite, save, loader_workers)  # fmt: skip
    finally:
        stop(group)


def _segment(
    source: Path | str,
    run_path: Path | str,
    out: Path,
    device: str,
    batch_size: int,
    reporter: Reporter,
    group: ProcessGroup,
    crf: bool,
    crf_workers: int,
    legend: bool,
    backbone: str | None,
    overwrite: bool,
    save: tuple[str, ...],
    loader_workers: int | None,
) -> dict[str, Any]:
    """Process ``group.rank``'s share; the first process merges the summary."""
    reporter = reporter if group.is_main else Reporter()
    run = open_run(run_path)
    if not Path(source).exists() and not glob.has_magic(str(source)):
        raise CauseError(f"{source} does not exist.")
    refuse_unusable_folder(out, "--out")
    refuse_outputs_among_inputs(source, out)
    if crf:
        require_crf()
    torch_device = start(group, resolve_device(device))
    model = load_trained(run, torch_device, backbone)
    mapping, names = labels_of(run, model.num_classes)
    labels_are = "classes" if mapping is not None else "clusters"
    label_format = "8-bit palette PNG" if model.num_classes <= PALETTE_IDS else "16-bit greyscale PNG"
    folder = OutputFolder(out, group.rank, group.world_size)
    settings = {
        "run": str(run.path.resolve()),
        "run_sha256": run_fingerprint(run),
        "labels_are": labels_are,
        "crf": crf,
        "label_format": label_format,
        "save": list(save),
        "processes": group.world_size,
    }
    with contextlib.ExitStack() as held:
        if group.is_main:  # the others wait until the folder is checked, cleared and claimed
            held.enter_context(folder.locked())
            check_before_writing(folder, source, settings, save, legend, overwrite)
            if overwrite:
                for problem in folder.clear():
                    reporter.message(f"left in place: {problem}")
            folder.claim(settings)
        group.barrier()
        if not group.is_main:
            folder.claim(settings)
        finished = (entry["input"] for entry in folder.finished())
        pending, total, left = pending_inputs(source, out, finished, group.rank, group.world_size)
        mine = len(range(group.rank, total, group.world_size))
        summary = SegmentSummary(inputs=total, done_before=mine - left)
        if summary.done_before:
            reporter.message(f"{summary.done_before:,} of the {mine:,} inputs were done before; going on")
        started = time.perf_counter()
        pool = CRFPool(crf_workers) if crf else None
        if pool is not None:
            pool.start()
        segmenter = _Segmenter(model, out, mapping, pool, summary, folder, save)
        batch: list[tuple[_Input, Image.Image | None, str | None]] = []
        try:
            # The first process's bar stands for all of them: each of its images is one of theirs.
            with reporter.task("segmenting", left * group.world_size, unit="images") as bar:

                def advance(images: int) -> None:
                    bar(images * group.world_size)

                for entry, pixels, problem in decoded_inputs(pending, workers_for(loader_workers, torch_device)):
                    image = Image.fromarray(pixels) if pixels is not None else None
                    del pixels  # the image holds a copy: a big photo's pixels are not kept twice
                    batch.append((_Input(entry.relative, entry.output), image, problem))
                    if len(batch) >= batch_size:
                        segmenter.batch(batch)
                        batch = []
                    advance(1)
                if batch:
                    segmenter.batch(batch)
                segmenter.finish()
        finally:
            if pool is not None:
                pool.close()
            folder.close()
        summary.seconds = time.perf_counter() - started
        counts = cast(
            "list[tuple[int, int, float]]",
            group.gather_objects((summary.done_before, summary.written, summary.seconds)),
        )
        group.barrier()  # every part is complete before the first process reads them
        if not group.is_main:
            return {}
        summary.done_before = sum(done for done, _, _ in counts)
        summary.written = sum(written for _, written, _ in counts)
        summary.seconds = max(seconds for _, _, seconds in counts)
        if legend:
            folder.write_file(LEGEND_FILE, png_writer(legend_picture(names, segmenter.colours)))
        result = summary.as_dict(entry for part in folder.parts() for entry in folder.finished(part))
        result.update(
            {
                "labels_are": labels_are,
                "run": str(run.path),
                "backbone": model.config.backbone,
                "label_format": label_format,
            }
        )
        folder.write_json(SUMMARY_FILE, result)
        return result
