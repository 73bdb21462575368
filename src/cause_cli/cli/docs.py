"""docs/train.md's table of options, made from the same declarations as ``cause train --help``.

    python -m cause_cli.cli.docs docs/train.md    # rewrite the table between its markers

A test fails when the file's table is not the one this makes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from . import app
from .base import option_help, option_names

BEGIN = "<!-- options of cause train: made by `python -m cause_cli.cli.docs docs/train.md`; a test checks them -->"
END = "<!-- end of the options of cause train -->"


def options_markdown(command_name: str = "train") -> str:
    """The command's options as markdown tables, one per help panel, in the help's order."""
    command = typer.main.get_command(app)
    subcommand = command.commands[command_name]  # type: ignore[attr-defined]
    context: Any = typer.Context(subcommand, info_name=command_name)
    panels: dict[str, list[Any]] = {}
    for param in subcommand.get_params(context):
        if param.param_type_name == "option" and not getattr(param, "hidden", False) and param.name != "help":
            panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(param)
    parts = []
    for title, params in panels.items():
        rows = [f"**{title}**", "", "| option | default | meaning |", "| --- | --- | --- |"]
        for param in params:
            names, (meaning, default) = option_names(param, context), option_help(param, apart=True)
            rows.append(f"| `{_cell(names)}` | {_cell(default or '')} | {_cell(meaning)} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def with_table(document: str, table: str) -> str:
    """``document`` with the text between the markers replaced by ``table``."""
    start, end = document.index(BEGIN) + len(BEGIN), document.index(END)
    return f"{document[:start]}\n\n{table}\n\n{document[end:]}"


def main(arguments: list[str]) -> int:
    path = Path(arguments[0] if arguments else "docs/train.md")
    path.write_text(with_table(path.read_text(encoding="utf-8"), options_markdown()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
