"""Writing checkpoint files atomically: a file is either untouched or complete, whatever
interrupts the write. Every file polyak writes goes through :func:`atomic_write`."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import FormatError
from .streaming import Layout, layout_of, write_safetensors

__all__ = ["check_output", "atomic_write", "save_weights", "save_checkpoint"]


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
