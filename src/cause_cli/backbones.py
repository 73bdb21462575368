"""Frozen self-supervised ViT backbones: the registry, the cache, loading and token extraction.

Every backbone, the tiny ``toy`` one included, goes through the same path: a weights file
in the toolkit's cache (safetensors), a timm model built from its registry entry, and
:class:`FrozenBackbone`, which returns the patch tokens of the last block after the final
norm with the prefix tokens (class, registers) dropped.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CauseError
from .paths import cache_home, write_atomically, write_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """What the toolkit knows about one backbone."""

    name: str
    family: str
    timm_name: str
    patch_size: int
    dim: int
    resolution: int
    licence: str
    hub_repo: str | None = None  # None: built locally (toy)
    num_heads: int | None = None  # None: timm's own default for the architecture
    depth: int | None = None

    @property
    def local(self) -> bool:
        return self.hub_repo is None


TOY = BackboneSpec(
    name="toy",
    family="toy",
    timm_name="vit_toy_patch8",
    patch_size=8,
    dim=96,
    resolution=128,
    licence="Apache-2.0 (random weights made by this toolkit)",
    num_heads=4,
    depth=2,
)
TOY_SEED = 20231011

_PAPER = [
    ("dino-vits8", "dino", "vit_small_patch8_224.dino", 8, 384, 320, "Apache-2.0"),
    ("dino-vits16", "dino", "vit_small_patch16_224.dino", 16, 384, 320, "Apache-2.0"),
    ("dino-vitb8", "dino", "vit_base_patch8_224.dino", 8, 768, 320, "Apache-2.0"),
    ("dino-vitb16", "dino", "vit_base_patch16_224.dino", 16, 768, 320, "Apache-2.0"),
    ("dinov2-vits14", "dinov2", "vit_small_patch14_dinov2.lvd142m", 14, 384, 322, "Apache-2.0"),
    ("dinov2-vitb14", "dinov2", "vit_base_patch14_dinov2.lvd142m", 14, 768, 322, "Apache-2.0"),
    ("dinov2-vits14-reg", "dinov2", "vit_small_patch14_reg4_dinov2.lvd142m", 14, 384, 322, "Apache-2.0"),
    ("dinov2-vitb14-reg", "dinov2", "vit_base_patch14_reg4_dinov2.lvd142m", 14, 768, 322, "Apache-2.0"),
    ("mae-vitb16", "mae", "vit_base_patch16_224.mae", 16, 768, 320, "CC-BY-NC-4.0"),
]

REGISTRY: dict[str, BackboneSpec] = {TOY.name: TOY}
for _name, _family, _timm, _patch, _dim, _res, _licence in _PAPER:
    REGISTRY[_name] = BackboneSpec(_name, _family, _timm, _patch, _dim, _res, _licence, hub_repo=f"timm/{_timm}")


def resolve_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``; an unknown name gets a suggestion."""
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, list(REGISTRY), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else f" Known backbones: {', '.join(REGISTRY)}."
    raise CauseError(f"Unknown backbone '{name}'.{hint}")


def backbone_folder(spec: BackboneSpec) -> Path:
    return cache_home() / "backbones" / spec.name


def weights_path(spec: BackboneSpec) -> Path:
    return backbone_folder(spec) / "model.safetensors"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_model(spec: BackboneSpec) -> nn.Module:
    """A timm ViT with this entry's architecture and uninitialised (random) weights."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if spec.local:
        return VisionTransformer(
            img_size=spec.resolution,
            patch_size=spec.patch_size,
            embed_dim=spec.dim,
            depth=spec.depth or 2,
            num_heads=spec.num_heads or 4,
            num_classes=0,
            dynamic_img_size=True,
        )
    extra: dict[str, Any] = {"num_heads": spec.num_heads} if spec.num_heads else {}
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, **extra)


def _save_state_dict(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    write_atomically(path, lambda target: save_file(state, str(target)))


def fetch(spec: BackboneSpec, revision: str | None = None) -> Path:
    """Make sure the backbone's weights are in the cache; return the safetensors path."""
    path = weights_path(spec)
    if path.exists():
        return path
    if spec.local:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TOY_SEED)
            model = build_model(spec)
        _save_state_dict(model, path)
    else:
        _download_from_hub(spec, path, revision)
    write_json(path.with_name("backbone.json"), {**asdict(spec), "sha256": file_sha256(path)})
    return path


def _download_from_hub(spec: BackboneSpec, path: Path, revision: str | None) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    assert spec.hub_repo is not None
    try:
        downloaded = hf_hub_download(spec.hub_repo, "model.safetensors", revision=revision)
    except GatedRepoError as error:
        raise CauseError(
            f"The Hub repository {spec.hub_repo} is gated: accept its licence on its Hub page, then log in with "
            "'hf auth login' or set HF_TOKEN."
        ) from error
    except RepositoryNotFoundError as error:
        raise CauseError(
            f"The Hub has no repository {spec.hub_repo} (or it is private and you are not logged in)."
        ) from error
    except EntryNotFoundError as error:
        raise CauseError(f"The Hub repository {spec.hub_repo} has no model.safetensors.") from error
    except LocalEntryNotFoundError as error:
        raise CauseError(
            f"Backbone '{spec.name}' is not cached and the Hub cannot be reached (offline); "
            "fetch it where there is a network."
        ) from error
    model = build_model(spec)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(downloaded), strict=False)
    _save_state_dict(model, path)


def recorded_hash(spec: BackboneSpec) -> str | None:
    meta = weights_path(spec).with_name("backbone.json")
    if not meta.exists():
        return None
    return json.loads(meta.read_text()).get("sha256")


class FrozenBackbone(nn.Module):
    """A frozen ViT in eval mode that maps normalised images ``[B, 3, H, W]`` to patch tokens
    ``[B, (H / p) * (W / p), D]``: the last block's output after the final norm, prefix
    tokens dropped."""

    def __init__(self, spec: BackboneSpec, model: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    @property
    def dim(self) -> int:
        return self.spec.dim

    def train(self, mode: bool = True) -> FrozenBackbone:
        # Frozen means frozen: dropout and the like stay off whatever the caller asks.
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise CauseError(
                f"Image size {height}x{width} is not a multiple of the backbone's patch size {self.patch_size}."
            )
        tokens = self.model.forward_features(images)  # type: ignore[operator]
        prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        return tokens[:, prefix:].float()


def load_backbone(name: str, device: torch.device | str = "cpu", fetch_if_missing: bool = True) -> FrozenBackbone:
    """The named backbone from the cache (fetched first when missing and allowed)."""
    spec = resolve_spec(name)
    path = weights_path(spec)
    if not path.exists():
        if not fetch_if_missing:
            raise CauseError(f"Backbone '{name}' is not in the cache {path.parent}; run 'cause fetch {name}'.")
        fetch(spec)
    from safetensors.torch import load_file

    model = build_model(spec)
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CauseError(f"The cached weights {path} are damaged; delete the file and fetch '{name}' again.") from error
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CauseError(f"The cached weights {path} do not fit backbone '{name}'; delete the file and fetch it again.")
    return FrozenBackbone(spec, model).to(device)
