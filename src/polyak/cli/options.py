"""What the commands read and write, and the options that say how: ``--unsafe``, ``--quiet``,
``--key``, ``--format``, ``--names-from``, ``--buffer-names``, ``--max-shard-size``; where an
output goes (a file, or a Hugging Face folder); and :class:`CLIError`, the one-line error of a
bad input."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..files import DEFAULT_MAX_SHARD_SIZE, Loaded, Output, input_kind, load, model_state_dict, open_weights
from .console import say
from .formats import FORMATS, detect

__all__ = [
    "CLIError",
    "UNSAFE_WARNING",
    "WEIGHT_SUFFIXES",
    "CHECKPOINT_SUFFIXES",
    "add_io_options",
    "add_source_options",
    "add_output_options",
    "output_path",
    "output_target",
    "read",
    "read_any",
    "find_average",
]

UNSAFE_WARNING = "warning: --unsafe: unpickling {path} runs whatever code it asks for; use it only on files you trust"


#: The extensions of a weights output (``average``, ``export``, ``posthoc``), which say its
#: format: safetensors, else ``torch.save``.
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
#: The extensions of a training checkpoint output (``convert``): ``torch.save`` only.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


class CLIError(Exception):
    """An error in the command's input, reported as one line."""


def output_path(
    out: Path | str, inputs: list[Path], *, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES, folders: bool = False
) -> Path:
    """``-o OUT``, a file, refused when it is one of ``inputs``, inside an input folder, or a
    directory (:func:`polyak.files.check_output_target`), or when its extension is not one of
    ``suffixes``: the extension says the output's format (``.safetensors``: safetensors;
    ``.pt``, ``.pth``, ``.ckpt``, ``.bin``: ``torch.save``). ``folders``: the command also
    writes Hugging Face folders (the message says how to ask for one)."""
    from ..files import check_output_target

    out = check_output_target(out, inputs, folder=False).path
    if out.suffix not in suffixes:
        given = f"its extension is {out.suffix}" if out.suffix else "it has no extension"
        if suffixes == CHECKPOINT_SUFFIXES:
            raise CLIError(
                f"-o {out}: {given}; a polyak training checkpoint holds more than tensors: "
                "write it as .pt, .pth or .ckpt (torch.save)"
            )
        folder = "; or end it with / to write a Hugging Face folder" if folders else ""
        raise CLIError(
            f"-o {out}: {given}, which says no format: name it .safetensors (safetensors) "
            f"or .pt, .pth, .ckpt, .bin (torch.save){folder}"
        )
    return out


def output_target(out: Path | str, inputs: list[Path]) -> Output:
    """Where ``-o OUT`` goes: a Hugging Face folder when ``OUT`` is an existing folder or ends
    with ``/`` (:func:`polyak.files.check_output_target`), else a file (:func:`output_path`)."""
    from ..files import check_output_target

    target = check_output_target(str(out), inputs)
    if target.folder:
        return target
    return Output(output_path(target.path, inputs, folders=True), False)


def add_output_options(p: argparse.ArgumentParser) -> None:
    """``--out``/``-o`` (a weights file, or a Hugging Face folder) and ``--max-shard-size``."""
    p.add_argument(
        "--out",
        "-o",
        required=True,
        metavar="OUT",
        help="output: .safetensors, or .pt, .pth, .ckpt, .bin (torch.save); or a folder (an existing one, or a "
        "name ending in /) for a Hugging Face sharded folder",
    )
    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        metavar="SIZE",
        help=f"with a folder output: the largest shard, in bytes or with KB, MB, GB (powers of 10, as transformers) "
        f"or KiB, MiB, GiB (default {DEFAULT_MAX_SHARD_SIZE}, transformers' save_pretrained default)",
    )


def add_io_options(p: argparse.ArgumentParser, *, unsafe: bool = True) -> None:
    """``--quiet`` and (for commands that read ``.pt`` files) ``--unsafe``."""
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, notes or summary")
    if unsafe:
        p.add_argument(
            "--unsafe",
            action="store_true",
            help="unpickle .pt files as they ask, running any code they hold (only for files you trust); "
            "by default files are read without running code from them",
        )


def add_source_options(p: argparse.ArgumentParser) -> None:
    """Options that say where the average is in a file: ``--key``, ``--format``,
    ``--names-from``, ``--buffer-names``."""
    p.add_argument("--key", help="look for the average only under this top-level key of the file")
    p.add_argument(
        "--format",
        choices=FORMATS.names(),
        metavar="FORMAT",
        help=f"read the file as this format, one of {', '.join(FORMATS.names())} (default: detect it)",
    )
    p.add_argument(
        "--names-from",
        type=Path,
        metavar="PLAIN_CKPT",
        help="a plain checkpoint of the same model, for formats that save tensors by position (torch-ema, "
        "diffusers): its parameters, in order, name them; its buffers fill in the rest, and it is taken as the "
        "live weights",
    )
    p.add_argument(
        "--buffer-names",
        default="",
        metavar="GLOB[,GLOB]",
        help="with --names-from: names (fnmatch globs) of floating buffers that are not parameters, besides "
        "BatchNorm statistics",
    )


def read(args: argparse.Namespace, path: Path, *, note: bool = True, **kwargs: Any) -> Any:
    """:func:`polyak.files.load` with ``--unsafe``, its warning, and (``note``) a note when
    objects besides tensors were read as placeholders."""
    unsafe = bool(getattr(args, "unsafe", False))
    if unsafe:
        print(UNSAFE_WARNING.format(path=path), file=sys.stderr)
    loaded = load(path, unsafe=unsafe, **kwargs)
    if note and loaded.note:
        say(args, f"note: {loaded.note}")
    return loaded


def read_any(args: argparse.Namespace, path: Path, *, note: bool = True, **kwargs: Any) -> Loaded:
    """:func:`read` for a file; for a Hugging Face folder or a ``torch.distributed.checkpoint``
    folder, the folder as a tree of placeholders (:meth:`polyak.files.Weights.tree`: shapes and
    dtypes, small tensors read), whose tensors :meth:`polyak.files.Loaded.tensor` reads one at
    a time."""
    kind = input_kind(path)
    if kind == "file":
        return read(args, path, note=note, **kwargs)
    reader = open_weights(path)
    obj, origins = reader.tree()
    loader = "dcp" if kind == "dcp" else "safetensors"
    return Loaded(path, obj, loader, metadata=reader.metadata or None, origins=origins, reader=reader)


def find_average(args: argparse.Namespace, path: Path) -> Any:
    """The average in ``path`` (:func:`polyak.cli.formats.detect`), with ``--key``, ``--format``,
    ``--names-from`` and ``--buffer-names``; notes go to stderr. ``path`` may be a folder
    (:func:`read_any`): the weights found are then placeholders, read by ``loaded.tensor``."""
    loaded = read_any(args, path)
    names = names_from = None
    if args.names_from is not None:
        names, where = model_state_dict(read(args, args.names_from).obj)
        names_from = f"{args.names_from} ({where})"
    globs = tuple(g for g in args.buffer_names.split(",") if g)
    found = detect(loaded, key=args.key, only=args.format, names=names, names_from=names_from, buffer_names=globs)
    for note in found.notes:
        say(args, f"note: {note}")
    return loaded, found
