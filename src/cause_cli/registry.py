"""Registries of variants, as timm registers its models: each variant of one choice (a head,
a start or a space of the cluster probe) is added once, under the name the configuration
accepts, with everything the code needs to know about it; code that uses a variant looks it up
by name instead of branching on names."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .errors import CauseError

T = TypeVar("T")


class Registry(dict[str, T]):
    """Variants by name. ``registry[name]`` of a name not registered is one sentence
    (:class:`CauseError`) naming those that are."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what  # the choice's name in messages: "head", "cluster-probe start"

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as the variant ``name`` (a name is registered once)."""
        if name in self:
            raise ValueError(f"the {self.what} '{name}' is registered twice")
        self[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator that registers what it decorates as the variant ``name``."""
        return lambda entry: self.add(name, entry)

    def __missing__(self, name: str) -> T:
        raise CauseError(f"Unknown {self.what} '{name}'; this version offers: {', '.join(self)}.")
