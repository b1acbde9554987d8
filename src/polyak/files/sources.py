"""A checkpoint's weights, read one tensor at a time, whatever holds them: :class:`Weights`, the
interface, and its readers of single files (a safetensors file, a ``torch.save`` file). The
readers of folders (a Hugging Face sharded folder, a ``torch.distributed.checkpoint`` folder)
are :mod:`polyak.files.hf` and :mod:`polyak.files.dcp`; :func:`polyak.files.open_weights`
chooses one."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from .errors import FormatError, shown
from .reading import load, model_state_dict, sniff
from .streaming import SafetensorsFile

__all__ = ["Weights", "SafetensorsWeights", "StateDictWeights", "Thunk", "meta_tree", "file_weights"]

#: Reads one tensor when called (what :meth:`Weights.tree` maps each placeholder to).
Thunk = Callable[[], Tensor]

#: Tensors of at most this many elements are read for real by :meth:`Weights.tree` (step
#: counters such as ``steps`` or ``n_averaged``, which the format readers need as values).
SMALL = 64


class Weights:
    """The weights of one checkpoint (a file or a folder), read one tensor at a time.

    ``keys()`` are the names of the state dict, in the checkpoint's order; ``shape`` and
    ``dtype`` come from headers or metadata, before any data is read; :meth:`read` reads one
    tensor. ``where`` says where in the checkpoint the weights were found (a key, a prefix,
    ``"safetensors"``), ``metadata`` the checkpoint's string metadata (safetensors header),
    ``kind`` what it is (``"safetensors"``, ``"torch"``, ``"hf-folder"``, ``"dcp"``).
    ``lazy`` is False only for a legacy (non-zip) ``torch.save`` file, which must be loaded
    whole to read any tensor. Close it (or use it as a context manager) when done."""

    kind = ""
    lazy = True

    def __init__(self, path: Path, *, where: str = "", metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.where = where
        self.metadata: dict[str, str] = dict(metadata or {})

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def read(self, key: str, out: Tensor | None = None) -> Tensor:
        """Tensor ``key``. ``out``, a contiguous ``uint8`` tensor of at least :meth:`nbytes`
        bytes, may be used to hold it (the result is then a view of it, valid until ``out`` is
        written again); a reader that maps its file returns the mapped tensor instead. The result
        must not be written to."""
        raise NotImplementedError

    def layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``name -> (shape, dtype)`` of every tensor, in order."""
        return {k: (self.shape(k), self.dtype(k)) for k in self.keys()}

    def nbytes(self, key: str) -> int:
        return math.prod(self.shape(key)) * self.dtype(key).itemsize

    def files(self) -> list[Path]:
        """The files the weights are read from."""
        return [self.path]

    def folder(self) -> Path | None:
        """The folder read, for a reader of a folder (an output may not be written inside it)."""
        return None

    def beside(self) -> list[Path]:
        """Files that go with the weights into a Hugging Face folder (``config.json``, the
        tokenizer's): none but for a Hugging Face folder."""
        return []

    def tree(self, small: int = SMALL) -> tuple[Any, dict[int, Thunk]]:
        """The checkpoint as the format readers of the command line look at it: nested dicts
        of tensors that are placeholders on the ``meta`` device (shape and dtype, no data),
        except tensors of at most ``small`` elements, which are read; and, by ``id`` of each
        placeholder, a function that reads its tensor."""
        return meta_tree({k: (k, self.shape(k), self.dtype(k)) for k in self.keys()}, self._reader(), small)

    def _reader(self) -> Callable[[str], Tensor]:
        return lambda key: self.read(key)

    def release(self) -> None:
        """Drop what was loaded (a non-lazy reader loads again when read)."""

    def close(self) -> None:
        """Release every file handle and mapping."""

    def __enter__(self) -> Weights:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {shown(self.path)} ({len(self.keys())} tensors)>"


def meta_tree(
    entries: dict[Any, tuple[str, tuple[int, ...], torch.dtype]],
    read: Callable[[str], Tensor],
    small: int = SMALL,
) -> tuple[Any, dict[int, Thunk]]:
    """:meth:`Weights.tree` from ``path -> (key, shape, dtype)``: a path is a name (one level)
    or a tuple of components (a component that is an ``int`` indexes a list)."""
    origins: dict[int, Thunk] = {}
    root: dict[Any, Any] = {}
    for path, (key, shape, dtype) in entries.items():
        parts = path if isinstance(path, tuple) else (path,)
        if math.prod(shape) <= small:
            t = read(key).clone()
        else:
            t = torch.empty(shape, dtype=dtype, device="meta")
        origins[id(t)] = lambda k=key: read(k)
        node = root
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise FormatError(f"{shown('.'.join(map(str, path)))}: a tensor and a container share a name")
        node[parts[-1]] = t
    return _lists(root), origins


def _lists(node: Any) -> Any:
    """Dicts whose keys are 0..n-1 (ints) become lists, as the checkpoint held them."""
    if not isinstance(node, dict):
        return node
    out = {k: _lists(v) for k, v in node.items()}
    if out and all(isinstance(k, int) for k in out) and sorted(out) == list(range(len(out))):
        return [out[i] for i in range(len(out))]
    return out


class SafetensorsWeights(Weights):
    """A safetensors file: a state dict, read with plain reads (no mapping stays resident)."""

    kind = "safetensors"

    def __init__(self, path: Path) -> None:
        self.file = SafetensorsFile(path)
        self.file.close()  # the header is read; tensors are read with plain reads
        super().__init__(self.file.path, where="safetensors", metadata=self.file.metadata)

    def keys(self) -> list[str]:
        offsets = self.file.offsets()
        return sorted(self.file.keys(), key=lambda k: offsets[k][0])  # the file read front to back

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.file.dtype(key)

    def read(self, key: str, out: Tensor | None = None) -> Tensor:
        return self.file.read(key, out)

    def close(self) -> None:
        self.file.close()


class StateDictWeights(Weights):
    """The weights in a ``torch.save`` file (:func:`polyak.files.model_state_dict`: ``key``,
    polyak's primary average, ``state_dict``, ...), read without running code from it unless
    ``unsafe``. A zip file (torch >= 1.6) is mapped, so a tensor is paged in when read; a legacy
    (non-zip) file is loaded whole while it is read (``lazy`` False: :meth:`release` drops it)."""

    kind = "torch"

    def __init__(
        self,
        path: Path,
        *,
        key: str | None = None,
        unsafe: bool = False,
        note: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(path)
        self.key, self.unsafe, self.note = key, unsafe, note
        self.lazy = sniff(path) == "zip"
        self._state: dict[str, Tensor] | None = None
        state = self._load()
        self._layout = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        if not self.lazy:
            self.release()

    def _load(self) -> dict[str, Tensor]:
        if self._state is None:
            loaded = load(self.path, unsafe=self.unsafe, mmap=True)
            if loaded.note and self.note is not None:
                self.note(loaded.note)
                self.note = None  # once
            try:
                self._state, self.where = model_state_dict(loaded.obj, key=self.key)
            except ValueError as e:
                raise FormatError(f"{shown(self.path)}: {e}") from e
        return self._state

    def keys(self) -> list[str]:
        return list(self._layout)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._layout[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._layout[key][1]

    def read(self, key: str, out: Tensor | None = None) -> Tensor:
        return self._load()[key]

    def release(self) -> None:
        self._state = None

    def close(self) -> None:
        self._state = None  # the mapped or loaded tensors go with it


def file_weights(
    path: Path, *, key: str | None = None, unsafe: bool = False, note: Callable[[str], None] | None = None
) -> Weights:
    """The reader of one checkpoint file, by its first bytes."""
    kind = sniff(path)
    if kind == "safetensors":
        return SafetensorsWeights(path)
    if kind == "unknown":
        raise FormatError(f"{shown(path)} is not a PyTorch (torch.save) or safetensors checkpoint")
    return StateDictWeights(path, key=key, unsafe=unsafe, note=note)
