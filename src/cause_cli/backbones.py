"""Frozen self-supervised ViT backbones: the registry, the cache, loading and token extraction.

Every backbone, the tiny ``toy`` one included, goes through the same path: a weights file
in the toolkit's cache (safetensors, in timm's layout), a timm model built from its registry
entry, and :class:`FrozenBackbone`, which returns the patch tokens of the last block after
the final norm with the prefix tokens (class, registers) dropped.

Cache layout (``$CAUSE_HOME``, default ``~/.cache/cause``)::

    backbones/<name>/model.safetensors   the weights, timm's key names
    backbones/<name>/backbone.json       the registry entry, where the weights came from
                                         (Hub repository, revision, commit, or the converted
                                         file) and the SHA-256 of model.safetensors

Besides the registry's short names, :func:`resolve_spec` accepts any timm model name with
weights on the Hub (``vit_small_patch16_224.augreg_in21k``) and ``hf-hub:ORG/NAME`` ids of
timm-form repositories.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .devices import autocast
from .errors import CauseError
from .paths import cache_home, write_atomically, write_json
from .pos_embed import POS_EMBED_CHOICES, install_pos_embed_rule
from .progress import Reporter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PAPER_RESOLUTION = 320
HF_HUB_PREFIX = "hf-hub:"
REFERENCE_HEADS_SUFFIX = "-12heads"
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "backbone.json"
# What fetch asks a Hub repository for, in this order (as timm does).
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def paper_resolution(patch_size: int) -> int:
    """The paper's input size: 320, or the nearest multiple of the patch (322 for patch 14)."""
    return max(1, round(PAPER_RESOLUTION / patch_size)) * patch_size


@dataclass(frozen=True)
class BackboneSpec:
    """What the toolkit knows about one backbone."""

    name: str
    family: str
    timm_name: str  # timm architecture (with its pretrained tag when the weights come from timm)
    patch_size: int
    dim: int
    resolution: int
    licence: str
    hub_repo: str | None = None  # None: made locally (toy) or converted from the authors' file
    num_heads: int | None = None  # None: timm's own number for the architecture
    depth: int | None = None  # None: timm's
    img_size: int | None = None  # pretrained input size (position-embedding grid); None: timm's
    prefix_tokens: int = 1  # tokens before the patches that are dropped: class (+ registers)
    parameters: int | None = None
    pos_embed: str = "dino"  # the reference code's position rule (pos_embed.py); rope: none needed
    source: str = "hub"  # hub, local (the toy, made here) or file (converted from a checkpoint)
    weights: str | None = None  # the entry whose cached weights this one shares; None: its own
    reference_heads: bool = False  # the reference's 12-head ViT-S (METHOD.md section 0)
    published_at: str | None = None  # where the authors publish the checkpoint (source file)
    model_args: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def local(self) -> bool:
        return self.source == "local"

    @property
    def weights_name(self) -> str:
        return self.weights or self.name


TOY = BackboneSpec(
    name="toy",
    family="toy",
    timm_name="vit_toy_patch8",
    patch_size=8,
    dim=96,
    resolution=128,
    licence="Apache-2.0",
    num_heads=4,
    depth=2,
    parameters=267_168,
    pos_embed="timm",
    source="local",
)
TOY_SEED = 20231011

APACHE = "Apache-2.0"
NON_COMMERCIAL = "CC-BY-NC-4.0"
DINOV3_LICENCE = "DINOv3 gated"
IBOT_PUBLISHED = (
    "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vitb_16/checkpoint_teacher.pth "
    "(listed at https://github.com/bytedance/ibot)"
)
MSN_PUBLISHED = (
    "https://dl.fbaipublicfiles.com/msn/vits16_800ep.pth.tar (listed at https://github.com/facebookresearch/msn)"
)


def _hub(
    name: str,
    family: str,
    timm_name: str,
    patch: int,
    dim: int,
    licence: str,
    parameters: int,
    prefix_tokens: int = 1,
    pos_embed: str = "dino",
) -> BackboneSpec:
    return BackboneSpec(
        name,
        family,
        timm_name,
        patch,
        dim,
        paper_resolution(patch),
        licence,
        hub_repo=f"timm/{timm_name}",
        prefix_tokens=prefix_tokens,
        parameters=parameters,
        pos_embed=pos_embed,
    )


def _file(
    name: str,
    family: str,
    timm_name: str,
    patch: int,
    dim: int,
    licence: str,
    parameters: int,
    published_at: str,
    pos_embed: str = "dino",
) -> BackboneSpec:
    """An entry converted from the authors' own checkpoint (``cause fetch NAME --from-file``)."""
    return BackboneSpec(
        name,
        family,
        timm_name,
        patch,
        dim,
        paper_resolution(patch),
        licence,
        parameters=parameters,
        pos_embed=pos_embed,
        source="file",
        published_at=published_at,
    )


def reference_heads_variant(spec: BackboneSpec) -> BackboneSpec:
    """The reference's ViT-S with 12 attention heads on the same weights (METHOD.md section 0)."""
    return dataclasses.replace(
        spec, name=spec.name + REFERENCE_HEADS_SUFFIX, num_heads=12, reference_heads=True, weights=spec.weights_name
    )


_ENTRIES = [
    TOY,
    _hub("dino-vits8", "dino", "vit_small_patch8_224.dino", 8, 384, APACHE, 21_670_272),
    _hub("dino-vits16", "dino", "vit_small_patch16_224.dino", 16, 384, APACHE, 21_665_664),
    _hub("dino-vitb8", "dino", "vit_base_patch8_224.dino", 8, 768, APACHE, 85_807_872),
    _hub("dino-vitb16", "dino", "vit_base_patch16_224.dino", 16, 768, APACHE, 85_798_656),
    _hub("dinov2-vits14", "dinov2", "vit_small_patch14_dinov2.lvd142m", 14, 384, APACHE, 22_056_192),
    _hub("dinov2-vitb14", "dinov2", "vit_base_patch14_dinov2.lvd142m", 14, 768, APACHE, 86_579_712),
    _hub("dinov2-vits14-reg", "dinov2", "vit_small_patch14_reg4_dinov2.lvd142m", 14, 384, APACHE, 22_057_344, 5),
    _hub("dinov2-vitb14-reg", "dinov2", "vit_base_patch14_reg4_dinov2.lvd142m", 14, 768, APACHE, 86_582_016, 5),
    _hub("mae-vitb16", "mae", "vit_base_patch16_224.mae", 16, 768, NON_COMMERCIAL, 85_798_656),
    _file("ibot-vitb16", "ibot", "vit_base_patch16_224", 16, 768, APACHE, 85_798_656, IBOT_PUBLISHED),
    _file("msn-vits16", "msn", "vit_small_patch16_224", 16, 384, NON_COMMERCIAL, 21_665_664, MSN_PUBLISHED, "msn"),
    _hub(
        "dinov3-vits16", "dinov3", "vit_small_patch16_dinov3.lvd1689m", 16, 384, DINOV3_LICENCE, 21_586_944, 5, "rope"
    ),
    _hub("dinov3-vitb16", "dinov3", "vit_base_patch16_dinov3.lvd1689m", 16, 768, DINOV3_LICENCE, 85_641_216, 5, "rope"),
    _hub(
        "dinov3-vitl16", "dinov3", "vit_large_patch16_dinov3.lvd1689m", 16, 1024, DINOV3_LICENCE, 303_079_424, 5, "rope"
    ),
]

REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in _ENTRIES}
for _base in ("dino-vits8", "dino-vits16"):
    _variant = reference_heads_variant(REGISTRY[_base])
    REGISTRY[_variant.name] = _variant


# ----------------------------------------------------------------------------- names


def resolve_spec(name: str, cache_dir: Path | None = None) -> BackboneSpec:
    """The registry entry for ``name``, or one made for a timm model name or an ``hf-hub:``
    id; an unknown name gets a suggestion."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(HF_HUB_PREFIX) or "_" in name:  # timm's names use underscores, the registry's hyphens
        cached = _read_json(_folder(cache_dir, _folder_name(name)) / METADATA_FILE)
        if cached is not None and cached.get("name") == name:
            return spec_from_record(cached)  # known from its fetch: no network, no model to build
    if name.startswith(HF_HUB_PREFIX):
        return _hf_hub_spec(name)
    if "_" in name:
        spec = _timm_spec(name)
        if spec is not None:
            return spec
    close = difflib.get_close_matches(name, list(REGISTRY), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else f" Known backbones: {', '.join(REGISTRY)}."
    raise CauseError(f"Unknown backbone '{name}'.{hint}")


def _timm_spec(name: str) -> BackboneSpec | None:
    """An entry for a timm model name with weights on the Hub; None when timm does not know it."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    architecture, _ = split_model_name_tag(name)
    if not timm.is_model(architecture):
        return None
    try:
        config = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:
        config = None
    hub_id = getattr(config, "hf_hub_id", None) if config is not None else None
    if not hub_id or config is None:
        raise CauseError(
            f"timm has no weights on the Hub for '{name}'; choose a tagged name from "
            f"timm.list_models('{architecture}*', pretrained=True)."
        )
    full_name = f"{architecture}.{config.tag}" if getattr(config, "tag", None) else architecture
    licence = getattr(config, "license", None) or "see the model card"
    return _derived_spec(name, full_name, hub_id, licence, {})


def _hf_hub_spec(name: str) -> BackboneSpec:
    """An entry for a timm-form Hub repository, from its config.json."""
    repo = name[len(HF_HUB_PREFIX) :]
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise CauseError(f"'{name}' is not an hf-hub id; write hf-hub:ORGANISATION/NAME.")
    from . import hub

    config_file = hub.download(repo, ["config.json"], what=f"backbone '{name}'")
    try:
        config = json.loads(config_file.path.read_text())
        architecture = config["architecture"]
    except (ValueError, KeyError, TypeError) as error:
        raise CauseError(f"The config.json of {repo} is not a timm model configuration.") from error
    licence = (config.get("pretrained_cfg") or {}).get("license") or "see the model card"
    return _derived_spec(name, architecture, repo, licence, dict(config.get("model_args") or {}))


def _derived_spec(name: str, timm_name: str, hub_repo: str, licence: str, model_args: dict[str, Any]) -> BackboneSpec:
    """An entry whose architecture facts are read off the timm model (built without memory)."""
    import timm

    model: Any
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, **model_args)
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(model, "num_prefix_tokens"):
        raise CauseError(f"'{name}' is not a vision transformer with patch tokens, so CAUSE cannot use it.")
    patch = int(patch_embed.patch_size[0])
    has_positions = getattr(model, "pos_embed", None) is not None
    return BackboneSpec(
        name=name,
        family="timm",
        timm_name=timm_name,
        patch_size=patch,
        dim=int(model.embed_dim),
        resolution=paper_resolution(patch),
        licence=licence,
        hub_repo=hub_repo,
        prefix_tokens=int(model.num_prefix_tokens),
        parameters=sum(parameter.numel() for parameter in model.parameters()),
        pos_embed="dino" if has_positions else "rope",
        model_args=model_args,
    )


def spec_from_record(record: Mapping[str, Any]) -> BackboneSpec:
    known = {f.name for f in dataclasses.fields(BackboneSpec)}
    return BackboneSpec(**{key: value for key, value in record.items() if key in known})


def weights_spec(spec: BackboneSpec) -> BackboneSpec:
    """The entry whose weights ``spec`` loads: itself, or the one a variant shares them with."""
    if spec.weights_name == spec.name:
        return spec
    if spec.weights_name in REGISTRY:
        return REGISTRY[spec.weights_name]
    return dataclasses.replace(spec, name=spec.weights_name, num_heads=None, reference_heads=False, weights=None)


# ----------------------------------------------------------------------------- the cache


def _folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name)


def _folder(cache_dir: Path | None, folder_name: str) -> Path:
    return (cache_dir if cache_dir is not None else cache_home()) / "backbones" / folder_name


def backbone_folder(spec: BackboneSpec, cache_dir: Path | None = None) -> Path:
    return _folder(cache_dir, _folder_name(spec.weights_name))


def weights_path(spec: BackboneSpec, cache_dir: Path | None = None) -> Path:
    return backbone_folder(spec, cache_dir) / WEIGHTS_FILE


def metadata_path(spec: BackboneSpec, cache_dir: Path | None = None) -> Path:
    return backbone_folder(spec, cache_dir) / METADATA_FILE


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_metadata(spec: BackboneSpec, cache_dir: Path | None = None) -> dict[str, Any] | None:
    """What ``backbone.json`` records about the cached weights, or None."""
    return _read_json(metadata_path(spec, cache_dir))


def recorded_hash(spec: BackboneSpec, cache_dir: Path | None = None) -> str | None:
    meta = read_metadata(spec, cache_dir)
    return meta.get("sha256") if meta else None


def is_cached(spec: BackboneSpec, cache_dir: Path | None = None) -> bool:
    return weights_path(spec, cache_dir).is_file()


# ----------------------------------------------------------------------------- models


def build_model(spec: BackboneSpec, state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A timm ViT with this entry's architecture: random weights, or ``state_dict`` loaded the
    way timm loads pretrained weights (its checkpoint filter, classifier dropped, every tensor
    checked)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if spec.local:
        return VisionTransformer(
            img_size=spec.resolution,
            patch_size=spec.patch_size,
            embed_dim=spec.dim,
            depth=spec.depth or 2,
            num_heads=spec.num_heads or 4,
            num_classes=0,
            dynamic_img_size=True,
        )
    kwargs = _timm_kwargs(spec)
    if state_dict is None:
        return timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    try:
        return timm.create_model(
            spec.timm_name, pretrained=True, pretrained_cfg_overlay={"state_dict": dict(state_dict)}, **kwargs
        )
    except (RuntimeError, KeyError, ValueError) as error:
        raise CauseError(
            f"The weights for '{spec.name}' do not fit its architecture {spec.timm_name}: {_first_problem(error)}."
        ) from error


def _timm_kwargs(spec: BackboneSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(spec.model_args)
    kwargs.update(num_classes=0, dynamic_img_size=True, embed_dim=spec.dim)
    for key in ("depth", "num_heads", "img_size"):
        if getattr(spec, key) is not None:
            kwargs[key] = getattr(spec, key)
    return kwargs


def _model_for_loading(spec: BackboneSpec) -> nn.Module:
    """The architecture with uninitialised memory, for weights that will all be loaded into it.

    Random initialisation of a ViT-B takes seconds and is thrown away at once, so timm's
    ``VisionTransformer`` (whose state is all parameters) is built on the meta device and
    given empty memory; anything else is built normally.
    """
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        model = build_model(spec)
    if isinstance(model, VisionTransformer) and not list(model.buffers()):
        return model.to_empty(device="cpu")
    return build_model(spec)


def _first_problem(error: BaseException) -> str:
    """The first informative line of a load_state_dict error (its first line names the class)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith("Error(s) in loading")]
    return (useful or lines or [type(error).__name__])[0].rstrip(".")[:200]


def _save_state_dict(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    write_atomically(path, lambda target: save_file(state, str(target)))


# ----------------------------------------------------------------------------- fetch


def _revision_matches(meta: Mapping[str, Any] | None, revision: str | None) -> bool:
    if revision is None:
        return True
    if meta is None:
        return False
    commit = meta.get("commit") or ""
    return revision in (meta.get("revision"), commit) or (len(revision) >= 7 and commit.startswith(revision))


def fetch(
    spec: BackboneSpec,
    revision: str | None = None,
    *,
    cache_dir: Path | None = None,
    from_file: Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> Path:
    """Make sure the backbone's weights are in the cache; return the safetensors path.

    Nothing is requested when they are cached (at ``revision``, when one is given) unless
    ``force``. Hub entries are downloaded through huggingface_hub and checked against the
    Hub's checksum; ``from_file`` converts a checkpoint on disk instead (the only way for
    iBOT and MSN, whose authors publish their own formats). The result is always timm's
    layout in safetensors, checked by loading it into the architecture.
    """
    target = weights_spec(spec)
    path = weights_path(target, cache_dir)
    meta = read_metadata(target, cache_dir)
    if path.is_file() and not force and from_file is None and _revision_matches(meta, revision):
        return path
    reporter = reporter or Reporter()
    provenance: dict[str, Any]
    if target.local:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TOY_SEED)
            model = build_model(target)
        provenance = {"made_locally": True, "seed": TOY_SEED}
    else:
        if from_file is not None:
            state, provenance = _state_from_file(target, Path(from_file))
        elif target.source == "file":
            raise CauseError(
                f"'{target.name}' is not on the Hub in timm's form: download the authors' checkpoint from "
                f"{target.published_at}, then run 'cause fetch {target.name} --from-file FILE'."
            )
        else:
            state, provenance = _state_from_hub(target, revision, force, reporter)
        model = build_model(target, state)
    _save_state_dict(model, path)
    record = {**asdict(target), **provenance, "sha256": file_sha256(path)}
    write_json(metadata_path(target, cache_dir), record)
    return path


def _state_from_hub(
    spec: BackboneSpec, revision: str | None, force: bool, reporter: Reporter
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from . import hub
    from .checkpoints import read_checkpoint

    assert spec.hub_repo is not None
    downloaded = hub.download(
        spec.hub_repo, HUB_WEIGHT_FILES, revision, what=f"backbone '{spec.name}'", force=force, reporter=reporter
    )
    contents = read_checkpoint(downloaded.path)
    if not isinstance(contents, dict):
        raise CauseError(f"{downloaded.filename} of {spec.hub_repo} holds no state dict.")
    return contents, downloaded.record()


def _state_from_file(spec: BackboneSpec, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from .checkpoints import backbone_state_dict, read_checkpoint

    contents = read_checkpoint(path)
    state = backbone_state_dict(contents, spec.family, path)
    return state, {"converted_from": str(path.resolve()), "source_sha256": file_sha256(path)}


def fetch_backbones(
    names: Sequence[str],
    revision: str | None = None,
    *,
    cache_dir: Path | None = None,
    from_file: Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> list[tuple[BackboneSpec, Path]]:
    """``cause fetch``: every name is checked before anything is downloaded."""
    if from_file is not None and len(names) != 1:
        raise CauseError("--from-file converts one checkpoint, so name exactly one backbone with it.")
    specs = [resolve_spec(name, cache_dir) for name in names]
    return [
        (spec, fetch(spec, revision, cache_dir=cache_dir, from_file=from_file, force=force, reporter=reporter))
        for spec in specs
    ]


def list_backbones(cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """One row per registry entry, then per other backbone found in the cache."""
    specs = list(REGISTRY.values())
    root = _folder(cache_dir, "")
    known = {_folder_name(spec.weights_name) for spec in specs}
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            meta = _read_json(folder / METADATA_FILE)
            if folder.name not in known and meta is not None and "name" in meta:
                specs.append(spec_from_record(meta))
    return [
        {
            "name": spec.name,
            "family": spec.family,
            "reference_heads": spec.reference_heads,
            "patch": spec.patch_size,
            "width": spec.dim,
            "parameters": spec.parameters,
            "resolution": spec.resolution,
            "licence": spec.licence,
            "cached": is_cached(spec, cache_dir),
        }
        for spec in specs
    ]


# ----------------------------------------------------------------------------- loading


class FrozenBackbone(nn.Module):
    """A frozen ViT in eval mode that maps normalised images ``[B, 3, H, W]`` to patch tokens
    ``[B, (H / p) * (W / p), D]``: the last block's output after the final norm, prefix
    tokens dropped, float32. On CUDA it runs under autocast.

    ``pos_embed`` chooses how position embeddings are resized to the input's grid:
    ``reference`` (the reference code's rule for the family, default) or ``timm``; the rule in
    force is :attr:`pos_embed_rule`.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        model: nn.Module,
        pos_embed: str = "reference",
        sha256: str | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.pos_embed_rule = install_pos_embed_rule(self.model, spec.pos_embed, pos_embed)
        self.sha256 = sha256
        self.provenance = dict(provenance or {})
        self.use_autocast = True

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def num_heads(self) -> int | None:
        blocks = getattr(self.model, "blocks", None)
        attention = getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None
        heads = getattr(attention, "num_heads", None)
        return int(heads) if heads is not None else None

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> FrozenBackbone:
        # Frozen means frozen: dropout and the like stay off whatever the caller asks.
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise CauseError(
                f"Image size {height}x{width} is not a multiple of the backbone's patch size {self.patch_size}."
            )
        device = images.device
        with autocast(device) if self.use_autocast else contextlib.nullcontext():
            tokens = self.model.forward_features(images)  # type: ignore[operator]
            tokens = self._final_norm(tokens)
        return tokens[:, self.num_prefix_tokens :].float()

    def _final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        # timm moves the final norm after pooling (fc_norm) for average-pooled models; apply it
        # per token there, so every backbone's features come after its final LayerNorm.
        fc_norm = getattr(self.model, "fc_norm", None)
        if isinstance(getattr(self.model, "norm", None), nn.Identity) and isinstance(fc_norm, nn.LayerNorm):
            return fc_norm(tokens)
        return tokens

    @torch.no_grad()
    def extract(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Tokens of many images, ``batch_size`` at a time on the backbone's device:
        ``[N, P, D]`` on the images' device."""
        if batch_size < 1:
            raise CauseError("The batch size must be at least 1.")
        device = self.device
        chunks = [
            self(images[start : start + batch_size].to(device)).to(images.device)
            for start in range(0, images.shape[0], batch_size)
        ]
        if not chunks:
            grid = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
            return images.new_zeros(0, grid, self.dim)
        return torch.cat(chunks)

    def describe(self) -> dict[str, Any]:
        """What a run records about its backbone."""
        return {
            "name": self.spec.name,
            "family": self.spec.family,
            "timm_name": self.spec.timm_name,
            "sha256": self.sha256,
            "dim": self.dim,
            "patch_size": self.patch_size,
            "num_heads": self.num_heads,
            "reference_heads": self.spec.reference_heads,
            "pos_embed": self.pos_embed_rule,
            "prefix_tokens_dropped": self.num_prefix_tokens,
            **{
                key: self.provenance[key]
                for key in ("hub_repo", "revision", "commit", "converted_from")
                if self.provenance.get(key)
            },
        }


def load_backbone(
    name: str | BackboneSpec,
    device: torch.device | str = "cpu",
    fetch_if_missing: bool = True,
    *,
    pos_embed: str = "reference",
    cache_dir: Path | None = None,
    reporter: Reporter | None = None,
) -> FrozenBackbone:
    """The named backbone from the cache (fetched first when missing and allowed).

    The cached file is checked against the SHA-256 recorded when it was fetched, so a damaged
    or replaced file is refused rather than silently giving other features.
    """
    if pos_embed not in POS_EMBED_CHOICES:
        raise CauseError(
            f"Unknown position-embedding rule '{pos_embed}'; choose one of {', '.join(POS_EMBED_CHOICES)}."
        )
    spec = name if isinstance(name, BackboneSpec) else resolve_spec(name, cache_dir)
    target = weights_spec(spec)
    path = weights_path(target, cache_dir)
    if not path.is_file():
        if not fetch_if_missing:
            raise CauseError(
                f"Backbone '{spec.name}' is not in the cache {path.parent}; run 'cause fetch {spec.name}'."
            )
        fetch(spec, cache_dir=cache_dir, reporter=reporter)
    meta = read_metadata(target, cache_dir) or {}
    digest = file_sha256(path)
    damaged = f"The cached weights {path} are damaged; run 'cause fetch {spec.name} --force' to fetch them again."
    if meta.get("sha256") not in (None, digest):
        raise CauseError(damaged)
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CauseError(damaged) from error
    model = _model_for_loading(spec)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CauseError(
            f"The cached weights {path} do not fit backbone '{spec.name}'; run 'cause fetch {spec.name} --force'."
        )
    if "sha256" not in meta:  # weights cached by an older version: record them now
        write_json(metadata_path(target, cache_dir), {**asdict(target), **meta, "sha256": digest})
    return FrozenBackbone(spec, model, pos_embed=pos_embed, sha256=digest, provenance=meta).to(device)


def refuse_other_backbone(run_path: Path, recorded: Mapping[str, Any], backbone: FrozenBackbone | str) -> None:
    """Refuse to use a run with a backbone other than the one it was made with, in one
    sentence: another name, other weights or another position rule (given a name alone, only
    the name is checked, which needs nothing loaded)."""
    info = recorded.get("backbone") or {}
    name = info.get("name") or (recorded.get("config") or {}).get("backbone")
    wanted = backbone if isinstance(backbone, str) else backbone.spec.name
    if name is not None and name != wanted:
        raise CauseError(f"Run {run_path} was made with backbone '{name}', not '{wanted}'.")
    if isinstance(backbone, str):
        return
    if info.get("sha256") not in (None, backbone.sha256):
        raise CauseError(f"Run {run_path} was trained with other weights for backbone '{backbone.spec.name}'.")
    if info.get("pos_embed") not in (None, backbone.pos_embed_rule):
        raise CauseError(
            f"Run {run_path} resized position embeddings by the {info['pos_embed']} rule, "
            f"not the {backbone.pos_embed_rule} rule asked for now."
        )
