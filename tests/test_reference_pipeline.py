"""An imported reference run, fed a backbone through `cause fetch`, predicts on real photos
exactly what the reference's own code path computes (METHOD.md sections 0 and 4).

The reference path is rebuilt here independently: torchvision transforms, a timm ViT-S/8 with
the reference's 12 heads whose position embeddings are resized by a numpy bicubic written in
test_backbones, the reference checkpoint applied with 1x1 convolutions on the raw state dict,
and its inference: bilinear upsampling, cosine to the centroids; for the CRF path, flip
averaging, log_softmax(3 cos), and pydensecrf called as the reference calls it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save
from typer.testing import CliRunner

from cause_cli.backbones import REGISTRY
from cause_cli.cli import app
from cause_cli.data.transforms import normalise, resize_and_crop
from cause_cli.inference.crf import CRFPool
from cause_cli.inference.predict import (
    cluster_scores,
    crf_unary,
    flip_averaged_feature_map,
    head_feature_map,
    load_trained,
)
from cause_cli.model.reference import load_reference_file
from cause_cli.runs import RunDirectory

from .fake_hub import FakeHub, forbid_remote_connections, point_hub_at
from .helpers import require_pydensecrf, shared_path
from .test_backbones import independent_resize

RESOLUTION = 320
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def vits8_state():
    import timm

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in timm.create_model("vit_small_patch8_224", num_classes=0).state_dict().items()}
    generator = torch.Generator().manual_seed(11)
    return {key: torch.randn(shape, generator=generator) * 0.05 for key, shape in shapes.items()}


@pytest.fixture
def imported_run(vits8_state, tmp_path, monkeypatch):
    """`cause fetch dino-vits8` from a local Hub, then `cause import` of the reference MLP files."""
    hub = FakeHub().start()
    try:
        hub.add(REGISTRY["dino-vits8"].hub_repo, "model.safetensors", save(vits8_state))
        point_hub_at(monkeypatch, hub.url, tmp_path / "hf")
        forbid_remote_connections(monkeypatch)
        monkeypatch.setenv("CAUSE_HOME", str(tmp_path / "cause"))
        runner = CliRunner()
        fetched = runner.invoke(app, ["fetch", "dino-vits8", "--quiet"], catch_exceptions=False)
        assert fetched.exit_code == 0, fetched.output
    finally:
        hub.stop()
    run = tmp_path / "run"
    ckpt = shared_path("parity", "ckpt")
    args = [
        "import",
        str(ckpt),
        "--backbone",
        "dino-vits8",
        "--head",
        "mlp",
        "--dataset",
        "cocostuff27",
        "--run",
        str(run),
    ]
    imported = runner.invoke(app, args, catch_exceptions=False)
    assert imported.exit_code == 0, imported.output
    return run


def reference_tokens(state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """The reference's ViT-S/8: 12 heads, DINO position rule, last block after the norm."""
    import timm

    model = timm.create_model("vit_small_patch8_224", num_classes=0, num_heads=12, img_size=RESOLUTION).eval()
    grid = RESOLUTION // 8
    stored = state["pos_embed"][0, 1:].reshape(28, 28, 384).permute(2, 0, 1).double().numpy()
    resized = torch.from_numpy(independent_resize(stored, (grid, grid), "dino")).float()
    pos_embed = torch.cat([state["pos_embed"][:, :1], resized.permute(1, 2, 0).reshape(1, grid * grid, 384)], 1)
    model.load_state_dict({**state, "pos_embed": pos_embed})
    with torch.no_grad():
        return model.forward_features(images)[:, 1:]


def to_map(tokens: torch.Tensor) -> torch.Tensor:
    batch, count, dim = tokens.shape
    side = int(math.sqrt(count))
    return tokens.permute(0, 2, 1).reshape(batch, dim, side, side)


def reference_head(state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """segment.head_ema of the reference: 1x1 convolutions on the token map."""
    x = to_map(tokens)
    direct = F.conv2d(x, state["head_ema.f1.weight"], state["head_ema.f1.bias"])
    hidden = F.relu(F.conv2d(x, state["head_ema.f2.0.weight"], state["head_ema.f2.0.bias"]))
    return direct + F.conv2d(hidden, state["head_ema.f2.2.weight"], state["head_ema.f2.2.bias"])


def reference_cosines(feature_map: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    upsampled = F.interpolate(feature_map, (RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    return torch.einsum("bchw,nc->bnhw", F.normalize(upsampled, dim=1), F.normalize(centroids, dim=1))


def reference_crf(image: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax
    from torchvision.transforms import functional

    rgb = image * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    bgr = np.ascontiguousarray(np.array(functional.to_pil_image(rgb))[:, :, ::-1])
    probabilities = F.softmax(logits, dim=0).numpy()
    classes, height, width = probabilities.shape
    model = dcrf.DenseCRF2D(width, height, classes)
    model.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probabilities)))
    model.addPairwiseGaussian(sxy=1, compat=3)
    model.addPairwiseBilateral(sxy=67, srgb=3, rgbim=bgr, compat=4)
    return np.array(model.inference(10)).reshape(classes, height, width)


def real_photos(count: int) -> tuple[list[Image.Image], torch.Tensor]:
    from torchvision import transforms

    paths = sorted((shared_path("data", "real", "voc2012") / "images").glob("*.png"))[:count]
    photos = [Image.open(path).convert("RGB") for path in paths]
    pascal = transforms.Compose([
        transforms.Resize((RESOLUTION, RESOLUTION), interpolation=transforms.InterpolationMode.NEAREST),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])  # fmt: skip
    return photos, torch.stack([pascal(photo) for photo in photos])


def agreement(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return float((np.asarray(a) == np.asarray(b)).mean())


def test_imported_run_reproduces_reference_predictions_on_real_photos(imported_run, vits8_state):
    photos, reference_images = real_photos(3)
    model = load_trained(RunDirectory(imported_run), torch.device("cpu"))
    assert model.backbone.num_heads == 12 and model.resolution == RESOLUTION
    ours = torch.stack([normalise(resize_and_crop(photo, RESOLUTION, square_resize=True)) for photo in photos])
    torch.testing.assert_close(ours, reference_images)

    segment = load_reference_file(shared_path("parity", "ckpt", "segment_mlp.pth"))
    centroids = load_reference_file(shared_path("parity", "ckpt", "cluster_mlp.pth"))["cluster_probe"]

    # Without CRF: the image alone.
    features = head_feature_map(model, ours)
    predictions = cluster_scores(model, features, (RESOLUTION, RESOLUTION)).argmax(dim=1)
    reference_features = reference_head(segment, reference_tokens(vits8_state, reference_images))
    torch.testing.assert_close(features, reference_features, rtol=1e-4, atol=1e-4)
    expected = reference_cosines(reference_features, centroids).argmax(dim=1)
    print(f"pixels agreeing with the reference path, no CRF: {100 * agreement(predictions, expected):.3f}%")
    assert agreement(predictions, expected) > 0.999

    require_pydensecrf()
    # With CRF: image and flip averaged, log_softmax(3 cos), the dense CRF.
    averaged = flip_averaged_feature_map(model, ours, features)
    unary = crf_unary(cluster_scores(model, averaged, (RESOLUTION, RESOLUTION)))
    from cause_cli.data.transforms import denormalise_to_uint8

    with CRFPool(0) as pool:
        refined = np.stack(pool.run(list(denormalise_to_uint8(ours)), list(unary.numpy())))
    flipped = reference_head(segment, reference_tokens(vits8_state, reference_images.flip(dims=[3])))
    reference_averaged = (reference_features + flipped.flip(dims=[3])) / 2
    logits = torch.log_softmax(3 * reference_cosines(reference_averaged, centroids), dim=1)
    expected_refined = np.stack(
        [reference_crf(image, scores) for image, scores in zip(reference_images, logits, strict=True)]
    )
    crf_agreement = agreement(refined, expected_refined.argmax(axis=1))
    print(f"pixels agreeing with the reference path, CRF: {100 * crf_agreement:.3f}%")
    assert crf_agreement > 0.999
