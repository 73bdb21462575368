"""``cause export``: a trained run as one ONNX graph, for serving without the toolkit.

The graph takes normalised images ``float32 [B, 3, R, R]`` (R: the run's resolution; the
batch is dynamic) through the backbone, the teacher head and the cluster probe (its whitening
included) and gives ``scores [B, C, R, R]`` (the cosine of each pixel with each centroid, or
its log-density where the probe has a spread; brought to pixel size as the run's probe does,
:meth:`ClusterProbe.score_map`) and ``labels int64 [B, R, R]``
(classes once the run was evaluated, clusters before). What it leaves out: the dense CRF (a
CPU algorithm with no ONNX form), reading and resizing images (resize to R x R and normalise
with ImageNet's mean and deviation, as the description beside the graph, ``<graph>.json``, says), and labels at
an image's own size (resize the label map with nearest neighbours).
"""

from __future__ import annotations

import copy
import json
import time
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CauseError
from ..model.ops import tokens_to_map
from ..paths import file_sha256, refuse_unusable_folder, write_atomically, write_json
from ..runs import open_run
from .predict import TrainedModel, load_trained
from .segment import labels_of

FORMATS = ("onnx",)
OPSET = 18


class ExportedSegmenter(nn.Module):
    """Normalised images to cluster scores and labels, in one module torch can export."""

    def __init__(self, model: TrainedModel, mapping: np.ndarray | None, for_export: bool = True) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(model.backbone) if for_export else model.backbone
        if for_export:
            _fix_positions(self.backbone.model, model.resolution // model.backbone.patch_size)
        self.head = model.heads.teacher
        self.cluster_probe = model.cluster_probe
        self.resolution = model.resolution
        table = torch.from_numpy(mapping).long() if mapping is not None else torch.arange(model.num_classes)
        self.register_buffer("cluster_to_label", table)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = tokens_to_map(self.head(self.backbone(images)))
        scores = self.cluster_probe.score_map(features, images.shape[-2:])
        table: torch.Tensor = self.cluster_to_label  # type: ignore[assignment]
        return scores, table[scores.argmax(dim=1)]


def _fix_positions(vit: nn.Module, grid: int) -> None:
    """Resize the position embeddings once, for the exported resolution: the resizing (bicubic,
    antialiased) has no ONNX form, and at one resolution it is a constant. Adding positions is
    the same in every rule the toolkit has, ``constant + [0 for the prefix tokens, patches]``,
    so the constant is what the model's own rule gives for all-zero patches."""
    if getattr(vit, "pos_embed", None) is None:
        return  # rotary or no positions: nothing is resized
    dim = int(vit.embed_dim)  # type: ignore[arg-type]
    with torch.no_grad():
        constant = vit._pos_embed(torch.zeros(1, grid, grid, dim))  # type: ignore[operator]
    prefix = constant.shape[1] - grid * grid
    vit.register_buffer("cause_fixed_positions", constant)

    def fixed(self: Any, patches: torch.Tensor) -> torch.Tensor:
        batch = patches.shape[0]
        flat = patches.reshape(batch, -1, patches.shape[-1])
        return self.cause_fixed_positions.expand(batch, -1, -1) + F.pad(flat, (0, 0, prefix, 0))

    vit._pos_embed = types.MethodType(fixed, vit)  # type: ignore[method-assign,assignment]


def description_path(graph: Path) -> Path:
    """Where the description of ``graph`` goes: beside it, its whole name plus ``.json``, so
    that the two can never be one file (``model.onnx.json``; ``model.json.json``)."""
    return graph.with_name(graph.name + ".json")


def _recorded_graph_hash(description: Path) -> str | None:
    """The graph's SHA-256 that a description cause wrote records; None for any other file."""
    try:
        recorded = json.loads(description.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if isinstance(recorded, dict) and recorded.get("format") in FORMATS and isinstance(recorded.get("sha256"), str):
        return recorded["sha256"]
    return None


def refuse_replacing_other_files(graph: Path) -> None:
    """The graph and its description may replace only an earlier export's graph and
    description: never a run's file, a user's file, or one that is a link."""
    refuse_unusable_folder(graph.parent, "The folder of --out")
    description = description_path(graph)
    for path in (graph, description):
        if path.is_symlink():
            raise CauseError(f"{path} is a symbolic link; give another --out.")
        if path.exists() and not path.is_file():
            raise CauseError(f"{path} is not a file; give the path of the graph to write with --out.")
    if graph.exists():
        if _recorded_graph_hash(description) != file_sha256(graph):
            raise CauseError(
                f"{graph} exists and is not a graph cause exported (no description beside it records it); cause "
                "replaces only files it wrote: give another --out, or move the file away."
            )
    elif description.exists() and _recorded_graph_hash(description) is None:
        raise CauseError(
            f"{description} exists and is not a description cause wrote; give another --out, or move the file away."
        )


def export_run(run_path: Path | str, out: Path | str, export_format: str = "onnx") -> dict[str, Any]:
    """Write the run as ``out`` (ONNX) and its description beside it (:func:`description_path`);
    checked by running the graph in ONNX Runtime on a random batch against the toolkit's own
    output before either is put in place."""
    if export_format not in FORMATS:
        raise CauseError(f"Unknown export format '{export_format}'; this version writes {', '.join(FORMATS)}.")
    try:
        import onnxruntime
    except ImportError as error:
        raise CauseError('Exporting needs onnx and onnxruntime: pip install "cause-cli[export]".') from error
    out = Path(out)
    refuse_replacing_other_files(out)
    run = open_run(run_path)
    model = load_trained(run, torch.device("cpu"))
    mapping, names = labels_of(run, model.num_classes)
    module = ExportedSegmenter(model, mapping).eval()
    size = model.resolution
    example = torch.randn(2, 3, size, size)
    description: dict[str, Any] = {}

    def write_and_check(temporary: Path) -> None:
        """The graph into ``temporary``, checked; its description written beside ``out``
        before the graph is renamed into place."""
        # The tracer notes that the resolution becomes a constant: it is meant to (dynamic batch only).
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(temporary),
                input_names=["images"],
                output_names=["scores", "labels"],
                dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}, "labels": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        session = onnxruntime.InferenceSession(str(temporary), providers=["CPUExecutionProvider"])
        check = torch.randn(3, 3, size, size)
        with torch.no_grad():  # the toolkit's own forward, positions resized as it resizes them
            expected = ExportedSegmenter(model, mapping, for_export=False).eval()(check)[1].numpy()
        started = time.perf_counter()
        labels = session.run(["labels"], {"images": check.numpy()})[0]
        seconds = time.perf_counter() - started
        agreement = float((labels == expected).mean())
        if agreement < 0.999:
            raise CauseError(
                f"The exported graph agrees with the toolkit on only {agreement:.2%} of pixels; not kept."
            )
        description.update({
            "format": export_format,
            "file": out.name,
            "sha256": file_sha256(temporary),
            "run": str(run.path),
            "backbone": model.config.backbone,
            "resolution": size,
            "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32",
                      "normalise": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": "pixels / 255"}},
            "outputs": {"scores": ["batch", len(names), size, size], "labels": ["batch", size, size]},
            "labels_are": "classes" if mapping is not None else "clusters",
            "scores_are": "cosines" if model.cluster_probe.precision is None else "log-densities",
            "crf_starts_from": f"softmax({model.cluster_probe.sharpness:g} * scores)",
            "names": names,
            "not_exported": ["the dense CRF", "reading and resizing images", "labels at the image's own size"],
            "bytes": temporary.stat().st_size,
            "check": {"images": int(check.shape[0]), "pixels_agreeing": agreement, "onnxruntime_seconds": seconds},
        })
        # The description first: a stop between the two leaves an earlier graph no description
        # records, which the next export refuses to replace rather than guess about.
        write_json(description_path(out), description)

    write_atomically(out, write_and_check)
    return description
