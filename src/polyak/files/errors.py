"""The error of every file that cannot be read or written as asked."""

from __future__ import annotations

import re

__all__ = ["FormatError", "first_line", "shown"]


class FormatError(ValueError):
    """A file that cannot be read, holds nothing usable, or may not be written (a one-line
    message naming the file)."""


def shown(text: object) -> str:
    r"""``text`` (a path, a tensor name, a metadata value read from a file) safe to print on a
    terminal: control characters (an escape sequence would act on the terminal) and bytes that
    are not UTF-8 (in a file name) are written as escapes, printable characters as they are.

    >>> print(shown("ema" + chr(27) + "[2Jweights"), shown("caf" + chr(0xDCE9) + ".pt"), shown("été"))
    ema\x1b[2Jweights caf\xe9.pt été
    """
    out = []
    for c in str(text):
        code = ord(c)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, as os.fsdecode keeps it
            out.append(f"\\x{code - 0xDC00:02x}")
        elif c.isprintable() or c == " ":
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, without terminal colour codes, at most 300
    characters: what a one-line error report quotes of an underlying library's error."""
    text = str(e).strip() or type(e).__name__
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return shown(text.splitlines()[0][:300])
