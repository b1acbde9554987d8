"""Registries: the names under which configs, checkpoints and the command line refer to classes.

One lookup rule and one error for every kind of name (schedules, averaged models, checkpoint
formats): a :class:`Registry` maps a name to an object, in registration order, and an unknown
name raises :class:`ValueError` listing the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one ``kind``, in registration order.

    >>> shapes = Registry("shape")
    >>> @shapes.register
    ... class Square: ...
    >>> shapes["Square"] is Square, list(shapes)
    (True, ['Square'])
    >>> shapes["Circle"]
    Traceback (most recent call last):
    ValueError: unknown shape 'Circle'; known: ['Square']
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    @overload
    def register(self, obj: T, *, name: str | None = None) -> T: ...

    @overload
    def register(self, obj: None = None, *, name: str | None = None) -> Callable[[T], T]: ...

    def register(self, obj: T | None = None, *, name: str | None = None) -> T | Callable[[T], T]:
        """Add ``obj`` under ``name`` (default: its ``__name__``); usable as a decorator, with
        or without ``name=``. A name is registered once: another object under a taken name
        raises :class:`KeyError`."""

        def add(o: T) -> T:
            key = name if name is not None else getattr(o, "__name__", None)
            if not isinstance(key, str) or not key:
                raise ValueError(f"a {self.kind} needs a name, got {o!r}")
            old = self._entries.get(key)
            if old is not None and old is not o:
                raise KeyError(f"{self.kind} {key!r} is already registered as {old!r}")
            self._entries[key] = o
            return o

        return add if obj is None else add(obj)

    def __getitem__(self, name: str) -> T:
        return self.lookup(name)

    def lookup(self, name: str, *, what: str | None = None) -> T:
        """The object registered as ``name``; else :class:`ValueError` calling the name ``what``
        (the argument it came from; default: the registry's kind) and listing the known ones."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {what or self.kind} {name!r}; known: {sorted(self._entries)}") from None

    def get(self, name: str, default: T | None = None) -> T | None:
        return self._entries.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
