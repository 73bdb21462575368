"""A run is believed only after it is checked (docs/safety.md): a run folder whose run.json,
metrics.json or weights were damaged or written by hand ends in one sentence naming the file
and the field, exit code 1, no traceback and no huge allocation, and the folder is left as it
was. Hypothesis then throws random values, headers and bytes at the same loading code: it
succeeds or says CauseError, never anything else."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from cause_cli.config import TrainConfig
from cause_cli.errors import CauseError
from cause_cli.run_checks import CONFIG_RULES

from .helpers import invoke, one_sentence, train_small_run

CLASS_NAMES = ["brick", "water", "grass", "heather", "sky", "sand"]
VALID_METRICS = {"cluster_to_class": [5, 4, 3, 2, 1, 0], "class_names": CLASS_NAMES, "miou": 12.5, "split": "val"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MLP run (trained in seconds) and the folder of its validation images."""
    scenes, run = train_small_run(tmp_path_factory.mktemp("checked"), num_val=1, seed=5)
    return run, scenes / "images" / "val"


@pytest.fixture(scope="module")
def tr_run(trained, tmp_path_factory):
    """The same run with a TR head (freshly initialised, not trained): a run whose clusterbook
    is read at inference."""
    from cause_cli.trained import build_heads

    run = tmp_path_factory.mktemp("tr") / "run"
    shutil.copytree(trained[0], run)
    info = json.loads((run / "run.json").read_text())
    info["config"]["head"] = "tr"
    (run / "run.json").write_text(json.dumps(info))
    heads = build_heads(TrainConfig.from_dict(info["config"]), 96, 8, info["num_classes"])
    save_file({key: value.contiguous() for key, value in heads.state_dict().items()}, str(run / "head.safetensors"))
    return run


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# Mutations of a copied run folder.
Mutation = Callable[[Path], None]


def edit_info(change: Callable[[dict[str, Any]], None]) -> Mutation:
    def mutate(folder: Path) -> None:
        info = json.loads((folder / "run.json").read_text())
        change(info)
        (folder / "run.json").write_text(json.dumps(info))

    return mutate


def config(key: str, value: Any) -> Mutation:
    return edit_info(lambda info: info["config"].__setitem__(key, value))


def top(key: str, value: Any) -> Mutation:
    return edit_info(lambda info: info.__setitem__(key, value))


def run_text(change: Callable[[str], str]) -> Mutation:
    def mutate(folder: Path) -> None:
        (folder / "run.json").write_text(change((folder / "run.json").read_text()))

    return mutate


def metrics(content: Any) -> Mutation:
    def mutate(folder: Path) -> None:
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / "metrics.json").write_text(text)

    return mutate


def tensors(name: str, change: Callable[[dict[str, torch.Tensor]], None]) -> Mutation:
    def mutate(folder: Path) -> None:
        state = load_file(str(folder / name))
        change(state)
        save_file({key: value.contiguous() for key, value in state.items()}, str(folder / name))

    return mutate


def raw(name: str, data: bytes) -> Mutation:
    return lambda folder: (folder / name).write_bytes(data)


def poison(key: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(state: dict[str, torch.Tensor]) -> None:
        state[key].view(-1)[3] = value

    return change


def big_header_length(folder: Path) -> None:
    data = bytearray((folder / "probe.safetensors").read_bytes())
    data[:8] = struct.pack("<Q", 2**62)
    (folder / "probe.safetensors").write_bytes(bytes(data))


DEEP = "[" * 100_000 + "]" * 100_000
LONG_NUMBER = "1" + "0" * 5000
MLP_WEIGHT = "teacher.projection.linear_branch.weight"

HOSTILE = [
    ("resolution-100000", config("resolution", 100_000), "'resolution' is 100000, not a whole number from 1 to 4,096"),
    ("resolution-0", config("resolution", 0), "'resolution' is 0, not a whole number"),
    ("resolution-negative", config("resolution", -3), "'resolution' is -3, not a whole number"),
    ("resolution-string", config("resolution", "big"), "'resolution' is 'big', not a whole number"),
    ("resolution-true", config("resolution", True), "'resolution' is True, not a whole number"),
    ("resolution-float", config("resolution", 64.0), "'resolution' is 64.0, not a whole number"),
    ("resolution-patch", config("resolution", 60), "'resolution' 60 is not a multiple of its backbone's patch size 8"),
    ("resolution-missing", edit_info(lambda info: info["config"].pop("resolution")), "has no 'resolution'"),
    ("classes-0", top("num_classes", 0), "its class count 0 is not a positive whole number"),
    ("classes-true", top("num_classes", True), "its class count True is not a positive whole number"),
    ("classes-100000", top("num_classes", 100_000), "its class count 100000 is not a positive whole number"),
    ("classes-missing", edit_info(lambda info: info.pop("num_classes")), "its class count None"),
    ("classes-disagree", top("num_classes", 7), "its class count 7 differs from its config's 'num_classes' 6"),
    ("deep-json", run_text(lambda text: DEEP), "run.json is damaged: it nests more deeply than a JSON parser follows"),
    (
        "long-number",
        run_text(lambda text: text.replace('"resolution": 64', f'"resolution": {LONG_NUMBER}')),
        "run.json is damaged: it holds a number longer than a JSON parser reads",
    ),
    ("not-utf8", raw("run.json", b'{"config": "\xff\xfe"}'), "run.json is damaged: it is not UTF-8 text"),
    ("huge-run-json", raw("run.json", b" " * (16 * 2**20 + 1)), "more than any such file this toolkit writes"),
    ("head", config("head", "xl"), "'head' names an unknown head 'xl' (this version knows mlp, tr)"),
    ("recipe", config("recipe", "fast"), "'recipe' names an unknown recipe 'fast'"),
    ("upsampling", config("probe_upsampling", "bicubic"), "names an unknown cluster-probe upsampling 'bicubic'"),
    ("spread", config("probe_spread", 1), "'probe_spread' is 1, not one of auto, on, off"),
    ("precision", config("precision", "float8"), "names an unknown precision 'float8'"),
    ("pos-embed", config("pos_embed", "rope"), "names an unknown position-embedding rule 'rope'"),
    ("reduced-dim-huge", config("reduced_dim", 10**9), "'reduced_dim' is 1000000000, not a whole number from 1 to"),
    ("dropout", config("dropout", math.nan), "'dropout' is nan, not a number in [0.0, 1.0)"),
    (
        "learning-rate",
        config("learning_rate", 10**400),
        "'learning_rate' is 1000000000000000000000000000000000000..., not a finite number of at least 0.0",
    ),
    ("flag", config("use_bank", "yes"), "'use_bank' is 'yes', not true or false"),
    ("data-dir", edit_info(lambda info: info["config"].pop("data_dir")), "has no data folder"),
    ("class-names-type", top("class_names", [1, 2, 3, 4, 5, 6]), "its 'class_names' is [1, 2, 3, 4, 5, 6], not a list"),
    ("class-names-string", top("class_names", "brick"), "its 'class_names' is 'brick', not a list"),
    ("backbone-record", top("backbone", ["toy"]), "its 'backbone' is ['toy'], not an object"),
    ("backbone-null", top("backbone", None), "its 'backbone' is None, not an object"),
    ("backbone-patch", edit_info(lambda info: info["backbone"].__setitem__("patch_size", 0)), "'patch_size' is 0"),
    ("weights-sha256", top("weights_sha256", ["x"]), "its 'weights_sha256' is ['x'], not an object"),
    # Within the limits, but not what the weights hold: refused before the heads are built.
    ("reduced-dim", config("reduced_dim", 4000), "of shape [90, 96], where this run's configuration needs [4000, 96]"),
    ("tr-on-mlp-weights", config("head", "tr"), "head.safetensors has no tensor"),
    ("metrics-out-of-range", metrics({**VALID_METRICS, "cluster_to_class": [0, 1, 2, 3, 4, 6]}), "does not map"),
    ("metrics-negative", metrics({**VALID_METRICS, "cluster_to_class": [0, 1, 2, 3, 4, -1]}), "does not map"),
    ("metrics-short", metrics({**VALID_METRICS, "cluster_to_class": [0, 1]}), "does not map the run's 6 clusters"),
    ("metrics-names-short", metrics({**VALID_METRICS, "class_names": ["a", "b"]}), "does not map the run's 6"),
    ("metrics-bools", metrics({**VALID_METRICS, "cluster_to_class": [True] * 6}), "is not a list of class numbers"),
    ("metrics-names", metrics({**VALID_METRICS, "class_names": [0] * 6}), "its class_names [0, 0, 0, 0, 0, 0] is not"),
    ("metrics-deep", metrics(DEEP), "metrics.json is damaged; run cause eval on the run again"),
    ("metrics-long-number", metrics('{"images": ' + LONG_NUMBER + "}"), "a number longer than a JSON parser reads"),
    ("metrics-not-object", metrics([1, 2]), "metrics.json is damaged; run cause eval on the run again"),
    ("metrics-score", metrics({**VALID_METRICS, "miou": "high"}), "its miou 'high' is not a finite number"),
    (
        "probe-missing-key",
        tensors("probe.safetensors", lambda state: state.pop("centroids")),
        "probe.safetensors has no tensor centroids, which this run's configuration needs; the run is damaged",
    ),
    (
        "probe-missing-whitening",
        tensors("probe.safetensors", lambda state: state.pop("whitening.matrix")),
        "probe.safetensors has no tensor whitening.matrix",
    ),
    (
        "probe-wrong-shape",
        tensors("probe.safetensors", lambda state: state.__setitem__("centroids", state["centroids"][:5])),
        "probe.safetensors holds centroids of shape [5, 90], where this run's configuration needs [6, 90]",
    ),
    (
        "probe-extra-tensor",
        tensors("probe.safetensors", lambda state: state.__setitem__("extra", torch.zeros(3))),
        "probe.safetensors holds a tensor 'extra' this run's configuration has no place for",
    ),
    (
        "probe-nan",
        tensors("probe.safetensors", poison("centroids", math.nan)),
        "probe.safetensors holds non-finite values (NaN or infinity) in centroids; the run is damaged: train it again.",
    ),
    (
        "head-inf",
        tensors("head.safetensors", poison(MLP_WEIGHT, math.inf)),
        f"head.safetensors holds non-finite values (NaN or infinity) in {MLP_WEIGHT}",
    ),
    (
        "head-integers",
        tensors("head.safetensors", lambda state: state.__setitem__(MLP_WEIGHT, state[MLP_WEIGHT].int())),
        f"head.safetensors holds {MLP_WEIGHT} as int32, not as floating-point weights",
    ),
    (
        "head-missing-key",
        tensors("head.safetensors", lambda state: state.pop(MLP_WEIGHT)),
        f"head.safetensors has no tensor {MLP_WEIGHT}",
    ),
    ("not-safetensors", raw("probe.safetensors", b"PK\x03\x04 a zip file"), "is damaged or not a safetensors file"),
    ("empty-safetensors", raw("head.safetensors", b""), "head.safetensors is damaged or not a safetensors file"),
    ("header-length", big_header_length, "probe.safetensors is damaged or not a safetensors file"),
]


def segment_copy(trained, tmp_path, mutate: Mutation, source: Path | None = None):
    """``cause segment`` of the run mutated by ``mutate`` (in a copy), and whether the copy's
    files were left byte for byte as the mutation left them."""
    run, images = trained
    copy = tmp_path / "run"
    shutil.copytree(source or run, copy)
    mutate(copy)
    before = fingerprint(copy)
    out = tmp_path / "out"
    result = invoke("segment", images, "--run", copy, "--out", out, "--device", "cpu", "-q")
    assert fingerprint(copy) == before  # nothing in the run folder was changed
    assert not list(out.rglob("*.png"))  # nothing was segmented
    return result


@pytest.mark.parametrize(("mutate", "fragment"), [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_a_hostile_run_is_one_sentence(trained, tmp_path, mutate, fragment):
    one_sentence(segment_copy(trained, tmp_path, mutate), fragment)


TR_CLUSTERBOOK = [
    ("clusterbook-nan", tensors("clusterbook.safetensors", poison("clusterbook", math.nan)), "in clusterbook"),
    (
        "clusterbook-shape",
        tensors("clusterbook.safetensors", lambda state: state.__setitem__("clusterbook", state["clusterbook"][:, :8])),
        "clusterbook.safetensors holds clusterbook of shape [16, 8], where this run's configuration needs [16, 96]",
    ),
    (
        "clusterbook-renamed",
        tensors("clusterbook.safetensors", lambda state: state.__setitem__("codes", state.pop("clusterbook"))),
        "clusterbook.safetensors has no tensor clusterbook",
    ),
    ("query-grid", config("resolution", 128), "head.safetensors holds student.query_pos of shape [64, 96]"),
]


@pytest.mark.parametrize(
    ("mutate", "fragment"), [case[1:] for case in TR_CLUSTERBOOK], ids=[case[0] for case in TR_CLUSTERBOOK]
)
def test_a_tr_run_checks_its_clusterbook(trained, tr_run, tmp_path, mutate, fragment):
    one_sentence(segment_copy(trained, tmp_path, mutate, source=tr_run), fragment)


EVERY_COMMAND_CASES = [
    ("probe-nan", tensors("probe.safetensors", poison("centroids", math.nan)), "holds non-finite values"),
    ("resolution-100000", config("resolution", 100_000), "'resolution' is 100000, not a whole number"),
]


@pytest.mark.parametrize("command", ["eval", "export", "api"])
@pytest.mark.parametrize(
    ("mutate", "fragment"), [case[1:] for case in EVERY_COMMAND_CASES], ids=[case[0] for case in EVERY_COMMAND_CASES]
)
def test_every_command_that_reads_a_run_checks_it(trained, tmp_path, command, mutate, fragment):
    """eval, export and the Python API believe a run no sooner than segment does."""
    from cause_cli import load_run
    from cause_cli.errors import CauseError

    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    mutate(copy)
    before = fingerprint(copy)
    if command == "api":
        with pytest.raises(CauseError, match=re.escape(fragment)):
            load_run(copy, device="cpu")
    elif command == "eval":
        one_sentence(invoke("eval", "--run", copy, "--no-crf", "--no-baselines", "--device", "cpu"), fragment)
    else:
        one_sentence(invoke("export", copy, "--out", tmp_path / "model.onnx"), fragment)
        assert not (tmp_path / "model.onnx").exists()
    after = fingerprint(copy)
    # eval holds the run's lock while it reads, and the lock file names the process holding it.
    after.pop(".lock", None), before.pop(".lock", None)
    assert after == before


@pytest.mark.parametrize("source", ["mlp", "tr"])
def test_the_unmutated_runs_segment(trained, tr_run, tmp_path, source):
    """The mutations above are what is refused: the runs they start from segment, with a valid
    metrics.json too, and the limits leave room for every resolution a run may be trained at."""
    for resolution in (64, 8) if source == "mlp" else (64,):
        out = tmp_path / f"out-{resolution}"
        copy = tmp_path / f"run-{resolution}"
        shutil.copytree(trained[0] if source == "mlp" else tr_run, copy)
        config("resolution", resolution)(copy)
        metrics(VALID_METRICS)(copy)
        result = invoke("segment", trained[1], "--run", copy, "--out", out, "--device", "cpu", "-q")
        assert result.exit_code == 0, result.output
        assert list(out.rglob("*.png"))


def test_every_setting_has_a_rule():
    assert set(CONFIG_RULES) == {field.name for field in fields(TrainConfig)}


def test_the_settings_runs_are_trained_with_pass():
    from cause_cli.resolve import apply_reference_recipe, resolve_schedule, resolve_thresholds, validated
    from cause_cli.run_checks import run_info_problem

    for recipe in ("default", "reference"):
        for head in ("mlp", "tr"):
            setting = TrainConfig(data_dir="", recipe=recipe, head=head, resolution=320, num_classes=27)
            setting = resolve_thresholds(apply_reference_recipe(validated(setting)), True)
            setting, _ = resolve_schedule(setting, 100, True)
            info = {"config": setting.to_dict(), "num_classes": 27, "class_names": None}
            assert run_info_problem(info) is None
    for resolution in (224, 322, 448, 518, 4096):
        assert run_info_problem({"config": {"data_dir": "", "resolution": resolution}, "num_classes": 2}) is None


def test_a_hub_run_is_checked_as_a_local_one(trained, tmp_path, monkeypatch):
    from cause_cli.runs import HUB_RUN_FILES

    from .fake_hub import FakeHub, forbid_remote_connections, point_hub_at

    run, images = trained
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    tensors("probe.safetensors", poison("centroids", math.nan))(damaged)
    hub = FakeHub()
    for name in HUB_RUN_FILES:
        hub.add("someone/nan-run", name, (damaged / name).read_bytes())
    config("resolution", 100_000)(damaged)
    for name in HUB_RUN_FILES:
        hub.add("someone/huge-run", name, (damaged / name).read_bytes())
    hub.start()
    try:
        forbid_remote_connections(monkeypatch)
        point_hub_at(monkeypatch, hub.url, tmp_path / "hf-cache")
        for repo, fragment in (
            ("someone/nan-run", "holds non-finite values (NaN or infinity) in centroids"),
            ("someone/huge-run", "'resolution' is 100000, not a whole number from 1 to 4,096"),
        ):
            result = invoke("segment", images, "--run", f"hf-hub:{repo}", "--out", tmp_path / repo, "--device", "cpu")
            one_sentence(result, fragment)
    finally:
        hub.stop()


def test_the_python_api_refuses_empty_images_and_batches(trained):
    from cause_cli import load_run

    model = load_run(trained[0], device="cpu")
    for empty in (np.zeros((0, 0, 3), np.uint8), Image.new("RGB", (0, 0)), np.zeros((4, 0), np.uint8)):
        with pytest.raises(CauseError, match="give one at least 1 pixel wide and high"):
            model.segment(empty)
    for batch_size in (0, -1, True, 2.5):
        with pytest.raises(CauseError, match="batch_size must be a whole number of at least 1"):
            model.segment(np.zeros((8, 8, 3), np.uint8), batch_size=batch_size)
    assert model.segment(np.zeros((1, 1, 3), np.uint8), batch_size=1).labels.shape == (1, 1)


# Property tests: random damage, through the toolkit's own loading functions.

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
# Values near the ones runs hold, so that the random runs reach past the first check.
PLAUSIBLE = st.sampled_from(
    [0, 1, 2, 5, 6, 7, 8, 16, 24, 32, 48, 60, 64, 72, 90, 96, 128, -1, 0.5, 1.0, None, True, False, [], {}, "",
     "mlp", "tr", "scores", "features", "timm", "reference", "kmeans", "random", "on", "off", "auto", "whitened",
     "head", "float32", "toy", "folder", "default", CLASS_NAMES, CLASS_NAMES[:5], [0, 1, 2, 3, 4, 5]]
)  # fmt: skip
# Values at the edges of what JSON and Python's numbers hold.
EXTREMES = st.sampled_from([2**63, 2**64, 10**400, -(10**400), 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf])
VALUES = st.one_of(JSON_VALUES, PLAUSIBLE, EXTREMES)
TOP_FIELDS = ["num_classes", "class_names", "backbone", "weights_sha256", "config", "schedule", "toolkit_version"]
BACKBONE_FIELDS = ["name", "sha256", "pos_embed", "dim", "patch_size", "hub_repo"]
RUN_FIELDS = (
    [("config", name) for name in CONFIG_RULES]
    + [(name,) for name in TOP_FIELDS]
    + [("backbone", name) for name in BACKBONE_FIELDS]
)
RUN_EDITS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(RUN_FIELDS), VALUES),
    st.tuples(st.just("set"), st.sampled_from(RUN_FIELDS), PLAUSIBLE),
    st.tuples(st.just("set"), st.sampled_from(RUN_FIELDS), EXTREMES),
    st.tuples(st.just("delete"), st.sampled_from(RUN_FIELDS), st.none()),
    st.tuples(st.just("truncate"), st.integers(min_value=0, max_value=2100), st.none()),
    st.tuples(st.just("replace"), VALUES, st.none()),
)
SAFETENSORS_DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "I8", "BOOL", "F8_E4M3", "U64", "X"]
SAFETENSORS_EDITS = st.one_of(
    st.tuples(st.just("length"), st.integers(min_value=0, max_value=2**64 - 1), st.none()),
    st.tuples(
        st.just("entry"),
        st.tuples(st.sampled_from(["dtype", "shape", "data_offsets", "rename", "delete"]), st.integers(0, 60)),
        st.one_of(
            st.sampled_from(SAFETENSORS_DTYPES),
            st.lists(st.integers(min_value=-2, max_value=2**40), max_size=4),
            st.lists(st.integers(min_value=0, max_value=120), min_size=1, max_size=3),
            VALUES,
        ),
    ),
    st.tuples(
        st.just("bytes"),
        st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=8),
        st.none(),
    ),
    st.tuples(st.just("truncate"), st.integers(min_value=0, max_value=4000), st.none()),
    st.tuples(
        st.just("entry"), st.tuples(st.just("shape"), st.integers(0, 60)), st.sampled_from(["reverse", "flatten"])
    ),
    st.tuples(
        st.just("value"),
        st.integers(min_value=0, max_value=200),
        st.sampled_from([math.nan, math.inf, -math.inf, 1e30]),
    ),
)
METRICS_FIELDS = ["cluster_to_class", "class_names", "split", "images", "miou", "pixel_accuracy", "crf",
                  "linear_probe", "baselines", "dataset"]  # fmt: skip
METRICS_EDITS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(METRICS_FIELDS), VALUES),
    st.tuples(st.just("set"), st.just("cluster_to_class"), st.lists(st.integers(-1, 7), min_size=5, max_size=7)),
    st.tuples(st.just("set"), st.just("crf"), st.dictionaries(st.sampled_from(["miou", "pixel_accuracy"]), VALUES)),
    st.tuples(st.just("replace"), VALUES, st.none()),
    st.tuples(st.just("bytes"), st.binary(max_size=40), st.none()),
)


STRIPES = Image.fromarray(np.repeat(np.arange(24, dtype=np.uint8)[None, :, None] * 10, 16, axis=0).repeat(3, axis=2))


class Loader:
    """A scratch copy of a run, the toy backbone loaded once, and the toolkit's loading: files
    are damaged one at a time and restored after each example."""

    def __init__(self, run: Path, scratch: Path) -> None:
        shutil.copytree(run, scratch)
        self.run = scratch
        self.originals = {path.name: path.read_bytes() for path in scratch.iterdir() if path.is_file()}

    def restore(self) -> None:
        (self.run / "metrics.json").unlink(missing_ok=True)
        for name, data in self.originals.items():
            (self.run / name).write_bytes(data)

    def load_and_segment(self) -> None:
        """``load_run(...).segment(image)`` of the Python API, and the names of what it found."""
        from cause_cli import load_run

        model = load_run(self.run, device="cpu")
        if model.mapping is not None:  # every class id the labels may hold has a name
            assert model.mapping.min() >= 0 and model.mapping.max() < len(model.names)
        if model.trained.resolution <= 128:  # larger ones are valid, and slow on a CPU
            result = model.segment(STRIPES)
            assert result.labels.shape == (16, 24) and int(result.labels.max()) < len(result.names)
            result.present()


@pytest.fixture(scope="module")
def loaders(trained, tr_run, tmp_path_factory):
    from cause_cli.backbones import load_backbone
    from cause_cli.inference import predict

    @functools.cache
    def cached(name: str, device: Any = "cpu", pos_embed: str = "reference"):
        return load_backbone(name, device, pos_embed=pos_embed)

    scratch = tmp_path_factory.mktemp("scratch")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict, "load_backbone", cached)
        yield {"mlp": Loader(trained[0], scratch / "mlp"), "tr": Loader(tr_run, scratch / "tr")}


def survives(loader: Loader) -> None:
    """Loading succeeds or says one sentence; nothing else escapes."""
    try:
        loader.load_and_segment()
        event("loaded")
    except CauseError as error:
        assert "\n" not in str(error) and str(error).endswith("."), str(error)
        event("refused")
    finally:
        loader.restore()


PROPERTY = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def apply_run_edit(loader: Loader, edit: tuple[Any, Any, Any]) -> None:
    kind, target, value = edit
    path = loader.run / "run.json"
    if kind == "truncate":
        path.write_bytes(path.read_bytes()[:target])
        return
    if kind == "replace":
        path.write_text(json.dumps(target))
        return
    info = json.loads(path.read_text())
    holder = info
    for key in target[:-1]:
        holder = holder[key]
    if kind == "delete":
        holder.pop(target[-1], None)
    else:
        holder[target[-1]] = value
    path.write_text(json.dumps(info))


@PROPERTY
@given(head=st.sampled_from(["mlp", "tr"]), edits=st.lists(RUN_EDITS, min_size=1, max_size=3))
def test_random_run_json_loads_or_is_one_sentence(loaders, head, edits):
    loader = loaders[head]
    for edit in edits:
        try:
            apply_run_edit(loader, edit)
        except (TypeError, KeyError, AttributeError, ValueError):
            break  # an earlier edit left nothing to edit further (or no JSON at all)
    survives(loader)


def apply_safetensors_edit(path: Path, edit: tuple[Any, Any, Any], data: bytes) -> bytes:
    kind, target, value = edit
    if kind == "length":
        return struct.pack("<Q", target) + data[8:]
    if kind == "bytes":
        changed = bytearray(data)
        for index, byte in target:
            changed[index % len(changed)] = byte
        return bytes(changed)
    if kind == "truncate":
        return data[:target]
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    names = sorted(key for key in header if key != "__metadata__")
    if kind == "value":  # one float32 of the data set to a non-finite or huge value
        entry = header[names[target % len(names)]]
        start = 8 + length + entry["data_offsets"][0]
        count = max(1, (entry["data_offsets"][1] - entry["data_offsets"][0]) // 4)
        at = start + 4 * (target % count)
        return data[:at] + struct.pack("<f", value) + data[at + 4 :]
    field, index = target
    name = names[index % len(names)]
    shape = header[name]["shape"]
    if field == "shape" and value in ("reverse", "flatten"):  # the same bytes, another shape
        header[name]["shape"] = shape[::-1] if value == "reverse" else [math.prod(shape)]
    elif field == "delete":
        del header[name]
    elif field == "rename":
        header[str(value)] = header.pop(name)
    else:
        header[name][field] = value
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


@PROPERTY
@given(
    head=st.sampled_from(["mlp", "tr"]),
    name=st.sampled_from(["probe.safetensors", "head.safetensors", "clusterbook.safetensors"]),
    edits=st.lists(SAFETENSORS_EDITS, min_size=1, max_size=2),
)
def test_random_safetensors_headers_load_or_are_one_sentence(loaders, head, name, edits):
    loader = loaders[head]
    path = loader.run / name
    data = path.read_bytes()
    for edit in edits:
        try:
            data = apply_safetensors_edit(path, edit, data)
        except (ValueError, KeyError, TypeError, IndexError, ZeroDivisionError, struct.error, RecursionError):
            break  # an earlier edit left no header to edit further
    path.write_bytes(data)
    survives(loader)


@settings(PROPERTY, max_examples=100)
@given(edits=st.lists(METRICS_EDITS, min_size=1, max_size=3))
def test_random_metrics_json_loads_or_is_one_sentence(loaders, edits):
    from cause_cli.run_checks import MAX_METRICS_JSON_BYTES, metrics_problem, read_json
    from cause_cli.sharing import model_card

    loader = loaders["mlp"]
    path = loader.run / "metrics.json"
    content: Any = dict(VALID_METRICS)
    raw_bytes = None
    for kind, target, value in edits:
        if kind == "set" and isinstance(content, dict):
            content[target] = value
        elif kind == "replace":
            content = target
        elif kind == "bytes":
            raw_bytes = target
    path.write_bytes(raw_bytes if raw_bytes is not None else json.dumps(content).encode())
    metrics_read, problem = read_json(path, MAX_METRICS_JSON_BYTES)
    if problem is None and metrics_problem(metrics_read, 6) is None:
        info = json.loads((loader.run / "run.json").read_text())
        model_card(info, metrics_read, "me/run", [])  # what cause push writes from it
    survives(loader)
