"""Argument checks shared by every public constructor and function: each returns the checked
value or raises :class:`ValueError` naming the argument and the range it must be in; and where a
warning about an argument points.

One rule for every sibling (optax's lesson): a ``bool`` is never accepted as a number, NaN is
never in a range, and the message says the range with its open or closed ends. A momentum (the
weight of the new value) and a decay (the weight kept on the average, ``1 - momentum``) are both
in the closed interval [0, 1]: momentum 0 (decay 1) freezes the average, momentum 1 (decay 0)
copies the model. A momentum above 0.5 or a decay below 0.5 is almost surely the other
convention, and gives a :class:`ConventionWarning`.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Collection
from typing import TypeVar

import torch

__all__ = [
    "check_int",
    "check_number",
    "check_choice",
    "check_float_dtype",
    "check_count",
    "check_momentum",
    "check_decay",
    "ConventionWarning",
    "warning_stacklevel",
]

T = TypeVar("T")


def check_int(name: str, value: object, minimum: int | None = 0, maximum: int | None = None) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) in ``[minimum, maximum]``.

    >>> check_int("interval", 3, 1)
    3
    >>> check_int("interval", 0, 1)
    Traceback (most recent call last):
    ValueError: interval must be an int >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int{_int_range(minimum, maximum)}, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an int{_int_range(minimum, maximum)}, got {value!r}")
    return value


def check_count(name: str, value: object) -> int:
    """A count (``steps``, ``n_averaged``) as an int: a non-negative ``int`` (not a ``bool``) or a
    one-element integer tensor holding one. A float, even a whole one, is refused: a count that
    went through a float may have lost its exact value.

    >>> check_count("steps", torch.tensor(12))
    12
    >>> check_count("steps", 2.7)
    Traceback (most recent call last):
    ValueError: steps must be a non-negative integer, got 2.7
    """
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _int_range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def check_number(
    name: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """``value`` as a float if it is a real number (not a ``bool``, not NaN) in the interval
    from ``low`` to ``high``, each end open or closed.

    >>> check_number("decay", 0.999, 0.0, 1.0)
    0.999
    >>> check_number("gamma", 0.0, 0.0, open_low=True)
    Traceback (most recent call last):
    ValueError: gamma must be in (0.0, inf), got 0.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    below = v <= low if open_low else v < low
    above = v >= high if open_high else v > high
    if math.isnan(v) or below or above:
        lo = "(" if open_low or low == -math.inf else "["
        hi = ")" if open_high or high == math.inf else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return v


class ConventionWarning(UserWarning):
    """A momentum that is almost surely a decay, or a decay that is almost surely a momentum."""


def check_momentum(name: str, value: object) -> float:
    """``value`` as a float if it is a momentum, the weight of the new value, in [0, 1]; a
    :class:`ConventionWarning` above 0.5 (a decay given as a momentum).

    >>> check_momentum("momentum", 0.0002)
    0.0002
    """
    m = check_number(name, value, 0.0, 1.0)
    if m > 0.5:
        warnings.warn(
            f"{name}={m} is the weight of the new value and is usually small; "
            f"did you mean {name}={1 - m:.6g} (a decay of {m})?",
            ConventionWarning,
            stacklevel=warning_stacklevel(),
        )
    return m


def check_decay(name: str, value: object) -> float:
    """``value`` as a float if it is a decay, the weight kept on the average, in [0, 1]; a
    :class:`ConventionWarning` below 0.5 (a momentum given as a decay).

    >>> check_decay("decay", 0.999)
    0.999
    """
    d = check_number(name, value, 0.0, 1.0)
    if d < 0.5:
        warnings.warn(
            f"{name}={d} is the weight kept on the average and is usually close to 1; "
            f"did you mean {name}={1 - d:.6g} (a momentum of {d})?",
            ConventionWarning,
            stacklevel=warning_stacklevel(),
        )
    return d


def check_choice(name: str, value: T, choices: Collection[T]) -> T:
    """``value`` if it is one of ``choices``.

    >>> check_choice("swap", "val", ("val", "epoch", None))
    'val'
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)!r}, got {value!r}")
    return value


def check_float_dtype(name: str, value: object, *, optional: bool = True) -> torch.dtype | None:
    """``value`` if it is a floating ``torch.dtype`` (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(f"{name} must be a floating torch.dtype{' or None' if optional else ''}, got {value!r}")
    return value


def warning_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn` that points a warning at the first frame
    outside polyak (the user's line), however deep inside polyak it is raised."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("polyak"):
        frame, level = frame.f_back, level + 1
    return level
