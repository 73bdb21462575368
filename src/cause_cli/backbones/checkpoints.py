"""Reading backbone checkpoints that did not come from the Hub: the authors' own releases.

iBOT and MSN publish their ViTs as PyTorch pickles in their own layouts, not on the Hub in
timm's form. This module reads such a file safely (``torch.load(weights_only=True)``: tensors
and plain containers only, never arbitrary objects) and maps it to timm's key names:

- iBOT ``checkpoint_teacher.pth``: ``{"state_dict": {...}}`` with timm's key names, plus the
  iBOT head and ``masked_embed``; the full ``checkpoint.pth``: ``{"teacher": {"backbone.*",
  "head.*"}, "student": ..., "args": Namespace}``.
- MSN ``vits16_800ep.pth.tar``: ``{"target_encoder": {"module.*"}, "encoder": ...,
  "prototypes": ..., "opt": ...}`` whose ViT carries a projection head ``fc.*``.
- DINO, DINOv2 and MAE releases, and timm-form files (safetensors or pickles), also work:
  their keys already are timm's once wrappers and prefixes are removed.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..devices import load_tensors_only
from ..errors import CauseError

# Where each family's state dict sits in the authors' files, most specific first.
_STATE_KEYS = {
    "ibot": ("state_dict", "teacher", "model"),
    "msn": ("target_encoder", "encoder", "state_dict", "model"),
}
_DEFAULT_STATE_KEYS = ("state_dict", "model", "teacher", "target_encoder")
# Wrappers the training code put around the ViT's own names (DistributedDataParallel, the
# student/teacher wrapper, MAE's encoder).
_PREFIXES = ("module.", "backbone.", "encoder.")
# Parts of the checkpoints that are not the ViT: projection and prediction heads, mask tokens,
# MSN's prototypes, MAE's decoder.
_NOT_BACKBONE = ("head.", "fc.", "pred", "prototypes", "masked_embed", "mask_token", "last_layer", "decoder")


def read_checkpoint(path: Path) -> Any:
    """The contents of a safetensors file or a PyTorch pickle read with ``weights_only=True``."""
    if not path.is_file():
        raise CauseError(f"Checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors has its own error types
            raise CauseError(f"{path} is not a readable safetensors file.") from error
    try:
        # argparse.Namespace is allowed because iBOT's full checkpoints store their arguments in one.
        return load_tensors_only(path, allowed=(argparse.Namespace,))
    except Exception as error:  # pickle, zip and torch errors alike
        if "Weights only load failed" in str(error):
            raise CauseError(
                f"{path} holds Python objects besides tensors, which the toolkit does not unpickle because "
                "that can run code; save the weights alone (a state_dict, or a safetensors file) and give that."
            ) from error
        raise CauseError(f"{path} is not a checkpoint file torch can read ({type(error).__name__}).") from error


def backbone_state_dict(contents: Any, family: str, path: Path) -> dict[str, torch.Tensor]:
    """The ViT's tensors from a checkpoint's ``contents``, under timm's key names."""
    state = _find_state_dict(contents, _STATE_KEYS.get(family, _DEFAULT_STATE_KEYS))
    if state is None:
        raise CauseError(f"{path} holds no state dict of a ViT (looked for {', '.join(_STATE_KEYS.get(family, ()))}).")
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = _strip_prefixes(key)
        if name.startswith(_NOT_BACKBONE):
            continue
        cleaned[name] = value
    if "pos_embed" not in cleaned or "patch_embed.proj.weight" not in cleaned:
        raise CauseError(f"{path} does not look like a ViT checkpoint (no pos_embed or patch_embed.proj.weight).")
    return cleaned


def _find_state_dict(contents: Any, keys: tuple[str, ...]) -> Mapping[str, Any] | None:
    """The known nested places first (MSN keeps a stray tensor, its prototypes, at the top
    level), then the mapping itself when it holds tensors."""
    if not isinstance(contents, Mapping):
        return None
    for key in keys:
        found = _find_state_dict(contents.get(key), keys)
        if found is not None:
            return found
    if any(isinstance(value, torch.Tensor) for value in contents.values()):
        return contents
    return None


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key
