"""The ``polyak`` command line: ``polyak COMMAND --help`` for each command.

Each command lives in its own module with ``register(subparsers)`` and ``run(args) -> int``.
Errors in the input (a missing or damaged file, a bad argument) end with one line on stderr
and a non-zero exit code; outputs are written to a temporary name and renamed, so an
interrupted command never leaves a half-written file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import posthoc

__all__ = ["main", "CLIError"]

COMMANDS = (posthoc,)


class CLIError(Exception):
    """An error in the command's input, reported as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyak", description="Weight-averaging tools for PyTorch checkpoints.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"polyak {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, KeyError, OSError, RuntimeError) as e:
        message = str(e) if not isinstance(e, KeyError) else str(e.args[0] if e.args else e)
        print(f"polyak {args.command}: error: {message}", file=sys.stderr)
        return 1
