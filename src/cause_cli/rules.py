"""Small rules that say what is wrong with a value read from a file (a run's ``run.json``, a
``--config`` file), in the words a message gives after "is ..., not": one place, used by the
settings' declaration (config.py) and the checks of a run folder (run_checks.py)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any


def shown(value: Any, limit: int = 40) -> str:
    """``value`` as a message shows it: its repr, cut short, on one line."""
    try:
        text = repr(value)
    except RecursionError:  # nested about as deeply as the JSON parser follows
        return f"a {type(value).__name__} nested too deeply to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# A rule takes a value and says what is wrong with it (after "is ... , not"), or None.
Rule = Callable[[Any], str | None]


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite number a float holds (JSON's integers may be longer than any float)."""
    if is_integer(value):
        return abs(value) <= sys.float_info.max
    return isinstance(value, float) and math.isfinite(value)


def integer(low: int, high: int, optional: bool = False) -> Rule:
    def rule(value: Any) -> str | None:
        if value is None and optional:
            return None
        if is_integer(value) and low <= value <= high:
            return None
        return f"a whole number from {low:,} to {high:,}" + (" (or null)" if optional else "")

    return rule


def number(low: float, high: float, optional: bool = False, low_open: bool = False, high_open: bool = False) -> Rule:
    def rule(value: Any) -> str | None:
        if value is None and optional:
            return None
        if is_number(value):
            above = value > low if low_open else value >= low
            below = value < high if high_open else value <= high
            if above and below:
                return None
        if math.isinf(high):
            expected = f"a finite number {'above' if low_open else 'of at least'} {low}"
        else:
            expected = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        return expected + (" (or null)" if optional else "")

    return rule


def flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def text(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string"


def name(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "a name"


def mapping(value: Any) -> str | None:
    return None if isinstance(value, dict) else "an object"


def choice(options: tuple[str, ...]) -> Rule:
    def rule(value: Any) -> str | None:
        return None if isinstance(value, str) and value in options else f"one of {', '.join(options)}"

    return rule


def either(*rules: Rule) -> Rule:
    """A value any of ``rules`` accepts."""

    def rule(value: Any) -> str | None:
        problems = [rule(value) for rule in rules]
        return None if None in problems else " or ".join(str(problem) for problem in problems)

    return rule


def or_null(rule: Rule) -> Rule:
    """``rule``, or null."""

    def either_null(value: Any) -> str | None:
        if value is None:
            return None
        problem = rule(value)
        return None if problem is None else f"{problem} (or null)"

    return either_null
