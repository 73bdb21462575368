"""The modularity objective against a slow, obvious version written from METHOD.md section 1,
and the chunked form against the direct one, in value and gradient."""

from __future__ import annotations

import math

import pytest
import torch

from cause_cli.model.modularity import co_membership_chunked, co_membership_direct, modularity_loss, soft_assignment


def slow_modularity_loss(centres: torch.Tensor, x: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Loops over images, token pairs and codes, straight from the formula."""
    total = 0.0
    for features in x:
        tokens = features.shape[0]
        affinity = [[0.0] * tokens for _ in range(tokens)]
        for i in range(tokens):
            for j in range(tokens):
                if i != j:
                    affinity[i][j] = max(torch.cosine_similarity(features[i], features[j], dim=0), torch.tensor(0.0))
        degree = [sum(row) for row in affinity]
        edges = sum(degree)
        assignment = [
            [max(torch.cosine_similarity(features[i], c, dim=0), torch.tensor(0.0)) for c in centres]
            for i in range(tokens)
        ]
        image_total = 0.0
        for i in range(tokens):
            for j in range(tokens):
                w = affinity[i][j] - degree[i] * degree[j] / edges
                delta = max(torch.tanh(assignment[i][k] * assignment[j][k] / tau) for k in range(len(centres)))
                image_total = image_total + w * delta
        total = total + image_total / edges
    return -total / x.shape[0]


def test_equals_slow_version_in_value_and_gradient():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    centres = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    slow = slow_modularity_loss(centres, x)
    (slow_grad,) = torch.autograd.grad(slow, centres)
    fast = modularity_loss(centres, x, chunk_size=2)
    (fast_grad,) = torch.autograd.grad(fast, centres)
    # The objective runs in float32 whatever the input precision.
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5)
    torch.testing.assert_close(fast_grad.double(), slow_grad, rtol=1e-4, atol=1e-7)


def test_hand_computed_value():
    # Two orthogonal pairs of identical tokens and centres on them: A is two blocks of ones.
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # A_ij = 1 for the pairs (0,1), (2,3) and their mirrors: degree 1 each, e = 4.
    # W = A - 1/4 everywhere. Delta = tanh(10) within a pair (diagonal included), 0 across.
    # sum W * Delta = tanh(10) * (4 * (1 - 1/4) + 4 * (0 - 1/4)) = 2 tanh(10).
    expected = -(2 * math.tanh(10.0)) / 4
    assert modularity_loss(centres, x).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("codes", "tokens", "chunk"), [(2048, 16, 256), (2048, 25, 100), (64, 30, 7)])
def test_chunked_equals_direct(codes, tokens, chunk):
    torch.manual_seed(codes + tokens)
    x = torch.randn(3, tokens, 24)
    centres = torch.randn(codes, 24)
    direct_centres = centres.clone().requires_grad_(True)
    chunked_centres = centres.clone().requires_grad_(True)
    direct = modularity_loss(direct_centres, x, chunk_size=None)
    direct.backward()
    chunked = modularity_loss(chunked_centres, x, chunk_size=chunk)
    chunked.backward()
    torch.testing.assert_close(chunked, direct, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(chunked_centres.grad, direct_centres.grad, rtol=1e-5, atol=1e-8)


def test_co_membership_is_symmetric_and_bounded():
    torch.manual_seed(0)
    assignment = soft_assignment(torch.randn(2, 9, 6), torch.randn(11, 6))
    delta = co_membership_chunked(assignment, 0.1, chunk_size=4)
    torch.testing.assert_close(delta, delta.transpose(1, 2))
    torch.testing.assert_close(delta, co_membership_direct(assignment, 0.1))
    assert bool((delta >= 0).all()) and bool((delta <= 1).all())


def test_features_get_no_gradient():
    x = torch.randn(2, 16, 8, requires_grad=True)
    centres = torch.randn(5, 8, requires_grad=True)
    modularity_loss(centres, x).backward()
    assert x.grad is None
    assert centres.grad is not None


def test_an_image_without_edges_adds_zero_not_nan():
    """Every pair of its tokens at a negative cosine: no edges, so W = 0 and the image's
    modularity is 0; the other image's loss and the centres' gradient stay finite."""
    lonely = torch.zeros(4, 8)
    lonely[0, 0], lonely[1, 0], lonely[2, 1], lonely[3, 1] = 1.0, -1.0, 1.0, -1.0
    connected = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).abs()
    centres = torch.nn.Parameter(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)))
    both = modularity_loss(centres, torch.stack([connected, lonely]))
    both.backward()
    assert torch.isfinite(both) and torch.isfinite(centres.grad).all()
    alone = modularity_loss(centres.detach(), connected[None])
    assert torch.allclose(both, alone / 2)
