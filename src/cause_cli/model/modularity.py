"""The modularity objective that trains the concept clusterbook (step one) and the
cluster probe (step three), METHOD.md section 1.

For a batch of token features ``x [B, P, D]`` and cluster centres ``c [K, D]``:

* ``A_ij = max(cos(x_i, x_j), 0)`` with a zero diagonal, ``d = A 1``, ``e = 1^T A 1``,
  ``W = A - d d^T / e``;
* ``S_ik = max(cos(x_i, c_k), 0)``;
* ``Delta_ij = max_k tanh(S_ik S_jk / tau)``;
* loss ``= -mean_b sum_ij W_ij Delta_ij / e``.

The direct form materialises ``[B, K, P, P]``. Because ``tanh`` is increasing and the
gradient of a max flows only through its arg-max, the same value and gradient follow from
finding the arg-max ``k`` chunk by chunk without autograd and then evaluating the single
winning term per pair with autograd, which needs ``O(B P^2)`` memory plus one chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TEMPERATURE = 0.1


def modularity_matrix(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W = A - d d^T / e`` and the total edge weight ``e`` ``[B, 1, 1]`` of the token graph."""
    normed = F.normalize(x, dim=-1)
    affinity = (normed @ normed.transpose(1, 2)).clamp_min(0)
    affinity = affinity * (1 - torch.eye(affinity.shape[-1], device=x.device, dtype=affinity.dtype))
    degree = affinity.sum(dim=2, keepdim=True)
    # A graph without edges (every pair of tokens at a negative cosine, which happens with a
    # few grid-sampled tokens) has W = 0: its modularity is 0, not the reference's 0 / 0 NaN
    # that would poison the centres through Adam.
    edges = degree.sum(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return affinity - degree @ degree.transpose(1, 2) / edges, edges


def soft_assignment(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``S_ik = max(cos(x_i, c_k), 0)``: ``[B, P, K]``."""
    return (F.normalize(x, dim=-1) @ F.normalize(centres, dim=-1).t()).clamp_min(0)


def co_membership_direct(assignment: torch.Tensor, temperature: float) -> torch.Tensor:
    """``Delta [B, P, P]`` through the full ``[B, K, P, P]`` tensor (the reference's way)."""
    per_code = assignment.transpose(1, 2)  # [B, K, P]
    products = per_code.unsqueeze(3) * per_code.unsqueeze(2)  # [B, K, P, P]
    return torch.tanh(products / temperature).max(dim=1).values


def winning_codes(assignment: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """For every token pair, the ``k`` that maximises ``S_ik S_jk``: ``[B, P, P]`` int64.

    Computed without autograd, ``chunk_size`` codes at a time.
    """
    with torch.no_grad():
        batch, tokens, codes = assignment.shape
        best_value = torch.full((batch, tokens, tokens), -1.0, device=assignment.device, dtype=assignment.dtype)
        best_code = torch.zeros((batch, tokens, tokens), device=assignment.device, dtype=torch.long)
        for start in range(0, codes, chunk_size):
            chunk = assignment[:, :, start : start + chunk_size].transpose(1, 2)  # [B, k, P]
            products = chunk.unsqueeze(3) * chunk.unsqueeze(2)  # [B, k, P, P]
            value, index = products.max(dim=1)
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best_code = torch.where(better, index + start, best_code)
        return best_code


def co_membership_chunked(assignment: torch.Tensor, temperature: float, chunk_size: int = 64) -> torch.Tensor:
    """``Delta [B, P, P]`` equal in value and gradient to :func:`co_membership_direct`."""
    code = winning_codes(assignment, chunk_size)
    row_term = assignment.gather(2, code)  # S_i,k*(i,j)
    col_term = assignment.gather(2, code.transpose(1, 2)).transpose(1, 2)  # S_j,k*(i,j)
    return torch.tanh(row_term * col_term / temperature)


def modularity_loss(
    centres: torch.Tensor,
    x: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int | None = 64,
) -> torch.Tensor:
    """Negated modularity of the soft clustering of ``x [B, P, D]`` by ``centres [K, D]``.

    ``x`` is detached: only the centres learn. ``chunk_size=None`` uses the direct form.
    """
    # Under mixed precision the products S_ik S_jk / tau lose too many digits in half
    # precision, so this objective always runs in float32.
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.detach().float()
        weights, edges = modularity_matrix(x)
        assignment = soft_assignment(x, centres.float())
        if chunk_size is None:
            delta = co_membership_direct(assignment, temperature)
        else:
            delta = co_membership_chunked(assignment, temperature, chunk_size)
        # trace((W / e) @ Delta) with Delta symmetric is the elementwise sum of W * Delta / e.
        per_image = (weights * delta).sum(dim=(1, 2)) / edges.view(-1)
        return -per_image.mean()


class ModularityObjective(nn.Module):
    """The modularity losses ``[S]`` of ``S`` sets of centres on one batch of tokens.

    A module around the centres (which it shares, not copies) so that data-parallel training
    can average their gradients over processes.
    """

    def __init__(self, centres: Sequence[nn.Parameter], temperature: float = DEFAULT_TEMPERATURE) -> None:
        super().__init__()
        self.centres = nn.ParameterList(centres)
        self.temperature = temperature

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([modularity_loss(centres, tokens, self.temperature) for centres in self.centres])
