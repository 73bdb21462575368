"""The toolkit from Python: load a trained run once, segment images in a notebook or a
service. ``cause segment`` computes its label maps with the same functions.

    from cause_cli import load_run

    model = load_run("runs/photos", device="cpu")
    result = model.segment("photo.jpg")        # a path, a PIL image or a uint8 array
    result.labels                              # [H, W] class (or cluster) ids, the image's size
    result.overlay().save("overlay.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast, overload

import numpy as np
import torch
from PIL import Image

from .data.base import as_rgb, read_image
from .devices import resolve_device
from .errors import CauseError
from .inference.crf import choose_crf_backend, open_crf
from .inference.figures import palette
from .inference.outputs import OVERLAY_OPACITY, label_image, overlay_image
from .inference.predict import (
    TrainedModel,
    cluster_labels,
    cluster_scores,
    crf_image,
    crf_unary,
    image_features,
    load_trained,
)
from .inference.segment import labels_of
from .runs import open_run

ImageInput = str | Path | Image.Image | np.ndarray


@dataclass(frozen=True)
class Segmentation:
    """One image's segmentation: ``labels [H, W]`` at the image's own size, class ids once the
    run has been evaluated (cluster ids before), with their ``names``."""

    image: Image.Image
    labels: np.ndarray
    names: list[str]

    def colours(self) -> np.ndarray:
        """``uint8 [N, 3]``: the colour of each id, as ``cause segment`` paints them."""
        return palette()

    def label_image(self) -> Image.Image:
        """The label map as ``cause segment`` writes it (palette PNG, 16-bit past 256 ids)."""
        return label_image(self.labels, self.image.size, len(self.names))

    def overlay(self, opacity: float = OVERLAY_OPACITY) -> Image.Image:
        """The image with the label colours blended in."""
        return overlay_image(self.image, self.labels, self.colours(), opacity)

    def present(self) -> list[str]:
        """The names of the ids that occur in this image, in id order."""
        return [self.names[int(value)] for value in np.unique(self.labels)]


class CauseModel:
    """A trained run, loaded once. Thread it through a service; it holds no state per call."""

    def __init__(self, trained: TrainedModel, mapping: np.ndarray | None, names: list[str]) -> None:
        self.trained = trained
        self.mapping = mapping
        self.names = names

    @property
    def labels_are(self) -> str:
        """``"classes"`` once ``cause eval`` matched clusters to classes, else ``"clusters"``."""
        return "classes" if self.mapping is not None else "clusters"

    @property
    def device(self) -> torch.device:
        return self.trained.device

    @overload
    def segment(  # type: ignore[overload-overlap]  # a str is one path, not a sequence of them
        self, images: ImageInput, crf: bool = False, batch_size: int = 8, crf_backend: str = "auto"
    ) -> Segmentation: ...

    @overload
    def segment(
        self, images: Sequence[ImageInput], crf: bool = False, batch_size: int = 8, crf_backend: str = "auto"
    ) -> list[Segmentation]: ...

    def segment(
        self,
        images: ImageInput | Sequence[ImageInput],
        crf: bool = False,
        batch_size: int = 8,
        crf_backend: str = "auto",
    ) -> Segmentation | list[Segmentation]:
        """Segment one image or a batch: paths, PIL images, ``uint8`` arrays (``[H, W, 3]`` or
        grey ``[H, W]``; a ``[B, H, W, 3]`` array is a batch). With ``crf``, the image and its
        mirror are averaged and refined by the dense CRF, as ``cause segment --crf`` does, with
        ``crf_backend`` ``"auto"`` (torch on a GPU, pydensecrf on a CPU where it is installed,
        else torch), ``"pydensecrf"`` or ``"torch"``."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise CauseError(f"batch_size must be a whole number of at least 1, not {batch_size!r}.")
        single = not _is_batch(images)
        batch = cast("list[ImageInput]", [images] if single else list(images))  # type: ignore[arg-type]
        refiner = open_crf(choose_crf_backend(crf_backend, self.device), 0, self.device) if crf else None
        pictures = [_as_image(image) for image in batch]
        for picture in pictures:
            if picture.width < 1 or picture.height < 1:
                raise CauseError(
                    f"Cannot segment an image of {picture.width} x {picture.height} pixels; give one at least 1 pixel "
                    "wide and high."
                )
        results = []
        for start in range(0, len(pictures), batch_size):
            chunk = pictures[start : start + batch_size]
            with torch.no_grad():
                for picture, (features, size) in zip(chunk, image_features(self.trained, chunk, crf), strict=True):
                    if refiner is not None:
                        scores = cluster_scores(self.trained, features, size)
                        unary = crf_unary(scores, self.trained.cluster_probe.sharpness)[0]
                        (refined,) = refiner.run([crf_image(picture, scores)], [unary])
                        clusters = torch.as_tensor(refined).cpu().numpy()
                    else:
                        clusters = cluster_labels(self.trained, features, size)[0].cpu().numpy()
                    values = self.mapping[clusters] if self.mapping is not None else clusters
                    labels = np.asarray(label_image(values, picture.size, self.trained.num_classes))
                    results.append(Segmentation(picture, labels.astype(np.int64), self.names))
        return results[0] if single else results


def load_run(run: str | Path, device: str = "auto", backbone: str | None = None) -> CauseModel:
    """The trained run in folder ``run`` (or ``"hf-hub:OWNER/NAME[@REVISION]"``, downloaded once
    into the Hub's cache) on ``device`` (``auto``: a GPU when there is one). ``backbone`` only
    checks the run's (another name is refused)."""
    directory = open_run(run)
    trained = load_trained(directory, resolve_device(device), backbone)
    mapping, names = labels_of(directory, trained.num_classes)
    return CauseModel(trained, mapping, names)


def _is_batch(images: object) -> bool:
    if isinstance(images, np.ndarray):
        return images.ndim == 4
    return isinstance(images, (list, tuple))


def _as_image(image: ImageInput) -> Image.Image:
    if isinstance(image, (str, Path)):
        return read_image(Path(image), upright=True)
    if isinstance(image, Image.Image):
        return as_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise CauseError(
                f"An image array must be uint8 [H, W, 3] (or grey [H, W]), not {image.dtype} {list(image.shape)}."
            )
        return as_rgb(Image.fromarray(image))
    raise CauseError(f"Cannot segment a {type(image).__name__}: give a path, a PIL image or a uint8 array.")
