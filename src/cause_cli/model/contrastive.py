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

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ContrastiveSettings:
    temperature: float = 0.07
    positive_threshold: float = 0.3
    negative_threshold: float = 0.1


def per_image_terms(
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


@dataclass(frozen=True)
class BankByCode:
    """The concept bank as the loss reads it: groups of entries of one code each, ``features
    [K, C, E]`` (L2-normalised; slots that hold nothing may hold anything), ``valid [K, C]``
    (which slots hold an entry) and the codes' normalised vectors ``code_vectors``: group
    ``k``'s is ``code_vectors[k]``, or ``code_vectors[group_codes[k]]``."""

    features: torch.Tensor
    valid: torch.Tensor
    code_vectors: torch.Tensor
    # The entries taken back through the student's projection, [K, C, r + 1] (StudentBranch).
    through_projection: torch.Tensor | None = None
    # Which row of code_vectors each group of entries has, [K]; None: group k has row k.
    group_codes: torch.Tensor | None = None

    def through(self, projected_entries: torch.Tensor | None) -> BankByCode:
        """This bank with its entries taken back through the student's projection, given
        flat ``[K * C, r + 1]`` as :class:`~.heads.StudentBranch` returns them (or not: None)."""
        if projected_entries is None:
            return self
        shape = (*self.features.shape[:2], projected_entries.shape[-1])
        return replace(self, through_projection=projected_entries.reshape(shape))

    @staticmethod
    def of_entries(
        features: torch.Tensor, code_vectors: torch.Tensor, entry_codes: torch.Tensor | None = None
    ) -> BankByCode:
        """A bank given entry by entry, ``features [N, E]``, each entry a group of one: its code
        is ``code_vectors[n]`` (``[N, D]``), or ``code_vectors[entry_codes[n]]``."""
        one_each = torch.ones(len(features), 1, dtype=torch.bool, device=features.device)
        return BankByCode(features[:, None], one_each, code_vectors, group_codes=entry_codes)


class _ConsideredLogSumExp(torch.autograd.Function):
    """``log sum_{g: code of g considered} sum_{c valid} exp(l_i . r_gc)`` for every row
    ``l_i`` of ``left [R, q]`` over the groups ``right [G, C, q]`` (``valid [G, C]`` boolean,
    ``considered [R, K]`` 0 or 1 per code, ``group_codes [G]`` the code of each group, or
    None when group ``g`` is code ``g``); 0 for a row that considers no entry.

    The only ``[entries, R]`` tensor kept for the backward pass is the exponentials: the
    gradients ``sum_gc p_igc r_gc`` and ``sum_i p_igc l_i`` reuse them, with no mask or
    similarity matrix beside. They are laid out entry by entry (``[G * C, R]``), so that
    summing the groups of a code and spreading a code's weight back to its groups move whole
    rows: along the anchors' axis those gathers and scatters took a sixth of a CPU update.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        left: torch.Tensor,
        right: torch.Tensor,
        valid: torch.Tensor,
        considered: torch.Tensor,
        group_codes: torch.Tensor | None,
    ) -> torch.Tensor:
        groups, capacity, width = right.shape
        flat = right.reshape(groups * capacity, width)
        similarity = flat @ left.t()  # [G * C, R]
        # Empty slots out before the shift: a large value there would underflow the others.
        similarity.view(groups, capacity, -1).masked_fill_(~valid[:, :, None], -math.inf)
        shift = similarity.amax(dim=0) if len(similarity) else similarity.new_zeros(len(left))
        shift = torch.where(torch.isfinite(shift), shift, 0.0)
        exponentials = similarity.sub_(shift).exp_().view(groups, capacity, -1)
        per_code = exponentials.sum(dim=1)  # [G, R]
        if group_codes is not None:
            per_code = per_code.new_zeros(considered.shape[1], per_code.shape[1]).index_add_(0, group_codes, per_code)
        considered = considered.t().contiguous()  # [K, R], as the entries' rows are laid out
        denominator = (per_code * considered).sum(dim=0)
        some = denominator > 0
        result = torch.where(some, denominator.clamp_min(torch.finfo(denominator.dtype).tiny).log() + shift, 0.0)
        ctx.save_for_backward(exponentials, left, flat, considered, denominator, group_codes)
        return result

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, upstream: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        exponentials, left, flat, considered, denominator, group_codes = ctx.saved_tensors
        scale = considered * (upstream / denominator.clamp_min(torch.finfo(denominator.dtype).tiny))[None, :]
        if group_codes is not None:
            scale = scale.index_select(0, group_codes)  # [G, R]
        probabilities = (exponentials * scale[:, None, :]).flatten(0, 1)  # [G * C, R]
        grad_left = probabilities.t() @ flat if ctx.needs_input_grad[0] else None
        grad_right = None
        if ctx.needs_input_grad[1]:
            grad_right = (probabilities @ left).view(*exponentials.shape[:2], -1)
        return grad_left, grad_right, None, None, None


def _projected_anchors(student: torch.Tensor, student_inputs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[h_i, 1] / (|h_i W^T + bias| T)`` for every anchor, ``[R, r + 1]``: its product with a
    candidate taken back through the projection (``[c W, c . bias]``) is ``a_i . c / T``."""
    norms = student.float().norm(dim=1).clamp_min(1e-12)  # as F.normalize divides
    inputs = student_inputs.float()
    return torch.cat([inputs, inputs.new_ones(len(inputs), 1)], dim=1) / (norms * temperature)[:, None]


def _bank_terms(
    anchors: torch.Tensor,
    anchor_codes: torch.Tensor,
    bank: BankByCode,
    settings: ContrastiveSettings,
    batch: int,
    projected_anchors: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`per_image_terms` against the bank, computed code by code.

    Whether an entry is a positive or a negative depends on its code only, so the masks are
    ``[rows, K]`` (the code table), never ``[rows, entries]``; the sum of the positives'
    similarities is each anchor against the sum of each positive code's entries. Given the
    anchors as :func:`_projected_anchors` makes them and ``bank.through_projection``, the
    similarities are ``[h_i, 1] . [b W, b . bias] / |h_i W^T + bias|``: the same numbers as
    ``a_i . b`` for ``r + 1`` multiply-adds instead of ``E``.
    """
    code_similarity = anchor_codes @ bank.code_vectors.float().t()  # [R, K]
    positive = code_similarity > settings.positive_threshold
    considered = positive | (code_similarity < settings.negative_threshold)
    through = projected_anchors is not None and bank.through_projection is not None
    stored = bank.through_projection if through and bank.through_projection is not None else bank.features
    features = stored.float()  # [G, C, r + 1 or E]
    valid = bank.valid.to(features.dtype)
    entries_per_code = valid.sum(dim=1)  # per group, [G]
    # Similarity is linear in the entry, so each anchor meets the sum of each code's entries.
    code_sums = torch.bmm(valid[:, None, :], features)[:, 0]  # [G, width]; einsum picks a slow order
    if bank.group_codes is not None:
        codes_total = len(bank.code_vectors)
        entries_per_code = entries_per_code.new_zeros(codes_total).index_add_(0, bank.group_codes, entries_per_code)
        code_sums = code_sums.new_zeros(codes_total, code_sums.shape[1]).index_add_(0, bank.group_codes, code_sums)
    positive_f = positive.to(features.dtype)
    positives_per_row = positive_f @ entries_per_code
    left = projected_anchors if through and projected_anchors is not None else anchors / settings.temperature
    positive_similarity = (left * (positive_f @ code_sums)).sum(dim=1)
    considered_f = considered.to(features.dtype)
    log_denominator = _ConsideredLogSumExp.apply(left, features, bank.valid, considered_f, bank.group_codes)
    row_total = positives_per_row * log_denominator - positive_similarity
    image_total = row_total.view(batch, -1).sum(dim=1)
    image_count = positives_per_row.view(batch, -1).sum(dim=1)
    return image_total / image_count.clamp_min(1), image_count > 0


def concept_contrastive_terms(
    student: torch.Tensor,
    code_vectors: torch.Tensor,
    teacher: torch.Tensor,
    teacher_code_vectors: torch.Tensor,
    first_image: int = 0,
    bank: BankByCode | None = None,
    settings: ContrastiveSettings = ContrastiveSettings(),
    student_inputs: torch.Tensor | None = None,
    teacher_through_projection: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's term against the batch, then each image's term against the bank, ``[2B]``
    (``[B]`` without a bank), and whether each is defined (the image has a positive pair).

    ``student [B, P, E]`` and its tokens' normalised code vectors ``[B, P, D]`` are the
    anchors. ``teacher [G, P, E]`` with ``teacher_code_vectors [G, P, D]`` are the candidates:
    the same images (``G = B``) or a larger batch holding them from image ``first_image`` on,
    whose other images' tokens are candidates too.

    ``student_inputs [B, P, r]``, what the student's projection made the anchors from, speeds
    up every similarity whose candidates come taken back through that projection
    (:class:`~.heads.StudentBranch`): the bank's, when it holds ``through_projection``, and
    the batch's, given ``teacher_through_projection [G * P, r + 1]`` (the unit teacher
    projections taken back).
    """
    batch, tokens, _ = student.shape
    anchors = F.normalize(student.float(), dim=-1).reshape(batch * tokens, -1)
    anchor_codes = code_vectors.float().reshape(batch * tokens, -1)
    candidate_codes = teacher_code_vectors.float().reshape(-1, anchor_codes.shape[1])
    projected_anchors = None
    if student_inputs is not None:
        inputs = student_inputs.reshape(batch * tokens, -1)
        projected_anchors = _projected_anchors(student.reshape(batch * tokens, -1), inputs, settings.temperature)

    code_similarity = anchor_codes @ candidate_codes.t()
    positive = code_similarity > settings.positive_threshold
    rows = torch.arange(batch * tokens, device=positive.device)
    positive[rows, rows + first_image * tokens] = False  # a token is not its own positive
    negative = code_similarity < settings.negative_threshold
    if projected_anchors is not None and teacher_through_projection is not None:
        similarity = projected_anchors @ teacher_through_projection.float().t()
    else:
        candidates = F.normalize(teacher.float(), dim=-1).reshape(-1, anchors.shape[1])
        similarity = anchors @ candidates.t() / settings.temperature
    terms = [per_image_terms(similarity, positive, negative, batch)]
    if bank is not None and bank.features.shape[0] > 0:
        terms.append(_bank_terms(anchors, anchor_codes, bank, settings, batch, projected_anchors))
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
    bank = None
    if bank_features is not None:
        assert bank_code_vectors is not None
        bank = BankByCode.of_entries(bank_features, bank_code_vectors)
    values, defined = concept_contrastive_terms(student, code_vectors, teacher, code_vectors, 0, bank, settings)
    if not bool(defined.any()):
        return student.sum() * 0.0
    return values[defined].mean()
