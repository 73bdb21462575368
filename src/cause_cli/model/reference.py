"""Reading the reference implementation's checkpoints into this toolkit's modules.

The reference saves ``torch.save(state_dict)`` files whose per-token maps are 1x1
convolutions (weights ``[out, in, 1, 1]``); here they are linear layers (``[out, in]``).
Files are read with ``torch.load(weights_only=True)``: tensors only, nothing executed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..devices import load_tensors_only
from ..errors import CauseError

# Inside one head: the reference's names -> this toolkit's, per head kind.
_HEAD_NAMES = {
    "mlp": {
        "f1.": "projection.linear_branch.",
        "f2.0.": "projection.mlp_branch.0.",
        "f2.2.": "projection.mlp_branch.2.",
    },
    "tr": {
        "query_pos": "query_pos",
        "tr.self_attn.": "self_attn.",
        "tr.multihead_attn.": "cross_attn.",
        "tr.linear1.": "linear1.",
        "tr.linear2.": "linear2.",
        "tr.norm1.": "norm1.",
        "tr.norm2.": "norm2.",
        "tr.norm3.": "norm3.",
        "tr.f1.": "projection.linear_branch.",
        "tr.f2.0.": "projection.mlp_branch.0.",
        "tr.f2.2.": "projection.mlp_branch.2.",
    },
}
# The reference's module prefixes -> this toolkit's (SegmentationHeads).
_MODULES = {
    "head.": "student.",
    "head_ema.": "teacher.",
    "projection_head.f.": "student_projection.linear.",
    "projection_head_ema.f.": "teacher_projection.linear.",
    "linear.f.": "linear_probe.linear.",
}


def load_reference_file(path: Path | str) -> dict[str, torch.Tensor]:
    try:
        state = load_tensors_only(Path(path))
    except FileNotFoundError as error:
        raise CauseError(f"{path} does not exist.") from error
    except Exception as error:  # torch raises several types for files it cannot unpickle safely
        raise CauseError(
            f"{path} is not a reference checkpoint torch can read safely ({type(error).__name__})."
        ) from error
    if not isinstance(state, dict):
        raise CauseError(f"{path} does not hold a state dict.")
    return state


def _rename(key: str, kind: str) -> str | None:
    for old_module, new_module in _MODULES.items():
        if not key.startswith(old_module):
            continue
        rest = key[len(old_module) :]
        if old_module in ("head.", "head_ema."):
            for old, new in _HEAD_NAMES[kind].items():
                if rest.startswith(old):
                    return new_module + new + rest[len(old) :]
            return None
        return new_module + rest
    return None


def convert_heads(reference: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """A reference ``segment_mlp.pth`` / ``segment_tr.pth`` state dict as a
    :class:`SegmentationHeads` state dict (``kind`` is ``"mlp"`` or ``"tr"``)."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in reference.items():
        new_key = _rename(key, kind)
        if new_key is None:
            continue
        tensor = value.float()
        if tensor.dim() == 4:  # a 1x1 convolution weight
            tensor = tensor[:, :, 0, 0]
        converted[new_key] = tensor.contiguous()
    return converted
