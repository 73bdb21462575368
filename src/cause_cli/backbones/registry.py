"""The registry of backbones: what the toolkit knows about each one, and how a name becomes an entry.

Besides the registry's short names, :func:`resolve_spec` accepts any timm model name with
weights on the Hub (``vit_small_patch16_224.augreg_in21k``) and ``hf-hub:ORG/NAME`` ids of
timm-form repositories.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CauseError
from .cache import METADATA_FILE, folder_name, named_folder, read_json

PAPER_RESOLUTION = 320
HF_HUB_PREFIX = "hf-hub:"
REFERENCE_HEADS_SUFFIX = "-12heads"


def paper_resolution(patch_size: int) -> int:
    """The paper's input size: 320, or the nearest multiple of the patch (322 for patch 14)."""
    return max(1, round(PAPER_RESOLUTION / patch_size)) * patch_size


@dataclass(frozen=True)
class BackboneSpec:
    """What the toolkit knows about one backbone."""

    name: str
    family: str
    timm_name: str  # timm architecture (with its pretrained tag when the weights come from timm)
    patch_size: int
    dim: int
    resolution: int
    licence: str
    hub_repo: str | None = None  # None: made locally (toy) or converted from the authors' file
    num_heads: int | None = None  # None: timm's own number for the architecture
    depth: int | None = None  # None: timm's
    img_size: int | None = None  # pretrained input size (position-embedding grid); None: timm's
    prefix_tokens: int = 1  # tokens before the patches that are dropped: class (+ registers)
    parameters: int | None = None
    pos_embed: str = "dino"  # the reference code's position rule (backbones/pos_embed.py); rope: none needed
    source: str = "hub"  # hub, local (the toy, made here) or file (converted from a checkpoint)
    weights: str | None = None  # the entry whose cached weights this one shares; None: its own
    reference_heads: bool = False  # the reference's 12-head ViT-S (METHOD.md section 0)
    published_at: str | None = None  # where the authors publish the checkpoint (source file)
    model_args: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def local(self) -> bool:
        return self.source == "local"

    @property
    def weights_name(self) -> str:
        return self.weights or self.name


TOY = BackboneSpec(
    name="toy",
    family="toy",
    timm_name="vit_toy_patch8",
    patch_size=8,
    dim=96,
    resolution=128,
    licence="Apache-2.0",
    num_heads=4,
    depth=2,
    parameters=267_168,
    pos_embed="timm",
    source="local",
)
TOY_SEED = 20231011

APACHE = "Apache-2.0"
NON_COMMERCIAL = "CC-BY-NC-4.0"
DINOV3_LICENCE = "DINOv3 gated"
IBOT_PUBLISHED = (
    "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vitb_16/checkpoint_teacher.pth "
    "(listed at https://github.com/bytedance/ibot)"
)
MSN_PUBLISHED = (
    "https://dl.fbaipublicfiles.com/msn/vits16_800ep.pth.tar (listed at https://github.com/facebookresearch/msn)"
)


def _hub(
    name: str,
    family: str,
    timm_name: str,
    patch: int,
    dim: int,
    licence: str,
    parameters: int,
    prefix_tokens: int = 1,
    pos_embed: str = "dino",
) -> BackboneSpec:
    return BackboneSpec(
        name,
        family,
        timm_name,
        patch,
        dim,
        paper_resolution(patch),
        licence,
        hub_repo=f"timm/{timm_name}",
        prefix_tokens=prefix_tokens,
        parameters=parameters,
        pos_embed=pos_embed,
    )


def _file(
    name: str,
    family: str,
    timm_name: str,
    patch: int,
    dim: int,
    licence: str,
    parameters: int,
    published_at: str,
    pos_embed: str = "dino",
) -> BackboneSpec:
    """An entry converted from the authors' own checkpoint (``cause fetch NAME --from-file``)."""
    return BackboneSpec(
        name,
        family,
        timm_name,
        patch,
        dim,
        paper_resolution(patch),
        licence,
        parameters=parameters,
        pos_embed=pos_embed,
        source="file",
        published_at=published_at,
    )


def reference_heads_variant(spec: BackboneSpec) -> BackboneSpec:
    """The reference's ViT-S with 12 attention heads on the same weights (METHOD.md section 0)."""
    return dataclasses.replace(
        spec, name=spec.name + REFERENCE_HEADS_SUFFIX, num_heads=12, reference_heads=True, weights=spec.weights_name
    )


_ENTRIES = [
    TOY,
    _hub("dino-vits8", "dino", "vit_small_patch8_224.dino", 8, 384, APACHE, 21_670_272),
    _hub("dino-vits16", "dino", "vit_small_patch16_224.dino", 16, 384, APACHE, 21_665_664),
    _hub("dino-vitb8", "dino", "vit_base_patch8_224.dino", 8, 768, APACHE, 85_807_872),
    _hub("dino-vitb16", "dino", "vit_base_patch16_224.dino", 16, 768, APACHE, 85_798_656),
    _hub("dinov2-vits14", "dinov2", "vit_small_patch14_dinov2.lvd142m", 14, 384, APACHE, 22_056_192),
    _hub("dinov2-vitb14", "dinov2", "vit_base_patch14_dinov2.lvd142m", 14, 768, APACHE, 86_579_712),
    _hub("dinov2-vits14-reg", "dinov2", "vit_small_patch14_reg4_dinov2.lvd142m", 14, 384, APACHE, 22_057_344, 5),
    _hub("dinov2-vitb14-reg", "dinov2", "vit_base_patch14_reg4_dinov2.lvd142m", 14, 768, APACHE, 86_582_016, 5),
    _hub("mae-vitb16", "mae", "vit_base_patch16_224.mae", 16, 768, NON_COMMERCIAL, 85_798_656),
    _file("ibot-vitb16", "ibot", "vit_base_patch16_224", 16, 768, APACHE, 85_798_656, IBOT_PUBLISHED),
    _file("msn-vits16", "msn", "vit_small_patch16_224", 16, 384, NON_COMMERCIAL, 21_665_664, MSN_PUBLISHED, "msn"),
    _hub(
        "dinov3-vits16", "dinov3", "vit_small_patch16_dinov3.lvd1689m", 16, 384, DINOV3_LICENCE, 21_586_944, 5, "rope"
    ),
    _hub("dinov3-vitb16", "dinov3", "vit_base_patch16_dinov3.lvd1689m", 16, 768, DINOV3_LICENCE, 85_641_216, 5, "rope"),
    _hub(
        "dinov3-vitl16", "dinov3", "vit_large_patch16_dinov3.lvd1689m", 16, 1024, DINOV3_LICENCE, 303_079_424, 5, "rope"
    ),
]

REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in _ENTRIES}
for _base in ("dino-vits8", "dino-vits16"):
    _variant = reference_heads_variant(REGISTRY[_base])
    REGISTRY[_variant.name] = _variant


# ----------------------------------------------------------------------------- names


def resolve_spec(name: str, cache_dir: Path | None = None) -> BackboneSpec:
    """The registry entry for ``name``, or one made for a timm model name or an ``hf-hub:``
    id; an unknown name gets a suggestion."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(HF_HUB_PREFIX) or "_" in name:  # timm's names use underscores, the registry's hyphens
        cached = read_json(named_folder(cache_dir, folder_name(name)) / METADATA_FILE)
        if cached is not None and cached.get("name") == name:
            return spec_from_record(cached)  # known from its fetch: no network, no model to build
    if name.startswith(HF_HUB_PREFIX):
        return _hf_hub_spec(name)
    if "_" in name:
        spec = _timm_spec(name)
        if spec is not None:
            return spec
    close = difflib.get_close_matches(name, list(REGISTRY), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else f" Known backbones: {', '.join(REGISTRY)}."
    raise CauseError(f"Unknown backbone '{name}'.{hint}")


def _timm_spec(name: str) -> BackboneSpec | None:
    """An entry for a timm model name with weights on the Hub; None when timm does not know it."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    architecture, _ = split_model_name_tag(name)
    if not timm.is_model(architecture):
        return None
    try:
        config = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:
        config = None
    hub_id = getattr(config, "hf_hub_id", None) if config is not None else None
    if not hub_id or config is None:
        raise CauseError(
            f"timm has no weights on the Hub for '{name}'; choose a tagged name from "
            f"timm.list_models('{architecture}*', pretrained=True)."
        )
    full_name = f"{architecture}.{config.tag}" if getattr(config, "tag", None) else architecture
    licence = getattr(config, "license", None) or "see the model card"
    return _derived_spec(name, full_name, hub_id, licence, {})


def _hf_hub_spec(name: str) -> BackboneSpec:
    """An entry for a timm-form Hub repository, from its config.json."""
    from . import hub

    repo = name[len(HF_HUB_PREFIX) :]
    if not hub.is_repo_id(repo):
        raise CauseError(f"'{name}' is not an hf-hub id; write hf-hub:ORGANISATION/NAME.")

    config_file = hub.download(repo, ["config.json"], what=f"backbone '{name}'")
    try:
        config = json.loads(config_file.path.read_text())
        architecture = config["architecture"]
    except (ValueError, KeyError, TypeError) as error:
        raise CauseError(f"The config.json of {repo} is not a timm model configuration.") from error
    licence = (config.get("pretrained_cfg") or {}).get("license") or "see the model card"
    return _derived_spec(name, architecture, repo, licence, dict(config.get("model_args") or {}))


def _derived_spec(name: str, timm_name: str, hub_repo: str, licence: str, model_args: dict[str, Any]) -> BackboneSpec:
    """An entry whose architecture facts are read off the timm model (built without memory)."""
    import timm
    import torch

    model: Any
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, **model_args)
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(model, "num_prefix_tokens"):
        raise CauseError(f"'{name}' is not a vision transformer with patch tokens, so CAUSE cannot use it.")
    patch = int(patch_embed.patch_size[0])
    has_positions = getattr(model, "pos_embed", None) is not None
    return BackboneSpec(
        name=name,
        family="timm",
        timm_name=timm_name,
        patch_size=patch,
        dim=int(model.embed_dim),
        resolution=paper_resolution(patch),
        licence=licence,
        hub_repo=hub_repo,
        prefix_tokens=int(model.num_prefix_tokens),
        parameters=sum(parameter.numel() for parameter in model.parameters()),
        pos_embed="dino" if has_positions else "rope",
        model_args=model_args,
    )


def spec_from_record(record: Mapping[str, Any]) -> BackboneSpec:
    known = {f.name for f in dataclasses.fields(BackboneSpec)}
    return BackboneSpec(**{key: value for key, value in record.items() if key in known})


def weights_spec(spec: BackboneSpec) -> BackboneSpec:
    """The entry whose weights ``spec`` loads: itself, or the one a variant shares them with."""
    if spec.weights_name == spec.name:
        return spec
    if spec.weights_name in REGISTRY:
        return REGISTRY[spec.weights_name]
    return dataclasses.replace(spec, name=spec.weights_name, num_heads=None, reference_heads=False, weights=None)


# ----------------------------------------------------------------------------- the cache
