"""``torch.distributed.checkpoint`` (DCP) folders, read one tensor at a time in one process,
with no process group and no code run from the folder.

A DCP folder holds ``.metadata`` (a pickle of torch's ``Metadata``: every tensor's shape, dtype
and chunks, and where each chunk's bytes are) and ``*.distcp`` files (each chunk a
``torch.save`` of a tensor). torch's own reader unpickles ``.metadata`` as it asks, which runs
whatever it names; here it is read with polyak's restricted unpickler
(:func:`polyak.files.restricted_pickle_module`: every class becomes an inert placeholder), and
the placeholders are read as data: each field is checked for its type and range (names of files
in the folder, offsets inside them, chunks that tile their tensor). From that checked data a
``Metadata`` is built again, and each tensor is loaded with ``torch.distributed.checkpoint.load``
(``no_dist=True``) into a tensor allocated for it, asking for that one key; the chunks'
``torch.save`` bytes are read by torch with ``weights_only=True``.

Which tensors are the weights (:class:`DCPFolder`'s ``key``): a DCP key is the state dict's
path joined with dots. ``polyak.distributed.save`` writes ``{"average": average.state_dict()}``,
so its weights are under ``average.module.``; by default that prefix is taken when present, else
the first of ``state_dict.``, ``model.``, ``model_state_dict.``, ``module.``, ``net.``,
``network.`` that holds tensors, else every tensor of the checkpoint; ``key="model"`` takes the
tensors under ``model.`` (the prefix is removed from the names).
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import FormatError, first_line, shown
from .paths import check_input, kind_of
from .reading import MODEL_KEYS
from .sources import SMALL, Thunk, Weights, meta_tree
from .unpickler import Opaque, restricted_pickle_module

__all__ = ["METADATA_NAME", "DCPChunk", "DCPTensor", "DCPMetadata", "read_dcp_metadata", "DCPFolder", "is_dcp_folder"]

METADATA_NAME = ".metadata"
#: The prefix of the weights in a checkpoint written by ``polyak.distributed.save``.
POLYAK_PREFIX = "average.module."
_PACKAGE = "torch.distributed.checkpoint."


def is_dcp_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding a ``.metadata`` entry (of any kind: it is checked
    when read)."""
    try:
        return stat.S_ISDIR(path.stat().st_mode) and os.path.lexists(path / METADATA_NAME)
    except OSError:
        return False


@dataclass(frozen=True)
class DCPChunk:
    """One chunk of a tensor: where it sits in the tensor, and where its ``torch.save`` bytes
    are (a file of the folder, an offset and a length)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class DCPTensor:
    """A tensor of a DCP checkpoint: its key, shape, dtype and chunks."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[DCPChunk, ...]


@dataclass
class DCPMetadata:
    """What ``.metadata`` says, checked: the tensors by key, the keys of other objects (saved
    as pickled bytes, never read here), each key's path in the state dict (``planner_data``),
    and the files the chunks are in."""

    tensors: dict[str, DCPTensor]
    objects: list[str]
    paths: dict[str, tuple[Any, ...]]
    files: dict[str, int]


def _bad(path: Path, what: str) -> FormatError:
    return FormatError(f"{shown(path)} does not parse as torch.distributed.checkpoint metadata: {what}")


def _state(obj: Any, cls: str, path: Path, where: str) -> Any:
    """The state of placeholder ``obj``, which must stand for DCP's class ``cls``."""
    origin = getattr(obj, "origin", None) if isinstance(obj, Opaque) else None
    if origin is None or not origin.startswith(_PACKAGE) or origin.rsplit(".", 1)[-1] != cls:
        got = origin if origin is not None else type(obj).__name__
        raise _bad(path, f"{where} is {shown(got)}, not {cls}")
    return obj.state


def _ints(value: Any, path: Path, where: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62 for v in value
    ):
        raise _bad(path, f"{where} is not a list of sizes: {shown(repr(value)[:80])}")
    return tuple(int(v) for v in value)


def _field(state: Any, name: str, index: int, path: Path, where: str) -> Any:
    """A field of a dataclass's pickled state: a dict (by name) or a tuple (by position)."""
    if isinstance(state, dict):
        if name not in state:
            raise _bad(path, f"{where} has no {name}")
        return state[name]
    if isinstance(state, tuple) and len(state) > index:
        return state[index]
    raise _bad(path, f"{where} has no {name}")


def read_dcp_metadata(folder: str | os.PathLike[str]) -> DCPMetadata:
    """Read and check ``folder/.metadata`` without running code from it (see the module
    docstring). Raises :class:`FormatError` naming what does not parse or does not fit: a
    class that is not DCP's where one is expected, a shape or offset that is not a size,
    chunks that do not tile their tensor, a chunk with no storage, a file name that reaches
    outside the folder, a file that is missing, not regular (a FIFO is never opened) or
    shorter than a chunk says."""
    folder = Path(folder)
    path = check_input(folder / METADATA_NAME)
    try:
        with open(path, "rb") as f:
            top = restricted_pickle_module(Counter()).load(f)
    except Exception as e:  # a damaged pickle raises anything from UnpicklingError to MemoryError
        raise _bad(path, first_line(e)) from e
    state = _state(top, "Metadata", path, "the file")
    sdm = _field(state, "state_dict_metadata", 0, path, "Metadata")
    planner = _field(state, "planner_data", 1, path, "Metadata") if isinstance(state, dict) else None
    storage = _field(state, "storage_data", 2, path, "Metadata")
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        raise _bad(path, "state_dict_metadata or storage_data is not a dict")

    where_is: dict[tuple[str, tuple[int, ...]], tuple[str, int, int, tuple[str, ...]]] = {}
    for index, info in storage.items():
        istate = _state(index, "MetadataIndex", path, "a storage_data key")
        fqn = _field(istate, "fqn", 0, path, "MetadataIndex")
        offset = istate.get("offset") if isinstance(istate, dict) else None
        if offset is None:  # an object saved as bytes: never read here
            continue
        sstate = _state(info, "_StorageInfo", path, f"the storage of {shown(fqn)}")
        name = _field(sstate, "relative_path", 0, path, "_StorageInfo")
        start = _field(sstate, "offset", 1, path, "_StorageInfo")
        length = _field(sstate, "length", 2, path, "_StorageInfo")
        transforms = sstate.get("transform_descriptors") if isinstance(sstate, dict) else None
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise FormatError(f"{shown(path)} names {shown(repr(name))} for {shown(fqn)}: not a file in the folder")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (start, length)):
            raise _bad(path, f"the storage of {shown(fqn)} has offset {start!r}, length {length!r}")
        if transforms is not None and not (
            isinstance(transforms, (list, tuple)) and all(isinstance(t, str) for t in transforms)
        ):
            raise _bad(path, f"the storage of {shown(fqn)} has transforms {shown(repr(transforms)[:80])}")
        key = (str(fqn), _ints(offset, path, f"the storage offset of {shown(fqn)}"))
        where_is[key] = (name, start, length, tuple(transforms or ()))

    tensors: dict[str, DCPTensor] = {}
    objects: list[str] = []
    for fqn, entry in sdm.items():
        if not isinstance(fqn, str):
            raise _bad(path, f"a key is {type(fqn).__name__}, not a string")
        origin = getattr(entry, "origin", "") if isinstance(entry, Opaque) else ""
        if origin.endswith(".BytesStorageMetadata") and origin.startswith(_PACKAGE):
            objects.append(fqn)
            continue
        tstate = _state(entry, "TensorStorageMetadata", path, shown(fqn))
        props = _state(_field(tstate, "properties", 0, path, shown(fqn)), "TensorProperties", path, shown(fqn))
        dtype = _field(props, "dtype", 0, path, f"the properties of {shown(fqn)}")
        if not isinstance(dtype, torch.dtype):
            raise _bad(path, f"the dtype of {shown(fqn)} is {shown(repr(dtype)[:80])}")
        shape = _ints(_field(tstate, "size", 1, path, shown(fqn)), path, f"the size of {shown(fqn)}")
        raw_chunks = _field(tstate, "chunks", 2, path, shown(fqn))
        if not isinstance(raw_chunks, list):
            raise _bad(path, f"the chunks of {shown(fqn)} are not a list")
        chunks = []
        for c in raw_chunks:
            cstate = _state(c, "ChunkStorageMetadata", path, f"a chunk of {shown(fqn)}")
            offsets = _ints(_field(cstate, "offsets", 0, path, "a chunk"), path, f"a chunk offset of {shown(fqn)}")
            sizes = _ints(_field(cstate, "sizes", 1, path, "a chunk"), path, f"a chunk size of {shown(fqn)}")
            if len(offsets) != len(shape) or len(sizes) != len(shape):
                raise _bad(path, f"a chunk of {shown(fqn)} has {len(sizes)} dimensions, the tensor {len(shape)}")
            if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
                raise _bad(path, f"a chunk of {shown(fqn)} ({offsets} + {sizes}) lies outside its shape {shape}")
            stored = where_is.get((fqn, offsets))
            if stored is None:
                raise FormatError(f"{shown(path)}: the chunk of {shown(fqn)} at {list(offsets)} has no storage entry")
            chunks.append(DCPChunk(offsets, sizes, *stored))
        _check_tiling(path, fqn, shape, chunks)
        tensors[fqn] = DCPTensor(fqn, shape, dtype, tuple(chunks))

    paths: dict[str, tuple[Any, ...]] = {}
    if isinstance(planner, dict):
        for fqn, p in planner.items():
            if (
                isinstance(fqn, str)
                and isinstance(p, tuple)
                and p
                and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in p)
            ):
                paths[fqn] = p
    files: dict[str, int] = {}
    for t in tensors.values():
        for c in t.chunks:
            if c.file not in files:
                files[c.file] = _file_size(folder, c.file)
            if c.offset + c.length > files[c.file]:
                raise FormatError(
                    f"{shown(folder / c.file)} is {files[c.file]} bytes, but {shown(path)} puts a chunk of "
                    f"{shown(t.key)} at bytes {c.offset}-{c.offset + c.length}"
                )
    return DCPMetadata(tensors, objects, paths, files)


def _file_size(folder: Path, name: str) -> int:
    p = folder / name
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FormatError(f"{shown(folder)}: {METADATA_NAME} names {shown(name)}, which is not in the folder") from None
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{shown(p)} is {kind_of(st.st_mode)}, not a checkpoint file")
    return st.st_size


def _check_tiling(path: Path, fqn: str, shape: tuple[int, ...], chunks: list[DCPChunk]) -> None:
    """The chunks cover the tensor exactly once: their sizes add up to it and no two overlap."""
    total = sum(math.prod(c.sizes) for c in chunks)
    if total != math.prod(shape):
        raise _bad(path, f"the chunks of {shown(fqn)} hold {total} elements, the tensor {math.prod(shape)}")
    for i, a in enumerate(chunks):
        for b in chunks[i + 1 :]:
            if (
                all(
                    max(ao, bo) < min(ao + asz, bo + bsz)
                    for ao, asz, bo, bsz in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
                )
                and math.prod(a.sizes)
                and math.prod(b.sizes)
            ):
                raise _bad(path, f"two chunks of {shown(fqn)} overlap ({list(a.offsets)}, {list(b.offsets)})")


def _torch_metadata(md: DCPMetadata) -> Any:
    """torch's ``Metadata`` for the checked tensors (the objects saved as bytes are left out:
    they are never loaded)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    state: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    for t in md.tensors.values():
        chunks = [ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in t.chunks]
        state[t.key] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), torch.Size(t.shape), chunks)
        for i, c in enumerate(t.chunks):
            info = _StorageInfo(c.file, c.offset, c.length)
            if c.transforms:
                info.transform_descriptors = list(c.transforms)
            storage[MetadataIndex(t.key, torch.Size(c.offsets), i)] = info
    return Metadata(state_dict_metadata=state, planner_data={}, storage_data=storage)


def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader

    class CheckedReader(FileSystemReader):
        """torch's reader of a DCP folder, given the checked metadata instead of unpickling
        ``.metadata``."""

        def __init__(self, path: Path, metadata: Any) -> None:
            super().__init__(path)
            self.checked = metadata

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return self.checked

    return CheckedReader


class DCPFolder(Weights):
    """The weights of a ``torch.distributed.checkpoint`` folder, read one tensor at a time in
    this process (no process group): see the module docstring for what is checked and how the
    weights are chosen (``key``). Objects saved beside the tensors (saved as pickled bytes)
    are never read."""

    kind = "dcp"

    def __init__(self, path: str | os.PathLike[str], *, key: str | None = None) -> None:
        path = Path(path)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise FormatError(f"{shown(path)}: no such file or folder") from None
        if not stat.S_ISDIR(mode):
            raise FormatError(f"{shown(path)} is {kind_of(mode)}, not a torch.distributed.checkpoint folder")
        self.root = path
        self.md = read_dcp_metadata(path)
        self.prefix, where = self._choose(key)
        self._keys = {k[len(self.prefix) :]: k for k in self.md.tensors if k.startswith(self.prefix)}
        self._reader_obj: Any = None
        super().__init__(path, where=where)

    def _choose(self, key: str | None) -> tuple[str, str]:
        tensors = self.md.tensors
        if key is not None:
            prefix = key.rstrip(".") + "." if key else ""
            if not any(k.startswith(prefix) for k in tensors):
                tops = sorted({k.split(".", 1)[0] for k in tensors})[:8]
                raise FormatError(f"{shown(self.root)}: no tensors under {shown(key)!r} (it has {tops})")
            return prefix, f"{key} (--key)"
        if any(k.startswith(POLYAK_PREFIX) for k in tensors):
            return POLYAK_PREFIX, "average.module (polyak.distributed.save)"
        for k in MODEL_KEYS:
            if any(t.startswith(k + ".") for t in tensors):
                return k + ".", k
        if not tensors:
            raise FormatError(f"{shown(self.root)}: the checkpoint holds no tensors")
        return "", "the checkpoint's top level"

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.md.tensors[self._keys[key]].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.md.tensors[self._keys[key]].dtype

    def read(self, key: str, out: Tensor | None = None) -> Tensor:
        return self.read_key(self._keys[key], out)

    def read_key(self, fqn: str, out: Tensor | None = None) -> Tensor:
        """The tensor of DCP key ``fqn`` (the full key, prefix included)."""
        import torch.distributed.checkpoint as dcp

        t = self.md.tensors[fqn]
        size = math.prod(t.shape) * t.dtype.itemsize
        if out is not None and size and out.numel() >= size:
            target = out[:size].view(t.dtype).view(t.shape)
        else:
            target = torch.empty(t.shape, dtype=t.dtype)
        if not size:
            return target
        if self._reader_obj is None:
            self._reader_obj = _reader_class()(self.root, _torch_metadata(self.md))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load({fqn: target}, storage_reader=self._reader_obj, no_dist=True)
        except FormatError:
            raise
        except Exception as e:
            raise FormatError(f"{shown(self.root)}: tensor {shown(fqn)!r} could not be read: {first_line(e)}") from e
        return target

    def files(self) -> list[Path]:
        return [self.root / METADATA_NAME] + [self.root / f for f in self.md.files]

    def folder(self) -> Path | None:
        return self.root

    def tree(self, small: int = SMALL) -> tuple[Any, dict[int, Thunk]]:
        """Every tensor of the checkpoint (not only the chosen weights), nested as the saved
        state dict was (``planner_data``); objects saved as bytes are ``None``."""
        entries: dict[Any, tuple[str, tuple[int, ...], torch.dtype]] = {}
        for fqn, t in self.md.tensors.items():
            entries[self.md.paths.get(fqn, (fqn,))] = (fqn, t.shape, t.dtype)
        obj, origins = meta_tree(entries, self._full_reader(), small)
        if isinstance(obj, dict):
            for fqn in self.md.objects:
                p = self.md.paths.get(fqn, (fqn,))
                node: Any = obj
                with contextlib.suppress(KeyError, IndexError, TypeError):
                    for part in p[:-1]:
                        node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
                    if isinstance(node, dict):
                        node.setdefault(p[-1], None)
        return obj, origins

    def _full_reader(self) -> Callable[[str], Tensor]:
        return lambda fqn: self.read_key(fqn)

    def close(self) -> None:
        self._reader_obj = None
