"""The restricted unpickler: builds tensors, storages and plain containers, and an inert
placeholder for anything else a pickle names, so that no code stored in a file runs."""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import types
from collections import Counter
from typing import Any

__all__ = ["Opaque", "restricted_pickle_module"]


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
