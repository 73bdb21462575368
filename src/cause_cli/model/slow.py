"""Straightforward forms of the front-door computations, written the way the reference code
computes them: a Python dict of growing tensors for the concept bank, rebuilt by concatenation
every step, and a loop over the images of the batch for the loss.

They are slow on purpose and kept for two jobs only: the tests check the fast forms
(:mod:`.bank`, :mod:`.contrastive`) against them, and the benchmarks time both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .contrastive import ContrastiveSettings, concept_contrastive_terms, per_image_terms


class LoopBank:
    """Per code, a tensor that grows by concatenation and is cut to its newest ``capacity``."""

    def __init__(self, num_codes: int, capacity: int = 100) -> None:
        self.capacity = capacity
        self.entries: dict[int, torch.Tensor] = {code: torch.empty(0, 0) for code in range(num_codes)}

    def update(self, codes: torch.Tensor, features: torch.Tensor, random_keys: torch.Tensor | None = None) -> None:
        codes = codes.reshape(-1)
        features = F.normalize(features.reshape(codes.numel(), -1).detach().float(), dim=1)
        if random_keys is None:
            random_keys = torch.rand(codes.numel(), device=codes.device)
        for code in codes.unique().tolist():
            members = torch.where(codes == code)[0]
            chosen = members[torch.argsort(random_keys[members])][: len(members) // 2]
            old = self.entries[code]
            merged = torch.cat([old, features[chosen]]) if old.numel() else features[chosen]
            self.entries[code] = merged[-self.capacity :]

    def flat(self, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All entries and their normalised code vectors, concatenated code by code."""
        features = torch.empty(0, 0, device=codebook.device)
        vectors = torch.empty(0, codebook.shape[1], device=codebook.device)
        for code, stored in self.entries.items():
            if stored.numel() == 0:
                continue
            features = torch.cat([features, stored]) if features.numel() else stored
            vectors = torch.cat([vectors, codebook[code].unsqueeze(0).repeat(len(stored), 1)])
        return features, F.normalize(vectors, dim=1)


def loop_contrastive_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    code_vectors: torch.Tensor,
    bank_features: torch.Tensor | None,
    bank_code_vectors: torch.Tensor | None,
    settings: ContrastiveSettings = ContrastiveSettings(),
) -> torch.Tensor:
    """One image at a time as anchors, with the full loss matrix of each."""
    batch, tokens, _ = student.shape
    candidates = F.normalize(teacher.float(), dim=-1).reshape(batch * tokens, -1)
    all_codes = code_vectors.float().reshape(batch * tokens, -1)
    terms = []

    def term(similarity: torch.Tensor, code_similarity: torch.Tensor, own_block: int | None) -> torch.Tensor:
        positive = code_similarity > settings.positive_threshold
        if own_block is not None:
            positive[:, own_block * tokens : (own_block + 1) * tokens].fill_diagonal_(False)
        negative = code_similarity < settings.negative_threshold
        shifted = similarity - similarity.max(dim=1, keepdim=True).values.detach()
        denominator = (shifted.exp() * (positive | negative)).sum(dim=1, keepdim=True)
        return (-shifted + torch.log(denominator))[positive].mean()

    for b in range(batch):
        anchors = F.normalize(student[b].float(), dim=-1)
        anchor_codes = code_vectors[b].float()
        terms.append(term(anchors @ candidates.t() / settings.temperature, anchor_codes @ all_codes.t(), b))
        if bank_features is not None and bank_code_vectors is not None and len(bank_features):
            bank_similarity = anchors @ bank_features.float().t() / settings.temperature
            terms.append(term(bank_similarity, anchor_codes @ bank_code_vectors.float().t(), None))
    stacked = torch.stack(terms)
    return stacked[~torch.isnan(stacked)].mean()


def entrywise_contrastive_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    code_vectors: torch.Tensor,
    bank_features: torch.Tensor,
    bank_code_vectors: torch.Tensor,
    settings: ContrastiveSettings = ContrastiveSettings(),
) -> torch.Tensor:
    """The vectorised loss as it was before the code table: the bank's code similarities,
    masks and feature similarities as ``[rows, entries]`` matrices through autograd."""
    batch, tokens, _ = student.shape
    batch_values, batch_defined = concept_contrastive_terms(
        student, code_vectors, teacher, code_vectors, settings=settings
    )
    anchors = F.normalize(student.float(), dim=-1).reshape(batch * tokens, -1)
    code_similarity = code_vectors.float().reshape(batch * tokens, -1) @ bank_code_vectors.float().t()
    bank_values, bank_defined = per_image_terms(
        anchors @ bank_features.float().t() / settings.temperature,
        code_similarity > settings.positive_threshold,
        code_similarity < settings.negative_threshold,
        batch,
    )
    values, defined = torch.cat([batch_values, bank_values]), torch.cat([batch_defined, bank_defined])
    return values[defined].mean()
