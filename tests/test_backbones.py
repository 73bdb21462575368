"""Backbones from a Hub on 127.0.0.1: fetch, verify, cache, load, convert, extract tokens.

Small randomly initialised checkpoints in each family's architecture (timm's own model code,
few blocks, narrow) are served by :mod:`tests.fake_hub`; one test serves a full-size ViT-S/8.
No test reaches the network: any connection to a host but 127.0.0.1 fails the test.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import pathlib
import shutil
import time
from argparse import Namespace

import numpy as np
import pytest
import torch
from safetensors.torch import save, save_file
from typer.testing import CliRunner

from cause_cli import backbones
from cause_cli.backbones import (
    REGISTRY,
    BackboneSpec,
    build_model,
    load_backbone,
    reference_heads_variant,
    resolve_spec,
    weights_path,
)
from cause_cli.backbones.pos_embed import resize_grid
from cause_cli.cli import app
from cause_cli.data.synthetic import write_scenes
from cause_cli.errors import CauseError

from .fake_hub import FakeHub, closed_port_url, forbid_remote_connections, point_hub_at
from .helpers import assert_close

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_sentence(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return " ".join(result.stderr.split())


# ----------------------------------------------------------------------------- small checkpoints


def tiny(base: str, name: str, img_size: int, resolution: int, dim: int = 32, heads: int = 2) -> BackboneSpec:
    """``base``'s architecture (timm's model code), two blocks of width ``dim``, pretrained on
    ``img_size`` and run at ``resolution``, served from ``tests/<name>``."""
    spec = REGISTRY[base]
    return dataclasses.replace(
        spec,
        name=name,
        hub_repo=f"tests/{name}" if spec.source == "hub" else None,
        dim=dim,
        depth=2,
        num_heads=heads,
        img_size=img_size,
        resolution=resolution,
    )


# The pretrained grid differs from the run's in every family, growing (8 -> 12, as DINO's
# 28 -> 40) or shrinking (8 -> 6, as DINOv2's 37 -> 23).
FAMILIES = {
    "dino": tiny("dino-vits8", "tiny-dino", 64, 96, dim=48, heads=4),
    "dinov2": tiny("dinov2-vits14", "tiny-dinov2", 112, 84),
    "dinov2-reg": tiny("dinov2-vits14-reg", "tiny-dinov2-reg", 112, 84),
    "mae": tiny("mae-vitb16", "tiny-mae", 64, 96),
    "dinov3": tiny("dinov3-vits16", "tiny-dinov3", 64, 96),
}
IBOT = tiny("ibot-vitb16", "tiny-ibot", 64, 96)
MSN = tiny("msn-vits16", "tiny-msn", 64, 96)
TINY_DINO = FAMILIES["dino"]
TINY_DINO_12 = reference_heads_variant(TINY_DINO)
TINY_SPECS = [*FAMILIES.values(), IBOT, MSN, TINY_DINO_12]


def random_state(spec: BackboneSpec, seed: int) -> dict[str, torch.Tensor]:
    """Weights of ``spec``'s architecture, every tensor random (timm leaves some at 0 or 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # shapes only
        state = build_model(spec).state_dict()
    return {key: torch.randn(value.shape, generator=generator) * 0.2 for key, value in state.items()}


def images_for(spec: BackboneSpec, count: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, spec.resolution, spec.resolution, generator=generator)


@pytest.fixture(scope="module")
def hub():
    server = FakeHub().start()
    for seed, spec in enumerate([*FAMILIES.values()]):
        assert spec.hub_repo is not None
        server.add(spec.hub_repo, "model.safetensors", save(random_state(spec, seed)))
    # A repository with only the pickle timm falls back to, and one with no weights at all.
    buffer = io.BytesIO()
    torch.save(random_state(TINY_DINO, 40), buffer)
    server.add("tests/tiny-dino-bin", "pytorch_model.bin", buffer.getvalue())
    server.add("tests/no-weights", "README.md", b"nothing here\n")
    server.gated.add("tests/gated")
    server.private.add("tests/private")
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    """This test's caches in tmp_path, the tiny backbones registered, Hub requests to ``hub``."""
    point_hub_at(monkeypatch, hub.url, tmp_path / "hf")
    monkeypatch.setenv("CAUSE_HOME", str(tmp_path / "cause"))
    forbid_remote_connections(monkeypatch)
    for spec in TINY_SPECS:
        monkeypatch.setitem(REGISTRY, spec.name, spec)
    hub.requests.clear()
    return hub


def served_file(hub: FakeHub, spec: BackboneSpec, tmp_path: pathlib.Path) -> pathlib.Path:
    assert spec.hub_repo is not None
    path = tmp_path / f"{spec.name}.safetensors"
    path.write_bytes(hub.files[(spec.hub_repo, "model.safetensors")])
    return path


# ----------------------------------------------------------------------------- independent references


def cubic_kernel(distance: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel with PyTorch's a = -0.75."""
    x = abs(distance)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def bicubic_matrix(size_in: int, size_out: int, step: float) -> np.ndarray:
    """Rows: output samples at source position (o + 0.5) * step - 0.5, four taps, edges repeated."""
    matrix = np.zeros((size_out, size_in))
    for out in range(size_out):
        source = (out + 0.5) * step - 0.5
        base = math.floor(source)
        for tap in range(base - 1, base + 3):
            matrix[out, min(max(tap, 0), size_in - 1)] += cubic_kernel(source - tap)
    return matrix


def independent_resize(grid: np.ndarray, size: tuple[int, int], rule: str) -> np.ndarray:
    """Position embeddings ``[D, n, m]`` resized by the reference's rule, in float64 with numpy.

    dino: PyTorch's bicubic given scale factor (g + 0.1) / n samples the source at
    (o + 0.5) * n / (g + 0.1) - 0.5; msn: resizing to g samples it at (o + 0.5) * n / g - 0.5.
    """
    rows, columns = grid.shape[1:]
    if (rows, columns) == size:
        return grid
    offset = 0.1 if rule == "dino" else 0.0
    down = bicubic_matrix(rows, size[0], rows / (size[0] + offset))
    across = bicubic_matrix(columns, size[1], columns / (size[1] + offset))
    return np.einsum("yi,dij,xj->dyx", down, grid, across)


def timm_direct(spec: BackboneSpec, weights: pathlib.Path, **overrides) -> torch.nn.Module:
    """The same weights loaded the plain timm way, resizing positions by timm's own rule."""
    import timm

    kwargs = dict(num_classes=0, dynamic_img_size=True, embed_dim=spec.dim, depth=spec.depth)
    kwargs.update(num_heads=spec.num_heads, img_size=spec.img_size)
    kwargs.update(overrides)
    model = timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)
    return model.eval()


def timm_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(images)[:, model.num_prefix_tokens :]


def reference_rule_tokens(
    spec: BackboneSpec, state: dict[str, torch.Tensor], images: torch.Tensor, rule: str
) -> torch.Tensor:
    """Tokens of a timm ViT built for the run's input size whose position embeddings were
    resized by :func:`independent_resize` beforehand."""
    import timm

    grid = images.shape[-1] // spec.patch_size
    kwargs = dict(num_classes=0, embed_dim=spec.dim, depth=spec.depth, num_heads=spec.num_heads)
    model = timm.create_model(spec.timm_name, pretrained=False, img_size=images.shape[-1], **kwargs).eval()
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    stored = spec.img_size // spec.patch_size
    positions = state["pos_embed"][0, prefix:].reshape(stored, stored, spec.dim).permute(2, 0, 1)
    resized = independent_resize(positions.double().numpy(), (grid, grid), rule)
    patch_positions = torch.from_numpy(resized).permute(1, 2, 0).reshape(1, grid * grid, spec.dim).float()
    model.load_state_dict({**state, "pos_embed": torch.cat([state["pos_embed"][:, :prefix], patch_positions], 1)})
    return timm_tokens(model, images)


# ----------------------------------------------------------------------------- the registry


def test_registry_entries_match_timm_architectures():
    import timm

    wanted = {"dino-vits8", "dino-vits16", "dino-vitb8", "dino-vitb16", "dinov2-vits14", "dinov2-vitb14"}
    wanted |= {"dinov2-vits14-reg", "dinov2-vitb14-reg", "mae-vitb16", "ibot-vitb16", "msn-vits16"}
    wanted |= {"dinov3-vits16", "dinov3-vitb16", "dinov3-vitl16", "dino-vits8-12heads", "dino-vits16-12heads"}
    assert wanted <= set(REGISTRY)
    for spec in REGISTRY.values():
        if spec.local:
            continue
        with torch.device("meta"):
            model = timm.create_model(spec.timm_name, num_classes=0, num_heads=spec.num_heads or None)
        assert model.patch_embed.patch_size[0] == spec.patch_size, spec.name
        assert model.embed_dim == spec.dim, spec.name
        assert model.num_prefix_tokens == spec.prefix_tokens, spec.name
        assert sum(p.numel() for p in model.parameters()) == spec.parameters, spec.name
        assert spec.resolution == (322 if spec.patch_size == 14 else 320)
        assert (spec.pos_embed == "rope") == (getattr(model, "pos_embed", None) is None), spec.name
        assert spec.licence and (spec.hub_repo == f"timm/{spec.timm_name}" or spec.source == "file")
        if spec.reference_heads:
            assert model.blocks[0].attn.num_heads == 12 and spec.weights in REGISTRY
        elif spec.family == "dino" and spec.dim == 384:
            assert model.blocks[0].attn.num_heads == 6  # the true DINO ViT-S stays the default
    assert REGISTRY["dinov3-vits16"].prefix_tokens == 5 and REGISTRY["mae-vitb16"].licence == "CC-BY-NC-4.0"
    assert REGISTRY["msn-vits16"].pos_embed == "msn"


def test_unknown_names_get_a_suggestion():
    assert "Did you mean 'dinov2-vitb14-reg'" in one_sentence(invoke("fetch", "dinov2-vitb14-regs"))
    with pytest.raises(CauseError, match="Did you mean 'dino-vits8-12heads'"):
        resolve_spec("dino-vits8-12head")
    with pytest.raises(CauseError, match="Unknown backbone"):
        resolve_spec("not_a_timm_model_at_all")


# ----------------------------------------------------------------------------- position embeddings


@pytest.mark.parametrize(
    ("stored", "target"), [((28, 28), (40, 40)), ((37, 37), (23, 23)), ((14, 14), (20, 20)), ((4, 4), (6, 5))]
)
@pytest.mark.parametrize("rule", ["dino", "msn"])
def test_position_rules_match_an_independent_bicubic(stored, target, rule):
    generator = torch.Generator().manual_seed(1)
    grid = torch.randn(1, 16, *stored, generator=generator)
    ours = resize_grid(grid, target, rule)
    expected = independent_resize(grid[0].double().numpy(), target, rule)
    assert ours.shape == (1, 16, *target)
    assert_close(ours[0], expected, rtol=1e-5)
    assert resize_grid(grid, stored, rule) is grid  # the reference uses a fitting grid as it is


def test_dino_rule_differs_from_timms():
    from timm.layers import resample_abs_pos_embed

    grid = torch.randn(1, 16, 28, 28, generator=torch.Generator().manual_seed(2))
    flat = grid.flatten(2).transpose(1, 2)
    timms = resample_abs_pos_embed(flat, new_size=(40, 40), old_size=(28, 28), num_prefix_tokens=0)
    ours = resize_grid(grid, (40, 40), "dino").flatten(2).transpose(1, 2)
    assert (timms - ours).abs().max() > 1e-3


# ----------------------------------------------------------------------------- fetch, then load


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fetch_then_load_gives_timms_tokens(family, hub_env, tmp_path):
    spec = FAMILIES[family]
    result = invoke("fetch", spec.name, "--quiet")
    assert result.exit_code == 0, result.output
    stored = weights_path(spec)
    assert f"{spec.name}: {stored}" in " ".join(result.stdout.split())
    record = json.loads(stored.with_name("backbone.json").read_text())
    assert record["hub_repo"] == spec.hub_repo and record["commit"] == hub_env.commit(spec.hub_repo)
    assert record["sha256"] == backbones.file_sha256(stored)

    images = images_for(spec)
    served = served_file(hub_env, spec, tmp_path)
    expected_timm = timm_tokens(timm_direct(spec, served), images)
    with_timm_rule = load_backbone(spec.name, pos_embed="timm")
    assert with_timm_rule.pos_embed_rule == ("rope" if family == "dinov3" else "timm")
    assert_close(with_timm_rule(images), expected_timm, rtol=1e-5)

    backbone = load_backbone(spec.name)  # the default: the reference rule
    tokens = backbone(images)
    grid = spec.resolution // spec.patch_size
    assert tokens.shape == (2, grid * grid, spec.dim) and tokens.dtype == torch.float32
    assert backbone.num_prefix_tokens == spec.prefix_tokens
    if family == "dinov3":
        assert backbone.pos_embed_rule == "rope"
        assert_close(tokens, expected_timm, rtol=1e-5)
    else:
        assert backbone.pos_embed_rule == "dino"
        from safetensors.torch import load_file

        state = load_file(str(served))
        assert_close(tokens, reference_rule_tokens(spec, state, images, "dino"), rtol=1e-4)
        assert (tokens - expected_timm).abs().max() > 1e-4  # the two rules do give other features
    assert torch.equal(backbone.extract(images, batch_size=1), tokens)
    assert torch.equal(copy.deepcopy(backbone)(images), tokens)


def test_a_second_fetch_and_cached_loads_make_no_request(hub_env, tmp_path):
    name = TINY_DINO.name
    assert invoke("fetch", name, "--quiet").exit_code == 0
    assert [r.method for r in hub_env.requests].count("GET") == 1
    hub_env.requests.clear()
    assert invoke("fetch", name, "--quiet").exit_code == 0
    load_backbone(name)
    variant = load_backbone(TINY_DINO_12.name)  # shares the weights: nothing to download
    assert hub_env.requests == []
    assert variant.sha256 == load_backbone(name).sha256
    listing = invoke("fetch", "--list")
    row = next(line for line in listing.stdout.splitlines() if line.split()[:1] == [name])
    assert row.split()[-1] == "yes"
    load_backbone(FAMILIES["mae"].name)  # not cached yet: fetched on first use
    assert [r.method for r in hub_env.requests].count("GET") == 1
    elsewhere = tmp_path / "elsewhere"
    assert invoke("fetch", name, "--cache-dir", elsewhere, "--quiet").exit_code == 0
    assert (elsewhere / "backbones" / name / "model.safetensors").is_file()
    assert load_backbone(name, cache_dir=elsewhere).sha256 == variant.sha256


def test_offline_mode_loads_the_cache_and_fails_at_once_otherwise(hub_env, monkeypatch, tmp_path):
    assert invoke("fetch", TINY_DINO.name, "--quiet").exit_code == 0
    hub_env.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_backbone(TINY_DINO.name)(images_for(TINY_DINO, 1)).shape[1] == 144
    started = time.perf_counter()
    message = one_sentence(invoke("fetch", FAMILIES["mae"].name))
    assert time.perf_counter() - started < 3
    assert "not cached" in message and "HF_HUB_OFFLINE" in message
    # huggingface_hub's own cache still serves offline when only the toolkit's copy is gone.
    shutil.rmtree(weights_path(TINY_DINO).parent)
    assert invoke("fetch", TINY_DINO.name, "--quiet").exit_code == 0
    assert hub_env.requests == []


def test_an_unreachable_hub_fails_at_once_with_one_sentence(hub_env, monkeypatch, tmp_path):
    assert invoke("fetch", FAMILIES["mae"].name, "--quiet").exit_code == 0
    point_hub_at(monkeypatch, closed_port_url(), tmp_path / "other-hf-cache")
    started = time.perf_counter()
    message = one_sentence(invoke("fetch", TINY_DINO.name))
    assert time.perf_counter() - started < 5
    assert "Cannot reach the Hub" in message and "not cached" in message
    with pytest.raises(CauseError, match="Cannot reach the Hub"):
        load_backbone(TINY_DINO.name)
    load_backbone(FAMILIES["mae"].name)  # what is cached needs no network


@pytest.mark.parametrize(
    ("repo", "revision", "fragment"),
    [
        ("tests/nowhere", None, "The Hub has no repository tests/nowhere."),
        ("tests/no-weights", None, "has no model.safetensors or pytorch_model.bin"),
        ("tests/tiny-dino", "v9", "has no revision 'v9'"),
        ("tests/gated", None, "is gated: accept its licence on"),
        ("tests/private", None, "private, gated or missing"),
    ],
)
def test_missing_or_closed_repositories_get_one_sentence(hub_env, monkeypatch, repo, revision, fragment):
    spec = dataclasses.replace(TINY_DINO, name="tiny-elsewhere", hub_repo=repo)
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    message = one_sentence(invoke("fetch", spec.name, *(["--revision", revision] if revision else [])))
    assert fragment in message
    if "licence" in fragment or "private" in fragment:
        assert "hf auth login" in message and f"{hub_env.url}/{repo}" in message
    assert not weights_path(spec).exists()


def test_pinned_revision_and_pickle_fallback(hub_env, monkeypatch):
    spec = dataclasses.replace(TINY_DINO, name="tiny-dino-bin", hub_repo="tests/tiny-dino-bin")
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    commit = hub_env.commit("tests/tiny-dino-bin")
    assert invoke("fetch", spec.name, "--revision", commit, "--quiet").exit_code == 0
    record = json.loads(weights_path(spec).with_name("backbone.json").read_text())
    assert record["hub_file"] == "pytorch_model.bin" and record["commit"] == commit
    loaded = load_backbone(spec.name).model.state_dict()
    served = torch.load(io.BytesIO(hub_env.files[("tests/tiny-dino-bin", "pytorch_model.bin")]), weights_only=True)
    assert all(torch.equal(loaded[key], value) for key, value in served.items())


def test_a_download_cut_off_halfway_is_resumed(hub_env, monkeypatch, tmp_path):
    # huggingface_hub writes 10 MiB chunks, so resuming shows only in a file of more than 20 MiB.
    spec = tiny("mae-vitb16", "tiny-wide", 64, 96, dim=512, heads=8)
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    hub_env.add(spec.hub_repo, "model.safetensors", save(random_state(spec, 5)))
    key = (spec.hub_repo, "model.safetensors")
    hub_env.cut_once.add(key)
    assert invoke("fetch", spec.name, "--quiet").exit_code == 0
    ranges = [request.range for request in hub_env.requests if request.method == "GET"]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] is not None
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(hub_env.files[key]) // 2  # the second request asked only for the rest
    images = images_for(spec, 1)
    expected = timm_tokens(timm_direct(spec, served_file(hub_env, spec, tmp_path)), images)
    assert_close(load_backbone(spec.name, pos_embed="timm")(images), expected, rtol=1e-5)


def test_a_corrupted_download_is_caught_and_removed(hub_env):
    spec = FAMILIES["dinov2"]
    key = (spec.hub_repo, "model.safetensors")
    hub_env.corrupt.add(key)
    try:
        assert "does not match the Hub's checksum" in one_sentence(invoke("fetch", spec.name, "--quiet"))
    finally:
        hub_env.corrupt.discard(key)
    assert not weights_path(spec).exists()
    assert invoke("fetch", spec.name, "--quiet").exit_code == 0  # downloaded anew, not the bad blob


def test_a_corrupted_stored_file_is_detected(hub_env):
    spec = FAMILIES["dinov3"]
    assert invoke("fetch", spec.name, "--quiet").exit_code == 0
    stored = weights_path(spec)
    data = bytearray(stored.read_bytes())
    data[-5] ^= 0x40  # a flipped bit in the last tensor: safetensors itself would not notice
    stored.write_bytes(bytes(data))
    with pytest.raises(CauseError, match="are damaged; run 'cause fetch tiny-dinov3 --force'"):
        load_backbone(spec.name)
    assert invoke("fetch", spec.name, "--force", "--quiet").exit_code == 0
    load_backbone(spec.name)


def test_reference_heads_variant_is_recorded_and_computes_12_heads(hub_env, tmp_path):
    assert invoke("fetch", TINY_DINO_12.name, "--quiet").exit_code == 0
    assert weights_path(TINY_DINO_12) == weights_path(TINY_DINO)  # one file for both
    images = images_for(TINY_DINO, 1)
    served = served_file(hub_env, TINY_DINO, tmp_path)
    twelve = load_backbone(TINY_DINO_12.name, pos_embed="timm")
    assert_close(twelve(images), timm_tokens(timm_direct(TINY_DINO, served, num_heads=12), images), rtol=1e-5)
    true = load_backbone(TINY_DINO.name, pos_embed="timm")
    assert (twelve(images) - true(images)).abs().max() > 1e-3
    record = load_backbone(TINY_DINO_12.name).describe()
    assert record["name"] == "tiny-dino-12heads" and record["reference_heads"] and record["num_heads"] == 12
    assert record["pos_embed"] == "dino" and record["sha256"] == true.sha256
    assert load_backbone(TINY_DINO.name).describe()["num_heads"] == 4


# ----------------------------------------------------------------------------- iBOT and MSN from the authors' files


def authors_layout(layout: str, state: dict[str, torch.Tensor]) -> dict:
    generator = torch.Generator().manual_seed(9)

    def extra(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    if layout == "ibot-teacher":  # checkpoint_teacher.pth
        return {"state_dict": {**state, "masked_embed": extra(1, 32), "head.mlp.0.weight": extra(64, 32)}}
    if layout == "ibot-full":  # checkpoint.pth: student and teacher with their heads, and the arguments
        teacher = {f"backbone.{k}": v for k, v in state.items()} | {"head.last_layer.weight_g": extra(8, 1)}
        student = {f"module.{k}": v + 1 for k, v in teacher.items()}
        return {"student": student, "teacher": teacher, "epoch": 3, "args": Namespace(arch="vit_base")}
    # msn: vits16_800ep.pth.tar, DistributedDataParallel prefixes, a projection head, prototypes
    target = {f"module.{k}": v for k, v in state.items()} | {"module.fc.fc1.weight": extra(64, 32)}
    encoder = {key: value + 1 for key, value in target.items()}
    return {"encoder": encoder, "target_encoder": target, "prototypes": extra(16, 8), "epoch": 800, "lr": 0.001}


@pytest.mark.parametrize("layout", ["ibot-teacher", "ibot-full", "msn"])
def test_authors_checkpoints_are_converted(layout, hub_env, tmp_path):
    spec = MSN if layout == "msn" else IBOT
    state = random_state(spec, 7)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save(authors_layout(layout, state), checkpoint)

    message = one_sentence(invoke("fetch", spec.name))
    assert (
        "--from-file" in message
        and ("vits16_800ep.pth.tar" if layout == "msn" else "checkpoint_teacher.pth") in message
    )
    result = invoke("fetch", spec.name, "--from-file", checkpoint, "--quiet")
    assert result.exit_code == 0, result.output
    assert hub_env.requests == []

    images = images_for(spec, 1)
    backbone = load_backbone(spec.name)
    assert backbone.pos_embed_rule == ("msn" if layout == "msn" else "dino")
    assert_close(backbone(images), reference_rule_tokens(spec, state, images, backbone.pos_embed_rule), rtol=1e-4)
    save_file(state, str(tmp_path / "timm-form.safetensors"))
    expected = timm_tokens(timm_direct(spec, tmp_path / "timm-form.safetensors"), images)
    assert_close(load_backbone(spec.name, pos_embed="timm")(images), expected, rtol=1e-5)
    assert backbone.describe()["converted_from"] == str(checkpoint.resolve())


def test_unsafe_or_foreign_checkpoints_are_refused(hub_env, tmp_path):
    state = random_state(IBOT, 8)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": state, "path": pathlib.PurePosixPath("/x")}, unsafe)
    assert "holds Python objects besides tensors" in one_sentence(invoke("fetch", IBOT.name, "--from-file", unsafe))
    not_a_vit = tmp_path / "other.pth"
    torch.save({"state_dict": {"conv.weight": torch.zeros(3)}}, not_a_vit)
    assert "does not look like a ViT" in one_sentence(invoke("fetch", IBOT.name, "--from-file", not_a_vit))
    wrong_width = tmp_path / "wrong.pth"
    torch.save({"state_dict": random_state(MSN, 8) | {"pos_embed": torch.zeros(1, 17, 8)}}, wrong_width)
    assert "do not fit its architecture" in one_sentence(invoke("fetch", IBOT.name, "--from-file", wrong_width))
    assert not weights_path(IBOT).exists()


# ----------------------------------------------------------------------------- any timm model, any hf-hub id


def test_hf_hub_ids_and_timm_names(hub_env, tmp_path, monkeypatch):
    config = {
        "architecture": "vit_small_patch16_224",
        "model_args": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64},
        "pretrained_cfg": {"license": "mit"},
    }
    custom = tiny("mae-vitb16", "custom", 64, 96)
    hub_env.add("tests/custom", "config.json", json.dumps(config).encode())
    hub_env.add("tests/custom", "model.safetensors", save(random_state(custom, 11)))
    assert invoke("fetch", "hf-hub:tests/custom", "--quiet").exit_code == 0
    backbone = load_backbone("hf-hub:tests/custom")
    assert (backbone.spec.licence, backbone.patch_size, backbone.dim, backbone.spec.resolution) == ("mit", 16, 32, 320)
    assert backbone(torch.randn(1, 3, 64, 64)).shape == (1, 16, 32)
    assert "hf-hub:tests/custom" in invoke("fetch", "--list").stdout

    import timm

    name = "vit_tiny_patch16_224.augreg_in21k"  # timm's smallest ViT; served with a classifier to drop
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in timm.create_model(name, num_classes=10).state_dict().items()}
    state = {key: torch.randn(shape, generator=torch.Generator().manual_seed(6)) for key, shape in shapes.items()}
    hub_env.add(f"timm/{name}", "model.safetensors", save(state))
    hub_env.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_backbone("hf-hub:tests/custom").sha256 == backbone.sha256  # known offline from its cached record
    assert "HF_HUB_OFFLINE" in one_sentence(invoke("fetch", name))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert invoke("fetch", name, "--quiet").exit_code == 0
    tiny_vit = load_backbone(name)
    assert (tiny_vit.dim, tiny_vit.spec.family, tiny_vit.spec.licence) == (192, "timm", "apache-2.0")
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    save_file(state, str(tmp_path / "tiny-vit.safetensors"))
    model = timm.create_model(name, pretrained=True, num_classes=0, dynamic_img_size=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "tiny-vit.safetensors")))  # fmt: skip
    assert_close(load_backbone(name, pos_embed="timm")(image), timm_tokens(model.eval(), image), rtol=1e-5)
    with pytest.raises(CauseError, match="not a vision transformer"):
        resolve_spec("resnet18.a1_in1k")


# ----------------------------------------------------------------------------- a full-size ViT-S/8


@pytest.fixture(scope="module")
def vits8_home(hub, tmp_path_factory):
    """A random full-size DINO ViT-S/8 served where timm's weights are, and caches for it."""
    import timm

    spec = REGISTRY["dino-vits8"]
    with torch.device("meta"):  # shapes only: random values are quicker than timm's initialisation
        shapes = {
            key: value.shape for key, value in timm.create_model(spec.timm_name, num_classes=0).state_dict().items()
        }
    generator = torch.Generator().manual_seed(3)
    state = {key: torch.randn(shape, generator=generator) * 0.05 for key, shape in shapes.items()}
    hub.add(spec.hub_repo, "model.safetensors", save(state))
    return tmp_path_factory.mktemp("vits8")


@pytest.fixture
def vits8_env(hub_env, vits8_home, monkeypatch):
    point_hub_at(monkeypatch, hub_env.url, vits8_home / "hf")
    monkeypatch.setenv("CAUSE_HOME", str(vits8_home / "cause"))
    return vits8_home


def test_full_size_dino_vits8_fetches_and_gives_1600_tokens(vits8_env):
    result = invoke("fetch", "dino-vits8", "--quiet")
    assert result.exit_code == 0, result.output
    stored = vits8_env / "cause" / "backbones" / "dino-vits8" / "model.safetensors"
    assert stored.is_file() and f"dino-vits8: {stored}" in " ".join(result.stdout.split())
    backbone = load_backbone("dino-vits8")
    assert backbone.num_heads == 6 and backbone.pos_embed_rule == "dino"
    image = torch.randn(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    tokens = backbone(image)
    assert tokens.shape == (1, 1600, 384)
    assert torch.isfinite(tokens).all()


def test_train_with_dino_vits8_from_the_cache(vits8_env, hub_env, monkeypatch, tmp_path):
    assert invoke("fetch", "dino-vits8", "--quiet").exit_code == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # from the cache only
    hub_env.requests.clear()
    scenes = write_scenes(tmp_path / "scenes", num_train=8, num_val=2, seed=2, size_range=(64, 80))
    run = tmp_path / "run"
    common = ["--data-dir", scenes, "--run", run, "--resolution", "64", "--clusterbook-size", "32"]
    common += ["--batch-size", "8", "--epochs-front-door", "1", "--min-updates", "0", "--device", "cpu", "--quiet"]
    result = invoke("train", "--backbone", "dino-vits8", *common)
    assert result.exit_code == 0, result.output
    assert hub_env.requests == []
    info = json.loads((run / "run.json").read_text())
    recorded = info["backbone"]
    assert recorded["name"] == "dino-vits8" and recorded["num_heads"] == 6 and not recorded["reference_heads"]
    stored = vits8_env / "cause" / "backbones" / "dino-vits8" / "model.safetensors"
    assert recorded["sha256"] == backbones.file_sha256(stored)
    assert recorded["pos_embed"] == "dino" and recorded["hub_repo"] == "timm/vit_small_patch8_224.dino"
    assert info["config"]["pos_embed"] == "reference"
    for name in ("clusterbook.safetensors", "head.safetensors", "probe.safetensors"):
        assert (run / name).is_file()
    message = one_sentence(invoke("train", "--backbone", "dino-vits8-12heads", *common))
    assert "was made with backbone 'dino-vits8', not 'dino-vits8-12heads'" in message
