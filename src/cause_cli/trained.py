"""A trained run's weights, one artifact: how they are written and read back, and their format,
in one place. Training writes them through here, and everything that reads them (inference,
``cause import``, ``cause export``, ``cause push``, the Python API) reads them through here.
Below training and inference, above the run folder (runs.py)::

    clusterbook.safetensors       step one: {"clusterbook": [K, D]}
    head.safetensors              step two: the state dict of SegmentationHeads (student and
                                  teacher heads, their projections, the linear probe); the
                                  reference recipe's step three rewrites it and keeps step
                                  two's as head_front_door.safetensors
    probe.safetensors             step three: the ClusterProbe's state dict ("centroids";
                                  "whitening.mean" and "whitening.matrix" where the centroids
                                  live in a whitened space; "precision" where the clusters have
                                  a spread), and the linear probe's under "linear_probe."

The probe file says what it is in one entry of its header's metadata, ``"cause"``: JSON such as
``{"format": "cause-cluster-probe", "version": 2, "whitening": true, "spread": false,
"linear_probe": true, "start": "kmeans", "space": "whitened"}`` (which parts it holds, and the
start and space that made them). Files written before the format was recorded (version 1: no
header metadata) are read by the tensors they hold. Every file is checked tensor by tensor
against what the run's configuration builds before any of it is believed (run_checks.py).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .errors import CauseError
from .model.head_kinds import HEAD_KINDS
from .model.heads import ClusterProbe, LinearProbe, SegmentationHeads
from .model.whitening import FeatureWhitening
from .rules import shown
from .run_checks import WEIGHTS_REMEDY, check_state, parse_json
from .runs import CLUSTERBOOK_FILE, FRONT_DOOR_HEAD_FILE, HEAD_FILE, PROBE_FILE, WEIGHT_FILES, RunDirectory

__all__ = [
    "CLUSTERBOOK_FILE",
    "FRONT_DOOR_HEAD_FILE",
    "HEAD_FILE",
    "PROBE_FILE",
    "PROBE_FORMAT",
    "PROBE_FORMAT_VERSION",
    "PROBE_HEADER",
    "WEIGHT_FILES",
    "ProbeParts",
    "TrainedWeights",
    "build_heads",
    "check_weight_bytes",
    "keep_front_door_heads",
    "load_clusterbook",
    "load_heads",
    "load_probe",
    "load_weights",
    "probe_header",
    "probe_parts",
    "save_clusterbook",
    "save_heads",
    "save_probe",
]

PROBE_HEADER = "cause"  # the probe file's header entry: JSON that says what the file is
PROBE_FORMAT = "cause-cluster-probe"
PROBE_FORMAT_VERSION = 2  # 1: the files written before the format was recorded
PROBE_PARTS = ("whitening", "spread", "linear_probe")  # what the header says the file holds, or not
LINEAR_PROBE_PREFIX = "linear_probe."


def build_heads(config: TrainConfig, dim: int, patch_size: int, num_classes: int) -> SegmentationHeads:
    """The heads the run's configuration describes, freshly initialised."""
    assert config.resolution is not None
    tokens_per_image = (config.resolution // patch_size) ** 2
    return SegmentationHeads(
        dim, config.reduced_dim, config.projection_dim, num_classes, config.dropout, config.head, tokens_per_image
    )


def save_clusterbook(run: RunDirectory, clusterbook: torch.Tensor) -> None:
    run.save_tensors(CLUSTERBOOK_FILE, {"clusterbook": clusterbook.detach()})


def load_clusterbook(
    run: RunDirectory, device: torch.device | str, size: int | None = None, dim: int | None = None
) -> torch.Tensor:
    """The clusterbook ``[K, D]``; checked to be ``[size, dim]`` where they are given."""
    book = run.load_tensors(CLUSTERBOOK_FILE, device)
    if size is not None and dim is not None:
        check_state(run.file(CLUSTERBOOK_FILE), {"clusterbook": torch.empty(size, dim, device="meta")}, book)
    return book["clusterbook"]


def save_heads(run: RunDirectory, heads: SegmentationHeads, file_name: str = HEAD_FILE) -> None:
    run.save_tensors(file_name, heads.state_dict())


def keep_front_door_heads(run: RunDirectory) -> None:
    """Keep step two's heads as head_front_door.safetensors (once), before the reference
    recipe's step three rewrites head.safetensors, so that the step can be run again."""
    if run.writes and not run.has(FRONT_DOOR_HEAD_FILE):
        front_door = run.file(HEAD_FILE)
        run.write_file(FRONT_DOOR_HEAD_FILE, lambda target: shutil.copyfile(front_door, target))


def load_heads(
    run: RunDirectory,
    config: TrainConfig,
    dim: int,
    patch_size: int,
    num_classes: int,
    device: torch.device,
    file_name: str = HEAD_FILE,
) -> SegmentationHeads:
    state = run.load_tensors(file_name, device)
    # The file's tensors are checked against the heads the configuration builds, built first
    # where nothing is allocated: a configuration that asks for huge heads meets a file that
    # does not hold them before it costs any memory.
    with torch.device("meta"):
        expected = build_heads(config, dim, patch_size, num_classes)
    check_state(run.file(file_name), expected.state_dict(), state)
    clusterbook = None
    if HEAD_KINDS[config.head].reads_clusterbook:
        clusterbook = load_clusterbook(run, device, config.clusterbook_size, dim)
    heads = build_heads(config, dim, patch_size, num_classes).to(device)
    if clusterbook is not None:
        heads.set_clusterbook(clusterbook)
    try:
        heads.load_state_dict(state)
    except RuntimeError as error:
        raise CauseError(f"{run.file(file_name)} does not fit this run's configuration.") from error
    return heads


@dataclass(frozen=True)
class ProbeParts:
    """What a probe file holds besides the centroids."""

    whitening: bool  # the whitening of the centroids' space
    spread: bool  # the clusters' shared spread ("precision")
    linear_probe: bool  # the linear probe's weights


def save_probe(run: RunDirectory, probe: ClusterProbe, linear_probe: nn.Module, start: str, space: str) -> None:
    """Step three's file: the cluster probe (with whatever its start and space made it hold)
    and the linear probe, and a header that says which parts it holds and what made them."""
    tensors = {key: value.detach() for key, value in probe.state_dict().items()}
    tensors.update({f"{LINEAR_PROBE_PREFIX}{key}": value for key, value in linear_probe.state_dict().items()})
    header = {
        "format": PROBE_FORMAT,
        "version": PROBE_FORMAT_VERSION,
        "whitening": probe.whitening is not None,
        "spread": probe.precision is not None,
        "linear_probe": True,
        "start": start,
        "space": space,
    }
    # One entry: safetensors writes the entries of a header in no fixed order, and a run
    # trained twice the same way is the same bytes.
    run.save_tensors(PROBE_FILE, tensors, {PROBE_HEADER: json.dumps(header)})


def probe_header(run: RunDirectory) -> dict[str, Any] | None:
    """What the run's probe file says of itself (:func:`save_probe`); None for a file written
    before the format was recorded, one sentence for a header this version cannot read."""
    path = run.file(PROBE_FILE)
    text = run.tensor_metadata(PROBE_FILE).get(PROBE_HEADER)
    if text is None:
        return None
    header, problem = parse_json(text.encode())
    if problem is None and not isinstance(header, dict):
        problem = f"it holds a {type(header).__name__}, not an object"
    if problem is not None:
        raise CauseError(f"{path} has a header this version of cause cannot read: {problem}; {WEIGHTS_REMEDY}.")
    written = (header.get("format"), header.get("version"))
    if written != (PROBE_FORMAT, PROBE_FORMAT_VERSION):
        raise CauseError(
            f"{path} is a probe file of format {shown(written[0])} version {shown(written[1])}, which this "
            f"version of cause does not read (it reads {PROBE_FORMAT} version {PROBE_FORMAT_VERSION}); "
            f"{WEIGHTS_REMEDY}."
        )
    for name in PROBE_PARTS:
        if not isinstance(header.get(name), bool):
            raise CauseError(
                f"{path} says {shown(header.get(name))} of its part '{name}', not true or false; {WEIGHTS_REMEDY}."
            )
    return header


def probe_parts(run: RunDirectory, tensors: dict[str, torch.Tensor]) -> ProbeParts:
    """The parts the run's probe file holds, as its header says; a file of version 1 says
    nothing, and its parts are the tensors it holds."""
    header = probe_header(run)
    if header is not None:
        return ProbeParts(**{name: header[name] for name in PROBE_PARTS})
    return ProbeParts(
        whitening="whitening.mean" in tensors or "whitening.matrix" in tensors,
        spread="precision" in tensors,
        linear_probe=any(key.startswith(LINEAR_PROBE_PREFIX) for key in tensors),
    )


def load_probe(
    run: RunDirectory, config: TrainConfig, num_classes: int, linear_probe: nn.Module, device: torch.device
) -> ClusterProbe:
    """The cluster probe of the run; the linear probe's weights, where the file holds them, are
    loaded into ``linear_probe``."""
    state = run.load_tensors(PROBE_FILE, device)
    parts = probe_parts(run, state)
    upsample_scores = config.probe_upsampling == "scores"

    def build_probe() -> ClusterProbe:
        space = FeatureWhitening(config.reduced_dim) if parts.whitening else None
        return ClusterProbe(config.reduced_dim, num_classes, space, parts.spread, upsample_scores)

    # The file's tensors against the probes the run describes, built where nothing is allocated.
    with torch.device("meta"):
        expected = dict(build_probe().state_dict())
        if parts.linear_probe:
            expected.update({f"{LINEAR_PROBE_PREFIX}{key}": value for key, value in linear_probe.state_dict().items()})
    check_state(run.file(PROBE_FILE), expected, state)
    cluster_probe = build_probe().to(device)
    cluster_probe.load_state_dict({key: value for key, value in state.items() if key in cluster_probe.state_dict()})
    if parts.linear_probe:
        linear_probe.load_state_dict(
            {
                key.removeprefix(LINEAR_PROBE_PREFIX): value
                for key, value in state.items()
                if key.startswith(LINEAR_PROBE_PREFIX)
            }
        )
    return cluster_probe


@dataclass
class TrainedWeights:
    """Everything a run learnt, loaded: the heads (the teacher is what inference uses), the
    cluster probe and the linear probe (the heads' own, with the probe file's weights)."""

    heads: SegmentationHeads
    cluster_probe: ClusterProbe
    linear_probe: LinearProbe


def load_weights(
    run: RunDirectory, config: TrainConfig, dim: int, patch_size: int, num_classes: int, device: torch.device
) -> TrainedWeights:
    """The run's weights for a backbone of width ``dim`` and patch ``patch_size``, in
    evaluation mode, each file checked against the configuration first."""
    heads = load_heads(run, config, dim, patch_size, num_classes, device).eval()
    cluster_probe = load_probe(run, config, num_classes, heads.linear_probe, device)
    return TrainedWeights(heads, cluster_probe, heads.linear_probe.eval())


def check_weight_bytes(path: Path, data: bytes) -> None:
    """The bytes of the weight file ``path`` are a safetensors file, or one sentence why not."""
    from safetensors.torch import load as safetensors_load

    try:
        safetensors_load(data)
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CauseError(f"{path} is damaged or not a safetensors file; train the run again.") from error
