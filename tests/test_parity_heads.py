"""The MLP heads, projections, probes and inference path against the reference's outputs
(shared/parity/heads.npz, computed from shared/parity/ckpt/)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cause_cli.model.heads import ClusterProbe, SegmentationHeads
from cause_cli.model.ops import map_to_tokens, tokens_to_map
from cause_cli.model.reference import convert_mlp_heads, load_reference_file
from cause_cli.predict import CRF_SHARPNESS

from .helpers import assert_close, shared_path


@pytest.fixture
def mlp_heads():
    reference = load_reference_file(shared_path("parity", "ckpt", "segment_mlp.pth"))
    heads = SegmentationHeads(dim=384, reduced_dim=90, projection_dim=2048, num_classes=27)
    heads.load_state_dict(convert_mlp_heads(reference))
    return heads.eval()


@pytest.fixture
def mlp_probe():
    reference = load_reference_file(shared_path("parity", "ckpt", "cluster_mlp.pth"))
    probe = ClusterProbe(90, 27)
    probe.centroids.data.copy_(reference["cluster_probe"])
    return probe


@pytest.fixture
def inputs(parity):
    data = parity("inputs")
    return torch.from_numpy(data["feat"]), torch.from_numpy(data["feat_flip"])


def test_student_and_teacher_heads(mlp_heads, inputs, parity):
    expected = parity("heads")
    feat, _ = inputs
    with torch.no_grad():
        assert_close(mlp_heads.student(feat), expected["mlp_seg_feat"])
        assert_close(mlp_heads.teacher(feat), expected["mlp_seg_feat_ema"])


def test_projection_heads(mlp_heads, inputs, parity):
    expected = parity("heads")
    feat, _ = inputs
    with torch.no_grad():
        student = mlp_heads.student_projection(mlp_heads.student(feat))[:1]
        teacher = mlp_heads.teacher_projection(mlp_heads.teacher(feat))[:1]
    assert_close(student, expected["mlp_proj_feat_b0"])
    assert_close(teacher, expected["mlp_proj_feat_ema_b0"])


def test_linear_probe(mlp_heads, inputs, parity):
    feat, _ = inputs
    with torch.no_grad():
        logits = mlp_heads.linear_probe(mlp_heads.teacher(feat))
    assert logits.shape == (4, 27, 8, 8)
    assert_close(logits, parity("heads")["mlp_linear_logits"])


def test_cluster_assignment_and_crf_unary(mlp_heads, mlp_probe, inputs, parity):
    expected = parity("heads")
    feat, _ = inputs
    with torch.no_grad():
        features = mlp_heads.teacher(feat)
        cosines = mlp_probe.cosine(features)  # [B, P, C]
        assignment = mlp_probe.assign(features).reshape(4, 8, 8)
        unary = torch.log_softmax(CRF_SHARPNESS * tokens_to_map(cosines), dim=1)
    assert torch.equal(assignment, torch.from_numpy(expected["mlp_cluster_preds"]))
    assert torch.equal(assignment, torch.from_numpy(expected["mlp_cluster_loss_preds"]))
    assert_close(unary, expected["mlp_cluster_logprob_crf"])
    # The reference's "cluster loss" is minus the mean best cosine.
    assert_close(-cosines.max(dim=-1).values.mean(), expected["mlp_cluster_loss"])


def test_cluster_predictions_after_upsampling(mlp_heads, mlp_probe, inputs, parity):
    feat, _ = inputs
    with torch.no_grad():
        upsampled = F.interpolate(
            tokens_to_map(mlp_heads.teacher(feat)), (32, 32), mode="bilinear", align_corners=False
        )
        predictions = mlp_probe.assign(map_to_tokens(upsampled)).reshape(4, 32, 32)
    assert torch.equal(predictions, torch.from_numpy(parity("heads")["mlp_cluster_preds_interp32"]))


def test_flip_averaged_features_and_crf_unary(mlp_heads, mlp_probe, inputs, parity):
    expected = parity("heads")
    feat, feat_flip = inputs
    with torch.no_grad():
        averaged = (
            tokens_to_map(mlp_heads.teacher(feat)) + tokens_to_map(mlp_heads.teacher(feat_flip)).flip(dims=[3])
        ) / 2
        assert_close(map_to_tokens(averaged), expected["mlp_tta_seg_feat"])
        upsampled = F.interpolate(averaged, (32, 32), mode="bilinear", align_corners=False)
        cosines = mlp_probe.cosine(map_to_tokens(upsampled)).transpose(1, 2).reshape(4, 27, 32, 32)
        unary = torch.log_softmax(CRF_SHARPNESS * cosines, dim=1)
    assert_close(unary, expected["mlp_tta_cluster_logprob_crf32"])
