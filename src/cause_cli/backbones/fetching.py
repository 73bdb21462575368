"""``cause fetch``: backbone weights into the cache, from the Hub or converted from a file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CauseError
from ..paths import file_sha256, write_json
from ..progress import Reporter
from .cache import (
    METADATA_FILE,
    folder_name,
    is_cached,
    metadata_path,
    named_folder,
    read_json,
    read_metadata,
    weights_path,
)
from .registry import REGISTRY, TOY_SEED, BackboneSpec, resolve_spec, spec_from_record, weights_spec

# What fetch asks a Hub repository for, in this order (as timm does).
if TYPE_CHECKING:
    import torch

HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _revision_matches(meta: Mapping[str, Any] | None, revision: str | None) -> bool:
    if revision is None:
        return True
    if meta is None:
        return False
    commit = meta.get("commit") or ""
    return revision in (meta.get("revision"), commit) or (len(revision) >= 7 and commit.startswith(revision))


def fetch(
    spec: BackboneSpec,
    revision: str | None = None,
    *,
    cache_dir: Path | None = None,
    from_file: Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> Path:
    """Make sure the backbone's weights are in the cache; return the safetensors path.

    Nothing is requested when they are cached (at ``revision``, when one is given) unless
    ``force``. Hub entries are downloaded through huggingface_hub and checked against the
    Hub's checksum; ``from_file`` converts a checkpoint on disk instead (the only way for
    iBOT and MSN, whose authors publish their own formats). The result is always timm's
    layout in safetensors, checked by loading it into the architecture.
    """
    target = weights_spec(spec)
    path = weights_path(target, cache_dir)
    meta = read_metadata(target, cache_dir)
    if path.is_file() and not force and from_file is None and _revision_matches(meta, revision):
        return path
    import torch

    from .building import build_model, save_state_dict  # timm: only when something is fetched

    reporter = reporter or Reporter()
    provenance: dict[str, Any]
    if target.local:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TOY_SEED)
            model = build_model(target)
        provenance = {"made_locally": True, "seed": TOY_SEED}
    else:
        if from_file is not None:
            state, provenance = _state_from_file(target, Path(from_file))
        elif target.source == "file":
            raise CauseError(
                f"'{target.name}' is not on the Hub in timm's form: download the authors' checkpoint from "
                f"{target.published_at}, then run 'cause fetch {target.name} --from-file FILE'."
            )
        else:
            state, provenance = _state_from_hub(target, revision, force, reporter)
        model = build_model(target, state)
    save_state_dict(model, path)
    record = {**asdict(target), **provenance, "sha256": file_sha256(path)}
    write_json(metadata_path(target, cache_dir), record)
    return path


def _state_from_hub(
    spec: BackboneSpec, revision: str | None, force: bool, reporter: Reporter
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from . import hub
    from .checkpoints import read_checkpoint

    assert spec.hub_repo is not None
    downloaded = hub.download(
        spec.hub_repo, HUB_WEIGHT_FILES, revision, what=f"backbone '{spec.name}'", force=force, reporter=reporter
    )
    contents = read_checkpoint(downloaded.path)
    if not isinstance(contents, dict):
        raise CauseError(f"{downloaded.filename} of {spec.hub_repo} holds no state dict.")
    return contents, downloaded.record()


def _state_from_file(spec: BackboneSpec, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from .checkpoints import backbone_state_dict, read_checkpoint

    contents = read_checkpoint(path)
    state = backbone_state_dict(contents, spec.family, path)
    return state, {"converted_from": str(path.resolve()), "source_sha256": file_sha256(path)}


def fetch_backbones(
    names: Sequence[str],
    revision: str | None = None,
    *,
    cache_dir: Path | None = None,
    from_file: Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> list[tuple[BackboneSpec, Path]]:
    """``cause fetch``: every name is checked before anything is downloaded."""
    if from_file is not None and len(names) != 1:
        raise CauseError("--from-file converts one checkpoint, so name exactly one backbone with it.")
    specs = [resolve_spec(name, cache_dir) for name in names]
    return [
        (spec, fetch(spec, revision, cache_dir=cache_dir, from_file=from_file, force=force, reporter=reporter))
        for spec in specs
    ]


def list_backbones(cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """One row per registry entry, then per other backbone found in the cache."""
    specs = list(REGISTRY.values())
    root = named_folder(cache_dir, "")
    known = {folder_name(spec.weights_name) for spec in specs}
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            meta = read_json(folder / METADATA_FILE)
            if folder.name not in known and meta is not None and "name" in meta:
                specs.append(spec_from_record(meta))
    return [
        {
            "name": spec.name,
            "family": spec.family,
            "reference_heads": spec.reference_heads,
            "patch": spec.patch_size,
            "width": spec.dim,
            "parameters": spec.parameters,
            "resolution": spec.resolution,
            "licence": spec.licence,
            "cached": is_cached(spec, cache_dir),
        }
        for spec in specs
    ]


# ----------------------------------------------------------------------------- loading
