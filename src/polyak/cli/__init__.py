"""The ``polyak`` command line: ``polyak COMMAND --help`` for each command (docs/cli.md).

Each command lives in its own module with ``register(subparsers)`` and ``run(args) -> int``.
Errors in the input (a missing or damaged file, a bad argument) end with one line on stderr
and a non-zero exit code; outputs are written to a temporary name and renamed, so an
interrupted command never leaves a half-written file. Files are read without running code
stored in them (:mod:`polyak.formats`) unless ``--unsafe`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import average, convert, demo, export, inspect, posthoc

__all__ = ["main", "CLIError"]

COMMANDS = (average, export, convert, inspect, posthoc, demo)

UNSAFE_WARNING = "warning: --unsafe: unpickling {path} runs whatever code it asks for; use it only on files you trust"


class CLIError(Exception):
    """An error in the command's input, reported as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyak", description="Weight-averaging tools for PyTorch checkpoints.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _one_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return "; ".join(lines) if lines else "failed"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"polyak {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (``polyak inspect x | head``)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (CLIError, ValueError, KeyError, OSError, RuntimeError) as e:
        message = str(e) if not isinstance(e, KeyError) else str(e.args[0] if e.args else e)
        print(f"polyak {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return 1
    except Exception as e:  # never a traceback for a user; POLYAK_DEBUG=1 shows it
        if os.environ.get("POLYAK_DEBUG"):
            raise
        print(f"polyak {args.command}: error: {type(e).__name__}: {_one_line(str(e))}", file=sys.stderr)
        return 1


# -- shared by the commands ------------------------------------------------------------------------


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
    from ..formats import FORMAT_NAMES

    p.add_argument("--key", help="look for the average only under this top-level key of the file")
    p.add_argument("--format", choices=FORMAT_NAMES, help="read the file as this format (default: detect it)")
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


def say(args: argparse.Namespace, message: str) -> None:
    """A note or summary on stderr, unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def progress(args: argparse.Namespace, items: Iterable[Any], *, desc: str, unit: str = "tensor", **kw: Any) -> Any:
    """A tqdm progress bar on stderr (off with ``--quiet``)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, disable=getattr(args, "quiet", False), **kw)


def read(args: argparse.Namespace, path: Path, *, note: bool = True, **kwargs: Any) -> Any:
    """:func:`polyak.formats.load` with ``--unsafe``, its warning, and (``note``) a note when
    objects besides tensors were read as placeholders."""
    from ..formats import load

    unsafe = bool(getattr(args, "unsafe", False))
    if unsafe:
        print(UNSAFE_WARNING.format(path=path), file=sys.stderr)
    loaded = load(path, unsafe=unsafe, **kwargs)
    if note and loaded.note:
        say(args, f"note: {loaded.note}")
    return loaded


def find_average(args: argparse.Namespace, path: Path) -> Any:
    """The average in ``path`` (:func:`polyak.formats.detect`), with ``--key``, ``--format``,
    ``--names-from`` and ``--buffer-names``; notes go to stderr."""
    from ..formats import detect, model_state_dict

    loaded = read(args, path)
    names = names_from = None
    if args.names_from is not None:
        names, where = model_state_dict(read(args, args.names_from).obj)
        names_from = f"{args.names_from} ({where})"
    globs = tuple(g for g in args.buffer_names.split(",") if g)
    found = detect(loaded, key=args.key, only=args.format, names=names, names_from=names_from, buffer_names=globs)
    for note in found.notes:
        say(args, f"note: {note}")
    return loaded, found


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover
