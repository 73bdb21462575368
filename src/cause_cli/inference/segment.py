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
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..devices import loader_workers as workers_for
from ..devices import resolve_device
from ..distributed import ProcessGroup, from_environment, start, stop
from ..errors import CauseError
from ..paths import refuse_unusable_folder
from ..progress import Reporter
from ..run_checks import MAX_METRICS_JSON_BYTES, metrics_problem, read_json
from ..runs import METRICS_FILE, RunDirectory, open_run
from .crf import choose_crf_backend, default_workers, open_crf
from .figures import legend_picture, png_writer
from .inputs import DecodedInput, decoded_inputs, pending_inputs
from .manifest import (
    LEGEND_FILE,
    MANIFEST_FILE,
    SUMMARY_FILE,
    OutputFolder,
    check_before_writing,
    refuse_outputs_among_inputs,
    run_fingerprint,
)
from .outputs import DEFAULT_SAVE, PALETTE_IDS
from .predict import (
    load_trained,
)
from .report import write_gallery
from .segmenter import BatchSegmenter, default_writer_threads


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
class SegmentSettings:
    """How ``cause segment`` segments, named and defaulted as its options are."""

    device: str = "auto"
    batch_size: int = 8
    crf: bool = False
    crf_workers: int | None = None  # None: one per CPU (crf.default_workers)
    crf_backend: str = "auto"
    loader_workers: int | None = None  # None: none on the CPU, up to 8 on a GPU
    writer_threads: int | None = None  # None: one per CPU
    legend: bool = False
    save: tuple[str, ...] = DEFAULT_SAVE
    overwrite: bool = False
    backbone: str | None = None  # only checks the run's


def segment_images(
    source: Path | str,
    run_path: Path | str,
    out: Path | str,
    settings: SegmentSettings | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Segment every image named by ``source`` with the run's model into ``out``; inputs a
    previous call finished there are skipped (``settings.overwrite`` redoes everything). Inputs
    are listed lazily and decoded in ``settings.loader_workers`` processes, so memory does not
    grow with their number; the files are made in ``settings.writer_threads`` threads."""
    group = from_environment()
    try:
        return _segment(source, run_path, Path(out), settings or SegmentSettings(), reporter or Reporter(), group)
    finally:
        stop(group)


def _segment(
    source: Path | str,
    run_path: Path | str,
    out: Path,
    settings: SegmentSettings,
    reporter: Reporter,
    group: ProcessGroup,
) -> dict[str, Any]:
    """Process ``group.rank``'s share; the first process merges the summary."""
    reporter = reporter if group.is_main else Reporter()
    crf, save, legend = settings.crf, settings.save, settings.legend
    run = open_run(run_path)
    if not Path(source).exists() and not glob.has_magic(str(source)):
        raise CauseError(f"{source} does not exist.")
    refuse_unusable_folder(out, "--out")
    refuse_outputs_among_inputs(source, out)
    resolved = resolve_device(settings.device)
    backend = choose_crf_backend(settings.crf_backend, resolved) if crf else None
    torch_device = start(group, resolved)
    model = load_trained(run, torch_device, settings.backbone)
    mapping, names = labels_of(run, model.num_classes)
    labels_are = "classes" if mapping is not None else "clusters"
    label_format = "8-bit palette PNG" if model.num_classes <= PALETTE_IDS else "16-bit greyscale PNG"
    folder = OutputFolder(out, group.rank, group.world_size)
    recorded = {
        "run": str(run.path.resolve()),
        "run_sha256": run_fingerprint(run),
        "labels_are": labels_are,
        "crf": crf,
        "crf_backend": backend,
        "label_format": label_format,
        "save": list(save),
        "processes": group.world_size,
    }
    with contextlib.ExitStack() as held:
        if group.is_main:  # the others wait until the folder is checked, cleared and claimed
            held.enter_context(folder.locked())
            check_before_writing(folder, source, recorded, save, legend, settings.overwrite)
            if settings.overwrite:
                for problem in folder.clear():
                    reporter.message(f"left in place: {problem}")
            folder.claim(recorded)
        group.barrier()
        if not group.is_main:
            folder.claim(recorded)
        finished = (entry["input"] for entry in folder.finished())
        pending, total, left = pending_inputs(source, out, finished, group.rank, group.world_size)
        mine = len(range(group.rank, total, group.world_size))
        summary = SegmentSummary(inputs=total, done_before=mine - left)
        if summary.done_before:
            reporter.message(f"{summary.done_before:,} of the {mine:,} inputs were done before; going on")
        started = time.perf_counter()
        crf_workers = default_workers(settings.crf_workers)
        pool = open_crf(backend, crf_workers, torch_device) if backend is not None else None
        threads = settings.writer_threads
        threads = threads if threads is not None else default_writer_threads(group.world_size)
        segmenter = BatchSegmenter(model, mapping, pool, folder, save, threads)
        batch: list[DecodedInput] = []
        decoding = workers_for(settings.loader_workers, torch_device)
        try:
            # The first process's bar stands for all of them: each of its images is one of theirs.
            with reporter.task("segmenting", left * group.world_size, unit="images") as bar:
                for decoded in decoded_inputs(pending, decoding, model.resolution):
                    batch.append(decoded)
                    if len(batch) >= settings.batch_size:
                        segmenter.batch(batch)
                        batch = []
                    bar(group.world_size)
                if batch:
                    segmenter.batch(batch)
                segmenter.finish()
        finally:
            segmenter.close()
            if pool is not None:
                pool.close()
            folder.close()
        summary.written = segmenter.written
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
                "crf_backend": backend,
            }
        )
        folder.write_json(SUMMARY_FILE, result)
        image_root = os.path.relpath(Path(source), out) if Path(source).is_dir() else None
        write_gallery(folder, result["written"], names, image_root)
        return result
