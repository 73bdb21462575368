"""Settings declared once (config.py): the options of cause train, their checks, docs/train.md's
table and --config files are all made from the declarations; the configuration a run trains with
is resolved once, by a pure function, and frozen."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import typer

from cause_cli.cli import app
from cause_cli.cli.docs import BEGIN, END, options_markdown
from cause_cli.config import TrainConfig
from cause_cli.config_files import read_settings_file
from cause_cli.errors import CauseError
from cause_cli.resolve import TrainingFacts, resolve_config

from .helpers import assert_same_weights, invoke, one_sentence, train_small_run

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def train_command():
    return typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]


def test_train_help_at_80_columns_cuts_no_option_name_and_shows_panels(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = invoke("train", "--help")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.output
    shown = set(re.findall(r"--[a-z][a-z0-9-]*", result.output))
    for param in train_command().params:
        for name in [*param.opts, *param.secondary_opts]:
            assert name.startswith("-") and (name in shown or len(name) == 2), f"{name} is not shown whole"
    panels = re.findall(r"╭─ ([^─]+) ─", result.output)
    assert len(panels) >= 4, panels
    assert {"Data", "Backbone and head", "Step 3: cluster probe", "Speed"} <= {panel.strip() for panel in panels}


def test_every_setting_is_an_option_with_its_declared_help_and_panel():
    options = {param.name: param for param in train_command().params}
    for setting in TrainConfig.settings():
        if not setting.on_command_line:
            continue
        option = options[setting.name]
        assert setting.flag in option.opts
        assert option.help.startswith(setting.help)
        assert option.rich_help_panel == setting.panel
        assert option.default == setting.default


def test_docs_train_md_holds_the_declared_options():
    document = (REPO_ROOT / "docs" / "train.md").read_text(encoding="utf-8")
    between = document[document.index(BEGIN) + len(BEGIN) : document.index(END)].strip()
    assert between == options_markdown(), "docs/train.md is stale: run python -m cause_cli.cli.docs docs/train.md"


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".json", '{"batch_size": 4, "probe-init": "random", "positive_threshold": null, "seed": 7}'),
        (".yaml", "batch_size: 4\nprobe-init: random\npositive_threshold: null\nseed: 7\n"),
        (".toml", 'batch_size = 4\nprobe-init = "random"\nseed = 7\n'),
    ],
)
def test_a_settings_file_in_each_format(tmp_path, suffix, text):
    path = tmp_path / f"settings{suffix}"
    path.write_text(text)
    settings = read_settings_file(path)
    assert settings["batch_size"] == 4 and settings["probe_init"] == "random" and settings["seed"] == 7


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ({"batch_szie": 4}, "'batch_szie' is not a setting of cause train (did you mean 'batch_size'?)."),
        ({"batch_size": "four"}, "'batch_size' is 'four', not a whole number from 1 to 65,536."),
        ({"probe_init": "kmedoids"}, "Unknown cluster-probe start 'kmedoids'; choose kmeans or random."),
        ({"use_bank": "yes"}, "'use_bank' is 'yes', not true or false."),
        ([1, 2], "holds list, not a mapping of settings"),
    ],
)
def test_a_wrong_settings_file_is_one_sentence_and_nothing_is_written(tmp_path, content, pattern):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(content))
    run = tmp_path / "run"
    one_sentence(invoke("train", "--config", path, "--data-dir", tmp_path, "--run", run), pattern)
    assert not run.exists()


def test_options_given_override_the_file_and_the_file_overrides_defaults(tmp_path, monkeypatch):
    import cause_cli.training

    trained = []
    monkeypatch.setattr(cause_cli.training, "train", lambda config, *args, **kwargs: trained.append(config))
    monkeypatch.setattr("cause_cli.cli.train._print_training", lambda *args: None)
    path = tmp_path / "settings.yaml"
    path.write_text(f"data_dir: {tmp_path}\nseed: 3\nbatch_size: 4\nuse_bank: false\n")
    assert invoke("train", "--config", path, "--seed", "5", "--run", tmp_path / "run").exit_code == 0
    assert invoke("train", "--config", path, "--use-bank", "--run", tmp_path / "run").exit_code == 0
    first, second = trained
    assert (first.seed, first.batch_size, first.use_bank, first.head) == (5, 4, False, "mlp")
    assert (second.seed, second.use_bank) == (3, True)


def test_resume_with_a_config_file_is_refused(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text("{}")
    one_sentence(invoke("train", "--run", tmp_path / "run", "--resume", "--config", path), "give one of them")


def test_a_run_trained_again_from_its_run_json_has_equal_weights(tmp_path):
    scenes, run = train_small_run(tmp_path, num_val=2, seed=4)
    again = tmp_path / "again"
    result = invoke("train", "--config", run / "run.json", "--data-dir", scenes, "--run", again, "-q")
    assert result.exit_code == 0, result.output
    assert_same_weights(again, run, rtol=0, atol=0)
    first, second = (json.loads((folder / "run.json").read_text())["config"] for folder in (run, again))
    assert first == second


FACTS = TrainingFacts(
    dataset="folder", data_dir="/data", backbone_resolution=224, patch_size=8, classes_in_data=5, whole_epoch_batches=7
)


def test_resolving_is_pure_complete_and_settles():
    given = TrainConfig(data_dir="data", probe_init="random", recipe="default")
    resolved = resolve_config(given, FACTS)
    assert resolve_config(given, FACTS) == resolved  # the same settings and facts, the same configuration
    assert given == TrainConfig(data_dir="data", probe_init="random")  # what was given is untouched
    config = resolved.config
    assert (config.resolution, config.num_classes, config.data_dir) == (224, 5, "/data")
    for name in ("epochs_clusterbook", "epochs_front_door", "epochs_cluster_probe", "positive_threshold",
                 "negative_threshold", "probe_restarts", "probe_consensus"):  # fmt: skip
        assert getattr(config, name) is not None, name
    assert resolve_config(config, FACTS).config == config  # a run's own configuration resolves to itself
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]


def test_the_reference_recipe_is_applied_where_the_configuration_is_resolved():
    resolved = resolve_config(TrainConfig(data_dir="data", recipe="reference", head="mlp"), FACTS).config
    assert (resolved.probe_init, resolved.probe_space, resolved.front_door_resolution) == ("random", "head", 224)
    assert resolved.epoch_fraction == 0.25 and resolved.learning_rate == pytest.approx(4e-3)
    assert resolve_config(resolved, FACTS).config == resolved


def test_no_class_count_anywhere_is_one_sentence():
    with pytest.raises(CauseError, match="--num-classes"):
        resolve_config(TrainConfig(data_dir="data"), dataclasses.replace(FACTS, classes_in_data=None))
