"""The toolkit's cache of backbone weights (``$CAUSE_HOME``, default ``~/.cache/cause``)::

backbones/<name>/model.safetensors   the weights, timm's key names
backbones/<name>/backbone.json       the registry entry, where the weights came from
                                     (Hub repository, revision, commit, or the converted
                                     file) and the SHA-256 of model.safetensors
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..paths import cache_home

if TYPE_CHECKING:
    from .registry import BackboneSpec

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "backbone.json"


def folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name)


def named_folder(cache_dir: Path | None, folder_name: str) -> Path:
    return (cache_dir if cache_dir is not None else cache_home()) / "backbones" / folder_name


def backbone_folder(spec: BackboneSpec, cache_dir: Path | None = None) -> Path:
    return named_folder(cache_dir, folder_name(spec.weights_name))


def weights_path(spec: BackboneSpec, cache_dir: Path | None = None) -> Path:
    return backbone_folder(spec, cache_dir) / WEIGHTS_FILE


def metadata_path(spec: BackboneSpec, cache_dir: Path | None = None) -> Path:
    return backbone_folder(spec, cache_dir) / METADATA_FILE


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_metadata(spec: BackboneSpec, cache_dir: Path | None = None) -> dict[str, Any] | None:
    """What ``backbone.json`` records about the cached weights, or None."""
    return read_json(metadata_path(spec, cache_dir))


def recorded_hash(spec: BackboneSpec, cache_dir: Path | None = None) -> str | None:
    meta = read_metadata(spec, cache_dir)
    return meta.get("sha256") if meta else None


def is_cached(spec: BackboneSpec, cache_dir: Path | None = None) -> bool:
    return weights_path(spec, cache_dir).is_file()


# ----------------------------------------------------------------------------- models
