"""The MLP and TR heads, projections, probes and inference path against the reference's
outputs (shared/parity/heads.npz, computed from shared/parity/ckpt/)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cause_cli.config import TrainConfig
from cause_cli.inference.predict import (
    TrainedModel,
    cluster_scores,
    crf_unary,
    flip_averaged_feature_map,
    head_feature_map,
)
from cause_cli.model.heads import ClusterProbe, SegmentationHeads
from cause_cli.model.ops import map_to_tokens
from cause_cli.model.reference import convert_heads, load_reference_file

from .helpers import assert_close, shared_path

KINDS = ("mlp", "tr")


def reference_heads(kind: str) -> SegmentationHeads:
    reference = load_reference_file(shared_path("parity", "ckpt", f"segment_{kind}.pth"))
    heads = SegmentationHeads(dim=384, reduced_dim=90, projection_dim=2048, num_classes=27, kind=kind, num_queries=64)
    heads.load_state_dict(convert_heads(reference, kind))
    heads.set_clusterbook(torch.from_numpy(np.load(shared_path("parity", "ckpt", "modular.npy"))))
    return heads.eval()


def reference_probe(kind: str) -> ClusterProbe:
    reference = load_reference_file(shared_path("parity", "ckpt", f"cluster_{kind}.pth"))
    probe = ClusterProbe(90, 27)
    probe.centroids.data.copy_(reference["cluster_probe"])
    return probe


@pytest.fixture
def inputs(parity):
    data = parity("inputs")
    return torch.from_numpy(data["feat"]), torch.from_numpy(data["feat_flip"])


@pytest.mark.parametrize("kind", KINDS)
def test_student_and_teacher_heads(kind, inputs, parity):
    expected = parity("heads")
    heads = reference_heads(kind)
    feat, _ = inputs
    with torch.no_grad():
        assert_close(heads.student(feat), expected[f"{kind}_seg_feat"])
        assert_close(heads.teacher(feat), expected[f"{kind}_seg_feat_ema"])


@pytest.mark.parametrize("kind", KINDS)
def test_projection_heads(kind, inputs, parity):
    expected = parity("heads")
    heads = reference_heads(kind)
    feat, _ = inputs
    with torch.no_grad():
        student = heads.student_projection(heads.student(feat))[:1]
        teacher = heads.teacher_projection(heads.teacher(feat))[:1]
    assert_close(student, expected[f"{kind}_proj_feat_b0"])
    assert_close(teacher, expected[f"{kind}_proj_feat_ema_b0"])


@pytest.mark.parametrize("kind", KINDS)
def test_linear_probe(kind, inputs, parity):
    heads = reference_heads(kind)
    feat, _ = inputs
    with torch.no_grad():
        logits = heads.linear_probe(heads.teacher(feat))
    assert logits.shape == (4, 27, 8, 8)
    assert_close(logits, parity("heads")[f"{kind}_linear_logits"])


class ParityBackbone(torch.nn.Module):
    """Stands in for the backbone: the reference's features of the parity images ``images``
    and of their horizontal flip, so the toolkit's own inference functions run on them."""

    def __init__(self, images: torch.Tensor, feat: torch.Tensor, feat_flip: torch.Tensor) -> None:
        super().__init__()
        self.images, self.feat, self.feat_flip = images, feat, feat_flip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if torch.equal(images, self.images):
            return self.feat
        if torch.equal(images, self.images.flip(dims=[3])):
            return self.feat_flip
        raise AssertionError("the parity backbone was given other images")


def parity_model(kind: str, inputs) -> tuple[TrainedModel, torch.Tensor]:
    """A trained model of the reference's checkpoints and stand-in images for it."""
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    heads, probe = reference_heads(kind), reference_probe(kind)
    config = TrainConfig(data_dir=".", head=kind, resolution=64)
    model = TrainedModel(config, ParityBackbone(images, *inputs), heads, probe, heads.linear_probe, 27, None,
                         torch.device("cpu"))  # type: ignore[arg-type]  # fmt: skip
    return model, images


@pytest.mark.parametrize("kind", KINDS)
def test_cluster_assignment_and_crf_unary(kind, inputs, parity):
    expected = parity("heads")
    model, images = parity_model(kind, inputs)
    features = head_feature_map(model, images)  # [B, r, 8, 8]
    cosines = cluster_scores(model, features, (8, 8))  # at the token grid: no resampling
    assignment = cosines.argmax(dim=1)
    assert torch.equal(assignment, torch.from_numpy(expected[f"{kind}_cluster_preds"]))
    assert torch.equal(assignment, torch.from_numpy(expected[f"{kind}_cluster_loss_preds"]))
    assert_close(crf_unary(cosines), expected[f"{kind}_cluster_logprob_crf"])
    # The reference's "cluster loss" is minus the mean best cosine.
    assert_close(-cosines.max(dim=1).values.mean(), expected[f"{kind}_cluster_loss"])


@pytest.mark.parametrize("kind", KINDS)
def test_cluster_predictions_after_upsampling(kind, inputs, parity):
    model, images = parity_model(kind, inputs)
    predictions = cluster_scores(model, head_feature_map(model, images), (32, 32)).argmax(dim=1)
    assert torch.equal(predictions, torch.from_numpy(parity("heads")[f"{kind}_cluster_preds_interp32"]))


@pytest.mark.parametrize("kind", KINDS)
def test_flip_averaged_features_and_crf_unary(kind, inputs, parity):
    expected = parity("heads")
    model, images = parity_model(kind, inputs)
    averaged = flip_averaged_feature_map(model, images, head_feature_map(model, images))
    assert_close(map_to_tokens(averaged), expected[f"{kind}_tta_seg_feat"])
    unary = crf_unary(cluster_scores(model, averaged, (32, 32)))
    assert_close(unary, expected[f"{kind}_tta_cluster_logprob_crf32"])


def test_tr_decoder_internals(inputs, parity):
    expected = parity("heads")
    heads = reference_heads("tr")
    feat, _ = inputs
    with torch.no_grad():
        internals = heads.teacher.decode(feat)
    # The reference runs its decoder sequence-first: [P, B, D].
    for name, key in [("self_attn_out", "self_attn_out"), ("norm1_out", "norm1_out"),
                      ("cross_attn_out", "multihead_attn_out"), ("norm2_out", "norm2_out"),
                      ("linear2_out", "linear2_out"), ("norm3_out", "norm3_out")]:  # fmt: skip
        assert_close(internals[name].transpose(0, 1), expected[f"tr_head_ema_internal_{key}"])
    assert_close(internals["self_attn_weights"], expected["tr_head_ema_internal_self_attn_weights"])
    assert_close(internals["cross_attn_weights"], expected["tr_head_ema_internal_multihead_attn_weights"])


def test_tr_head_refuses_another_grid_size():
    heads = SegmentationHeads(dim=8, reduced_dim=4, projection_dim=8, num_classes=3, kind="tr", num_queries=16)
    heads.set_clusterbook(torch.randn(5, 8))
    with pytest.raises(ValueError, match="built for 16 tokens"):
        heads.teacher(torch.randn(1, 25, 8))
