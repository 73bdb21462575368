"""docs/reproduce.md: every command on the page parses with today's options, and names
backbones, datasets and heads the toolkit has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from cause_cli.backbones import REGISTRY
from cause_cli.cli import app
from cause_cli.data import DATASETS, canonical_name

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reproduce.md"


def page_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("cause ")]


COMMANDS = page_commands()


def test_the_page_has_a_command_for_every_published_row():
    trained = [words for words in COMMANDS if words[0] == "train"]
    assert len(trained) >= 14 and sum(words[0] == "eval" for words in COMMANDS) >= 5
    assert any(words[0] == "import" for words in COMMANDS)


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(words[:3]) for words in COMMANDS])
def test_every_command_parses(words):
    group = typer.main.get_command(app)
    command = group.get_command(group.make_context("cause", ["--help"], resilient_parsing=True), words[0])
    assert command is not None, f"no command {words[0]}"
    with command.make_context(words[0], words[1:]) as context:  # raises on an unknown or malformed option
        values = context.params
    if values.get("backbone"):
        assert values["backbone"] in REGISTRY
    if values.get("dataset"):
        assert canonical_name(values["dataset"]) in DATASETS
    if words[0] == "train":
        assert values["recipe"] == "reference" and values["head"] in ("mlp", "tr")
