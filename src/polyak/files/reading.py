"""Reading checkpoint files without running code from them, and finding the weights inside.

A ``.pt`` file is read with ``torch.load(weights_only=True)``; one that also holds other objects
(an mmengine checkpoint keeps its own classes in ``message_hub``, which ``weights_only``
refuses) is read again with a restricted unpickler (:mod:`polyak.files.unpickler`) that builds
tensors, storages and plain containers, and turns every other class or function the file names
into an inert :class:`~polyak.files.unpickler.Opaque` placeholder, so nothing is imported or
called and the tensors beside it are still read. Only ``unsafe=True`` (the ``--unsafe`` option)
unpickles the file as it asks. safetensors files hold no code.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import checkpoint as ckpt
from .errors import FormatError, first_line, shown
from .paths import check_input, openable
from .streaming import SafetensorsFile
from .unpickler import Opaque, restricted_pickle_module

__all__ = [
    "sniff",
    "Loaded",
    "load",
    "iter_tensors",
    "is_state_dict",
    "tensors_only",
    "MODEL_KEYS",
    "model_state_dict",
]


def sniff(path: Path) -> str:
    """``"safetensors"``, ``"zip"`` (``torch.save``), ``"pickle"`` (legacy ``torch.save``) or
    ``"unknown"``, from the first bytes of the file (which must be a regular file:
    :func:`~polyak.files.paths.check_input`)."""
    path = check_input(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000 and n + 8 <= os.path.getsize(path):
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


@dataclass
class Loaded:
    """One file (or folder) as read: ``obj`` (a dict of tensors for safetensors), how it was
    read (``"safetensors"``, ``"weights_only"``, ``"restricted"``, ``"unsafe"``, or ``"dcp"``
    for a ``torch.distributed.checkpoint`` folder), the globals that became :class:`Opaque`
    placeholders, and a safetensors file's metadata."""

    path: Path
    obj: Any
    loader: str
    replaced: Counter[str] = field(default_factory=Counter)
    metadata: dict[str, str] | None = None
    #: For a folder read as a tree of placeholders (:meth:`polyak.files.Weights.tree`): by
    #: ``id`` of each placeholder, the function that reads its tensor (:meth:`tensor`).
    origins: dict[int, Callable[[], Tensor]] = field(default_factory=dict)
    #: The reader of a folder (:class:`polyak.files.Weights`), None for a file.
    reader: Any = None

    def tensor(self, t: Tensor) -> Tensor:
        """``t`` with its data: ``t`` itself, or, for a placeholder on the ``meta`` device, the
        tensor read from the folder."""
        if t.device.type != "meta":
            return t
        read = self.origins.get(id(t))
        if read is None:
            raise FormatError(f"{shown(self.path)}: a tensor was not read from the checkpoint (a placeholder)")
        return read()

    @property
    def note(self) -> str | None:
        """A line for the user when the file held objects that were not loaded."""
        if not self.replaced:
            return None
        names = ", ".join(sorted(self.replaced)[:4]) + (" ..." if len(self.replaced) > 4 else "")
        return f"{self.path.name} holds objects besides tensors ({names}): read as inert placeholders"


def load(
    path: str | os.PathLike[str], *, unsafe: bool = False, mmap: bool = True, lazy_safetensors: bool = False
) -> Loaded:
    """Read a checkpoint file without running code from it (see the module docstring).

    The path must be a regular file (a FIFO or a device is refused before it is opened); a name
    that is not valid UTF-8 is read too. ``mmap`` maps a ``torch.save`` zip file instead of
    reading it (tensors are paged in as they are used). ``lazy_safetensors`` returns a
    safetensors file as a :class:`SafetensorsFile` (tensors read one at a time) instead of a
    dict. Raises :class:`FormatError`.
    """
    path = check_input(path)
    try:
        kind = sniff(path)
    except OSError as e:
        raise FormatError(f"{shown(path)}: cannot read: {first_line(e)}") from e
    if kind == "safetensors":
        sf = SafetensorsFile(path)
        obj: Any = sf if lazy_safetensors else sf.load_all()
        return Loaded(path, obj, "safetensors", metadata=sf.metadata)
    if kind == "unknown":
        raise FormatError(f"{shown(path)} is not a PyTorch (torch.save) or safetensors checkpoint")
    replaced: Counter[str] = Counter()
    options: dict[str, Any] = {"map_location": "cpu", "weights_only": False}
    if not unsafe:
        options["pickle_module"] = restricted_pickle_module(replaced)
    try:
        obj = _torch_load(path, mmap=mmap and kind == "zip", **options)
    except Exception as e:
        what = "could not be read" if unsafe else "is corrupt or not a PyTorch checkpoint"
        raise FormatError(f"{shown(path)} {what}: {first_line(e)}") from e
    return Loaded(path, obj, "unsafe" if unsafe else "restricted", replaced)


def _torch_load(path: Path, *, mmap: bool, **options: Any) -> Any:
    """``torch.load`` of ``path``, mapped when asked; through the open file when the name ends
    in ``.safetensors`` (``torch.load`` would hand such a path to safetensors)."""
    with openable(path) as name:
        if path.name.endswith(".safetensors"):
            with open(name, "rb") as f:
                return torch.load(f, **options)
        return torch.load(name, mmap=mmap, **options)


# -- walking what was loaded ----------------------------------------------------------------------


def iter_tensors(obj: Any, path: str = "") -> Iterator[tuple[str, Tensor]]:
    """Every tensor in ``obj`` (dicts, lists, tuples, :class:`Opaque` data), with a path, depth
    first. Iterative, so a file nested a million levels deep is walked, not a RecursionError."""
    seen: set[int] = set()
    stack: list[Iterator[tuple[str, Any]]] = [iter([(path, obj)])]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        p, o = item
        if isinstance(o, Tensor):
            yield p, o
            continue
        if id(o) in seen:
            continue
        if isinstance(o, Mapping):
            seen.add(id(o))
            stack.append(((f"{p}.{k}" if p else str(k), v) for k, v in list(o.items())))
        elif isinstance(o, (list, tuple)):
            seen.add(id(o))
            stack.append(((f"{p}[{i}]", v) for i, v in enumerate(o)))
        elif isinstance(o, Opaque):
            seen.add(id(o))
            stack.append((f"{p}<{n}>", getattr(o, n, None)) for n in ("args", "kwargs", "state", "items", "entries"))


def is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of string names to tensors."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def tensors_only(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


#: Keys of a training checkpoint that hold the model's weights, in the order they are tried.
MODEL_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")


def model_state_dict(obj: Any, *, key: str | None = None) -> tuple[dict[str, Tensor], str]:
    """The weights a file holds, and where they were found: ``key`` if given; the primary
    average of a polyak checkpoint; the first of :data:`MODEL_KEYS` that is a state dict; or
    the file itself when it is one. Raises :class:`FormatError`."""
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            have = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
            raise FormatError(f"no {key!r} in the file (it has {have})")
        value = obj[key]
        if not isinstance(value, Mapping) or not tensors_only(value):
            raise FormatError(f"{key!r} holds no tensors")
        return tensors_only(value), key
    if isinstance(obj, Mapping) and ckpt.has_averages(obj):
        meta = obj[ckpt.KEY]
        wk = meta.get("weights_key")
        if isinstance(obj.get(wk), Mapping):
            return tensors_only(obj[wk]), f"{wk} (polyak's primary average {meta.get('primary')!r})"
    if isinstance(obj, Mapping):
        for k in MODEL_KEYS:
            if isinstance(obj.get(k), Mapping) and tensors_only(obj[k]):
                return tensors_only(obj[k]), k
        if is_state_dict(obj):
            return dict(obj), "the file's top level"
    raise FormatError("holds no state dict (looked for " + ", ".join(repr(k) for k in MODEL_KEYS) + ")")
