"""Resizing a ViT's learned position embeddings to the token grid of the input.

A backbone pretrained at 224 x 224 (a 28 x 28 grid for patch 8) runs at 320 x 320 here (40 x 40),
so its position embeddings have to be resampled. How matters: heads trained by the reference
code have only ever seen features computed with the reference rule. The rules:

``dino``
    The reference's DINO, DINOv2, MAE and iBOT code: bicubic ``F.interpolate`` given the
    *scale factor* ``(g + 0.1) / n`` for a stored grid of side ``n`` and a target side ``g``,
    without antialiasing. Because PyTorch maps output to input coordinates with the given
    scale, this samples at slightly different places than resizing to ``g`` does. When the
    target grid equals the stored one the embeddings are used as they are.
``msn``
    The reference's MSN code: scale factor ``sqrt(P / N)``, which for square grids is bicubic
    resizing straight to the target size, without antialiasing.
``timm``
    timm's ``resample_abs_pos_embed`` (bicubic, antialiased), what a timm ViT made with
    ``dynamic_img_size=True`` does by itself.

Backbones with rotary positions (DINOv3) have nothing to resize.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import POSITION_EMBEDDING_RULES
from ..errors import CauseError

# What the user chooses: the reference code's rule for the backbone's family, or timm's.
POS_EMBED_CHOICES = POSITION_EMBEDDING_RULES
# Offset the reference DINO code adds to the target side before computing the scale factor.
DINO_OFFSET = 0.1


def resize_grid(grid: torch.Tensor, size: tuple[int, int], rule: str) -> torch.Tensor:
    """Resample position embeddings laid out as a grid ``[1, D, n, m]`` to ``[1, D, h, w]``.

    ``rule`` is ``dino`` or ``msn`` (see the module docstring). Computed in float32 and
    returned in the input's dtype.
    """
    height, width = size
    stored = tuple(grid.shape[-2:])
    if stored == (height, width):
        return grid
    source = grid.float()
    if rule == "dino":
        scale = ((height + DINO_OFFSET) / stored[0], (width + DINO_OFFSET) / stored[1])
        resized = F.interpolate(source, scale_factor=scale, mode="bicubic", align_corners=False)
    elif rule == "msn":
        resized = F.interpolate(source, size=(height, width), mode="bicubic", align_corners=False)
    else:
        raise ValueError(f"unknown position-embedding rule {rule!r}")
    if tuple(resized.shape[-2:]) != (height, width):  # the +0.1 offset exists to prevent exactly this
        raise RuntimeError(f"resizing {stored} to {(height, width)} gave {tuple(resized.shape[-2:])}")
    return resized.to(grid.dtype)


def install_pos_embed_rule(model: nn.Module, reference_rule: str, choice: str) -> str:
    """Make ``model`` (a timm ViT) resize its position embeddings by ``choice``; return the rule
    now in force: ``dino``, ``msn``, ``timm``, ``rope`` (rotary, nothing to resize) or ``none``.

    ``choice`` is ``reference`` (the reference code's rule for this backbone, ``reference_rule``)
    or ``timm``. Only timm's ``VisionTransformer`` can take the reference rules; other
    architectures with learned positions keep timm's.
    """
    if choice not in POS_EMBED_CHOICES:
        raise CauseError(f"Unknown position-embedding rule '{choice}'; choose one of {', '.join(POS_EMBED_CHOICES)}.")
    if getattr(model, "pos_embed", None) is None:
        return "rope" if getattr(model, "rope", None) is not None else "none"
    from timm.models.vision_transformer import VisionTransformer

    if choice == "timm" or reference_rule not in ("dino", "msn") or not isinstance(model, VisionTransformer):
        return "timm"
    # A bound method (not a closure) so that copies of the model resize with their own weights.
    model.cause_pos_rule = reference_rule  # type: ignore[assignment]
    model._pos_embed = types.MethodType(_reference_pos_embed, model)  # type: ignore[method-assign]
    return reference_rule


def _reference_pos_embed(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Replaces timm ``VisionTransformer._pos_embed`` to resize by ``self.cause_pos_rule``.

    It takes the patch embeddings ``[B, H, W, D]`` (timm's layout with ``dynamic_img_size``)
    and returns the token sequence ``[B, prefix + H * W, D]`` with the class (and register)
    tokens in front and positions added, exactly as timm does apart from the resizing.
    """
    if x.ndim != 4:
        raise RuntimeError("the reference position rule needs a model made with dynamic_img_size=True")
    batch, height, width, dim = x.shape
    x = x.reshape(batch, height * width, dim)
    prefix_count = 0 if self.no_embed_class else int(self.num_prefix_tokens)
    prefix_pos, patch_pos = self.pos_embed[:, :prefix_count], self.pos_embed[:, prefix_count:]
    rows, columns = self.patch_embed.grid_size
    grid = patch_pos.reshape(1, rows, columns, dim).permute(0, 3, 1, 2)
    resized = resize_grid(grid, (height, width), self.cause_pos_rule)
    resized = resized.permute(0, 2, 3, 1).reshape(1, height * width, dim)
    prefix_tokens = [
        token.expand(batch, -1, -1) for token in (self.cls_token, getattr(self, "reg_token", None)) if token is not None
    ]
    if self.no_embed_class:
        x = torch.cat([*prefix_tokens, x + resized], dim=1)
    else:
        x = torch.cat([*prefix_tokens, x], dim=1) + torch.cat([prefix_pos, resized], dim=1)
    return self.pos_drop(x)  # type: ignore[no-any-return]
