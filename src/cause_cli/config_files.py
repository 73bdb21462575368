"""``cause train --config FILE``: settings from a JSON, YAML or TOML file holding a plain
mapping, or from a run's own ``run.json`` (its ``config``), each key checked against the
settings' declarations before anything runs."""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import CauseError
from .rules import or_null, shown
from .settings import Setting

# A settings file is a few kilobytes; a larger one is not one, and is not read into memory.
MAX_SETTINGS_FILE_BYTES = 16 * 2**20


def read_settings_file(path: Path) -> dict[str, Any]:
    """The settings ``path`` holds, by their names in :class:`TrainConfig`, every one checked;
    one sentence naming the first key that is unknown or of the wrong type."""
    data = _parsed(path)
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "toolkit_version" in data:
        # A run's run.json: its resolved settings, read as runs of every version wrote them.
        data = TrainConfig.from_dict(data["config"]).to_dict()
    if not isinstance(data, dict):
        raise CauseError(f"{path} holds {type(data).__name__ if data is not None else 'nothing'}, not a mapping of "
                         "settings (name: value).")  # fmt: skip
    return settings_from_mapping(data, str(path))


def settings_from_mapping(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data``'s settings by their names in :class:`TrainConfig`; keys may be written as the
    options are (``batch-size``, ``loader-workers``) too."""
    by_key: dict[str, Setting] = {}
    for declared in TrainConfig.settings():
        by_key[declared.name] = declared
        by_key[declared.flag.removeprefix("--").replace("-", "_")] = declared
    chosen: dict[str, Any] = {}
    for key, value in data.items():
        setting = by_key.get(str(key).replace("-", "_"))
        if setting is None:
            close = difflib.get_close_matches(str(key).replace("-", "_"), list(by_key), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CauseError(f"{source}: '{key}' is not a setting of cause train{hint}.")
        unknown = setting.unknown_choice(value)
        if unknown:
            raise CauseError(f"{source}: {unknown}")
        rule = or_null(setting.rule) if setting.may_be_none else setting.rule
        problem = rule(value)
        if problem is not None:
            raise CauseError(f"{source}: '{key}' is {shown(value)}, not {problem}.")
        chosen[setting.name] = value
    return chosen


def _parsed(path: Path) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_SETTINGS_FILE_BYTES:
            raise CauseError(f"{path} holds {size:,} bytes, more than a settings file does; is it the right file?")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "it is not UTF-8 text"
        raise CauseError(f"Cannot read the settings file {path}: {reason or error}.") from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        if suffix == ".toml":
            return _toml().loads(text)
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # JSON's, TOML's errors
        raise CauseError(f"{path} is not valid {_format_name(suffix)}: {_first_line(error)}.") from None
    except Exception as error:  # YAML's errors derive from its own base class
        if type(error).__module__.startswith("yaml"):
            raise CauseError(f"{path} is not valid YAML: {_first_line(error)}.") from None
        raise


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli

        return tomli
    except ImportError:
        raise CauseError("Reading TOML needs Python 3.11 or the tomli package; give JSON or YAML instead.") from None


def _format_name(suffix: str) -> str:
    return {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}.get(suffix, "JSON")


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]
