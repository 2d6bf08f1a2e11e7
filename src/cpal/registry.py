"""Named entries of one kind (methods, backbones, segmenters, refiners), each registered in
the module that defines it (timm's pattern), so that adding one is a file plus a
registration and no other module branches on its name.

A registry knows the modules holding its built-in entries (`builtins`) and imports them
on the first lookup; a user's own entries register on import of their module the same
way. Unknown names fail with the close ones named, as config keys do.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from cpal.errors import ConfigError

T = TypeVar("T")


class UnknownNameError(ConfigError, ValueError):
    """A name that no entry of a registry has (a ConfigError for the command line, a
    ValueError for code that builds by name)."""


def _as_is(name: str) -> str:
    return name


class Registry(Generic[T]):
    """name -> entry, in registration order; `normalize` maps a spelling to its key
    (e.g. 'DeepLab-v2' -> 'deeplab_v2') before aliases are looked up."""

    def __init__(self, kind: str, *, builtins: Sequence[str] = (),
                 normalize: Callable[[str], str] = _as_is) -> None:
        self.kind = kind
        self._builtins = tuple(builtins)
        self._loaded = not self._builtins
        self._normalize = normalize
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, entry: T, *, aliases: Sequence[str] = ()) -> T:
        """Add `entry` under `name` (and `aliases`); returns it, so a module can write
        `THING = REGISTRY.register("thing", Thing(...))`."""
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
        self._entries[name] = entry
        self._aliases.update(dict.fromkeys(aliases, name))
        return entry

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # before the imports: they register into this registry
            for module in self._builtins:
                importlib.import_module(module)

    def canonical(self, name: str) -> str:
        """The registered key of `name` (any spelling `normalize` accepts, or an alias)."""
        self._load()
        key = self._normalize(name) if isinstance(name, str) else name
        key = self._aliases.get(key, key)
        if key in self._entries:
            return key
        names = list(self._entries)
        close = difflib.get_close_matches(str(name), [*names, *self._aliases], n=1)
        hint = f" (did you mean '{self._aliases.get(close[0], close[0])}'?)" if close else ""
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}{hint}; choose one of {', '.join(names)}"
        )

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    __getitem__ = get

    def check(self, name: str, key: str) -> str:
        """`canonical(name)` for config key `key`: an unknown name is a ConfigError that
        starts with the key, as every config error does."""
        try:
            return self.canonical(name)
        except UnknownNameError as exc:
            raise UnknownNameError(f"'{key}': {exc}") from None

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.canonical(name)
        except UnknownNameError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
