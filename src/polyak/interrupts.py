"""Holding Ctrl-C (SIGINT) back across a few statements that must complete together, such as
exchanging the average with the live weights: the interrupt is delivered afterwards, at a point
the caller chooses, so it never lands halfway through.

Python runs signal handlers between bytecodes, so a ``KeyboardInterrupt`` can otherwise arrive
between any two tensor copies. Only the main thread can set signal handlers; elsewhere (and
where SIGINT is ignored or handled outside Python) nothing is held back.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["HeldInterrupts"]


class HeldInterrupts:
    """A context manager that records SIGINT instead of acting on it; :meth:`deliver` then
    acts on what was recorded, as the handler in force before would have (by default, raising
    :class:`KeyboardInterrupt`).

    >>> with HeldInterrupts() as held:
    ...     pass  # statements that must not be interrupted halfway
    >>> held.deliver()  # nothing arrived: nothing happens
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False
        self._received: list[tuple[int, FrameType | None]] = []

    def __enter__(self) -> HeldInterrupts:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if callable(previous):
                self._previous = previous
                signal.signal(signal.SIGINT, self._record)
                self._installed = True
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._received.append((signum, frame))

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def deliver(self) -> None:
        """Act on the interrupts recorded, once each (call it after the block)."""
        received, self._received = self._received, []
        for signum, frame in received:
            self._previous(signum, frame)
