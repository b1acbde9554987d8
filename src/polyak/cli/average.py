"""``polyak average``: the uniform or weighted average of checkpoints, one tensor at a time."""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..files import check_input
from ..tensors import is_averaged

__all__ = ["register", "run", "Averager", "Source"]


def register(sub: Any) -> None:
    from .options import add_io_options

    p = sub.add_parser(
        "average",
        help="average checkpoints (uniform, --weights, or the --last K), tensor by tensor",
        description=(
            "Average the weights of several checkpoints of one model into a state dict the model loads. "
            "Floating tensors are averaged in float64 and written in the dtype of the last checkpoint; "
            "integer and bool tensors (num_batches_tracked) are taken from the last checkpoint, and so are "
            "BatchNorm statistics with --buffers last. "
            "From a training checkpoint the weights are taken from --key, else from polyak's primary "
            "average, else from 'state_dict' (or 'model', 'model_state_dict', 'module', ...), else the "
            "file itself when it is a state dict. All files must hold the same names and shapes. "
            "The output's extension says its format: .safetensors, or .pt, .pth, .ckpt, .bin (torch.save)."
        ),
        epilog="examples:\n  polyak average ep8.pt ep9.pt ep10.pt -o soup.safetensors\n"
        "  polyak average ckpts/*.safetensors --last 3 -o last3.safetensors\n"
        "  polyak average a.pt b.pt c.pt --weights 0.2,0.3,0.5 -o weighted.pt",
    )
    p.add_argument(
        "checkpoints", nargs="+", type=Path, metavar="CKPT", help="two or more .pt/.pth/.ckpt or .safetensors files"
    )
    p.add_argument(
        "--out", "-o", required=True, type=Path, help="output: .safetensors, or .pt, .pth, .ckpt, .bin (torch.save)"
    )
    p.add_argument(
        "--weights",
        metavar="W1,W2,...",
        help="one weight per averaged file, in the order given (after --last); normalised to sum to 1",
    )
    p.add_argument("--last", type=int, metavar="K", help="average only the last K files in --sort order")
    p.add_argument(
        "--sort",
        choices=("name", "mtime"),
        default="name",
        help="order for --last: by file name, numbers compared as numbers (ep9 < ep10; default), "
        "or by modification time",
    )
    p.add_argument("--key", help="take the weights from this top-level key of every .pt file")
    p.add_argument(
        "--buffers",
        choices=("average", "last"),
        default="average",
        help="BatchNorm statistics (running_mean, running_var): average them like the weights (default), or "
        "take them from the last checkpoint; either way they do not fit the averaged weights: recompute them "
        "with polyak.update_bn after loading",
    )
    add_io_options(p)
    p.set_defaults(run=run)


# -- inputs ---------------------------------------------------------------------------------------


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def select(paths: Sequence[Path], last: int | None, sort: str) -> list[Path]:
    """The files to average: all of them in the order given, or the last ``last`` in ``sort``
    order (``"name"``: natural order of the file names; ``"mtime"``: modification time). One
    file is refused: its average is itself."""
    from .options import CLIError

    for p in paths:
        check_input(p)  # a regular file: a FIFO would hang the reader
    if len(set(map(str, paths))) != len(paths):
        raise CLIError("a file is given twice")
    if last is not None:
        if last < 1:
            raise CLIError(f"--last must be >= 1, got {last}")
        if last > len(paths):
            raise CLIError(f"--last {last} but only {len(paths)} files are given")
        key = _natural_key if sort == "name" else (lambda p: (p.stat().st_mtime_ns, _natural_key(p)))
        paths = sorted(paths, key=key)[-last:]
    if len(paths) == 1:
        raise CLIError(
            f"averaging one file ({paths[0]}) changes nothing: give two or more; to write one checkpoint's "
            "weights as a plain state dict use 'polyak export' (or 'polyak convert' for another library's average)"
        )
    return list(paths)


def parse_weights(text: str | None, n: int) -> list[float]:
    """``n`` weights summing to 1: uniform, or ``text`` (comma-separated) normalised."""
    from .options import CLIError

    if text is None:
        return [1.0 / n] * n
    try:
        values = [float(w) for w in text.split(",") if w.strip()]
    except ValueError as e:
        raise CLIError(f"--weights must be numbers separated by commas, got {text!r}") from e
    if len(values) != n:
        raise CLIError(f"--weights has {len(values)} values for {n} files")
    if not all(math.isfinite(w) and w >= 0 for w in values):
        raise CLIError(f"--weights must be finite numbers >= 0 (the weights of an average), got {text!r}")
    total = math.fsum(values)
    if not 0 < total < math.inf:
        raise CLIError(f"--weights must have a positive, finite sum, got {text!r}")
    return [w / total for w in values]


class Source:
    """One input's weights, read lazily: a safetensors file through ``safe_open`` (one tensor
    at a time), a ``torch.save`` zip file memory-mapped (tensors paged in when used). A legacy
    (non-zip) ``.pt`` file cannot be mapped: it is loaded whole, only while it is being
    read (``lazy`` False)."""

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        from ..files import SafetensorsFile, sniff

        self.path, self._args = path, args
        self.kind = sniff(path)
        self.lazy = self.kind in ("safetensors", "zip")
        self._sf: SafetensorsFile | None = None
        self._state: dict[str, Tensor] | None = None
        self.where = ""

    def open(self) -> None:
        from ..files import SafetensorsFile, model_state_dict
        from .options import read

        if self.kind == "safetensors":
            self._sf = SafetensorsFile(self.path)
            self.where = "safetensors"
            return
        loaded = read(self._args, self.path, mmap=True)
        try:
            self._state, self.where = model_state_dict(loaded.obj, key=self._args.key)
        except ValueError as e:
            raise type(e)(f"{self.path}: {e}") from e

    def close(self) -> None:
        self._state = None  # the mapped or loaded tensors go with it
        self._sf = None

    def layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if self._sf is not None:
            return {k: (self._sf.shape(k), self._sf.dtype(k)) for k in self._sf.keys()}
        assert self._state is not None
        return {k: (tuple(v.shape), v.dtype) for k, v in self._state.items()}

    def get(self, key: str) -> Tensor:
        if self._sf is not None:
            return self._sf.get(key)
        assert self._state is not None
        return self._state[key]


def _check_layouts(sources: Sequence[Source], layouts: Sequence[dict[str, Any]]) -> None:
    from .options import CLIError

    first, ref = sources[0], layouts[0]
    for src, lay in zip(sources[1:], layouts[1:], strict=True):
        missing, extra = sorted(set(ref) - set(lay)), sorted(set(lay) - set(ref))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if extra:
                parts.append(f"has extra {extra[:5]}{' ...' if len(extra) > 5 else ''}")
            raise CLIError(f"{src.path} does not hold the same tensors as {first.path}: it " + " and ".join(parts))
        for k, (shape, dtype) in ref.items():
            other_shape, other_dtype = lay[k]
            if other_shape != shape:
                raise CLIError(f"tensor {k!r} has shape {shape} in {first.path} but {other_shape} in {src.path}")
            if is_averaged(other_dtype) != is_averaged(dtype):
                raise CLIError(f"tensor {k!r} is {dtype} in {first.path} but {other_dtype} in {src.path}")


#: The names (last component) of BatchNorm's running statistics: ``--buffers``.
BN_STATISTICS = ("running_mean", "running_var")


def is_bn_statistic(name: str) -> bool:
    """Whether ``name`` is a BatchNorm running statistic (``bn.running_mean``, ``bn.running_var``)."""
    return name.rsplit(".", 1)[-1] in BN_STATISTICS


def _wide(t: Tensor) -> Tensor:
    """A float64 (complex128) copy: never the input itself, which may be a read-only mapping."""
    return t.to(torch.complex128 if t.is_complex() else torch.float64, copy=True)


class Averager:
    """The weighted average of the inputs' weights, produced one tensor at a time.

    Memory: safetensors inputs are read through ``safe_open`` and ``torch.save`` zip inputs
    (every ``.pt`` written by torch >= 1.6) through a memory map, one tensor at a time, so
    besides the output the process holds two float64 buffers of the largest tensor (reused),
    one input and one output tensor; with a ``.safetensors`` output nothing more (each averaged
    tensor is written as soon as it is made), with a ``.pt`` output the whole output
    (``torch.save`` needs it). Pages of the
    mapped inputs show in the resident size as page cache; the kernel drops them under memory
    pressure. A legacy (non-zip) ``.pt`` input cannot be mapped: then the files are read one
    at a time, each whole, into float64 accumulators for every floating tensor (about twice
    the output for float32 weights, plus one input file).

    Integer and bool tensors come from the last input, and so do the BatchNorm statistics
    (``running_mean``, ``running_var``) with ``buffers="last"``; ``buffers="average"`` averages
    them like the weights.
    """

    def __init__(
        self, paths: Sequence[Path], weights: Sequence[float], args: argparse.Namespace, *, buffers: str = "average"
    ) -> None:
        self.weights = list(weights)
        self.args = args
        self.sources = [Source(p, args) for p in paths]
        layouts = []
        for src in self.sources:  # names, shapes and dtypes before any data is read
            src.open()
            layouts.append(src.layout())
            if not src.lazy:
                src.close()
        _check_layouts(self.sources, layouts)
        self.keys = list(layouts[0])
        #: name -> (shape, dtype) of the output: the dtypes of the last input
        self.layout = {k: layouts[-1][k] for k in self.keys}
        self.streaming = all(s.lazy for s in self.sources)
        #: the floating BatchNorm statistics: averaged (``buffers="average"``) or from the last file
        self.statistics = [k for k in self.keys if is_bn_statistic(k) and is_averaged(self.layout[k][1])]
        #: the names taken from the last file rather than averaged
        self.from_last = {k for k in self.keys if not is_averaged(self.layout[k][1])}
        if buffers == "last":
            self.from_last.update(self.statistics)

    @property
    def wheres(self) -> list[str]:
        return [s.where for s in self.sources]

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        try:
            if self.streaming:
                yield from self._by_tensor()
            else:
                yield from self._by_file().items()
        finally:
            for s in self.sources:
                s.close()

    def _by_tensor(self) -> Iterator[tuple[str, Tensor]]:
        # Two float64 buffers of the largest averaged tensor, reused for every tensor: no
        # allocation of accumulator size per tensor (which fragments the heap), and the same
        # numbers as summing fresh float64 copies.
        sizes = [
            math.prod(shape)
            for k, (shape, dtype) in self.layout.items()
            if dtype.is_floating_point and k not in self.from_last
        ]
        acc_buf = torch.empty(max(sizes, default=0), dtype=torch.float64)
        tmp_buf = torch.empty_like(acc_buf)
        last = self.sources[-1]
        for k in self.keys:
            shape, dtype = self.layout[k]
            if k in self.from_last:
                yield k, last.get(k).clone()
                continue
            if dtype.is_complex:
                acc_c = None
                for w, src in zip(self.weights, self.sources, strict=True):
                    t = _wide(src.get(k))
                    acc_c = t.mul_(w) if acc_c is None else acc_c.add_(t, alpha=w)
                assert acc_c is not None
                yield k, acc_c.to(dtype)
                continue
            n = math.prod(shape)
            acc, tmp = acc_buf[:n].view(shape), tmp_buf[:n].view(shape)
            for i, (w, src) in enumerate(zip(self.weights, self.sources, strict=True)):
                if i == 0:
                    acc.copy_(src.get(k)).mul_(w)
                else:
                    acc.add_(tmp.copy_(src.get(k)), alpha=w)
            yield k, acc.to(dtype, copy=True)

    def _by_file(self) -> dict[str, Tensor]:
        from .console import progress

        accs: dict[str, Tensor] = {}
        out: dict[str, Tensor] = {}
        n = len(self.sources)
        pairs = list(zip(self.weights, self.sources, strict=True))
        for i, (w, src) in enumerate(progress(self.args, pairs, desc="reading", unit="file")):
            if not src.lazy:
                src.open()
            for k in self.keys:
                t = src.get(k)
                if k not in self.from_last:
                    if k in accs:
                        accs[k].add_(_wide(t), alpha=w)
                    else:
                        accs[k] = _wide(t).mul_(w)
                elif i == n - 1:
                    out[k] = t.clone()
            src.close()
        for k in self.keys:
            if k in accs:
                out[k] = accs.pop(k).to(self.layout[k][1])
        return {k: out[k] for k in self.keys}


def run(args: argparse.Namespace) -> int:
    from ..files import save_weights
    from .console import human_bytes, progress, say
    from .options import output_path

    paths = select(args.checkpoints, args.last, args.sort)
    weights = parse_weights(args.weights, len(paths))
    out = output_path(args.out, list(args.checkpoints))  # every file named, averaged or not
    if args.last is not None:
        order = "file name (numbers as numbers)" if args.sort == "name" else "modification time"
        say(args, f"averaging the last {len(paths)} of {len(args.checkpoints)} files by {order}:")
    else:
        say(args, f"averaging {len(paths)} files:")
    for p, w in zip(paths, weights, strict=True):
        say(args, f"  {w:.6g}  {p}")
    averager = Averager(paths, weights, args, buffers=args.buffers)
    metadata = {
        "format": "polyak-average",
        "method": "uniform" if args.weights is None else "weighted",
        "inputs": json.dumps([p.name for p in paths]),
        "weights": json.dumps(weights),
        "taken_from": json.dumps(sorted(set(averager.wheres))),
        "buffers": args.buffers,
    }
    n = len(averager.statistics)
    if n:
        what = f"{n} BatchNorm statistics tensor{'' if n == 1 else 's'} (running_mean, running_var)"
        if args.buffers == "average":
            note = (
                f"averaged {what} like the weights; averaged statistics do not fit averaged weights: "
                "recompute them after loading with polyak.update_bn(loader, model) "
                "(--buffers last takes them from the last checkpoint instead)"
            )
        else:
            note = (
                f"took {what} from the last checkpoint, {paths[-1].name}; they were measured with its weights, "
                "not the averaged ones: recompute them after loading with polyak.update_bn(loader, model)"
            )
        say(args, f"note: {note}")
    tensors = progress(args, averager, desc="averaging", total=len(averager.keys))
    save_weights(out, tensors, metadata, layout=averager.layout)
    size = sum(math.prod(shape) * dtype.itemsize for shape, dtype in averager.layout.values())
    say(args, f"wrote {len(averager.layout)} tensors ({human_bytes(size)}) to {out}")
    return 0
