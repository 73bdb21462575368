"""Frozen self-supervised ViT backbones: the registry, the cache, fetching and loading.

``registry`` names the backbones, ``cache`` says where their weights live, ``fetching`` puts
them there (from the Hub or a converted checkpoint), ``building`` makes the timm model, and
``loading`` gives the frozen backbone that turns images into patch tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..paths import file_sha256
from .cache import (
    METADATA_FILE,
    WEIGHTS_FILE,
    backbone_folder,
    is_cached,
    metadata_path,
    read_metadata,
    recorded_hash,
    weights_path,
)
from .fetching import HUB_WEIGHT_FILES, fetch, fetch_backbones, list_backbones
from .registry import (
    HF_HUB_PREFIX,
    PAPER_RESOLUTION,
    REFERENCE_HEADS_SUFFIX,
    REGISTRY,
    TOY,
    TOY_SEED,
    BackboneSpec,
    paper_resolution,
    reference_heads_variant,
    resolve_spec,
    spec_from_record,
    weights_spec,
)

if TYPE_CHECKING:
    from .building import build_model
    from .loading import FrozenBackbone, load_backbone, refuse_other_backbone

# timm and torchvision take seconds to import: the model parts load on first use, so that
# `cause fetch --list` and the other commands that never build a model start at once.
_MODEL_PARTS = {
    "build_model": "building",
    "FrozenBackbone": "loading",
    "load_backbone": "loading",
    "refuse_other_backbone": "loading",
}


def __getattr__(name: str) -> Any:
    if name in _MODEL_PARTS:
        import importlib

        return getattr(importlib.import_module(f".{_MODEL_PARTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HF_HUB_PREFIX",
    "HUB_WEIGHT_FILES",
    "METADATA_FILE",
    "PAPER_RESOLUTION",
    "REFERENCE_HEADS_SUFFIX",
    "REGISTRY",
    "TOY",
    "TOY_SEED",
    "WEIGHTS_FILE",
    "BackboneSpec",
    "FrozenBackbone",
    "backbone_folder",
    "build_model",
    "fetch",
    "fetch_backbones",
    "file_sha256",
    "is_cached",
    "list_backbones",
    "load_backbone",
    "metadata_path",
    "paper_resolution",
    "read_metadata",
    "recorded_hash",
    "reference_heads_variant",
    "refuse_other_backbone",
    "resolve_spec",
    "spec_from_record",
    "weights_path",
    "weights_spec",
]
