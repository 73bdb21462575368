"""Loading a cached backbone as a :class:`FrozenBackbone` that turns images into patch tokens.

Every backbone, the tiny ``toy`` one included, goes through the same path: a weights file
in the toolkit's cache (safetensors, in timm's layout), a timm model built from its registry
entry, and :class:`FrozenBackbone`, which returns the patch tokens of the last block after
the final norm with the prefix tokens (class, registers) dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..devices import autocast
from ..errors import CauseError
from ..paths import file_sha256, write_json
from ..progress import Reporter
from .building import model_for_loading
from .cache import metadata_path, read_metadata, weights_path
from .fetching import fetch
from .pos_embed import POS_EMBED_CHOICES, install_pos_embed_rule
from .registry import BackboneSpec, resolve_spec, weights_spec


class FrozenBackbone(nn.Module):
    """A frozen ViT in eval mode that maps normalised images ``[B, 3, H, W]`` to patch tokens
    ``[B, (H / p) * (W / p), D]``: the last block's output after the final norm, prefix
    tokens dropped, float32. On CUDA it runs under autocast.

    ``pos_embed`` chooses how position embeddings are resized to the input's grid:
    ``reference`` (the reference code's rule for the family, default) or ``timm``; the rule in
    force is :attr:`pos_embed_rule`.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        model: nn.Module,
        pos_embed: str = "reference",
        sha256: str | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.pos_embed_rule = install_pos_embed_rule(self.model, spec.pos_embed, pos_embed)
        self.sha256 = sha256
        self.provenance = dict(provenance or {})
        self.use_autocast = True

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def num_heads(self) -> int | None:
        blocks = getattr(self.model, "blocks", None)
        attention = getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None
        heads = getattr(attention, "num_heads", None)
        return int(heads) if heads is not None else None

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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
        device = images.device
        with autocast(device) if self.use_autocast else contextlib.nullcontext():
            tokens = self.model.forward_features(images)  # type: ignore[operator]
            tokens = self._final_norm(tokens)
        return tokens[:, self.num_prefix_tokens :].float()

    def _final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        # timm moves the final norm after pooling (fc_norm) for average-pooled models; apply it
        # per token there, so every backbone's features come after its final LayerNorm.
        fc_norm = getattr(self.model, "fc_norm", None)
        if isinstance(getattr(self.model, "norm", None), nn.Identity) and isinstance(fc_norm, nn.LayerNorm):
            return fc_norm(tokens)
        return tokens

    @torch.no_grad()
    def extract(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Tokens of many images, ``batch_size`` at a time on the backbone's device:
        ``[N, P, D]`` on the images' device."""
        if batch_size < 1:
            raise CauseError("The batch size must be at least 1.")
        device = self.device
        chunks = [
            self(images[start : start + batch_size].to(device)).to(images.device)
            for start in range(0, images.shape[0], batch_size)
        ]
        if not chunks:
            grid = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
            return images.new_zeros(0, grid, self.dim)
        return torch.cat(chunks)

    def describe(self) -> dict[str, Any]:
        """What a run records about its backbone."""
        return {
            "name": self.spec.name,
            "family": self.spec.family,
            "timm_name": self.spec.timm_name,
            "sha256": self.sha256,
            "dim": self.dim,
            "patch_size": self.patch_size,
            "num_heads": self.num_heads,
            "reference_heads": self.spec.reference_heads,
            "pos_embed": self.pos_embed_rule,
            "prefix_tokens_dropped": self.num_prefix_tokens,
            **{
                key: self.provenance[key]
                for key in ("hub_repo", "revision", "commit", "converted_from")
                if self.provenance.get(key)
            },
        }


def load_backbone(
    name: str | BackboneSpec,
    device: torch.device | str = "cpu",
    fetch_if_missing: bool = True,
    *,
    pos_embed: str = "reference",
    cache_dir: Path | None = None,
    reporter: Reporter | None = None,
) -> FrozenBackbone:
    """The named backbone from the cache (fetched first when missing and allowed).

    The cached file is checked against the SHA-256 recorded when it was fetched, so a damaged
    or replaced file is refused rather than silently giving other features.
    """
    if pos_embed not in POS_EMBED_CHOICES:
        raise CauseError(
            f"Unknown position-embedding rule '{pos_embed}'; choose one of {', '.join(POS_EMBED_CHOICES)}."
        )
    spec = name if isinstance(name, BackboneSpec) else resolve_spec(name, cache_dir)
    target = weights_spec(spec)
    path = weights_path(target, cache_dir)
    if not path.is_file():
        if not fetch_if_missing:
            raise CauseError(
                f"Backbone '{spec.name}' is not in the cache {path.parent}; run 'cause fetch {spec.name}'."
            )
        fetch(spec, cache_dir=cache_dir, reporter=reporter)
    meta = read_metadata(target, cache_dir) or {}
    digest = file_sha256(path)
    damaged = f"The cached weights {path} are damaged; run 'cause fetch {spec.name} --force' to fetch them again."
    if meta.get("sha256") not in (None, digest):
        raise CauseError(damaged)
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CauseError(damaged) from error
    model = model_for_loading(spec)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CauseError(
            f"The cached weights {path} do not fit backbone '{spec.name}'; run 'cause fetch {spec.name} --force'."
        )
    if "sha256" not in meta:  # weights cached by an older version: record them now
        write_json(metadata_path(target, cache_dir), {**asdict(target), **meta, "sha256": digest})
    return FrozenBackbone(spec, model, pos_embed=pos_embed, sha256=digest, provenance=meta).to(device)


def refuse_other_backbone(run_path: Path, recorded: Mapping[str, Any], backbone: FrozenBackbone | str) -> None:
    """Refuse to use a run with a backbone other than the one it was made with, in one
    sentence: another name, other weights or another position rule (given a name alone, only
    the name is checked, which needs nothing loaded)."""
    info = recorded.get("backbone") or {}
    name = info.get("name") or (recorded.get("config") or {}).get("backbone")
    wanted = backbone if isinstance(backbone, str) else backbone.spec.name
    if name is not None and name != wanted:
        raise CauseError(f"Run {run_path} was made with backbone '{name}', not '{wanted}'.")
    if isinstance(backbone, str):
        return
    if info.get("sha256") not in (None, backbone.sha256):
        raise CauseError(f"Run {run_path} was trained with other weights for backbone '{backbone.spec.name}'.")
    if info.get("pos_embed") not in (None, backbone.pos_embed_rule):
        raise CauseError(
            f"Run {run_path} resized position embeddings by the {info['pos_embed']} rule, "
            f"not the {backbone.pos_embed_rule} rule asked for now."
        )
