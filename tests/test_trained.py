"""A trained run is one artifact (cause_cli/trained.py): the probe file says its format, files
written before the format was recorded load as they did, and step three's variants (and the
heads) plug in through registries whose names are the configuration's."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cause_cli import config as config_module
from cause_cli.config import TrainConfig
from cause_cli.data.synthetic import write_scenes
from cause_cli.errors import CauseError
from cause_cli.inference.predict import load_trained
from cause_cli.model.head_kinds import HEAD_KINDS
from cause_cli.model.heads import ClusterProbe, LinearProbe
from cause_cli.registry import Registry
from cause_cli.runs import PROBE_FILE, RunDirectory
from cause_cli.trained import PROBE_FORMAT, PROBE_FORMAT_VERSION, PROBE_HEADER, load_probe, probe_header
from cause_cli.training import train
from cause_cli.training.probe_kinds import PROBE_SPACES, PROBE_STARTS, ProbeStart

from .test_cli import small_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"), num_train=8, num_val=2, seed=4, size_range=(64, 72))


@pytest.fixture(scope="module")
def run(scenes, tmp_path_factory):
    """A tiny run whose probe file holds every part: a whitening, a spread, the linear probe."""
    path = tmp_path_factory.mktemp("runs") / "run"
    train(small_config(scenes, probe_spread="on"), path, "cpu")
    return path


def rewrite_probe(run, change=lambda tensors: None, header=None) -> None:
    """The run's probe file written again with the same tensors (after ``change``) and
    ``header`` (a string) as its header's entry (None: no metadata, as before the format was
    recorded)."""
    tensors = load_file(str(run / PROBE_FILE))
    change(tensors)
    save_file(tensors, str(run / PROBE_FILE), metadata=None if header is None else {PROBE_HEADER: header})


def test_the_probe_file_says_its_format_what_it_holds_and_what_made_it(run):
    assert set(RunDirectory(run).tensor_metadata(PROBE_FILE)) == {PROBE_HEADER}  # one entry: the same bytes each time
    assert probe_header(RunDirectory(run)) == {
        "format": PROBE_FORMAT,
        "version": PROBE_FORMAT_VERSION,
        "whitening": True,
        "spread": True,
        "linear_probe": True,
        "start": "kmeans",
        "space": "whitened",
    }


@pytest.mark.parametrize("linear_probe", [True, False], ids=["whole", "without the linear probe"])
def test_a_probe_file_from_before_the_format_loads_as_it_did(run, tmp_path, linear_probe):
    old = tmp_path / "old"
    shutil.copytree(run, old)

    def drop_linear_probe(tensors):
        for key in [key for key in tensors if key.startswith("linear_probe.")]:
            del tensors[key]

    rewrite_probe(old, (lambda tensors: None) if linear_probe else drop_linear_probe)
    assert RunDirectory(old).tensor_metadata(PROBE_FILE) == {} and probe_header(RunDirectory(old)) is None
    now, before = load_trained(RunDirectory(run), CPU), load_trained(RunDirectory(old), CPU)
    assert before.cluster_probe.whitening is not None and before.cluster_probe.precision is not None
    for key, value in now.cluster_probe.state_dict().items():
        assert torch.equal(before.cluster_probe.state_dict()[key], value), key
    features = torch.randn(2, now.config.reduced_dim, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = now.cluster_probe.label_map(features, (32, 32))
    assert torch.equal(before.cluster_probe.label_map(features, (32, 32)), labels)
    # Without the linear probe's tensors, the heads' own (head.safetensors) stand.
    heads_own = RunDirectory(run).load_tensors("head.safetensors")["linear_probe.linear.weight"]
    expected = now.linear_probe.linear.weight if linear_probe else heads_own
    assert torch.equal(before.linear_probe.linear.weight, expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 3}, f"of format '{PROBE_FORMAT}' version 3, which this version of cause does not read"),
        ({"format": "someone-else"}, "of format 'someone-else' version 2, which this version of cause does not read"),
        ({"spread": "maybe"}, "says 'maybe' of its part 'spread', not true or false"),
        ({"linear_probe": None}, "says None of its part 'linear_probe', not true or false"),
        ({"whitening": False}, "holds a tensor 'whitening.matrix' this run's configuration has no place for"),
        ({"spread": False}, "holds a tensor 'precision' this run's configuration has no place for"),
        ("[1, 2", "has a header this version of cause cannot read: Expecting"),
        ("[1, 2]", "has a header this version of cause cannot read: it holds a list, not an object"),
    ],
)
def test_a_probe_file_whose_header_this_version_cannot_read_is_one_sentence(run, tmp_path, change, message):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    header = change if isinstance(change, str) else json.dumps({**probe_header(RunDirectory(run)), **change})
    rewrite_probe(other, header=header)
    with pytest.raises(CauseError, match=r"probe\.safetensors") as refused:
        load_trained(RunDirectory(other), CPU)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_registries_name_what_the_configuration_accepts():
    assert tuple(HEAD_KINDS) == config_module.HEADS
    assert tuple(PROBE_STARTS) == config_module.PROBE_INITS
    assert tuple(PROBE_SPACES) == config_module.PROBE_SPACES


def test_a_registry_names_its_variants_once():
    registry: Registry[int] = Registry("colour")
    registry.register("red")(1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("red", 2)
    with pytest.raises(CauseError, match=r"^Unknown colour 'blue'; this version offers: red\.$"):
        registry["blue"]


@pytest.fixture
def first_points(monkeypatch):
    """A start registered from outside: the first C sampled features (in the probe's space),
    as unit vectors. What it made is recorded under "centroids"."""
    made: dict[str, torch.Tensor] = {}

    def start(context, points, whitening):
        assert points is not None
        probe = ClusterProbe(context.config.reduced_dim, context.num_classes, copy.deepcopy(whitening))
        probe.centroids.data.copy_(F.normalize(points[: context.num_classes], dim=1))
        made["centroids"] = probe.centroids.detach().clone()
        return [probe]

    PROBE_STARTS.register("first")(ProbeStart(start, reads_features=True))
    monkeypatch.setattr(config_module, "PROBE_INITS", (*config_module.PROBE_INITS, "first"))
    yield made
    del PROBE_STARTS["first"]


def test_a_registered_start_trains_and_its_centroids_are_saved(scenes, tmp_path, first_points):
    run = tmp_path / "run"
    train(small_config(scenes, probe_init="first", probe_restarts=1), run, "cpu")
    directory = RunDirectory(run)
    saved = directory.load_tensors(PROBE_FILE)
    assert torch.equal(saved["centroids"], first_points["centroids"])
    assert torch.allclose(saved["centroids"].norm(dim=1), torch.ones(len(saved["centroids"])))
    header = probe_header(directory)
    assert header is not None
    made_by = (header["start"], header["space"], header["whitening"], header["spread"])
    assert made_by == ("first", "whitened", True, False)
    info = json.loads((run / "run.json").read_text())
    config = TrainConfig.from_dict(info["config"])
    classes = info["num_classes"]
    probe = load_probe(directory, config, classes, LinearProbe(config.reduced_dim, classes), CPU)
    assert torch.equal(probe.centroids.detach(), first_points["centroids"]) and probe.whitening is not None


def test_a_start_the_configuration_accepts_but_nothing_registered_is_one_sentence(scenes, tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "PROBE_INITS", (*config_module.PROBE_INITS, "nowhere"))
    offered = r"^Unknown cluster-probe start 'nowhere'; this version offers: kmeans, random\.$"
    with pytest.raises(CauseError, match=offered):
        train(small_config(scenes, probe_init="nowhere", probe_restarts=1), tmp_path / "run", "cpu")
    assert not (tmp_path / "run" / "clusterbook.safetensors").exists()  # refused before step one
