"""What polyak checks of a path before it reads or writes a file: an input must be a regular
file, an output a regular file or absent, and a name the C++ and Rust readers (torch, safetensors)
cannot take (not UTF-8) is handed to them through a link they can."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import FormatError, shown

__all__ = ["check_input", "check_writable", "openable", "kind_of"]


def kind_of(mode: int) -> str:
    """What a file of this ``st_mode`` is, for messages: "a directory", "a FIFO", ..."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_input(path: str | os.PathLike[str]) -> Path:
    """``path`` if it is a regular file (following links); else :class:`FormatError` saying
    what it is. Nothing is opened: a FIFO would block the reader forever."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FormatError(f"{shown(path)}: no such file") from None
    except OSError as e:
        raise FormatError(f"{shown(path)}: cannot read: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise FormatError(f"{shown(path)} is {kind_of(mode)}, not a checkpoint file")
    return path


def check_writable(path: str | os.PathLike[str]) -> Path:
    """``path`` if it is absent or a regular file (following links), so that replacing it
    replaces a file; else :class:`FormatError` (an output onto ``/dev/null`` or a FIFO would
    replace the device node or the pipe with a regular file)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return path
    except OSError as e:
        raise FormatError(f"{shown(path)}: cannot write: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise FormatError(f"{shown(path)} is {kind_of(mode)}: write to a file name instead")
    return path


@contextlib.contextmanager
def openable(path: Path) -> Iterator[str]:
    """A name of ``path`` that torch and safetensors can open: the path itself, or, when it is
    not valid UTF-8 (they cannot encode it), a link to it in a temporary folder, removed after
    the block (what was opened or mapped through it stays valid)."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        yield name
        return
    with tempfile.TemporaryDirectory(prefix="polyak-") as folder:
        link = os.path.join(folder, "input")
        os.symlink(os.fsencode(path.absolute()), link)
        yield link
