"""``cause import``: the reference implementation's trained files as a run of this toolkit.

The reference writes, per dataset, backbone and clusterbook size K::

    CAUSE/<dataset>/<backbone>/<K>/segment_{mlp,tr}.pth     heads, projections, linear probe
    CAUSE/<dataset>/<backbone>/<K>/cluster_{mlp,tr}.pth     {"codebook", "cluster_probe"}
    CAUSE/<dataset>/modularity/<backbone>/<K>/modular.npy   the clusterbook

This module finds those files (in that layout, or side by side in one folder, or named one
by one), reads them without executing anything (``torch.load(weights_only=True)``,
``numpy.load(allow_pickle=False)``), checks every shape against the chosen backbone, and
writes a run folder that ``cause eval`` and ``cause segment`` use like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._version import __version__
from .backbones import REFERENCE_HEADS_SUFFIX, REGISTRY, file_sha256, load_backbone
from .config import TrainConfig
from .errors import CauseError
from .model.heads import ClusterProbe, SegmentationHeads
from .model.reference import convert_heads, load_reference_file
from .paths import refuse_unusable_folder
from .resolve import validated
from .runs import RunDirectory
from .trained import save_clusterbook, save_heads, save_probe


@dataclass(frozen=True)
class ReferenceFiles:
    segment: Path
    cluster: Path
    modular: Path
    head: str  # "mlp" or "tr"


def _single(matches: list[Path], what: str, where: Path) -> Path:
    if not matches:
        raise CauseError(f"No {what} under {where}.")
    if len(matches) > 1:
        listed = ", ".join(str(match) for match in matches[:4])
        raise CauseError(f"Several {what} under {where} ({listed}); name the one to import with its option.")
    return matches[0]


def find_reference_files(
    folder: Path | None,
    head: str | None = None,
    segment: Path | None = None,
    cluster: Path | None = None,
    modular: Path | None = None,
) -> ReferenceFiles:
    """Locate the three files, from explicit paths or by searching ``folder``."""
    if folder is not None and not folder.is_dir():
        raise CauseError(f"{folder} is not a folder.")
    kinds = (head,) if head else ("tr", "mlp")
    if segment is None:
        assert folder is not None or segment is not None
        if folder is None:
            raise CauseError("Name the reference folder or the segment file (--segment).")
        found = [p for kind in kinds for p in sorted(folder.rglob(f"segment_{kind}.pth"))]
        segment = _single(found, "segment_tr.pth or segment_mlp.pth" if not head else f"segment_{head}.pth", folder)
    if not segment.is_file():
        raise CauseError(f"{segment} does not exist.")
    kind = head or ("tr" if segment.name.endswith("_tr.pth") else "mlp" if segment.name.endswith("_mlp.pth") else "")
    if kind not in ("mlp", "tr"):
        raise CauseError(f"Cannot tell the head of {segment.name}; say --head mlp or --head tr.")
    if cluster is None:
        cluster = segment.with_name(f"cluster_{kind}.pth")
        if not cluster.is_file():
            raise CauseError(f"{cluster} does not exist; name the cluster probe file with --cluster.")
    if modular is None:
        modular = _find_modular(segment)
    for path in (cluster, modular):
        if not path.is_file():
            raise CauseError(f"{path} does not exist.")
    return ReferenceFiles(segment, cluster, modular, kind)


def _find_modular(segment: Path) -> Path:
    beside = segment.with_name("modular.npy")
    if beside.is_file():
        return beside
    # CAUSE/<dataset>/<backbone>/<K>/segment_*.pth  ->  CAUSE/<dataset>/modularity/<backbone>/<K>/modular.npy
    size_dir = segment.parent
    backbone_dir = size_dir.parent
    dataset_dir = backbone_dir.parent
    candidate = dataset_dir / "modularity" / backbone_dir.name / size_dir.name / "modular.npy"
    if candidate.is_file():
        return candidate
    raise CauseError(f"No modular.npy beside {segment} nor at {candidate}; name it with --modular.")


def _load_clusterbook(path: Path) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise CauseError(f"{path} is not a numpy array file this toolkit can read safely.") from error
    if array.ndim != 2:
        raise CauseError(f"{path} holds an array of shape {list(array.shape)}, not a clusterbook [K, D].")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _shape(state: dict[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in state:
        raise CauseError(f"{path} has no '{key}'; it is not a reference {path.stem} file.")
    return tuple(state[key].shape)


def reference_backbone(name: str) -> str:
    """The backbone as the reference built it: its DINO ViT-S has 12 heads (METHOD.md section 0)."""
    if name.endswith(REFERENCE_HEADS_SUFFIX):
        return name
    variant = name + REFERENCE_HEADS_SUFFIX
    return variant if variant in REGISTRY else name


def import_reference(
    files: ReferenceFiles,
    backbone: str,
    run_path: Path | str,
    dataset: str | None = None,
    class_names: list[str] | None = None,
    device: str = "cpu",
) -> RunDirectory:
    """Convert the reference's files into a run folder at ``run_path`` (which must not exist)."""
    run = RunDirectory(Path(run_path))
    refuse_unusable_folder(run.path, "--run")
    if run.path.exists() and any(run.path.iterdir()):
        raise CauseError(f"{run.path} already exists and is not empty; import into a new folder.")
    backbone = reference_backbone(backbone)
    loaded = load_backbone(backbone, device)
    dim, patch = loaded.dim, loaded.patch_size

    segment_state = load_reference_file(files.segment)
    cluster_state = load_reference_file(files.cluster)
    clusterbook = _load_clusterbook(files.modular)
    if "cluster_probe" not in cluster_state:
        raise CauseError(f"{files.cluster} has no 'cluster_probe'; it is not a reference cluster file.")
    centroids = cluster_state["cluster_probe"].float()

    prefix = "head.tr." if files.head == "tr" else "head."
    hidden = _shape(segment_state, f"{prefix}f2.0.weight", files.segment)
    reduced = _shape(segment_state, f"{prefix}f1.weight", files.segment)[0]
    projection = _shape(segment_state, "projection_head.f.weight", files.segment)[0]
    linear = _shape(segment_state, "linear.f.weight", files.segment)[0]
    num_classes = centroids.shape[0]
    book_width, centroid_width = clusterbook.shape[1], centroids.shape[1]
    checks = [
        (hidden[1] == dim, f"{files.segment.name} expects a backbone of width {hidden[1]}, {backbone} has {dim}"),
        (book_width == dim, f"{files.modular.name} has width {book_width}, {backbone} has {dim}"),
        (
            centroid_width == reduced,
            f"{files.cluster.name} has centroids of width {centroid_width}, the head {reduced}",
        ),
        (linear == num_classes, f"the linear probe has {linear} classes, the cluster probe {num_classes}"),
    ]
    if class_names is not None:
        checks.append((len(class_names) == num_classes, f"{num_classes} clusters but {len(class_names)} class names"))
    resolution = loaded.spec.resolution
    num_queries = None
    if files.head == "tr":
        num_queries = _shape(segment_state, "head.query_pos", files.segment)[0]
        side = math.isqrt(num_queries)
        checks.append((side * side == num_queries, f"{num_queries} TR queries do not form a square token grid"))
        resolution = side * patch
    for fits, problem in checks:
        if not fits:
            raise CauseError(f"The reference files do not fit backbone '{backbone}': {problem}.")

    config = TrainConfig(
        data_dir="",
        dataset=dataset or "folder",
        backbone=backbone,
        head=files.head,
        resolution=resolution,
        num_classes=num_classes,
        clusterbook_size=clusterbook.shape[0],
        reduced_dim=reduced,
        projection_dim=projection,
        probe_upsampling="features",  # the reference's inference
    )
    config = validated(config)
    heads = SegmentationHeads(dim, reduced, projection, num_classes, kind=files.head, num_queries=num_queries)
    converted = convert_heads(segment_state, files.head)
    missing, unexpected = heads.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise CauseError(
            f"{files.segment} does not match a reference {files.head.upper()} head (missing {missing[:3]})."
        )

    run.path.mkdir(parents=True, exist_ok=True)
    save_clusterbook(run, clusterbook)
    save_heads(run, heads)
    probe = ClusterProbe(reduced, num_classes)  # in the head's space, without a spread
    probe.centroids.data.copy_(centroids)
    save_probe(run, probe, heads.linear_probe, start="random", space="head")  # the reference's
    info: dict[str, Any] = {
        "toolkit_version": __version__,
        "config": config.to_dict(),
        "backbone": loaded.describe(),
        "num_classes": num_classes,
        "class_names": class_names,
        "imported_from": {
            "segment": str(files.segment),
            "cluster": str(files.cluster),
            "modular": str(files.modular),
            "sha256": {p.name: file_sha256(p) for p in (files.segment, files.cluster, files.modular)},
        },
    }
    run.write_run_info(info)
    run.log(f"imported reference files {files.segment}, {files.cluster}, {files.modular}")
    return run
