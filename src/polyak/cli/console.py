"""What the commands print: notes and summaries on stderr, progress bars, sizes, and the numbers
of a schedule for people."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from ..schedules import gamma_to_sigma_rel

__all__ = ["say", "progress", "human_bytes", "schedule_summary"]


def say(args: argparse.Namespace, message: str) -> None:
    """A note or summary on stderr, unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def progress(args: argparse.Namespace, items: Iterable[Any], *, desc: str, unit: str = "tensor", **kw: Any) -> Any:
    """A tqdm progress bar on stderr (off with ``--quiet``)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, disable=getattr(args, "quiet", False), **kw)


def human_bytes(n: float) -> str:
    """A size in bytes for people: ``1.5 MB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def schedule_summary(schedule: Mapping[str, Any] | None) -> dict[str, Any]:
    """The numbers a reader wants from a schedule dict: ``decay`` (constant or maximal),
    ``momentum``, ``sigma_rel``/``gamma`` (power function), ``method``; empty when unknown."""
    if not isinstance(schedule, Mapping):
        return {}
    kind, args = schedule.get("type"), dict(schedule.get("args") or {})
    out: dict[str, Any] = {"schedule": kind}
    if kind == "StartAt" and isinstance(args.get("schedule"), Mapping):
        inner = schedule_summary(args["schedule"])
        return {**inner, "schedule": kind, "start": args.get("start")}
    if kind == "ConstantMomentum" and isinstance(args.get("momentum"), (int, float)):
        out["method"] = "ema"
        out["momentum"] = args["momentum"]
        out["decay"] = 1.0 - args["momentum"]
    elif kind in ("Warmup", "NumUpdatesWarmup") and isinstance(args.get("decay"), (int, float)):
        out["method"] = "ema"
        out["decay"] = args["decay"]
    elif kind in ("MomentumAnnealing", "ExpMomentum", "MMCVWarmup") and isinstance(args.get("momentum"), (int, float)):
        out["method"] = "ema"
        out["momentum"] = args["momentum"]
        out["decay"] = 1.0 - args["momentum"]
    elif kind == "PowerFunction" and isinstance(args.get("gamma"), (int, float)):
        out["method"] = "power-function-ema"
        out["gamma"] = args["gamma"]
        out["sigma_rel"] = gamma_to_sigma_rel(float(args["gamma"]))
    elif kind == "EqualAverage":
        out["method"] = "swa"
    return out
