"""Checkpoint files for the command line: safe loading, format detection, the averages other
libraries save, and atomic writes.

Reading never runs code stored in a file (docs/cli.md, "Safety"). A ``.pt`` file is read with
``torch.load(weights_only=True)``; one that also holds other objects (an mmengine checkpoint
keeps its own classes in ``message_hub``, which ``weights_only`` refuses) is read again with a
restricted unpickler that builds tensors, storages and plain containers, and turns every other
class or function the file names into an inert :class:`Opaque` placeholder, so nothing is
imported or called and the tensors beside it are still read. Only ``unsafe=True`` (the
``--unsafe`` option) unpickles the file as it asks. safetensors files hold no code.

The formats read (:data:`FORMATS`), each turned into a :class:`Found`: the averaged weights as a
deployable state dict, the live weights where known, and polyak's record of the averaging
(class, schedule, counters) for :func:`polyak.checkpoint.pack_state`:

=========================  ==================================================================
``polyak``                 polyak's checkpoint format (docs/checkpoint-format.md)
``polyak-export``          weights written by ``polyak export`` / ``average`` / ``posthoc``
``mmengine``               mmengine ``EMAHook``: ``state_dict`` = average, ``ema_state_dict``
                           = live (``module.`` + ``steps``)
``lightning``              Lightning ``WeightAveraging``: ``state_dict`` = average,
                           ``current_model_state`` = live, ``averaging_state``
``timm``                   ``state_dict_ema`` beside ``state_dict``
``mmcv``                   mmcv 1.x ``EMAHook``: ``ema_<name with . as _>`` buffers in
                           ``state_dict``
``torch-averaged-model``   ``torch.optim.swa_utils.AveragedModel.state_dict()``
                           (``n_averaged``, ``module.*``)
``averaged-model``         mmengine/mmagic ``BaseAveragedModel.state_dict()`` (``steps``,
                           ``module.*``)
``ema-pytorch``            ema-pytorch ``EMA`` / ``KarrasEMA`` (``initted``, ``step``,
                           ``ema_model.*``, ``online_model.*``)
``torch-ema``              torch_ema ``ExponentialMovingAverage`` (``shadow_params`` by position)
``diffusers``              diffusers ``EMAModel`` (``shadow_params`` by position)
=========================  ==================================================================
"""

from __future__ import annotations

import _compat_pickle
import ast
import contextlib
import fnmatch
import io
import json
import math
import os
import pickle
import re
import struct
import sys
import tempfile
import types
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import checkpoint as ckpt
from .engine import canonical_name

__all__ = [
    "FormatError",
    "Opaque",
    "Loaded",
    "Found",
    "FORMATS",
    "sniff",
    "load",
    "restricted_pickle_module",
    "iter_tensors",
    "is_state_dict",
    "model_state_dict",
    "detect",
    "identify",
    "match_by_position",
    "atomic_write",
    "save_weights",
    "write_safetensors",
    "save_checkpoint",
    "check_output",
    "schedule_summary",
]


class FormatError(ValueError):
    """A file that cannot be read, or holds nothing the command can use (one-line message)."""


# -- safe loading ---------------------------------------------------------------------------------


class Opaque:
    """Stands in for an object of a class (or the result of a function) that the restricted
    unpickler does not load. Nothing of the original class is imported or run: the arguments
    and state the file gives are kept as data (``args``, ``kwargs``, ``state``, ``items``,
    ``entries``), so tensors inside them can still be found."""

    #: ``module.name`` of the global the file asked for.
    origin = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        obj.items, obj.entries = [], {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.entries[key] = value

    def __repr__(self) -> str:
        return f"<opaque {self.origin}>"


_OPAQUE_CLASSES: dict[str, type[Opaque]] = {}


def _opaque_class(module: str, name: str) -> type[Opaque]:
    origin = f"{module}.{name}"
    cls = _OPAQUE_CLASSES.get(origin)
    if cls is None:
        cls = type(f"Opaque[{origin}]", (Opaque,), {"origin": origin, "__module__": __name__})
        _OPAQUE_CLASSES[origin] = cls
    return cls


def _allowed_globals() -> dict[str, Any]:
    """What the restricted unpickler builds for real: torch's own ``weights_only`` allow-list
    (tensor rebuild functions, storages, dtypes, ``torch.Size``, ``OrderedDict``, ...) and the
    plain builtin containers."""
    from torch import _weights_only_unpickler

    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    for t in (set, frozenset, list, dict, tuple, complex, bytearray, slice, range):
        allowed[f"builtins.{t.__name__}"] = t
    return allowed


def restricted_pickle_module(replaced: Counter[str] | None = None) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` whose unpickler builds only what
    :func:`_allowed_globals` lists and an :class:`Opaque` placeholder for every other global
    (counted in ``replaced`` by ``module.name``). No other code runs while loading."""
    allowed = _allowed_globals()
    seen = replaced if replaced is not None else Counter()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            # Python 2 names, as protocol 2 (torch.save's default) writes them: __builtin__.set
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
            key = f"{module}.{name}"
            if key in allowed:
                return allowed[key]
            seen[key] += 1
            return _opaque_class(module, name)

    def load(file: Any, **kwargs: Any) -> Any:
        return Unpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs: Any) -> Any:
        return Unpickler(io.BytesIO(data), **kwargs).load()

    module = types.ModuleType("polyak_restricted_pickle")
    module.Unpickler = Unpickler  # type: ignore[attr-defined]
    module.load = load  # type: ignore[attr-defined]
    module.loads = loads  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return module


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return text.splitlines()[0][:300]


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
        raise FormatError(f"{path}: cannot read: {_first_line(e)}") from e
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
            raise FormatError(f"{path} could not be read: {_first_line(e)}") from e
        return Loaded(path, obj, "unsafe")
    try:
        return Loaded(path, torch_load(weights_only=True), "weights_only")
    except pickle.UnpicklingError:
        pass  # other objects than tensors: read them as placeholders below
    except Exception as e:
        raise FormatError(f"{path} is corrupt or not a PyTorch checkpoint: {_first_line(e)}") from e
    replaced: Counter[str] = Counter()
    try:
        obj = torch_load(weights_only=False, pickle_module=restricted_pickle_module(replaced))
    except Exception as e:
        raise FormatError(f"{path} is corrupt or not a PyTorch checkpoint: {_first_line(e)}") from e
    return Loaded(path, obj, "restricted", replaced)


class SafetensorsFile:
    """A safetensors file read lazily: names, shapes and dtypes from the header, one tensor at
    a time with :meth:`get` (``safe_open``)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        try:
            self._handle = safe_open(str(path), framework="pt")
            self.metadata: dict[str, str] = dict(self._handle.metadata() or {})
            self._keys = list(self._handle.keys())
            self._info = {k: self._handle.get_slice(k) for k in self._keys}
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise FormatError(f"{path} is a damaged safetensors file: {_first_line(e)}") from e

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._info[key].get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES.get(self._info[key].get_dtype(), torch.uint8)

    def get(self, key: str) -> Tensor:
        try:
            return self._handle.get_tensor(key)
        except Exception as e:
            raise FormatError(f"{self.path}: tensor {key!r} could not be read: {_first_line(e)}") from e

    def load_all(self) -> dict[str, Tensor]:
        return {k: self.get(k) for k in self._keys}


#: safetensors dtype names (the format's own, as the safetensors package writes them).
_SAFETENSORS_DTYPES = {
    "C64": torch.complex64,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


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


def _tensors_only(obj: Mapping[str, Any]) -> dict[str, Tensor]:
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
        if not isinstance(value, Mapping) or not _tensors_only(value):
            raise FormatError(f"{key!r} holds no tensors")
        return _tensors_only(value), key
    if isinstance(obj, Mapping) and ckpt.has_averages(obj):
        meta = obj[ckpt.KEY]
        wk = meta.get("weights_key")
        if isinstance(obj.get(wk), Mapping):
            return _tensors_only(obj[wk]), f"{wk} (polyak's primary average {meta.get('primary')!r})"
    if isinstance(obj, Mapping):
        for k in MODEL_KEYS:
            if isinstance(obj.get(k), Mapping) and _tensors_only(obj[k]):
                return _tensors_only(obj[k]), k
        if is_state_dict(obj):
            return dict(obj), "the file's top level"
    raise FormatError("holds no state dict (looked for " + ", ".join(repr(k) for k in MODEL_KEYS) + ")")


# -- what a format gives ----------------------------------------------------------------------------


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
    name: str
    summary: str
    read: Callable[[Any, Context], Found | None]
    nested: bool = False


def _record(cls: str, fmt: str, **fields: Any) -> dict[str, Any]:
    rec = {"class": cls, **{k: v for k, v in fields.items() if v is not None or k == "schedule"}}
    rec.setdefault("source", {"format": fmt})
    return rec


def _schedule(build: Callable[[], Any]) -> dict[str, Any] | None:
    try:
        return build().to_dict()
    except (ValueError, TypeError):
        return None


def _int(v: Any) -> int | None:
    if isinstance(v, Tensor) and v.numel() == 1 and not v.is_floating_point():
        return int(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    return None


def _strip(sd: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix) and isinstance(v, Tensor)}


def _fill(averaged: Mapping[str, Tensor], live: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """``live`` with the averaged tensors in place (a complete state dict), or the averaged
    tensors alone when the live ones are unknown."""
    if not live:
        return dict(averaged)
    out = dict(live)
    by_name = {canonical_name(k): k for k in live}
    for k, v in averaged.items():
        out[by_name.get(canonical_name(k), k)] = v
    return out


# polyak


def _read_polyak(obj: Any, ctx: Context) -> Found | None:
    if not (isinstance(obj, Mapping) and ckpt.has_averages(obj)):
        return None
    meta = obj[ckpt.KEY]
    records = {name: dict(rec) for name, rec in dict(meta.get("averages") or {}).items()}
    if not records:
        raise FormatError("the polyak block records no average")
    primary = meta.get("primary") or next(iter(records))
    weights_key, live_key, prefix = meta.get("weights_key"), meta.get("live_key"), meta.get("live_prefix", "")
    notes = []
    view = dict(obj)
    if weights_key not in view and ctx.path is not None:
        # the Hugging Face Trainer's polyak_averages.pt leaves the primary to model.safetensors
        sibling = ctx.path.parent / str(weights_key)
        if sibling.is_file():
            view[weights_key] = load(sibling).obj
            notes.append(f"the primary average's weights were read from {sibling.name} beside the file")
    try:
        weights = ckpt.deployable_weights(view, primary)
    except KeyError as e:
        raise FormatError(f"polyak checkpoint: {e.args[0] if e.args else e}") from e
    except ValueError as e:  # a newer format_version
        raise FormatError(f"polyak checkpoint: {e}") from e
    live = _strip(view[live_key], prefix) if isinstance(view.get(live_key), Mapping) else None
    for name, rec in records.items():
        if name != primary and isinstance(rec.get("weights"), Mapping):
            rec["weights"] = dict(rec["weights"])
    return Found("polyak", "", _tensors_only(weights), live, records, primary, notes)


# polyak's own exports


def _read_export(obj: Any, ctx: Context) -> Found | None:
    meta = ctx.metadata if ctx.metadata is not None else None
    weights = obj
    if meta is None and isinstance(obj, Mapping) and set(obj) == {"state_dict", "metadata"}:
        meta, weights = obj["metadata"], obj["state_dict"]
    if not isinstance(meta, Mapping) or not str(meta.get("format", "")).startswith("polyak-"):
        return None
    if not is_state_dict(weights):
        return None
    meta = {str(k): str(v) for k, v in meta.items()}
    rec: dict[str, Any] = {"class": meta.get("class") or meta.get("method") or "unknown"}
    if meta.get("schedule"):
        with contextlib.suppress(ValueError):
            rec["schedule"] = json.loads(meta["schedule"])
    elif meta.get("gamma"):  # a post-hoc synthesis: the power function it stands for
        with contextlib.suppress(ValueError):
            rec["schedule"] = {"type": "PowerFunction", "args": {"gamma": float(meta["gamma"])}}
    if meta.get("step", "").isdigit():
        rec["steps"] = int(meta["step"])
    rec["source"] = {"format": "polyak-export", "metadata": meta}
    return Found("polyak-export", "", dict(weights), None, {"ema": rec}, "ema", metadata=meta)


# mmengine


def _config_text(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("meta")
    if isinstance(meta, Mapping):
        for k in ("cfg", "config"):
            if isinstance(meta.get(k), str) and meta[k].strip():
                return meta[k]
    return None


def _hook_config(text: str | None, types_: Sequence[str]) -> dict[str, Any] | None:
    """The literal arguments of the first ``dict(type=<one of types_>, ...)`` in an OpenMMLab
    config's text. The text is parsed (``ast``), never run; non-literal arguments are left out."""
    if not text:
        return None
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        pairs: list[tuple[str, ast.expr]] = []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
            pairs = [(kw.arg, kw.value) for kw in node.keywords if kw.arg]
        elif isinstance(node, ast.Dict):
            pairs = [
                (k.value, v)
                for k, v in zip(node.keys, node.values, strict=True)
                if isinstance(k, ast.Constant) and isinstance(k.value, str)
            ]
        args: dict[str, Any] = {}
        for name, value in pairs:
            with contextlib.suppress(ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                args[name] = ast.literal_eval(value)
        if args.get("type") in types_:
            return args
    return None


def _openmmlab_record(cfg: Mapping[str, Any] | None, steps: int | None, fmt: str) -> dict[str, Any]:
    """polyak's record for an mmengine ``EMAHook`` configured with ``cfg`` (its literal
    arguments; mmengine's defaults where absent)."""
    from . import schedules as s

    cfg = dict(cfg or {})
    ema_type = cfg.get("ema_type", "ExponentialMovingAverage")
    momentum = cfg.get("momentum", 0.0002)
    builders: dict[str, Callable[[], Any]] = {
        "ExponentialMovingAverage": lambda: s.ConstantMomentum(momentum),
        "MomentumAnnealingEMA": lambda: s.MomentumAnnealing(momentum, cfg.get("gamma", 100)),
        "StochasticWeightAverage": lambda: s.EqualAverage(),
        "ExpMomentumEMA": lambda: s.ExpMomentum(momentum, cfg.get("gamma", 2000)),
    }
    name = ema_type.removeprefix("Polyak") if isinstance(ema_type, str) else "ExponentialMovingAverage"
    schedule = _schedule(builders[name]) if name in builders and cfg else None
    interval = cfg.get("interval", 1) if isinstance(cfg.get("interval", 1), int) else 1
    return _record(
        name,
        fmt,
        schedule=schedule,
        counters={"steps": steps} if steps is not None else {},
        steps=steps,
        interval=interval,
        compensate_interval=False,  # mmengine's numbers
        update_buffers=bool(cfg.get("update_buffers", False)),
    )


def _read_mmengine(obj: Any, ctx: Context) -> Found | None:
    if not (isinstance(obj, Mapping) and isinstance(obj.get("ema_state_dict"), Mapping)):
        return None
    if not isinstance(obj.get("state_dict"), Mapping):
        return None
    ema = obj["ema_state_dict"]
    if not any(isinstance(k, str) and k.startswith("module.") for k in ema):
        return None
    state = _tensors_only(obj["state_dict"])
    live_part = _strip(ema, "module.")
    missing = [k for k in live_part if k not in state]
    if missing:
        raise FormatError(f"mmengine checkpoint: ema_state_dict names tensors absent from state_dict: {missing[:5]}")
    # EMAHook swaps on save: state_dict holds the average, ema_state_dict the live weights.
    live = {**state, **live_part}
    steps = _int(ema.get("steps"))
    cfg = _hook_config(_config_text(obj), ("EMAHook", "PolyakEMAHook"))
    rec = _openmmlab_record(cfg, steps, "mmengine")
    notes = [] if cfg else ["no EMAHook settings in meta.cfg: the schedule is unknown"]
    return Found("mmengine", "", state, live, {"ema": rec}, "ema", notes)


# Lightning


def _read_lightning(obj: Any, ctx: Context) -> Found | None:
    if not isinstance(obj, Mapping):
        return None
    if not (isinstance(obj.get("current_model_state"), Mapping) and isinstance(obj.get("averaging_state"), Mapping)):
        return None
    if not isinstance(obj.get("state_dict"), Mapping):
        return None
    n = _int(obj["averaging_state"].get("n_averaged"))
    callbacks = obj.get("callbacks") if isinstance(obj.get("callbacks"), Mapping) else {}
    names = [str(k) for k in callbacks]
    notes = []
    if any(k.startswith("EMAWeightAveraging") for k in names):
        notes.append("Lightning's EMAWeightAveraging does not save its decay: the schedule is unknown")
    elif any(k.startswith("StochasticWeightAveraging") or k == "WeightAveraging" for k in names):
        notes.append("WeightAveraging does not save its avg_fn: the schedule is unknown")
    rec = _record(
        "AveragedModel",
        "lightning",
        schedule=None,
        counters={"n_averaged": n} if n is not None else {},
        steps=n,
        update_buffers=True,  # WeightAveraging's default use_buffers=True
        callbacks=names,
    )
    live = _tensors_only(obj["current_model_state"])
    return Found("lightning", "", _tensors_only(obj["state_dict"]), live, {"ema": rec}, "ema", notes)


# timm


def _read_timm(obj: Any, ctx: Context) -> Found | None:
    if not (isinstance(obj, Mapping) and isinstance(obj.get("state_dict_ema"), Mapping)):
        return None
    ema = {canonical_name(k): v for k, v in _tensors_only(obj["state_dict_ema"]).items()}
    live = {canonical_name(k): v for k, v in _tensors_only(obj.get("state_dict") or {}).items()} or None
    rec = _record("AveragedModel", "timm", schedule=None, update_buffers=True)
    notes = ["timm saves neither the decay nor the update count: schedule and steps are unknown"]
    if isinstance(obj.get("epoch"), int):
        rec["epoch"] = obj["epoch"]
    return Found("timm", "", _fill(ema, live), live, {"ema": rec}, "ema", notes)


# mmcv 1.x


def _read_mmcv(obj: Any, ctx: Context) -> Found | None:
    if not (isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)):
        return None
    sd = _tensors_only(obj["state_dict"])
    ema_keys = {k for k in sd if k.startswith("ema_")}
    if not ema_keys:
        return None
    # mmcv registers ema_<name with "." as "_"> on the model for every parameter.
    by_ema: dict[str, list[str]] = {}
    for k in sd:
        if k in ema_keys:
            continue
        by_ema.setdefault("ema_" + k.replace(".", "_"), []).append(k)
    averaged: dict[str, Tensor] = {}
    for e in sorted(ema_keys):
        owners = by_ema.get(e, [])
        if len(owners) > 1:
            raise FormatError(f"mmcv checkpoint: {e!r} could belong to any of {owners}")
        if not owners:
            continue
        if sd[e].shape != sd[owners[0]].shape:
            shapes = f"{tuple(sd[e].shape)} but {owners[0]!r} has {tuple(sd[owners[0]].shape)}"
            raise FormatError(f"mmcv checkpoint: {e!r} has shape {shapes}")
        averaged[owners[0]] = sd[e]
    if not averaged:
        return None  # ema_* names that are the model's own, not mmcv's buffers
    buffers = {e for e in ema_keys if e in by_ema}
    live = {k: v for k, v in sd.items() if k not in buffers}
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    steps = _int(meta.get("iter"))
    cfg = _hook_config(_config_text(obj), ("EMAHook",))
    from . import schedules as s

    schedule = None
    if cfg is not None:
        schedule = _schedule(lambda: s.MMCVWarmup(cfg.get("momentum", 0.0002), cfg.get("warm_up", 100)))
    rec = _record(
        "AveragedModel",
        "mmcv",
        schedule=schedule,
        counters={"n_averaged": steps} if steps is not None else {},
        steps=steps,
        interval=cfg.get("interval", 1) if cfg and isinstance(cfg.get("interval", 1), int) else 1,
    )
    notes = [] if cfg else ["no EMAHook settings in meta.config: the schedule is unknown"]
    return Found("mmcv", "", _fill(averaged, live), live, {"ema": rec}, "ema", notes)


# torch AveragedModel / mmengine BaseAveragedModel state dicts


def _module_state(obj: Any, counter: str) -> dict[str, Tensor] | None:
    if not (isinstance(obj, Mapping) and _int(obj.get(counter)) is not None):
        return None
    inner = _strip(obj, "module.")
    if not inner or any(not (k == counter or k.startswith("module.") or k == "steps") for k in obj):
        return None
    return inner


def _sibling_live(obj: Any, ctx: Context, averaged: Mapping[str, Tensor]) -> tuple[dict[str, Tensor] | None, str]:
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


def _read_torch_averaged(obj: Any, ctx: Context) -> Found | None:
    inner = _module_state(obj, "n_averaged")
    if inner is None:
        return None
    n = _int(obj["n_averaged"])
    averaged = {canonical_name(k): v for k, v in inner.items()}
    live, where = _sibling_live(obj, ctx, averaged)
    rec = _record("AveragedModel", "torch-averaged-model", schedule=None, counters={"n_averaged": n}, steps=n)
    notes = ["AveragedModel does not save avg_fn: the schedule is unknown"]
    if live is not None:
        notes.append(f"live weights taken from {where!r} beside it")
    return Found("torch-averaged-model", "", _fill(averaged, live), live, {"ema": rec}, "ema", notes)


def _read_averaged_model(obj: Any, ctx: Context) -> Found | None:
    inner = _module_state(obj, "steps")
    if inner is None or "n_averaged" in obj:
        return None
    steps = _int(obj["steps"])
    averaged = {canonical_name(k): v for k, v in inner.items()}
    live, where = _sibling_live(obj, ctx, averaged)
    rec = _record(
        "ExponentialMovingAverage",
        "averaged-model",
        schedule=None,
        counters={"steps": steps},
        steps=steps,
        compensate_interval=False,
    )
    notes = ["a BaseAveragedModel state dict does not name its class: ExponentialMovingAverage assumed (--class)"]
    if live is not None:
        notes.append(f"live weights taken from {where!r} beside it")
    return Found("averaged-model", "", _fill(averaged, live), live, {"ema": rec}, "ema", notes)


# ema-pytorch


def _read_ema_pytorch(obj: Any, ctx: Context) -> Found | None:
    if not isinstance(obj, Mapping):
        return None
    prefixes = [k[: -len("initted")] for k in obj if isinstance(k, str) and k.endswith("initted")]
    for p in prefixes:
        if p + "step" not in obj or not any(isinstance(k, str) and k.startswith(p + "ema_model.") for k in obj):
            continue
        averaged = _strip(obj, p + "ema_model.")
        live = _strip(obj, p + "online_model.") or None
        steps = _int(obj[p + "step"])
        rec = _record("AveragedModel", "ema-pytorch", schedule=None, counters={"n_averaged": steps}, steps=steps)
        notes = ["ema-pytorch does not save beta or update_every: the schedule is unknown"]
        if live is None:
            live, where = _sibling_live(obj, ctx, averaged)
            if live is not None:
                notes.append(f"live weights taken from {where!r} beside it")
        key = p[:-1] if p else ""
        found = Found("ema-pytorch", key, _fill(averaged, live), live, {"ema": rec}, "ema", notes)
        return found
    return None


# torch_ema and diffusers: tensors by position


_BUFFER_LEAVES = ("running_mean", "running_var", "num_batches_tracked")


def match_by_position(
    shadows: Sequence[Tensor], named: Mapping[str, Tensor], *, buffer_names: Sequence[str] = (), what: str = "shadow"
) -> dict[str, Tensor]:
    """Name ``shadows`` (an average saved as a list, in ``model.parameters()`` order) by the
    parameters of the plain state dict ``named``: its floating tensors in order, less buffers
    (BatchNorm statistics, and names matching a ``buffer_names`` glob) and later names for a
    tensor already seen (tied weights, which ``parameters()`` yields once). Shapes must agree;
    the error names the first mismatch."""
    params: list[str] = []
    tied: dict[str, str] = {}
    first_of: dict[tuple[Any, ...], str] = {}
    for k, t in named.items():
        if not (t.is_floating_point() or t.is_complex()):
            continue
        if k.rsplit(".", 1)[-1] in _BUFFER_LEAVES or any(fnmatch.fnmatchcase(k, g) for g in buffer_names):
            continue
        try:
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        except RuntimeError:
            ident = (id(t),)
        if ident[0] and ident in first_of:
            tied[k] = first_of[ident]
            continue
        first_of[ident] = k
        params.append(k)
    for i, (name, s) in enumerate(zip(params, shadows, strict=False)):
        if not isinstance(s, Tensor):
            raise FormatError(f"{what}[{i}] is a {type(s).__name__}, not a tensor")
        if tuple(s.shape) != tuple(named[name].shape):
            raise FormatError(
                f"{what}[{i}] has shape {tuple(s.shape)} but parameter {i} of the names, {name!r}, has "
                f"{tuple(named[name].shape)}: the names come from another model, or it has buffers that are "
                "not parameters (name them with --buffer-names)"
            )
    if len(shadows) != len(params):
        extra = params[len(shadows) :] if len(params) > len(shadows) else []
        raise FormatError(
            f"{what} holds {len(shadows)} tensors but the names have {len(params)} parameters"
            + (f" (unmatched: {extra[:4]}; if they are buffers, name them with --buffer-names)" if extra else "")
        )
    out = dict(zip(params, shadows, strict=True))
    for k, first in tied.items():
        out[k] = out[first]
    return out


def _positional(obj: Any, ctx: Context, fmt: str, rec: dict[str, Any]) -> Found:
    shadows = list(obj["shadow_params"])
    names: Mapping[str, Tensor] | None = ctx.names
    notes: list[str] = []
    where = ctx.names_from
    if names is None:
        top = ctx.top
        if isinstance(top, Mapping) and top is not obj:
            for k, v in top.items():
                candidate = _tensors_only(v) if v is not obj and isinstance(v, Mapping) else {}
                if candidate:
                    with contextlib.suppress(FormatError):
                        match_by_position(shadows, candidate, buffer_names=ctx.buffer_names)
                        names, where = candidate, repr(k)
                        notes.append(f"parameter names taken from {k!r} beside it")
                        break
    if names is None:
        return Found(
            fmt,
            "",
            None,
            None,
            {"ema": rec},
            "ema",
            notes,
            needs=f"{fmt} saves its {len(shadows)} tensors by position: give --names-from MODEL_CKPT "
            "(a plain state dict of the same model) to name them",
        )
    named = {canonical_name(k): v for k, v in names.items()}
    averaged = match_by_position(shadows, named, buffer_names=ctx.buffer_names, what=f"{fmt} shadow_params")
    notes.append(f"buffers (not averaged by {fmt}) and the live weights are those of {where}")
    return Found(fmt, "", _fill(averaged, named), dict(named), {"ema": rec}, "ema", notes)


def _read_torch_ema(obj: Any, ctx: Context) -> Found | None:
    if not (isinstance(obj, Mapping) and isinstance(obj.get("shadow_params"), list)):
        return None
    if "num_updates" not in obj or "optimization_step" in obj:
        return None
    from . import schedules as s

    decay, n = obj.get("decay"), obj.get("num_updates")
    if not isinstance(decay, (int, float)):
        decay = None
    if isinstance(n, int):  # use_num_updates=True: TensorFlow's warm-up
        schedule = _schedule(lambda: s.NumUpdatesWarmup(decay)) if decay is not None else None
        steps: int | None = n + 1  # polyak counts the initial copy as an update
    else:
        schedule = _schedule(lambda: s.ConstantMomentum(decay=decay)) if decay is not None else None
        steps = None
    rec = _record(
        "AveragedModel",
        "torch-ema",
        schedule=schedule,
        counters={"n_averaged": steps} if steps is not None else {},
        steps=steps,
    )
    return _positional(obj, ctx, "torch-ema", rec)


def _read_diffusers(obj: Any, ctx: Context) -> Found | None:
    if not (isinstance(obj, Mapping) and isinstance(obj.get("shadow_params"), list)):
        return None
    if "optimization_step" not in obj:
        return None
    from . import schedules as s

    n = obj.get("optimization_step")
    n = n if isinstance(n, int) else _int(n)
    decay = obj.get("decay", 0.9999)
    after = int(obj.get("update_after_step", 0) or 0)
    if obj.get("use_ema_warmup"):
        # diffusers' step k uses s = k - update_after_step - 1; polyak's k-th update is at steps k
        schedule = _schedule(
            lambda: s.Warmup(
                decay,
                inv_gamma=obj.get("inv_gamma", 1.0),
                power=obj.get("power", 2 / 3),
                min_decay=obj.get("min_decay", 0.0),
                update_after_step=after + 1,
            )
        )
    else:
        schedule = _schedule(lambda: s.StartAt(s.NumUpdatesWarmup(decay), start=after + 1))
    steps = None if n is None else n + 1
    rec = _record(
        "AveragedModel",
        "diffusers",
        schedule=schedule,
        counters={"n_averaged": steps} if steps is not None else {},
        steps=steps,
    )
    return _positional(obj, ctx, "diffusers", rec)


#: Every format read, in the order they are tried (``nested``: also one level down, under a key
#: of the file, e.g. ``{"model": ..., "ema": ema.state_dict()}``).
FORMATS: tuple[Format, ...] = (
    Format("polyak", "polyak's checkpoint format (a 'polyak' block)", _read_polyak),
    Format("polyak-export", "weights written by polyak export/average/posthoc", _read_export),
    Format("mmengine", "mmengine EMAHook (state_dict = average, ema_state_dict = live)", _read_mmengine),
    Format("lightning", "Lightning WeightAveraging (current_model_state, averaging_state)", _read_lightning),
    Format("timm", "timm state_dict_ema", _read_timm),
    Format("mmcv", "mmcv 1.x EMAHook ema_* buffers in state_dict", _read_mmcv),
    Format("torch-averaged-model", "torch AveragedModel state dict (n_averaged, module.*)", _read_torch_averaged, True),
    Format(
        "averaged-model", "mmengine/mmagic BaseAveragedModel state dict (steps, module.*)", _read_averaged_model, True
    ),
    Format("ema-pytorch", "ema-pytorch EMA/KarrasEMA (initted, step, ema_model.*)", _read_ema_pytorch, True),
    Format("torch-ema", "torch_ema ExponentialMovingAverage (shadow_params, num_updates)", _read_torch_ema, True),
    Format("diffusers", "diffusers EMAModel (shadow_params, optimization_step)", _read_diffusers, True),
)

FORMAT_NAMES = tuple(f.name for f in FORMATS)


def identify(loaded: Loaded, *, key: str | None = None, only: str | None = None, **context: Any) -> list[Found]:
    """Every average the file holds, as :class:`Found` (its ``weights`` None where names are
    needed), the top level first, then one level down for ``nested`` formats. ``key`` looks
    only under that top-level key; ``only`` tries only that format."""
    if only is not None and only not in FORMAT_NAMES:
        raise FormatError(f"unknown format {only!r}; known: {', '.join(FORMAT_NAMES)}")
    top = loaded.obj
    ctx = Context(path=loaded.path, metadata=loaded.metadata, top=top, **context)
    formats = [f for f in FORMATS if only is None or f.name == only]
    if key is not None:
        if not isinstance(top, Mapping) or key not in top:
            have = list(top)[:10] if isinstance(top, Mapping) else type(top).__name__
            raise FormatError(f"{loaded.path}: no key {key!r} (the file has {have})")
        candidates = [(key, top[key])]
        ctx.metadata = None
    else:
        candidates = [("", top)]
    found: list[Found] = []
    for where, obj in candidates:
        for f in formats:
            got = f.read(obj, ctx)
            if got is not None:
                got.key = ".".join(p for p in (where, got.key) if p)
                found.append(got)
                break
    if found or key is not None or not isinstance(top, Mapping):
        return found
    ctx.metadata = None
    for k, v in top.items():
        if not isinstance(v, Mapping):
            continue
        for f in formats:
            if not f.nested:
                continue
            got = f.read(v, ctx)
            if got is not None:
                got.key = ".".join(p for p in (str(k), got.key) if p)
                found.append(got)
                break
    return found


def detect(loaded: Loaded, *, key: str | None = None, only: str | None = None, **context: Any) -> Found:
    """The one average in the file (:func:`identify`), with its weights named. Raises
    :class:`FormatError` listing the formats tried, naming the candidates when there are
    several, or saying what is needed (``--names-from``)."""
    found = identify(loaded, key=key, only=only, **context)
    if not found:
        tried = ", ".join(f.name for f in FORMATS if only is None or f.name == only)
        if is_state_dict(loaded.obj):
            what = "a plain state dict"
        elif isinstance(loaded.obj, Opaque):
            what = f"a pickled {loaded.obj.origin} object, not loaded: save a state dict instead"
        else:
            what = "no known layout"
        raise FormatError(f"{loaded.path}: no averaged weights found ({what}); formats tried: {tried}")
    if len(found) > 1:
        listing = ", ".join(f"{f.key!r} ({f.format})" for f in found)
        raise FormatError(f"{loaded.path} holds several averages: {listing}; choose one with --key")
    one = found[0]
    if one.weights is None:
        raise FormatError(f"{loaded.path}: {one.needs}")
    return one


# -- schedules, for people --------------------------------------------------------------------------


def schedule_summary(schedule: Mapping[str, Any] | None) -> dict[str, Any]:
    """The numbers a reader wants from a schedule dict: ``decay`` (constant or maximal),
    ``momentum``, ``sigma_rel``/``gamma`` (power function), ``method``; empty when unknown."""
    if not isinstance(schedule, Mapping):
        return {}
    kind, args = schedule.get("type"), dict(schedule.get("args") or {})
    out: dict[str, Any] = {"schedule": kind}
    if kind == "StartAt" and isinstance(args.get("schedule"), Mapping):
        inner = schedule_summary(args["schedule"])
        return {**inner, "schedule": kind, "start": args.get("start")}
    if kind == "ConstantMomentum" and isinstance(args.get("momentum"), (int, float)):
        out["method"] = "ema"
        out["momentum"] = args["momentum"]
        out["decay"] = 1.0 - args["momentum"]
    elif kind in ("Warmup", "NumUpdatesWarmup") and isinstance(args.get("decay"), (int, float)):
        out["method"] = "ema"
        out["decay"] = args["decay"]
    elif kind in ("MomentumAnnealing", "ExpMomentum", "MMCVWarmup") and isinstance(args.get("momentum"), (int, float)):
        out["method"] = "ema"
        out["momentum"] = args["momentum"]
        out["decay"] = 1.0 - args["momentum"]
    elif kind == "PowerFunction" and isinstance(args.get("gamma"), (int, float)):
        from .schedules import gamma_to_sigma_rel

        out["method"] = "power-function-ema"
        out["gamma"] = args["gamma"]
        out["sigma_rel"] = gamma_to_sigma_rel(float(args["gamma"]))
    elif kind == "EqualAverage":
        out["method"] = "swa"
    return out


# -- writing ------------------------------------------------------------------------------------------


def check_output(out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]) -> Path:
    """``out`` as a path, refused (:class:`FormatError`) when it is one of ``inputs`` or a
    directory."""
    out = Path(out)
    if out.is_dir():
        raise FormatError(f"-o {out} is a directory: give a file name")
    for i in inputs:
        p = Path(i)
        same = False
        with contextlib.suppress(OSError):
            same = out.exists() and p.exists() and os.path.samefile(out, p)
        if same or out.resolve() == p.resolve():
            raise FormatError(f"-o {out} is one of the inputs: write to another file")
    return out


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s directory, fsync it, and rename it
    to ``path`` (``os.replace``), so ``path`` is either untouched or complete. The temporary
    file is removed on any failure, ``KeyboardInterrupt`` included."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if sys.platform != "win32":  # make the rename durable
        with contextlib.suppress(OSError):
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def write_safetensors(
    path: str | os.PathLike[str],
    layout: Layout,
    tensors: Iterable[tuple[str, Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file tensor by tensor: the header from ``layout`` (name -> (shape,
    dtype), in file order), then each tensor of ``tensors`` (which must come in that order,
    with those shapes and dtypes) as soon as it is given, so no more than one is held here.
    Writes ``path`` directly: use :func:`atomic_write` around it."""
    names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for key, (shape, dtype) in layout.items():
        if dtype not in names:
            raise FormatError(f"tensor {key!r} is {dtype}, which safetensors cannot hold")
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    if sys.byteorder != "little":  # pragma: no cover
        raise FormatError("writing safetensors (little-endian) is supported on little-endian machines only")
    expected = iter(layout.items())
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, t in tensors:
            want_key, (shape, dtype) = next(expected, (None, ((), None)))
            if key != want_key or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise FormatError(f"tensor {key!r} ({t.dtype}, {tuple(t.shape)}) does not match the header")
            if t.numel():
                f.write(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
        if next(expected, None) is not None:
            raise FormatError("fewer tensors were given than the header names")


def layout_of(tensors: Mapping[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


def save_weights(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    metadata: Mapping[str, str],
    *,
    layout: Layout | None = None,
) -> None:
    """Write a plain state dict atomically: ``.safetensors`` with ``metadata`` as its string
    metadata (streamed: :func:`write_safetensors`); any other suffix as
    ``torch.save({"state_dict": tensors, "metadata": metadata})`` (loads with
    ``weights_only=True``). ``tensors`` may be an iterable of ``(name, tensor)`` produced on the
    fly, with their ``layout``: a safetensors output then never holds more than one."""
    path = Path(path)
    meta = {str(k): str(v) for k, v in metadata.items()}
    if isinstance(tensors, Mapping):
        layout = layout_of(tensors) if layout is None else layout
        items: Iterable[tuple[str, Tensor]] = tensors.items()
    else:
        if layout is None:
            raise ValueError("save_weights() needs the layout of a stream of tensors")
        items = tensors
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: write_safetensors(tmp, layout, items, meta))
    else:
        atomic_write(path, lambda tmp: torch.save({"state_dict": dict(items), "metadata": meta}, tmp))


def save_checkpoint(path: str | os.PathLike[str], checkpoint: Mapping[str, Any]) -> None:
    """``torch.save`` a checkpoint dict atomically."""
    if Path(path).suffix == ".safetensors":
        raise FormatError(f"{path}: a training checkpoint holds more than tensors; write it as .pt / .pth / .ckpt")
    atomic_write(path, lambda tmp: torch.save(dict(checkpoint), tmp))
