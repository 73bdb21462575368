"""Concept-wise contrastive loss of the front-door step (METHOD.md section 2.4 to 2.6).

Anchors are the student's projected tokens of one image; candidates are the teacher's
projected tokens of the whole batch (of every process, when several train together) and,
separately, the concept bank. Whether a pair is
positive or negative is decided by the clusterbook: the cosine of the two tokens' code
vectors above ``positive_threshold`` makes a positive (a token is never its own positive),
below ``negative_threshold`` a negative, anything in between is ignored. For an anchor row
``i`` and positive ``j``::

    l_ij = -s_ij + log sum_{k in pos(i) or neg(i)} exp(s_ik),   s = cos(z_i, z'_k) / T

Each image contributes the mean of ``l`` over its positive pairs, once against the batch and
once against the bank; the loss is the mean of those terms. The reference loops over the
images; this module computes every row at once with row-wise reductions, so no ``[rows,
columns]`` loss matrix is kept beyond the similarities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ContrastiveSettings:
    temperature: float = 0.07
    positive_threshold: float = 0.3
    negative_threshold: float = 0.1


def _per_image_terms(
    similarity: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over positive pairs of ``l_ij`` for each image's block of rows, ``[batch]``, and
    whether that mean is defined (the image has at least one positive pair).

    ``similarity`` is ``s`` (already divided by the temperature), ``[B * P, N]``.
    """
    shifted = similarity - similarity.max(dim=1, keepdim=True).values.detach()
    considered = positive | negative
    denominator = (shifted.exp() * considered).sum(dim=1)  # [rows]
    positive_f = positive.to(shifted.dtype)
    positives_per_row = positive_f.sum(dim=1)
    # Rows with no positive contribute nothing. Their denominator may be empty, and log 0 in
    # the forward pass would send 0 * inf = NaN back through the log: take log 1 there instead.
    has_positive = positives_per_row > 0
    row_log_denominator = torch.log(torch.where(has_positive, denominator, torch.ones_like(denominator)))
    row_total = positives_per_row * row_log_denominator - (shifted * positive_f).sum(dim=1)
    image_total = row_total.view(batch, -1).sum(dim=1)
    image_count = positives_per_row.view(batch, -1).sum(dim=1)
    # Dividing by a clamped count keeps the backward pass free of 0/0 for undefined terms.
    return image_total / image_count.clamp_min(1), image_count > 0


def concept_contrastive_terms(
    student: torch.Tensor,
    code_vectors: torch.Tensor,
    teacher: torch.Tensor,
    teacher_code_vectors: torch.Tensor,
    first_image: int = 0,
    bank_features: torch.Tensor | None = None,
    bank_code_vectors: torch.Tensor | None = None,
    settings: ContrastiveSettings = ContrastiveSettings(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's term against the batch, then each image's term against the bank, ``[2B]``
    (``[B]`` without a bank), and whether each is defined (the image has a positive pair).

    ``student [B, P, E]`` and its tokens' normalised code vectors ``[B, P, D]`` are the
    anchors. ``teacher [G, P, E]`` with ``teacher_code_vectors [G, P, D]`` are the candidates:
    the same images (``G = B``) or a larger batch holding them from image ``first_image`` on,
    whose other images' tokens are candidates too.
    """
    batch, tokens, _ = student.shape
    anchors = F.normalize(student.float(), dim=-1).reshape(batch * tokens, -1)
    candidates = F.normalize(teacher.float(), dim=-1).reshape(-1, anchors.shape[1])
    anchor_codes = code_vectors.float().reshape(batch * tokens, -1)
    candidate_codes = teacher_code_vectors.float().reshape(candidates.shape[0], -1)

    code_similarity = anchor_codes @ candidate_codes.t()
    positive = code_similarity > settings.positive_threshold
    rows = torch.arange(batch * tokens, device=positive.device)
    positive[rows, rows + first_image * tokens] = False  # a token is not its own positive
    negative = code_similarity < settings.negative_threshold
    terms = [_per_image_terms(anchors @ candidates.t() / settings.temperature, positive, negative, batch)]

    if bank_features is not None and bank_features.shape[0] > 0:
        assert bank_code_vectors is not None
        bank_code_similarity = anchor_codes @ bank_code_vectors.float().t()
        terms.append(
            _per_image_terms(
                anchors @ bank_features.float().t() / settings.temperature,
                bank_code_similarity > settings.positive_threshold,
                bank_code_similarity < settings.negative_threshold,
                batch,
            )
        )
    return torch.cat([value for value, _ in terms]), torch.cat([mask for _, mask in terms])


def concept_contrastive_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    code_vectors: torch.Tensor,
    bank_features: torch.Tensor | None = None,
    bank_code_vectors: torch.Tensor | None = None,
    settings: ContrastiveSettings = ContrastiveSettings(),
) -> torch.Tensor:
    """The front-door loss for one batch.

    ``student``, ``teacher``: projections ``[B, P, E]``; ``code_vectors``: normalised
    clusterbook vectors of the same tokens ``[B, P, D]``. ``bank_features [N, E]``
    (normalised) and ``bank_code_vectors [N, D]`` (normalised) are the concept bank.
    Terms of images without any positive pair (where the reference's mean would be NaN) are
    left out of the mean.
    """
    values, defined = concept_contrastive_terms(
        student, code_vectors, teacher, code_vectors, 0, bank_features, bank_code_vectors, settings
    )
    if not bool(defined.any()):
        return student.sum() * 0.0
    return values[defined].mean()
