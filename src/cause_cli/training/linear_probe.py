"""The linear probe: the one part of a run that labels train, always on features that
carry no gradient back to the unsupervised parts (unless the reference recipe asks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..devices import autocast
from ..model.heads import SegmentationHeads
from .context import TrainingContext


def linear_probe_loss(
    context: TrainingContext,
    probe: torch.nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    detach: bool = True,
) -> torch.Tensor | None:
    """Cross-entropy of the linear probe over the labelled pixels of the global batch, labels
    at their own size; on detached features unless the reference recipe asks otherwise. None
    when no pixel of the global batch is labelled."""
    valid = (labels >= 0) & (labels < context.num_classes)
    labelled = context.group.all_sum(valid.sum().to(torch.float32))
    if not bool(labelled > 0):
        return None
    logits = probe(features.detach() if detach else features)
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    summed = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], labels[valid], reduction="sum")
    return summed * context.group.world_size / labelled


def step_linear_probe(
    context: TrainingContext,
    heads: SegmentationHeads,
    linear_probe: torch.nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    optimiser: torch.optim.Optimizer,
) -> None:
    # The probe reads the teacher's features as inference sees them (no dropout, the TR head's
    # inner dropouts included), which also keeps the random number stream, and so the
    # unsupervised steps, independent of labels.
    was_training = heads.teacher.training
    heads.teacher.eval()
    with torch.no_grad(), autocast(context.device):
        features = heads.teacher(tokens).float()
    heads.teacher.train(was_training)
    loss = linear_probe_loss(context, linear_probe, features, labels)
    if loss is None:
        return
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
