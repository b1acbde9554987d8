"""What a reader of another library's checkpoint format is given and gives back, and the
helpers the readers share."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ...files import is_state_dict
from ...tensors import canonical_name

__all__ = ["Found", "Context", "Format", "make_record", "schedule_dict", "int_value", "strip_prefix", "sibling_live"]


@dataclass
class Found:
    """An average read from a file: the format, where in the file it was (``key``), the
    averaged weights as a state dict that deploys it (None when the names are still needed:
    ``needs``), the live weights where known, and polyak records by name (the primary first)."""

    format: str
    key: str
    weights: dict[str, Tensor] | None
    live: dict[str, Tensor] | None
    records: dict[str, dict[str, Any]]
    primary: str
    notes: list[str] = field(default_factory=list)
    needs: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def record(self) -> dict[str, Any]:
        return self.records[self.primary]


@dataclass
class Context:
    """What a format reader may need besides the object: the file's path and metadata, the
    names (``--names-from``) for positional formats, and the top-level object (siblings)."""

    path: Path | None = None
    metadata: dict[str, str] | None = None
    names: Mapping[str, Tensor] | None = None
    names_from: str | None = None
    buffer_names: Sequence[str] = ()
    top: Any = None


@dataclass(frozen=True)
class Format:
    """One format: its name (``--format``), a line for the help, the reader (the object, or
    None if the object is not in this format), and whether it is also looked for one level
    down in a file."""

    name: str
    summary: str
    read: Callable[[Any, Context], Found | None]
    nested: bool = False


def make_record(cls: str, fmt: str, **fields: Any) -> dict[str, Any]:
    """A polyak record (:func:`polyak.checkpoint.record`'s fields) of class ``cls`` read from
    format ``fmt``, with the known ``fields`` (None ones left out, but ``schedule``)."""
    rec = {"class": cls, **{k: v for k, v in fields.items() if v is not None or k == "schedule"}}
    rec.setdefault("source", {"format": fmt})
    return rec


def schedule_dict(build: Callable[[], Any]) -> dict[str, Any] | None:
    """``build().to_dict()``, or None when the file's settings make no valid schedule."""
    try:
        return build().to_dict()
    except (ValueError, TypeError):
        return None


def int_value(v: Any) -> int | None:
    """An integer counter as a file stores it (an int, or a one-element integer tensor), else None."""
    if isinstance(v, Tensor) and v.numel() == 1 and not v.is_floating_point():
        return int(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    return None


def strip_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    """The tensors of ``sd`` whose keys start with ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix) and isinstance(v, Tensor)}


def sibling_live(obj: Any, ctx: Context, averaged: Mapping[str, Tensor]) -> tuple[dict[str, Tensor] | None, str]:
    """A plain state dict beside a nested average, holding the same tensors (the live model)."""
    top = ctx.top
    if not isinstance(top, Mapping) or top is obj:
        return None, ""
    want = {canonical_name(k) for k in averaged}
    for k, v in top.items():
        if v is obj or not is_state_dict(v):
            continue
        if want <= {canonical_name(n) for n in v}:
            return {canonical_name(n): t for n, t in v.items()}, str(k)
    return None, ""
