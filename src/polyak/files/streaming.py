"""safetensors files one tensor at a time: lazy reading (:class:`SafetensorsFile`) and streamed
writing (:func:`write_safetensors`), so neither holds more than one tensor of the file."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import FormatError, first_line, shown
from .paths import check_input, openable

__all__ = ["SAFETENSORS_DTYPES", "SafetensorsFile", "Layout", "layout_of", "write_safetensors"]

SAFETENSORS_DTYPES = {
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


class SafetensorsFile:
    """A safetensors file read lazily: names, shapes and dtypes from the header, one tensor at
    a time.

    :meth:`get` returns a tensor mapped from the file (``safe_open``): no copy, but the pages it
    touches count in the process's resident size until the file is closed. :meth:`read` copies
    the tensor's bytes with plain reads into a fresh tensor or a buffer the caller reuses, so
    nothing of the file stays resident (what :func:`polyak.files.average_checkpoints` uses).
    The header is checked by ``safe_open`` when the file is opened; no file handle or mapping is
    kept between calls of :meth:`read`."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = check_input(path)
        try:
            with openable(self.path) as name:
                handle = safe_open(name, framework="pt")
            self.metadata: dict[str, str] = dict(handle.metadata() or {})
            self._keys = list(handle.keys())
            self._info = {k: handle.get_slice(k) for k in self._keys}
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise FormatError(f"{shown(path)} is a damaged safetensors file: {first_line(e)}") from e
        self._handle: Any = handle
        self._offsets: dict[str, tuple[int, int]] | None = None

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._info[key].get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES.get(self._info[key].get_dtype(), torch.uint8)

    def nbytes(self, key: str) -> int:
        """The size of tensor ``key``'s data in bytes."""
        return math.prod(self.shape(key)) * self.dtype(key).itemsize

    def get(self, key: str) -> Tensor:
        """Tensor ``key``, mapped from the file (see the class docstring)."""
        try:
            if self._handle is None:
                from safetensors import safe_open

                with openable(self.path) as name:
                    self._handle = safe_open(name, framework="pt")
            return self._handle.get_tensor(key)
        except Exception as e:
            raise FormatError(f"{shown(self.path)}: tensor {shown(key)!r} could not be read: {first_line(e)}") from e

    def read(self, key: str, out: Tensor | None = None) -> Tensor:
        """Tensor ``key``, copied from the file with plain reads: into the start of ``out`` (a
        contiguous ``uint8`` tensor of at least :meth:`nbytes` bytes, reused by the caller; the
        result is a view of it) or into a new tensor. Raises :class:`FormatError` if the file
        is shorter than its header says."""
        shape, dtype = self.shape(key), self.dtype(key)
        size = math.prod(shape) * dtype.itemsize
        if out is None:
            buffer = torch.empty(size, dtype=torch.uint8)
        else:
            if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < size or not out.is_contiguous():
                raise ValueError(f"read(): out must be a contiguous uint8 tensor of at least {size} bytes")
            buffer = out[:size]
        if size:
            start, end = self.offsets()[key]
            if end - start != size:
                raise FormatError(f"{shown(self.path)}: tensor {shown(key)!r} has {end - start} bytes, not {size}")
            view = memoryview(buffer.numpy()).cast("B")
            with open(self.path, "rb", buffering=0) as f:
                f.seek(start)
                done = 0
                while done < size:
                    n = f.readinto(view[done:])
                    if not n:
                        raise FormatError(f"{shown(self.path)}: the file ends inside tensor {shown(key)!r}")
                    done += n
        if not size:
            return torch.empty(shape, dtype=dtype)
        return buffer.view(dtype).view(shape)

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Where each tensor's bytes are in the file: ``name -> (start, end)``, from the header."""
        if self._offsets is None:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            base = 8 + n
            self._offsets = {
                k: (base + int(v["data_offsets"][0]), base + int(v["data_offsets"][1]))
                for k, v in header.items()
                if k != "__metadata__"
            }
        return self._offsets

    def close(self) -> None:
        """Drop the mapping that :meth:`get` opened (tensors it returned stay valid)."""
        self._handle = None

    def load_all(self) -> dict[str, Tensor]:
        return {k: self.get(k) for k in self._keys}


Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def layout_of(tensors: Mapping[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


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
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
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
