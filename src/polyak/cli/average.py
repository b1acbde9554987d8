"""``polyak average``: the uniform or weighted average of checkpoints, one tensor at a time
(:func:`polyak.files.average_checkpoints` does the work; this module reads the options and
prints)."""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import Averager, check_source

__all__ = ["register", "run", "select", "parse_weights"]


def register(sub: Any) -> None:
    from .options import add_io_options, add_output_options

    p = sub.add_parser(
        "average",
        help="average checkpoints (uniform, --weights, or the --last K), tensor by tensor",
        description=(
            "Average the weights of several checkpoints of one model into a state dict the model loads. "
            "A checkpoint is a .pt/.pth/.ckpt or .safetensors file, a Hugging Face folder of safetensors "
            "shards (or its model.safetensors.index.json), or a torch.distributed.checkpoint folder; they "
            "may be mixed. "
            "Floating tensors are averaged in float64 and written in the dtype of the last checkpoint; "
            "integer and bool tensors (num_batches_tracked) are taken from the last checkpoint, and so are "
            "BatchNorm statistics with --buffers last. "
            "From a training checkpoint the weights are taken from --key, else from polyak's primary "
            "average, else from 'state_dict' (or 'model', 'model_state_dict', 'module', ...), else the "
            "file itself when it is a state dict; from a torch.distributed.checkpoint folder, from the keys "
            "under --key., else under average.module. (polyak.distributed.save), else under state_dict., "
            "model., ..., else every tensor. All checkpoints must hold the same names and shapes. "
            "The output's extension says its format: .safetensors, or .pt, .pth, .ckpt, .bin (torch.save); "
            "an existing folder or a name ending in / is written as a Hugging Face folder (shards of at most "
            "--max-shard-size, the index, and the config and tokenizer files of a Hugging Face input), "
            "whole or not at all."
        ),
        epilog="examples:\n  polyak average ep8.pt ep9.pt ep10.pt -o soup.safetensors\n"
        "  polyak average ckpts/*.safetensors --last 3 -o last3.safetensors\n"
        "  polyak average a.pt b.pt c.pt --weights 0.2,0.3,0.5 -o weighted.pt\n"
        "  polyak average run/step-1000 run/step-2000 run/step-3000 -o soup/ --max-shard-size 5GB",
    )
    p.add_argument(
        "checkpoints",
        nargs="+",
        type=Path,
        metavar="CKPT",
        help="two or more .pt/.pth/.ckpt or .safetensors files, Hugging Face folders, or "
        "torch.distributed.checkpoint folders",
    )
    add_output_options(p)
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
    p.add_argument(
        "--key",
        help="take the weights from this top-level key of every .pt file, or from the keys under this prefix "
        "of a torch.distributed.checkpoint folder",
    )
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
        check_source(p)  # a regular file or a folder: a FIFO would hang the reader
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


def _bn_note(args: argparse.Namespace, averager: Averager, paths: Sequence[Path]) -> None:
    from .console import say

    n = len(averager.statistics)
    if not n:
        return
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


def run(args: argparse.Namespace) -> int:
    from ..files import average_checkpoints, input_kind, sniff
    from .console import human_bytes, progress, say
    from .options import UNSAFE_WARNING, output_target

    paths = select(args.checkpoints, args.last, args.sort)
    weights = parse_weights(args.weights, len(paths))
    target = output_target(args.out, list(args.checkpoints))  # every checkpoint named, averaged or not
    if args.last is not None:
        order = "file name (numbers as numbers)" if args.sort == "name" else "modification time"
        say(args, f"averaging the last {len(paths)} of {len(args.checkpoints)} files by {order}:")
    else:
        say(args, f"averaging {len(paths)} files:")
    for p, w in zip(paths, weights, strict=True):
        say(args, f"  {w:.6g}  {p}")
    if args.unsafe:
        for p in paths:
            if input_kind(p) == "file" and sniff(p) != "safetensors":
                print(UNSAFE_WARNING.format(path=p), file=sys.stderr)
    written = average_checkpoints(
        paths,
        target.path,
        folder=target.folder,
        weights=None if args.weights is None else weights,
        buffers=args.buffers,
        max_shard_size=args.max_shard_size,
        key=args.key,
        unsafe=args.unsafe,
        note=lambda text: say(args, f"note: {text}"),
        progress=lambda items, n: progress(args, items, desc="averaging", total=n),
        on_plan=lambda averager: _bn_note(args, averager, paths),
    )
    say(args, f"wrote {written.tensors} tensors ({human_bytes(written.nbytes)}) to {_where(written)}")
    return 0


def _where(written: Any) -> str:
    """The output for the summary line: the file, or the folder with its shards and copies."""
    if not written.folder:
        return str(written.path)
    shards = len(written.files)
    text = f"{written.path}/ ({shards} shard{'' if shards == 1 else 's'}"
    if written.copied:
        text += ", with " + ", ".join(written.copied)
    return text + ")"
