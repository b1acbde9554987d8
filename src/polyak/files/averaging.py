"""The average of checkpoints, computed one tensor at a time from lazily read inputs and written
as it is computed: :class:`Averager`, :func:`write_weights` and :func:`average_checkpoints`,
which ``polyak average`` calls.

Memory: every input whose tensors can be read one at a time (a safetensors file, a Hugging Face
folder, a ``torch.distributed.checkpoint`` folder: plain reads, nothing mapped; a ``torch.save``
zip file: mapped) is read one tensor at a time into one reused buffer and added into one reused float64
buffer (through an 8 MB staging buffer); the rounded result goes back into the read buffer,
which the writer writes at once (a ``.safetensors`` file or a Hugging Face folder). Besides
Python and torch the process then holds the largest tensor once in its dtype and once in
float64 (three times the largest float32 tensor), whatever the model's size; a DCP chunk is
held once more while torch loads it. A ``.pt`` output holds the whole output
(``torch.save`` needs it); a legacy (non-zip) ``.pt`` input is loaded whole, one file at a
time, into float64 accumulators for every tensor.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..tensors import is_averaged
from .errors import FormatError, shown
from .hf import DEFAULT_MAX_SHARD_SIZE, HFFolder, parse_size, write_hf_folder
from .inputs import Output, check_output_target, open_weights
from .sources import Weights
from .streaming import Layout
from .writing import save_weights

__all__ = [
    "BN_STATISTICS",
    "is_bn_statistic",
    "check_layouts",
    "normalised_weights",
    "Averager",
    "Written",
    "write_weights",
    "average_checkpoints",
]

T = TypeVar("T")

#: Elements widened to float64 at a time when an input is added to the sum (8 MB).
CHUNK = 1 << 20

#: The names (last component) of BatchNorm's running statistics (``buffers=``).
BN_STATISTICS = ("running_mean", "running_var")


def is_bn_statistic(name: str) -> bool:
    """Whether ``name`` is a BatchNorm running statistic (``bn.running_mean``, ``bn.running_var``)."""
    return name.rsplit(".", 1)[-1] in BN_STATISTICS


def normalised_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """``n`` weights summing to 1: uniform for None, else ``weights`` (finite, >= 0, with a
    positive sum) divided by their sum. Raises :class:`ValueError`."""
    if weights is None:
        return [1.0 / n] * n
    values = [float(w) for w in weights]
    if len(values) != n:
        raise ValueError(f"weights has {len(values)} values for {n} checkpoints")
    if not all(math.isfinite(w) and w >= 0 for w in values):
        raise ValueError(f"weights must be finite numbers >= 0, got {values}")
    total = math.fsum(values)
    if not 0 < total < math.inf:
        raise ValueError(f"weights must have a positive, finite sum, got {values}")
    return [w / total for w in values]


def check_layouts(inputs: Sequence[Weights], layouts: Sequence[Mapping[str, Any]]) -> None:
    """Every input holds the names of the first, with the same shapes, and each tensor floating
    in all or in none; else :class:`FormatError` naming the input and the tensors."""
    first, ref = inputs[0], layouts[0]
    for src, lay in zip(inputs[1:], layouts[1:], strict=True):
        missing, extra = sorted(set(ref) - set(lay)), sorted(set(lay) - set(ref))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if extra:
                parts.append(f"has extra {extra[:5]}{' ...' if len(extra) > 5 else ''}")
            raise FormatError(
                f"{shown(src.path)} does not hold the same tensors as {shown(first.path)}: it " + " and ".join(parts)
            )
        for k, (shape, dtype) in ref.items():
            other_shape, other_dtype = lay[k]
            if other_shape != shape:
                raise FormatError(
                    f"tensor {shown(k)!r} has shape {shape} in {shown(first.path)} "
                    f"but {other_shape} in {shown(src.path)}"
                )
            if is_averaged(other_dtype) != is_averaged(dtype):
                raise FormatError(
                    f"tensor {shown(k)!r} is {dtype} in {shown(first.path)} but {other_dtype} in {shown(src.path)}"
                )


def _wide(t: Tensor) -> Tensor:
    """A float64 (complex128) copy: never the input itself, which may be a read-only mapping."""
    return t.to(torch.complex128 if t.is_complex() else torch.float64, copy=True)


class Averager:
    """The weighted average of the inputs' weights (``weights`` summing to 1), produced one
    tensor at a time by :meth:`tensors`.

    The layouts are read and checked (:func:`check_layouts`) when it is made, before any data.
    Floating (and complex) tensors are summed in float64 and rounded once to the dtype the
    tensor has in the last input; integer and bool tensors come from the last input, and so
    do the BatchNorm statistics (``running_mean``, ``running_var``) with ``buffers="last"``
    (``"average"`` averages them like the weights). Memory: see the module docstring."""

    def __init__(self, inputs: Sequence[Weights], weights: Sequence[float], *, buffers: str = "average") -> None:
        if buffers not in ("average", "last"):
            raise ValueError(f"buffers must be 'average' or 'last', got {buffers!r}")
        if len(inputs) != len(weights) or not inputs:
            raise ValueError(f"{len(inputs)} inputs but {len(weights)} weights")
        self.inputs = list(inputs)
        self.weights = [float(w) for w in weights]
        layouts = [src.layout() for src in self.inputs]
        check_layouts(self.inputs, layouts)
        self.keys = list(layouts[0])
        #: name -> (shape, dtype) of the output: the dtypes of the last input
        self.layout = {k: layouts[-1][k] for k in self.keys}
        #: whether every input is read a tensor at a time (else each file is loaded whole)
        self.streaming = all(s.lazy for s in self.inputs)
        #: the floating BatchNorm statistics: averaged (``buffers="average"``) or from the last input
        self.statistics = [k for k in self.keys if is_bn_statistic(k) and is_averaged(self.layout[k][1])]
        #: the names taken from the last input rather than averaged
        self.from_last = {k for k in self.keys if not is_averaged(self.layout[k][1])}
        if buffers == "last":
            self.from_last.update(self.statistics)

    @property
    def wheres(self) -> list[str]:
        """Where each input's weights were found."""
        return [s.where for s in self.inputs]

    @property
    def nbytes(self) -> int:
        """The output's size in bytes."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.layout.values())

    def tensors(self, order: Sequence[str] | None = None, *, reuse: bool = False) -> Iterator[tuple[str, Tensor]]:
        """``(name, averaged tensor)`` for every name, in ``order`` (default: the first input's).
        With ``reuse`` each tensor is a view of a buffer that the next one overwrites: for a
        consumer that writes each tensor before asking for the next (:func:`write_weights`)."""
        order = self.keys if order is None else list(order)
        if self.streaming:
            yield from self._by_tensor(order, reuse)
        else:
            state = self._by_file()
            for k in order:
                yield k, state.pop(k)

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        return self.tensors()

    def _by_tensor(self, order: Sequence[str], reuse: bool) -> Iterator[tuple[str, Tensor]]:
        # One read buffer (the largest tensor of any input), one float64 accumulator (the
        # largest averaged tensor) and one float64 staging buffer of at most CHUNK elements,
        # all reused for every tensor: no allocation per tensor (which fragments the heap), the
        # same numbers as summing fresh float64 copies. With ``reuse`` the rounded output goes
        # into the read buffer, free once the last input is added.
        read_size = max((s.nbytes(k) for s in self.inputs for k in self.keys), default=0)
        averaged = [k for k in self.keys if k not in self.from_last and self.layout[k][1].is_floating_point]
        largest = max((math.prod(self.layout[k][0]) for k in averaged), default=0)
        acc_buf = torch.empty(largest, dtype=torch.float64)
        stage = torch.empty(min(largest, CHUNK), dtype=torch.float64)
        read_buf = torch.empty(read_size, dtype=torch.uint8)
        last = self.inputs[-1]
        for k in order:
            shape, dtype = self.layout[k]
            if k in self.from_last:
                t = last.read(k, read_buf)
                yield k, (t if reuse and t.dtype == dtype else t.to(dtype, copy=True))
                continue
            if dtype.is_complex:
                acc_c = None
                for w, src in zip(self.weights, self.inputs, strict=True):
                    x = _wide(src.read(k, read_buf))
                    acc_c = x.mul_(w) if acc_c is None else acc_c.add_(x, alpha=w)
                assert acc_c is not None
                yield k, acc_c.to(dtype)
                continue
            n = math.prod(shape)
            acc = acc_buf[:n]
            for i, (w, src) in enumerate(zip(self.weights, self.inputs, strict=True)):
                x = src.read(k, read_buf).reshape(-1)
                if i == 0:
                    acc.copy_(x).mul_(w)
                    continue
                for j in range(0, n, CHUNK):  # widened through the staging buffer, a chunk at a time
                    m = min(CHUNK, n - j)
                    acc[j : j + m].add_(stage[:m].copy_(x[j : j + m]), alpha=w)
            if reuse and n:
                yield k, read_buf[: n * dtype.itemsize].view(dtype).view(shape).copy_(acc.view(shape))
            else:
                yield k, acc.view(shape).to(dtype, copy=True)

    def _by_file(self) -> dict[str, Tensor]:
        accs: dict[str, Tensor] = {}
        out: dict[str, Tensor] = {}
        n = len(self.inputs)
        for i, (w, src) in enumerate(zip(self.weights, self.inputs, strict=True)):
            for k in self.keys:
                t = src.read(k)
                if k not in self.from_last:
                    if k in accs:
                        accs[k].add_(_wide(t), alpha=w)
                    else:
                        accs[k] = _wide(t).mul_(w)
                elif i == n - 1:
                    out[k] = t.clone()
            src.release()
        for k in self.keys:
            if k in accs:
                out[k] = accs.pop(k).to(self.layout[k][1])
        return {k: out[k] for k in self.keys}

    def close(self) -> None:
        for s in self.inputs:
            s.close()


@dataclass
class Written:
    """What :func:`write_weights` or :func:`average_checkpoints` wrote: the path, whether it
    is a Hugging Face folder, the files written in it (shards; the file itself otherwise), the
    files copied beside them, the number of tensors and their bytes."""

    path: Path
    folder: bool
    files: list[str]
    tensors: int
    nbytes: int
    copied: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def write_weights(
    out: Output | str | os.PathLike[str],
    layout: Layout,
    tensors: Callable[[Sequence[str]], Iterable[tuple[str, Tensor]]],
    metadata: Mapping[str, str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    beside: Sequence[str | os.PathLike[str]] = (),
) -> Written:
    """Write a state dict given as its ``layout`` and ``tensors(order)``, which yields the
    tensors in the order asked, each written as soon as it comes: a Hugging Face folder
    (:func:`polyak.files.write_hf_folder`, with ``beside`` copied) when ``out`` is an
    :class:`Output` folder, else one file (:func:`polyak.files.save_weights`: ``.safetensors``
    streamed, another suffix ``torch.save``)."""
    target = out if isinstance(out, Output) else Output(Path(out), False)
    size = sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())
    meta = {str(k): str(v) for k, v in metadata.items()}
    if target.folder:
        names = write_hf_folder(target.path, layout, tensors, meta, max_shard_size=max_shard_size, beside=beside)
        copied = [Path(p).name for p in beside]
        return Written(target.path, True, names, len(layout), size, copied, meta)
    save_weights(target.path, tensors(list(layout)), meta, layout=layout)
    return Written(target.path, False, [target.path.name], len(layout), size, [], meta)


def average_checkpoints(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    buffers: str = "average",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    key: str | None = None,
    folder: bool | None = None,
    unsafe: bool = False,
    metadata: Mapping[str, str] | None = None,
    note: Callable[[str], None] | None = None,
    progress: Callable[[Iterable[tuple[str, Tensor]], int], Iterable[tuple[str, Tensor]]] | None = None,
    on_plan: Callable[[Averager], None] | None = None,
) -> Written:
    """Average checkpoints one tensor at a time into ``out`` and say what was written.

    ``inputs`` are any mix of safetensors files, ``torch.save`` files, Hugging Face folders
    (or their index files) and ``torch.distributed.checkpoint`` folders
    (:func:`polyak.files.open_weights`; ``key``: the key of a ``.pt`` file or the prefix in a
    DCP folder that holds the weights). ``weights`` (default uniform) are normalised to sum to
    1; ``buffers`` says what becomes of BatchNorm statistics (:class:`Averager`).

    ``out`` is a Hugging Face folder when ``folder`` is True or (``folder`` None) when it is an
    existing folder or ends with ``/``: shards of at most ``max_shard_size`` (default
    :data:`polyak.files.DEFAULT_MAX_SHARD_SIZE`, transformers' ``save_pretrained`` default),
    the index, and the ``config.json``, ``generation_config.json`` and tokenizer files of the
    last input that is a Hugging Face folder; the folder appears whole or not at all. Otherwise
    a file: ``.safetensors`` (streamed) or ``torch.save``. The output is refused before
    anything is read when it is an input, inside an input's folder, or a folder holding one
    (:func:`polyak.files.check_output_target`); every input is checked (names, shapes, kinds of
    tensor) before any tensor is read. Labels (``format: polyak-average``, ``method``,
    ``inputs``, ``weights``, ``taken_from``, ``buffers``, and ``metadata``) go into the output's
    metadata.

    ``note`` receives notes on the inputs (objects read as placeholders), ``progress`` wraps
    the stream of tensors (given it and their number), ``on_plan`` is called with the
    :class:`Averager` once the inputs are checked, before anything is written. Raises
    :class:`FormatError` (or :class:`ValueError` for bad arguments); nothing is written then."""
    paths = [Path(p) for p in inputs]
    if len(paths) < 1:
        raise ValueError("average_checkpoints() needs at least one input")
    if len({str(p) for p in paths}) != len(paths):
        raise ValueError("an input is given twice")
    w = normalised_weights(weights, len(paths))
    parse_size(max_shard_size)  # a bad size is refused before anything is read
    target = check_output_target(out, paths, folder=folder)
    sources: list[Weights] = []
    try:
        for p in paths:
            sources.append(open_weights(p, key=key, unsafe=unsafe, note=note))
        averager = Averager(sources, w, buffers=buffers)
        if on_plan is not None:
            on_plan(averager)
        labels = {
            "format": "polyak-average",
            "method": "uniform" if weights is None else "weighted",
            "inputs": json.dumps([p.name for p in paths]),
            "weights": json.dumps(w),
            "taken_from": json.dumps(sorted(set(averager.wheres))),
            "buffers": buffers,
            **{str(k): str(v) for k, v in (metadata or {}).items()},
        }
        hf = [s for s in sources if isinstance(s, HFFolder)]
        beside = hf[-1].beside() if hf and target.folder else []

        # a streamed output writes each tensor before the next is made: buffers are reused
        reuse = target.folder or target.path.suffix == ".safetensors"

        def stream(order: Sequence[str]) -> Iterable[tuple[str, Tensor]]:
            items = averager.tensors(order, reuse=reuse)
            return progress(items, len(order)) if progress is not None else items

        return write_weights(target, averager.layout, stream, labels, max_shard_size=max_shard_size, beside=beside)
    finally:
        for s in sources:
            s.close()
