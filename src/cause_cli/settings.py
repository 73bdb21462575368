"""How a setting is declared: one dataclass field that carries its help, panel, range, choices
and flag, from which the command line, the checks of files and the docs are made."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .rules import Rule, choice


def setting(
    default: Any,
    help: str,
    panel: str,
    rule: Rule | None = None,
    *,
    flag: str | None = None,
    choices: Callable[[], tuple[str, ...]] | None = None,
    noun: str | None = None,
    shown_default: str | None = None,
    metavar: str | None = None,
    on_command_line: bool = True,
) -> Any:
    """A dataclass field with everything said about it: ``choices`` gives its accepted values
    (asked when needed, so a registered variant can add to them), ``noun`` what messages call
    one, ``shown_default`` how help and docs show a default of None. Without a ``rule``, a value
    must be one of the ``choices``."""
    if rule is None:
        assert choices is not None, "a setting without a rule has choices"
        rule = choice_rule(choices)
    metadata = {
        "help": help,
        "panel": panel,
        "rule": rule,
        "flag": flag,
        "choices": choices,
        "noun": noun,
        "shown_default": shown_default,
        "on_command_line": on_command_line,
        "metavar": metavar,
    }
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


def choice_rule(choices: Callable[[], tuple[str, ...]]) -> Rule:
    """The rule of a setting whose accepted values are ``choices()`` when it is checked."""
    return lambda value: choice(choices())(value)


def settings_of(cls: type) -> list[Setting]:
    """Every setting of the dataclass ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    return [Setting.of(entry, hints[entry.name]) for entry in dataclasses.fields(cls)]


@dataclass(frozen=True)
class Setting:
    """One setting as the CLI, the checks and the docs see it."""

    name: str
    kind: type  # int, float, bool, str or dict
    default: Any
    may_be_none: bool
    help: str
    panel: str
    rule: Rule
    flag: str
    choices: Callable[[], tuple[str, ...]] | None
    noun: str | None
    shown_default: str | None
    on_command_line: bool
    metavar: str | None

    @classmethod
    def of(cls, entry: dataclasses.Field[Any], hint: Any) -> Setting:
        kind = hint
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            kind = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        kind = typing.get_origin(kind) or kind
        meta = entry.metadata
        default = {} if entry.default is dataclasses.MISSING else entry.default
        return cls(
            name=entry.name,
            kind=kind,
            default=default,
            may_be_none=type(None) in typing.get_args(hint) or default is None,
            help=meta["help"],
            panel=meta["panel"],
            rule=meta["rule"],
            flag=meta["flag"] or "--" + entry.name.replace("_", "-"),
            choices=meta["choices"],
            noun=meta["noun"],
            shown_default=meta["shown_default"],
            on_command_line=meta["on_command_line"],
            metavar=meta["metavar"],
        )

    @property
    def accepted(self) -> tuple[str, ...] | None:
        return self.choices() if self.choices else None

    def unknown_choice(self, value: Any) -> str | None:
        """One sentence for a value outside the setting's choices, or None."""
        accepted = self.accepted
        if accepted is None or self.noun is None or not isinstance(value, str) or value in accepted:
            return None
        listed = " or ".join(accepted) if len(accepted) == 2 else ", ".join(accepted)
        return f"Unknown {self.noun} '{value}'; choose {listed}."

    def default_text(self) -> str:
        """The default as help and docs show it."""
        if self.shown_default is not None:
            return self.shown_default
        if self.kind is bool:
            return "on" if self.default else "off"
        return str(self.default)
