"""The error of every file that cannot be read or written as asked."""

from __future__ import annotations

import re

__all__ = ["FormatError", "first_line"]


class FormatError(ValueError):
    """A file that cannot be read, holds nothing usable, or may not be written (a one-line
    message naming the file)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, without terminal colour codes, at most 300
    characters: what a one-line error report quotes of an underlying library's error."""
    text = str(e).strip() or type(e).__name__
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return text.splitlines()[0][:300]
