"""Building a backbone's timm model from its registry entry, and saving its weights."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CauseError
from ..paths import write_atomically
from .registry import BackboneSpec


def build_model(spec: BackboneSpec, state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A timm ViT with this entry's architecture: random weights, or ``state_dict`` loaded the
    way timm loads pretrained weights (its checkpoint filter, classifier dropped, every tensor
    checked)."""
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
    kwargs = _timm_kwargs(spec)
    if state_dict is None:
        return timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    try:
        return timm.create_model(
            spec.timm_name, pretrained=True, pretrained_cfg_overlay={"state_dict": dict(state_dict)}, **kwargs
        )
    except (RuntimeError, KeyError, ValueError) as error:
        raise CauseError(
            f"The weights for '{spec.name}' do not fit its architecture {spec.timm_name}: {_first_problem(error)}."
        ) from error


def _timm_kwargs(spec: BackboneSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(spec.model_args)
    kwargs.update(num_classes=0, dynamic_img_size=True, embed_dim=spec.dim)
    for key in ("depth", "num_heads", "img_size"):
        if getattr(spec, key) is not None:
            kwargs[key] = getattr(spec, key)
    return kwargs


def model_for_loading(spec: BackboneSpec) -> nn.Module:
    """The architecture with uninitialised memory, for weights that will all be loaded into it.

    Random initialisation of a ViT-B takes seconds and is thrown away at once, so timm's
    ``VisionTransformer`` (whose state is all parameters) is built on the meta device and
    given empty memory; anything else is built normally.
    """
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        model = build_model(spec)
    if isinstance(model, VisionTransformer) and not list(model.buffers()):
        return model.to_empty(device="cpu")
    return build_model(spec)


def _first_problem(error: BaseException) -> str:
    """The first informative line of a load_state_dict error (its first line names the class)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith("Error(s) in loading")]
    return (useful or lines or [type(error).__name__])[0].rstrip(".")[:200]


def save_state_dict(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    write_atomically(path, lambda target: save_file(state, str(target)))
