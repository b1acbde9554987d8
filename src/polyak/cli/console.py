"""What the commands print: notes and summaries on stderr, progress bars, sizes, the help text's
layout, and the numbers of a schedule and the description of an average for people."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import textwrap
from collections.abc import Iterable, Mapping
from typing import Any

from ..files import shown
from ..schedules import gamma_to_sigma_rel

__all__ = [
    "say",
    "progress",
    "human_bytes",
    "HelpFormatter",
    "number",
    "schedule_summary",
    "schedule_numbers",
    "describe_average",
]

#: The widest a help text is laid out, whatever the terminal's width.
HELP_WIDTH = 100


def say(args: argparse.Namespace, message: str) -> None:
    """A note or summary on stderr, unless ``--quiet``; shown escaped (:func:`printable`)."""
    if not getattr(args, "quiet", False):
        print(printable(message), file=sys.stderr)


def printable(text: str) -> str:
    """``text`` with every line escaped for a terminal (:func:`polyak.files.shown`): names and
    metadata come from files, and an escape sequence in one would act on the terminal."""
    return "\n".join(shown(line) for line in text.split("\n"))


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The help of every command: laid out to the terminal's width, at most
    :data:`HELP_WIDTH` columns; each line of a description or epilog that does not start with
    a space is wrapped as a paragraph, an indented line (an example command) is kept as it is."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        if width is None:
            width = shutil.get_terminal_size().columns - 2
        super().__init__(prog, indent_increment, max_help_position, max(40, min(width, HELP_WIDTH)))

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = " ".join(text.split())
        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if not line.strip() or line[0].isspace():
                lines.append(indent + line if line.strip() else "")
            else:
                wrapped = textwrap.fill(
                    line,
                    width,
                    initial_indent=indent,
                    subsequent_indent=indent,
                    break_long_words=False,
                    break_on_hyphens=False,
                )
                lines.append(wrapped)
        return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


def number(x: float) -> str:
    """A derived number for people: 6 significant digits, more where 6 would show a value near 1
    (or 0) as exactly 1 (or 0)."""
    x = float(x)
    text = f"{x:.6g}"
    if float(text) != x and float(text) in (0.0, 1.0):
        text = f"{x:.12g}"
    return text


def _one_minus(x: float) -> float:
    """``1 - x`` for ``x`` in [0, 1], without the noise of the subtraction (``1 - 0.99`` is
    0.010000000000000009): ``x`` holds about 16 decimals, so the result is rounded to 15."""
    return round(1.0 - float(x), 15)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def schedule_summary(schedule: Mapping[str, Any] | None) -> dict[str, Any]:
    """The numbers a reader wants from a schedule dict: ``decay`` (constant or maximal),
    ``momentum``, ``half_life``, ``sigma_rel``/``gamma`` (power function), ``method``, and
    ``given``: which of them the schedule holds as given (the others are derived from it, with
    the noise of ``1 - x`` rounded off); empty when unknown."""
    if not isinstance(schedule, Mapping):
        return {}
    kind, args = schedule.get("type"), dict(schedule.get("args") or {})
    out: dict[str, Any] = {"schedule": kind}
    if kind == "StartAt" and isinstance(args.get("schedule"), Mapping):
        inner = schedule_summary(args["schedule"])
        return {**inner, "schedule": kind, "start": args.get("start")}
    if kind == "ConstantMomentum":
        out["method"] = "ema"
        if _is_number(args.get("decay")):
            out.update(decay=args["decay"], momentum=_one_minus(args["decay"]), given="decay")
        elif _is_number(args.get("momentum")):
            out.update(momentum=args["momentum"], decay=_one_minus(args["momentum"]), given="momentum")
        elif _is_number(args.get("half_life")):
            from ..schedules import schedule_from_dict

            try:
                momentum = schedule_from_dict(schedule).momentum(0)
            except (ValueError, TypeError):
                momentum = None
            out.update(half_life=args["half_life"], given="half_life")
            if momentum is not None:
                out.update(decay=_one_minus(momentum), momentum=round(momentum, 15))
    elif kind in ("Warmup", "NumUpdatesWarmup") and _is_number(args.get("decay")):
        out.update(method="ema", decay=args["decay"], momentum=_one_minus(args["decay"]), given="decay")
    elif kind in ("MomentumAnnealing", "ExpMomentum", "MMCVWarmup") and _is_number(args.get("momentum")):
        out.update(method="ema", momentum=args["momentum"], decay=_one_minus(args["momentum"]), given="momentum")
    elif kind in ("CosineMomentum", "RampUpMomentum"):
        out["method"] = "ema"
    elif kind == "PowerFunction" and _is_number(args.get("gamma")):
        out.update(method="power-function-ema", gamma=args["gamma"], given="gamma")
        out["sigma_rel"] = gamma_to_sigma_rel(float(args["gamma"]))
    elif kind == "EqualAverage":
        out["method"] = "swa"
    return out


def schedule_numbers(summary: Mapping[str, Any], keys: Iterable[str] = ("decay", "sigma_rel")) -> str:
    """``decay 0.99, sigma_rel 0.07``: the summary's numbers among ``keys``, the given one as
    given, derived ones to 6 significant digits (:func:`number`)."""
    shown = []
    for k in keys:
        v = summary.get(k)
        if _is_number(v):
            shown.append(f"{k} {v!r}" if summary.get("given") == k else f"{k} {number(v)}")
    return ", ".join(shown)


def describe_average(record: Mapping[str, Any], name: str = "") -> str:
    """What an average is, in one line, from its record: ``an EMA, decay 0.999``, ``an SWA
    (equal average of 12 snapshots)``, ``the uniform average of 3 checkpoints``, ``a post-hoc
    EMA synthesis, sigma_rel 0.07``, ``an average whose schedule the file does not say``.
    ``name`` (the reader's name for it: ``ema``, ``swa``) says what an average with an
    unknown schedule is known to be."""
    method = record.get("method")
    steps = record.get("steps")
    s = schedule_summary(record.get("schedule"))
    if method in ("uniform", "weighted"):
        n = record.get("inputs")
        of = f"{n} checkpoint{'' if n == 1 else 's'}" if isinstance(n, int) else "checkpoints"
        return f"the uniform average of {of}" if method == "uniform" else f"a weighted average of {of}"
    if method in ("posthoc-ema", "posthoc-snapshot"):
        what = "a post-hoc EMA synthesis" if method == "posthoc-ema" else "a post-hoc EMA snapshot"
        numbers = schedule_numbers(s, ("sigma_rel",))
        return what + (f", {numbers}" if numbers else "") + (f", at step {steps}" if steps is not None else "")
    kind = s.get("method") or {"ema": "ema", "swa": "swa"}.get(name)
    if kind == "ema":
        if not s:
            return "an EMA whose decay the file does not say"
        numbers = schedule_numbers(s, ("decay", "half_life") if s.get("given") == "half_life" else ("decay",))
        inner = record.get("schedule") or {}
        if s["schedule"] == "StartAt":
            inner = (inner.get("args") or {}).get("schedule") or {}
        text = "an EMA" + (f", {numbers}" if numbers else "")
        if inner.get("type") not in ("ConstantMomentum", None):
            text += f" ({inner['type']} schedule)"
        if s["schedule"] == "StartAt" and s.get("start") is not None:
            text += f", from step {s['start']}"
        return text
    if kind == "power-function-ema":
        return f"a power-function EMA, {schedule_numbers(s, ('sigma_rel',))}"
    if kind == "swa":
        if steps is None:
            return "an SWA (equal average of the snapshots)"
        return f"an SWA (equal average of {steps} snapshot{'' if steps == 1 else 's'})"
    if s:
        return f"an average with schedule {json.dumps(record.get('schedule'))}"
    return "an average whose schedule the file does not say"


def health_summary(health: Any) -> dict[str, Any] | None:
    """A stored health report (``record["health"]``) checked field by field: numbers that are
    finite (or null), counts that are non-negative ints, at most 8 problems of at most 300
    characters each; None when the record has none or it is not a mapping."""
    if not isinstance(health, Mapping):
        return None
    out: dict[str, Any] = {}
    for key in ("distance", "moved", "horizon"):
        v = health.get(key)
        out[key] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    for key in ("steps", "averaged", "copied", "skipped"):
        v = health.get(key)
        out[key] = v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None
    problems = health.get("problems")
    items = problems if isinstance(problems, list) else []
    out["problems"] = [p[:300] for p in items[:8] if isinstance(p, str)]
    return out


def health_line(health: Mapping[str, Any]) -> str:
    """One line for people from :func:`health_summary`'s dict."""
    at = f" at step {health['steps']}" if health["steps"] is not None else ""
    nums = [f"{k} {number(health[k])}" for k in ("distance", "moved", "horizon") if health[k] is not None]
    counts = [f"{health[k]} {k}" for k in ("averaged", "copied", "skipped") if health[k] is not None]
    text = f"health{at}: " + ", ".join(nums or ["no numbers"])
    if counts:
        text += "; tensors " + ", ".join(counts)
    return text + ("; no problems" if not health["problems"] else f"; {len(health['problems'])} problem(s)")
