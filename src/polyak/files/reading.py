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
import pickle
import struct
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import checkpoint as ckpt
from .errors import FormatError, first_line
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
    ``"unknown"``, from the first bytes of the file."""
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
    """One file as read: ``obj`` (a dict of tensors for safetensors), how it was read
    (``"safetensors"``, ``"weights_only"``, ``"restricted"`` or ``"unsafe"``), the globals that
    became :class:`Opaque` placeholders, and a safetensors file's metadata."""

    path: Path
    obj: Any
    loader: str
    replaced: Counter[str] = field(default_factory=Counter)
    metadata: dict[str, str] | None = None

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

    ``mmap`` maps a ``torch.save`` zip file instead of reading it (tensors are paged in as they
    are used). ``lazy_safetensors`` returns a safetensors file as a :class:`SafetensorsFile`
    (tensors read one at a time) instead of a dict. Raises :class:`FormatError`.
    """
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file")
    if path.is_dir():
        raise FormatError(f"{path} is a directory, not a checkpoint file")
    try:
        kind = sniff(path)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {first_line(e)}") from e
    if kind == "safetensors":
        sf = SafetensorsFile(path)
        obj: Any = sf if lazy_safetensors else sf.load_all()
        return Loaded(path, obj, "safetensors", metadata=sf.metadata)
    if kind == "unknown":
        raise FormatError(f"{path} is not a PyTorch (torch.save) or safetensors checkpoint")
    # torch.load hands a path ending in .safetensors to safetensors: give it the open file then
    odd_name = path.name.endswith(".safetensors")
    use_mmap = mmap and kind == "zip" and not odd_name

    def torch_load(**kwargs: Any) -> Any:
        if not odd_name:
            return torch.load(path, map_location="cpu", mmap=use_mmap, **kwargs)
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", **kwargs)

    if unsafe:
        try:
            obj = torch_load(weights_only=False)
        except Exception as e:
            raise FormatError(f"{path} could not be read: {first_line(e)}") from e
        return Loaded(path, obj, "unsafe")
    try:
        return Loaded(path, torch_load(weights_only=True), "weights_only")
    except pickle.UnpicklingError:
        pass  # other objects than tensors: read them as placeholders below
    except Exception as e:
        raise FormatError(f"{path} is corrupt or not a PyTorch checkpoint: {first_line(e)}") from e
    replaced: Counter[str] = Counter()
    try:
        obj = torch_load(weights_only=False, pickle_module=restricted_pickle_module(replaced))
    except Exception as e:
        raise FormatError(f"{path} is corrupt or not a PyTorch checkpoint: {first_line(e)}") from e
    return Loaded(path, obj, "restricted", replaced)


# -- walking what was loaded ----------------------------------------------------------------------


def iter_tensors(obj: Any, path: str = "") -> Iterator[tuple[str, Tensor]]:
    """Every tensor in ``obj`` (dicts, lists, tuples, :class:`Opaque` data), with a path."""
    seen: set[int] = set()

    def walk(o: Any, p: str) -> Iterator[tuple[str, Tensor]]:
        if isinstance(o, Tensor):
            yield p, o
            return
        if id(o) in seen:
            return
        if isinstance(o, Mapping):
            seen.add(id(o))
            for k, v in o.items():
                yield from walk(v, f"{p}.{k}" if p else str(k))
        elif isinstance(o, (list, tuple)):
            seen.add(id(o))
            for i, v in enumerate(o):
                yield from walk(v, f"{p}[{i}]")
        elif isinstance(o, Opaque):
            seen.add(id(o))
            for name in ("args", "kwargs", "state", "items", "entries"):
                yield from walk(getattr(o, name, None), f"{p}<{name}>")

    yield from walk(obj, path)


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
