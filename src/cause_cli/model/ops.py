"""Small tensor operations shared by every step of CAUSE.

Features travel token-major, ``[B, P, D]`` with ``P = g * g`` tokens in row-major grid
order, as the backbone emits them. Helpers here convert to and from the image-major
``[B, D, g, g]`` layout only where a spatial operation (upsampling, flipping) needs it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def grid_side(num_tokens: int) -> int:
    """Side ``g`` of the square token grid holding ``num_tokens`` tokens."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a square grid")
    return side


def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, P, D]`` tokens to a ``[B, D, g, g]`` feature map."""
    batch, num_tokens, dim = tokens.shape
    side = grid_side(num_tokens)
    return tokens.transpose(1, 2).reshape(batch, dim, side, side)


def map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """``[B, D, h, w]`` feature map to ``[B, h * w, D]`` tokens."""
    batch, dim = feature_map.shape[:2]
    return feature_map.reshape(batch, dim, -1).transpose(1, 2)


def cosine_similarity_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``x [..., N, D]`` with every row of ``y [M, D]``.

    Returns ``[..., N, M]``.
    """
    return F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(-1, -2)


def nearest_code(features: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar codebook row for every token: ``[B, P]`` int64."""
    return cosine_similarity_matrix(features, codebook).argmax(dim=-1)


def quantise(features: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Replace every token by its nearest codebook row (cosine): ``[B, P, D]``."""
    return codebook[nearest_code(features, codebook)]


def draw_grid_choice(batch: int, side: int, window: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random token choice for grid sampling: one index in ``[0, window**2)`` per window.

    The result has one entry per window, ordered image by image, then window row, then
    window column; the index inside a window is ``row * window + col``. Pass the same choice
    to :func:`grid_sample_tokens` for every tensor that must be sampled alike.
    """
    windows = batch * (side // window) ** 2
    return torch.randint(window * window, (windows,), generator=generator)


def grid_positions(choice: torch.Tensor, batch: int, num_tokens: int, window: int = 4) -> torch.Tensor:
    """The token indices a grid choice keeps, ``[B, (g // window)**2]`` int64, in row-major
    window order: what :func:`grid_sample_tokens` picks from each image."""
    side = grid_side(num_tokens)
    per_side = side // window
    if per_side == 0:
        raise ValueError(f"a {side}x{side} token grid is smaller than one {window}x{window} window")
    # Tokens past the last whole window are never kept, as an unfold with stride = size does.
    window_row = torch.arange(per_side, device=choice.device).repeat_interleave(per_side)
    window_col = torch.arange(per_side, device=choice.device).repeat(per_side)
    inside = choice.reshape(batch, per_side * per_side)
    rows = window_row * window + torch.div(inside, window, rounding_mode="floor")
    return rows * side + window_col * window + inside % window


def take_tokens(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``tokens [B, P, ...]`` at ``positions [B, S]``: ``[B, S, ...]``."""
    index = positions.to(tokens.device).reshape(*positions.shape, *([1] * (tokens.dim() - 2)))
    return tokens.gather(1, index.expand(*positions.shape, *tokens.shape[2:]))


def grid_sample_tokens(tokens: torch.Tensor, choice: torch.Tensor, window: int = 4) -> torch.Tensor:
    """Keep one token per non-overlapping ``window x window`` window of the token grid.

    ``tokens`` is ``[B, P, D]`` on a ``g x g`` grid; the result is ``[B, (g // window)**2, D]``
    in row-major window order. ``choice`` comes from :func:`draw_grid_choice`.
    """
    return take_tokens(tokens, grid_positions(choice.to(tokens.device), tokens.shape[0], tokens.shape[1], window))


def ema_update_(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """In place: ``teacher <- momentum * teacher + (1 - momentum) * student``."""
    with torch.no_grad():
        teacher_params: list[torch.Tensor] = list(teacher.parameters())
        student_params: list[torch.Tensor] = [p.detach() for p in student.parameters()]
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


def best_channel(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(dim=1)`` of ``[B, C, H, W]`` (the first of equal maxima), about twice as
    fast on a CPU: ``max`` walks the channels of each pixel in one pass where ``argmax`` strides."""
    return scores.max(dim=1).indices
