"""Grid sampling and quantisation against slow, obvious versions (METHOD.md sections 1 and 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cause_cli.model.ops import (
    draw_grid_choice,
    grid_sample_tokens,
    map_to_tokens,
    nearest_code,
    quantise,
    tokens_to_map,
)


def slow_grid_sample(tokens: torch.Tensor, choice: torch.Tensor, window: int) -> torch.Tensor:
    batch, count, dim = tokens.shape
    side = int(count**0.5)
    per_side = side // window
    out = torch.empty(batch, per_side * per_side, dim)
    index = 0
    for b in range(batch):
        for wy in range(per_side):
            for wx in range(per_side):
                inside = int(choice[index])
                row, col = wy * window + inside // window, wx * window + inside % window
                out[b, wy * per_side + wx] = tokens[b, row * side + col]
                index += 1
    return out


@pytest.mark.parametrize(("side", "window"), [(8, 4), (40, 4), (10, 4), (6, 2)])
def test_grid_sampling_equals_loops(side, window):
    tokens = torch.randn(3, side * side, 5)
    choice = draw_grid_choice(3, side, window)
    assert choice.shape == (3 * (side // window) ** 2,) and int(choice.max()) < window * window
    torch.testing.assert_close(grid_sample_tokens(tokens, choice, window), slow_grid_sample(tokens, choice, window))


def test_grid_sampling_keeps_one_token_per_window():
    # Token values are their own grid positions: every pick must lie in its own window.
    side, window = 12, 4
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    tokens = torch.stack([rows, cols], dim=-1).reshape(1, side * side, 2).float()
    picked = grid_sample_tokens(tokens, draw_grid_choice(1, side, window), window)[0]
    for index, (row, col) in enumerate(picked.long().tolist()):
        assert (row // window, col // window) == divmod(index, side // window)


def test_quantisation_picks_the_most_cosine_similar_code():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    features = torch.tensor([[[5.0, 0.1], [0.1, 0.2], [-3.0, -2.0]]])
    assert nearest_code(features, codebook).tolist() == [[0, 1, 2]]
    torch.testing.assert_close(quantise(features, codebook), codebook[[0, 1, 2]][None])
    # Cosine, not distance: a long vector still maps by direction.
    assert nearest_code(torch.tensor([[[100.0, 1.0]]]), codebook).item() == 0
    random_features, random_codes = torch.randn(2, 9, 4), torch.randn(6, 4)
    slow = torch.tensor(
        [
            [max(range(6), key=lambda k: float(F.cosine_similarity(f, random_codes[k], dim=0))) for f in row]
            for row in random_features
        ]
    )
    assert torch.equal(nearest_code(random_features, random_codes), slow)


def test_token_map_round_trip():
    tokens = torch.randn(2, 49, 3)
    feature_map = tokens_to_map(tokens)
    assert feature_map.shape == (2, 3, 7, 7)
    assert torch.equal(feature_map[1, :, 2, 5], tokens[1, 2 * 7 + 5])
    assert torch.equal(map_to_tokens(feature_map), tokens)


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "cause_cli", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("cause ")
