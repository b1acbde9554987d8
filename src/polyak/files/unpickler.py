"""The restricted unpickler: builds tensors, storages and plain containers, and an inert
placeholder for anything else a pickle names, so that no code stored in a file runs."""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import types
from collections import Counter
from typing import Any, ClassVar

import torch

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
    (tensor rebuild functions, storages, dtypes, ``torch.Size``, ``OrderedDict``, ``set``, ...)
    and ``frozenset``, which a protocol-2 pickle of a frozenset names. Nothing else: in
    particular not ``list``, ``range`` or ``getattr``, whose calls a file could use to allocate
    or reach anything."""
    from torch import _weights_only_unpickler

    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    allowed["builtins.frozenset"] = frozenset
    allowed["builtins.bytearray"] = _bytearray
    return allowed


def _bytearray(*args: Any) -> bytearray:
    """``bytearray`` as a pickle of one calls it (from a string or bytes, with an encoding);
    ``bytearray(n)`` would allocate ``n`` bytes that the file does not hold, so it is refused."""
    if not args or not isinstance(args[0], (str, bytes)):
        raise pickle.UnpicklingError("bytearray may be rebuilt only from the bytes the file holds")
    return bytearray(*args)


def _no_call() -> frozenset[Any]:
    """Allow-listed classes a file may name (as the type of a rebuilt tensor) but not call: their
    constructors allocate a tensor of any size the arguments ask for."""
    from torch import _weights_only_unpickler

    legacy = [v for k, v in _weights_only_unpickler._get_allowed_globals().items() if k.startswith("torch.cuda.")]
    return frozenset({torch.Tensor, *legacy})


class _Unpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Python's own unpickler (the small pickle of a checkpoint; storages are read apart by
    torch), with three guards: names resolve to the allow-list or to an :class:`Opaque`
    placeholder; state (``BUILD``) may be given only to objects the file itself created, never
    to a class, function or other object the file named; and the classes of :func:`_no_call`
    are never called."""

    allowed: ClassVar[dict[str, Any]] = {}
    no_call: ClassVar[frozenset[Any]] = frozenset()
    replaced: ClassVar[Counter[str]] = Counter()
    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._named: set[int] = set()  # ids of the objects find_class returned

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names, as protocol 2 (torch.save's default) writes them: __builtin__.set
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = f"{module}.{name}"
        if key in self.allowed:
            found = self.allowed[key]
        else:
            self.replaced[key] += 1
            found = _opaque_class(module, name)
        self._named.add(id(found))
        return found

    def _refuse_call(self, func: Any) -> None:
        if isinstance(func, type) and func in self.no_call:
            raise pickle.UnpicklingError(f"the file calls {func.__module__}.{func.__qualname__}, which is not allowed")

    def load_build(self) -> None:
        inst = self.stack[-2]  # BUILD pops the state, then gives it to the object below
        if id(inst) in self._named or isinstance(inst, (type, types.FunctionType, types.BuiltinFunctionType)):
            what = getattr(inst, "__qualname__", type(inst).__name__)
            raise pickle.UnpicklingError(f"the file gives state to {what}, which it did not create: refused")
        super().load_build()

    def load_reduce(self) -> None:
        self._refuse_call(self.stack[-2])
        super().load_reduce()

    def load_newobj(self) -> None:
        self._refuse_call(self.stack[-2])
        super().load_newobj()

    def load_newobj_ex(self) -> None:
        self._refuse_call(self.stack[-3])
        super().load_newobj_ex()

    def _instantiate(self, klass: Any, args: Any) -> None:
        self._refuse_call(klass)
        super()._instantiate(klass, args)

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex


def restricted_pickle_module(replaced: Counter[str] | None = None) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` whose unpickler builds only what
    :func:`_allowed_globals` lists and an :class:`Opaque` placeholder for every other global
    (counted in ``replaced`` by ``module.name``), never gives state to anything but an object
    the file created, and never calls a class that would allocate what the file does not hold.
    No other code runs while loading."""

    class Unpickler(_Unpickler):
        allowed = _allowed_globals()
        no_call = _no_call()

    Unpickler.replaced = replaced if replaced is not None else Counter()

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
