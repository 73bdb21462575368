"""Modularity objective, grid sampling and quantisation against the reference's outputs
(shared/parity/modularity.npz and sampling_vq.npz)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cause_cli.model.modularity import modularity_loss, modularity_matrix, soft_assignment
from cause_cli.model.ops import cosine_similarity_matrix, grid_sample_tokens, nearest_code, quantise

from .helpers import assert_close, shared_path


@pytest.fixture
def feat(parity):
    return torch.from_numpy(parity("inputs")["feat"])


@pytest.fixture
def clusterbook():
    return torch.from_numpy(np.load(shared_path("parity", "ckpt", "modular.npy")))


def loss_and_gradient(centres: torch.Tensor, x: torch.Tensor, chunk_size: int | None):
    centres = centres.clone().requires_grad_(True)
    loss = modularity_loss(centres, x, chunk_size=chunk_size)
    loss.backward()
    return loss.detach(), centres.grad


@pytest.mark.parametrize("chunk_size", [None, 7, 64])
def test_clusterbook_loss_and_gradient(feat, clusterbook, parity, chunk_size):
    expected = parity("modularity")
    loss, grad = loss_and_gradient(clusterbook, feat, chunk_size)
    assert_close(loss, expected["m1_cb64_feat_loss"])
    assert_close(grad, expected["m1_cb64_feat_grad_c"], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_cluster_probe_loss_and_gradient(parity, chunk_size):
    expected = parity("modularity")
    loss, grad = loss_and_gradient(torch.from_numpy(expected["m2_c"]), torch.from_numpy(expected["m2_x"]), chunk_size)
    assert_close(loss, expected["m2_probe_segfeat_loss"])
    assert_close(grad, expected["m2_probe_segfeat_grad_c"], rtol=1e-5, atol=1e-8)


def test_loss_with_grid_sampling(parity, clusterbook):
    expected = parity("modularity")
    feat16 = torch.from_numpy(parity("inputs")["feat16"])
    sampled = grid_sample_tokens(feat16, torch.from_numpy(expected["m3_cb64_feat16_grid_order"]))
    assert sampled.shape == (2, 16, 384)
    loss, grad = loss_and_gradient(clusterbook, sampled, 16)
    assert_close(loss, expected["m3_cb64_feat16_grid_loss"])
    assert_close(grad, expected["m3_cb64_feat16_grid_grad_c"], rtol=1e-5, atol=1e-8)


def test_modularity_matrix_and_assignment(feat, clusterbook, parity):
    expected = parity("modularity")
    weights, edges = modularity_matrix(feat)
    assert_close(weights, expected["m1_W"], atol=1e-6)
    assert_close(edges, expected["m1_e"])
    assert_close(soft_assignment(feat, clusterbook), expected["m1_C"])


@pytest.mark.parametrize(
    ("source", "order", "window", "expected_key"),
    [
        ("feat", "order_feat", 4, "ss_feat"),
        ("feat16", "order_feat16", 4, "ss_feat16"),
        ("feat", "order_feat_k2", 2, "ss_feat_k2"),
    ],
)
def test_grid_sampling(parity, source, order, window, expected_key):
    data = parity("sampling_vq")
    tokens = torch.from_numpy(parity("inputs")[source])
    sampled = grid_sample_tokens(tokens, torch.from_numpy(data[order]), window)
    assert torch.equal(sampled, torch.from_numpy(data[expected_key]))


def test_grid_sampling_reuses_the_choice_for_projections(parity):
    from cause_cli.model.heads import SegmentationHeads
    from cause_cli.model.reference import convert_heads, load_reference_file

    data = parity("sampling_vq")
    heads = SegmentationHeads(384, 90, 2048, 27)
    heads.load_state_dict(convert_heads(load_reference_file(shared_path("parity", "ckpt", "segment_mlp.pth")), "mlp"))
    feat = torch.from_numpy(parity("inputs")["feat"])
    with torch.no_grad():
        projected = heads.student_projection(heads.student(feat))
    sampled = grid_sample_tokens(projected, torch.from_numpy(data["order_feat"]))[:1]
    assert_close(sampled, data["ss_mlp_proj_b0"])


def test_quantisation(feat, clusterbook, parity):
    data = parity("sampling_vq")
    assert torch.equal(nearest_code(feat, clusterbook), torch.from_numpy(data["codebook_index_cb64"]))
    assert torch.equal(nearest_code(feat, clusterbook), torch.from_numpy(data["quantize_index_cb64"]))
    assert torch.equal(quantise(feat, clusterbook), torch.from_numpy(data["vqt_cb64"]))
    assert_close(cosine_similarity_matrix(feat, clusterbook), data["cos_distance_cb64"])
    feat16 = torch.from_numpy(parity("inputs")["feat16"])
    assert torch.equal(nearest_code(feat16, clusterbook), torch.from_numpy(data["codebook_index_feat16_cb64"]))
