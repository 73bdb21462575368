"""The model's side of ``cause segment``: whole batches through the model on the device, each
image's scores upsampled to its own size and its label map made there, and the files handed to
the writer's threads (:mod:`.writing`), after the dense CRF's workers where there is a CRF.

The model's input comes resized from the loader workers (:mod:`.inputs`), as ``uint8``: it is
normalised on the device, in the arithmetic of training, so the label maps are those of the
one-image-at-a-time functions of :mod:`.predict`, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.transforms import normalise_pixels
from ..devices import available_cpus
from ..model.ops import best_channel
from ..owned import WriteBatch
from .crf import CRFPool, CRFQueue, TorchCRF
from .figures import palette, png_writer
from .inputs import DecodedInput, SourceEntry
from .manifest import OutputFolder
from .outputs import DEFAULT_SAVE, PALETTE_IDS, label_image, overlay_image, save_scores
from .predict import (
    TrainedModel,
    cluster_labels,
    cluster_scores,
    confidence_and_margin,
    crf_image,
    crf_unary,
    flip_averaged_feature_map,
    head_feature_map,
    prediction_size,
)
from .writing import OrderedWriter


@dataclass
class BatchSegmenter:
    """The model's work on whole batches on the device; the files of each input are made by
    the writer's threads (and, with a CRF, after the CRF's workers)."""

    model: TrainedModel
    mapping: np.ndarray | None
    pool: CRFPool | TorchCRF | None
    folder: OutputFolder
    save: tuple[str, ...] = DEFAULT_SAVE
    writer_threads: int = 0

    def __post_init__(self) -> None:
        self.colours = palette()
        self.flat_palette = self.colours.reshape(-1).tolist()
        # Earlier batches are refined in the CRF workers while later ones go through the model.
        self.in_flight = CRFQueue(2 * max(1, self.pool.workers if self.pool else 1))
        self.writer = OrderedWriter(self.folder, self.writer_threads, limit=4 * max(1, self.writer_threads) + 16)
        device = self.model.device
        self.mapping_on_device = torch.from_numpy(self.mapping).to(device) if self.mapping is not None else None
        self.label_dtype = torch.uint8 if self.model.num_classes <= PALETTE_IDS else torch.int32

    def batch(self, pending: list[DecodedInput]) -> None:
        """Segment the batch's images; their entries are written (or recorded as skipped, with
        the reason) in their order, after the batches before it."""
        model = self.model
        readable = [item for item in pending if item.pixels is not None]
        if not readable:
            self.in_flight.drain()
            self.write_all(pending, [], [])
            return
        squares: list[np.ndarray] = []
        for item in readable:
            assert item.model_input is not None, "the loader resizes every input it reads (decoded_inputs)"
            squares.append(item.model_input)
        model_inputs = torch.from_numpy(np.stack(squares)).permute(0, 3, 1, 2)
        images = normalise_pixels(model_inputs, model.device)
        features = head_feature_map(model, images)
        if self.pool is not None:
            features = flip_averaged_feature_map(model, images, features)
        label_maps: list[np.ndarray] = []
        crf_images: list[np.ndarray] = []
        crf_unaries: list[torch.Tensor] = []
        scores: list[tuple[np.ndarray, np.ndarray] | None] = []
        sharpness = model.cluster_probe.sharpness
        for index, item in enumerate(readable):
            assert item.pixels is not None
            height, width = item.pixels.shape[:2]
            size = prediction_size(width, height)
            image_features = features[index : index + 1]
            scores_map = (
                cluster_scores(model, image_features, size) if self.pool is not None or "scores" in self.save else None
            )
            scores.append(
                confidence_and_margin(scores_map, sharpness)
                if scores_map is not None and "scores" in self.save
                else None
            )
            if self.pool is None:
                labels = cluster_labels(model, image_features, size) if scores_map is None else best_channel(scores_map)
                label_maps.append(self.label_values(labels[0]))
            else:
                assert scores_map is not None
                crf_images.append(crf_image(Image.fromarray(item.pixels), scores_map))
                crf_unaries.append(crf_unary(scores_map, sharpness)[0])
        if self.pool is None:
            self.write_all(pending, scores, label_maps)
        else:
            # The whole batch at once, so the pool's workers refine several images together.
            def refined(cluster_maps: list[np.ndarray] | list[torch.Tensor]) -> None:
                values = [self.label_values(torch.as_tensor(clusters)) for clusters in cluster_maps]
                self.write_all(pending, scores, values)

            self.in_flight.put(self.pool.submit(crf_images, crf_unaries), refined)

    def label_values(self, clusters: torch.Tensor) -> np.ndarray:
        """A cluster map's label values (classes once the run is evaluated), in the label
        file's type, where the map is; then to the CPU."""
        if self.mapping_on_device is not None:
            clusters = self.mapping_on_device.to(clusters.device)[clusters.long()]
        return clusters.to(self.label_dtype).cpu().numpy()

    def finish(self) -> None:
        """Wait for the CRF and the writer; every input is then in place and in the manifest."""
        self.in_flight.drain()
        self.writer.finish()

    @property
    def written(self) -> int:
        return self.writer.written

    def close(self) -> None:
        self.writer.close()

    def write_all(
        self,
        pending: list[DecodedInput],
        scores: list[tuple[np.ndarray, np.ndarray] | None],
        label_maps: list[np.ndarray],
    ) -> None:
        """Hand the batch's inputs to the writer, in order."""
        jobs = []
        results = iter(zip(label_maps, scores, strict=True))
        for item in pending:
            if item.pixels is None:
                skipped = {"input": item.entry.relative.as_posix(), "skipped": item.problem or "unreadable"}
                jobs.append(partial(_entry_only, skipped))
                continue
            values, image_scores = next(results)
            jobs.append(partial(self._write_input, item.entry, item.pixels, values, image_scores))
        self.writer.submit(jobs)

    def _write_input(
        self,
        entry: SourceEntry,
        pixels: np.ndarray,
        values: np.ndarray,
        scores: tuple[np.ndarray, np.ndarray] | None,
        files: WriteBatch,
    ) -> dict[str, Any]:
        return self.write(files, entry, Image.fromarray(pixels), values, scores)

    def write(
        self,
        files: WriteBatch,
        item: SourceEntry,
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
        return entry


def default_writer_threads(processes: int = 1) -> int:
    """One writer thread per CPU this process may use (its share, with other processes)."""
    return max(1, available_cpus() // max(1, processes))


def _entry_only(entry: dict[str, Any], files: WriteBatch) -> dict[str, Any]:
    return entry
