"""Reading the reference implementation's checkpoints into this toolkit's modules.

The reference saves ``torch.save(state_dict)`` files whose per-token maps are 1x1
convolutions (weights ``[out, in, 1, 1]``); here they are linear layers (``[out, in]``).
Files are read with ``torch.load(weights_only=True)``: tensors only, nothing executed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CauseError

# reference prefix -> this toolkit's prefix, for the MLP variant of the segmentation heads
MLP_HEAD_PREFIXES = {
    "head.f1.": "student.linear_branch.",
    "head.f2.0.": "student.mlp_branch.0.",
    "head.f2.2.": "student.mlp_branch.2.",
    "head_ema.f1.": "teacher.linear_branch.",
    "head_ema.f2.0.": "teacher.mlp_branch.0.",
    "head_ema.f2.2.": "teacher.mlp_branch.2.",
    "projection_head.f.": "student_projection.linear.",
    "projection_head_ema.f.": "teacher_projection.linear.",
    "linear.f.": "linear_probe.linear.",
}


def load_reference_file(path: Path | str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CauseError(f"{path} does not exist.") from error
    except Exception as error:  # torch raises several types for files it cannot unpickle safely
        raise CauseError(
            f"{path} is not a reference checkpoint torch can read safely ({type(error).__name__})."
        ) from error
    if not isinstance(state, dict):
        raise CauseError(f"{path} does not hold a state dict.")
    return state


def convert_mlp_heads(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reference ``segment_mlp.pth`` state dict as a :class:`SegmentationHeads` state dict."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in reference.items():
        for old, new in MLP_HEAD_PREFIXES.items():
            if key.startswith(old):
                tensor = value.float()
                if tensor.dim() == 4:  # a 1x1 convolution weight
                    tensor = tensor[:, :, 0, 0]
                converted[new + key[len(old) :]] = tensor.contiguous()
                break
    return converted
