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
    a time with :meth:`get` (``safe_open``)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = check_input(path)
        try:
            with openable(self.path) as name:
                self._handle = safe_open(name, framework="pt")
            self.metadata: dict[str, str] = dict(self._handle.metadata() or {})
            self._keys = list(self._handle.keys())
            self._info = {k: self._handle.get_slice(k) for k in self._keys}
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise FormatError(f"{shown(path)} is a damaged safetensors file: {first_line(e)}") from e

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._info[key].get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES.get(self._info[key].get_dtype(), torch.uint8)

    def get(self, key: str) -> Tensor:
        try:
            return self._handle.get_tensor(key)
        except Exception as e:
            raise FormatError(f"{shown(self.path)}: tensor {shown(key)!r} could not be read: {first_line(e)}") from e

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
