"""What a run folder holds is checked before it is believed (docs/safety.md).

A run folder may come from anywhere: another machine, the Hub, a disk that failed, a hand that
edited it. Before a tensor is allocated from what it says, ``run.json`` is checked field by
field (types, ranges, known names), ``metrics.json`` likewise, and every weight file tensor by
tensor (its name, dtype and shape against the modules the run's configuration builds, and
that every value is finite). Whatever does not pass is one sentence naming the file and the
field; nothing here raises anything but :class:`CauseError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import MAX_CLASSES, MAX_PATCH_SIZE, TrainConfig
from .errors import CauseError
from .rules import Rule, integer, is_integer, is_number, name, or_null, shown, text

# run.json is a few kilobytes and metrics.json grows with the images it could not read; a
# file larger than these is not one the toolkit wrote, and is not read into memory.
MAX_RUN_JSON_BYTES = 16 * 2**20
MAX_METRICS_JSON_BYTES = 256 * 2**20
# A safetensors file's weights are read only in these types (what training saves, and the
# types a converted checkpoint may have); their values must all be finite.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
RUN_REMEDY = "train the run again (or download it again)"
WEIGHTS_REMEDY = "the run is damaged: train it again"


def read_json(path: Path, max_bytes: int) -> tuple[Any, str | None]:
    """The JSON value in ``path`` and None, or None and what makes the file unreadable, in a
    few words. A file that hits a parser limit (nesting too deep, a number too long) is a
    damaged file like any other."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return None, f"it holds {size:,} bytes, more than any such file this toolkit writes ({max_bytes:,})"
        data = path.read_bytes()
    except OSError as error:
        return None, f"it cannot be read ({error.strerror or error})"
    return parse_json(data)


def parse_json(data: bytes) -> tuple[Any, str | None]:
    """The JSON value in ``data`` and None, or None and what makes it unreadable (see
    :func:`read_json`)."""
    try:
        return json.loads(data.decode("utf-8")), None
    except UnicodeDecodeError:
        return None, "it is not UTF-8 text"
    except json.JSONDecodeError as error:
        return None, f"{error.msg} (line {error.lineno})"
    except RecursionError:
        return None, "it nests more deeply than a JSON parser follows"
    except ValueError:  # Python's limit on the digits of an integer it parses
        return None, "it holds a number longer than a JSON parser reads"


# Settings every run.json holds resolved (a run without them cannot be rebuilt).
RECORDED_BY_EVERY_RUN = ("data_dir", "resolution")


def choices() -> dict[str, tuple[str, tuple[str, ...]]]:
    """The settings with choices, what a message calls each, and the values it accepts."""
    return {
        setting.name: (setting.noun, setting.accepted)
        for setting in TrainConfig.settings()
        if setting.noun and setting.accepted
    }


# Every field of TrainConfig, with what a run.json may hold for it, as its declaration says (a
# field that is absent takes its default, as in runs written before it existed).
CONFIG_RULES: dict[str, Rule] = {
    setting.name: or_null(setting.rule)
    if setting.may_be_none and setting.name not in RECORDED_BY_EVERY_RUN
    else setting.rule
    for setting in TrainConfig.settings()
}
# What run.json records about the backbone, where it records it.
BACKBONE_RULES: dict[str, Rule] = {
    "name": name,
    "sha256": text,
    "pos_embed": text,
    "hub_repo": text,
    "dim": integer(1, 2**20),
    "patch_size": integer(1, MAX_PATCH_SIZE),
}


def _config_problem(config: dict[str, Any]) -> str | None:
    for key, rule in CONFIG_RULES.items():
        if key not in config:
            if key == "data_dir":
                return "its 'config' has no data folder ('data_dir')"
            if key == "resolution":
                return "its 'config' has no 'resolution'"
            continue
        value = config[key]
        expected = rule(value)
        if expected is None:
            continue
        known_choices = choices()
        if key in known_choices and isinstance(value, str):
            what, options = known_choices[key]
            known = ", ".join(options)
            return f"its config's '{key}' names an unknown {what} {shown(value)} (this version knows {known})"
        return f"its config's '{key}' is {shown(value)}, not {expected}"
    return None


def _usable_class_names(names: Any) -> bool:
    """Whether ``names`` is absent or a list of at most MAX_CLASSES class names."""
    return names is None or (
        isinstance(names, list) and len(names) <= MAX_CLASSES and all(isinstance(entry, str) for entry in names)
    )


def run_info_problem(info: Any) -> str | None:
    """What makes ``info`` (a parsed run.json) unusable, in a few words; None if nothing."""
    if not isinstance(info, dict):
        return f"it holds a {type(info).__name__}, not an object"
    config = info.get("config")
    if not isinstance(config, dict):
        return "its 'config' is missing or not an object"
    count = info.get("num_classes")
    if integer(1, MAX_CLASSES)(count) is not None:
        return f"its class count {shown(count)} is not a positive whole number up to {MAX_CLASSES:,}"
    problem = _config_problem(config)
    if problem:
        return problem
    if config.get("num_classes") not in (None, count):
        return f"its class count {count} differs from its config's 'num_classes' {shown(config['num_classes'])}"
    names = info.get("class_names")
    if not _usable_class_names(names):
        return f"its 'class_names' is {shown(names)}, not a list of at most {MAX_CLASSES:,} names"
    backbone = info.get("backbone")
    if "backbone" in info:  # absent in runs from before it was recorded; never null
        if not isinstance(backbone, dict):
            return f"its 'backbone' is {shown(backbone)}, not an object"
        for key, rule in BACKBONE_RULES.items():
            if key in backbone and (expected := rule(backbone[key])) is not None:
                return f"its backbone's '{key}' is {shown(backbone[key])}, not {expected}"
        patch = backbone.get("patch_size")
        resolution = config["resolution"]
        if patch is not None and resolution % patch:
            return f"its config's 'resolution' {resolution} is not a multiple of its backbone's patch size {patch}"
    hashes = info.get("weights_sha256")
    if hashes is not None and (
        not isinstance(hashes, dict) or not all(isinstance(value, str) for value in hashes.values())
    ):
        return f"its 'weights_sha256' is {shown(hashes)}, not an object of file names and hashes"
    return None


def metrics_problem(metrics: Any, num_classes: int) -> str | None:
    """What makes ``metrics`` (a parsed metrics.json of a run of ``num_classes`` clusters)
    unusable, in a few words; None if nothing."""
    if not isinstance(metrics, dict):
        return f"it holds a {type(metrics).__name__}, not an object"
    names = metrics.get("class_names")
    if not _usable_class_names(names):
        return f"its class_names {shown(names)} is not a list of at most {MAX_CLASSES:,} names"
    mapped = metrics.get("cluster_to_class")
    if mapped is not None and mapped != []:
        if not isinstance(mapped, list) or not all(is_integer(value) for value in mapped):
            return f"its cluster_to_class {shown(mapped)} is not a list of class numbers"
        if len(mapped) != num_classes or not names or not all(0 <= value < len(names) for value in mapped):
            return f"its cluster_to_class does not map the run's {num_classes} clusters to its classes"
    for key in ("split", "dataset", "head", "backbone"):
        if metrics.get(key) is not None and not isinstance(metrics[key], str):
            return f"its {key} {shown(metrics[key])} is not a string"
    if metrics.get("images") is not None and not is_integer(metrics["images"]):
        return f"its images {shown(metrics['images'])} is not a whole number"
    scored = [("", metrics)]
    for key in ("crf", "linear_probe", "baselines"):
        if metrics.get(key) is not None and not isinstance(metrics[key], dict):
            return f"its {key} {shown(metrics[key])} is not an object"
        scored.append((f"{key}.", metrics.get(key) or {}))
    for key in ("kmeans_tokens", "kmeans_head"):
        value = (metrics.get("baselines") or {}).get(key)
        if value is not None and not isinstance(value, dict):
            return f"its baselines.{key} {shown(value)} is not an object"
        scored.append((f"baselines.{key}.", value or {}))
    for prefix, scores in scored:
        for key in ("miou", "pixel_accuracy"):
            value = scores.get(key)
            if value is not None and not is_number(value):
                return f"its {prefix}{key} {shown(value)} is not a finite number"
    return None


def weights_problem(name: str, tensor: torch.Tensor) -> str | None:
    """What makes the tensor ``name`` of a weight file unusable, in a few words; None if nothing."""
    if tensor.dtype not in WEIGHT_DTYPES:
        return f"holds {name} as {str(tensor.dtype).removeprefix('torch.')}, not as floating-point weights"
    if not bool(torch.isfinite(tensor).all()):
        return f"holds non-finite values (NaN or infinity) in {name}"
    return None


def check_weights(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every tensor of the weight file ``path`` in a floating-point type and finite."""
    for key, tensor in tensors.items():
        problem = weights_problem(key, tensor)
        if problem:
            raise CauseError(f"{path} {problem}; {WEIGHTS_REMEDY}.")


def check_state(
    path: Path, expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], strict: bool = True
) -> None:
    """The tensors ``found`` in the weight file ``path`` are those of ``expected`` (a module's
    state dict, built on the meta device so that nothing is allocated): every name there, in
    its shape, and (``strict``) no other."""
    for key, wanted in expected.items():
        if key not in found:
            raise CauseError(f"{path} has no tensor {key}, which this run's configuration needs; {WEIGHTS_REMEDY}.")
        if tuple(found[key].shape) != tuple(wanted.shape):
            raise CauseError(
                f"{path} holds {key} of shape {list(found[key].shape)}, where this run's configuration needs "
                f"{list(wanted.shape)}; {WEIGHTS_REMEDY}."
            )
    unknown = sorted(set(found) - set(expected))
    if strict and unknown:
        raise CauseError(
            f"{path} holds a tensor {shown(unknown[0])} this run's configuration has no place for; {WEIGHTS_REMEDY}."
        )
