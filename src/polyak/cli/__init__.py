"""The ``polyak`` command line: ``polyak COMMAND --help`` for each command (docs/cli.md).

Each command lives in its own module with ``register(subparsers)`` and ``run(args) -> int``.
Errors in the input (a missing or damaged file, a bad argument) end with one line on stderr
and a non-zero exit code; outputs are written to a temporary name and renamed, so an
interrupted command never leaves a half-written file. Files are read without running code
stored in them (:mod:`polyak.files`) unless ``--unsafe`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..files import shown
from . import average, convert, demo, export, inspect, posthoc
from .console import HelpFormatter
from .options import CLIError

__all__ = ["main", "build_parser", "CLIError"]

COMMANDS = (average, export, convert, inspect, posthoc, demo)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with polyak's help layout (:class:`~polyak.cli.console.HelpFormatter`):
    the main parser is one, and so is each command's (``add_subparsers`` makes its parsers of
    the main parser's class)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="polyak",
        description="Weight-averaging tools for PyTorch checkpoints. 'polyak COMMAND --help' shows each command.",
    )
    parser.add_argument("--version", action="version", version=f"polyak {__version__}")
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
        print(f"polyak {args.command}: error: {shown(_one_line(message))}", file=sys.stderr)
        return 1
    except Exception as e:  # never a traceback for a user; POLYAK_DEBUG=1 shows it
        if os.environ.get("POLYAK_DEBUG"):
            raise
        print(f"polyak {args.command}: error: {type(e).__name__}: {shown(_one_line(str(e)))}", file=sys.stderr)
        return 1
