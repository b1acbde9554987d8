"""polyak's own files: the checkpoint format (a ``"polyak"`` block) and exported weights."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

from ... import checkpoint as ckpt
from ...files import is_state_dict, load, tensors_only
from ...files.errors import FormatError
from .base import Context, Found, strip_prefix

__all__ = ["read_checkpoint", "read_export"]


def read_checkpoint(obj: Any, ctx: Context) -> Found | None:
    if not (isinstance(obj, Mapping) and ckpt.has_averages(obj)):
        return None
    meta = obj[ckpt.KEY]
    records = {name: dict(rec) for name, rec in dict(meta.get("averages") or {}).items()}
    if not records:
        raise FormatError("the polyak block records no average")
    primary = meta.get("primary") or next(iter(records))
    weights_key, live_key, prefix = meta.get("weights_key"), meta.get("live_key"), meta.get("live_prefix", "")
    notes = []
    view = dict(obj)
    if weights_key not in view and ctx.path is not None:
        # the Hugging Face Trainer's polyak_averages.pt leaves the primary to model.safetensors
        sibling = ctx.path.parent / str(weights_key)
        if sibling.is_file():
            view[weights_key] = load(sibling).obj
            notes.append(f"the primary average's weights were read from {sibling.name} beside the file")
    try:
        weights = ckpt.deployable_weights(view, primary)
    except KeyError as e:
        raise FormatError(f"polyak checkpoint: {e.args[0] if e.args else e}") from e
    except ValueError as e:  # a newer format_version
        raise FormatError(f"polyak checkpoint: {e}") from e
    live = strip_prefix(view[live_key], prefix) if isinstance(view.get(live_key), Mapping) else None
    for name, rec in records.items():
        if name != primary and isinstance(rec.get("weights"), Mapping):
            rec["weights"] = dict(rec["weights"])
    return Found("polyak", "", tensors_only(weights), live, records, primary, notes)


#: The files polyak writes with string metadata, by their ``format``: what each holds.
EXPORTS = {
    "polyak-export": "an average exported by polyak export",
    "polyak-average": "an average of checkpoints written by polyak average",
    "polyak-posthoc-synthesis": "a post-hoc EMA synthesized by polyak posthoc",
    "polyak-posthoc": "a PostHocEMA snapshot",
}


def _kind(method: str) -> str:
    """The name of an exported average by its ``method``: ``ema``, ``swa``, else ``average``."""
    if method in ("ema", "power-function-ema", "posthoc-ema"):
        return "ema"
    return "swa" if method == "swa" else "average"


def read_export(obj: Any, ctx: Context) -> Found | None:
    """Weights polyak wrote with its metadata (:data:`EXPORTS`); the :class:`Found`'s format
    is the file's own (``polyak-average`` for ``polyak average``'s output), and its record
    says what the file holds: the method and the number of inputs of an average of
    checkpoints, the power function of a post-hoc synthesis or snapshot, or the exported
    average's class and schedule under the name it had."""
    meta = ctx.metadata if ctx.metadata is not None else None
    weights = obj
    if meta is None and isinstance(obj, Mapping) and set(obj) == {"state_dict", "metadata"}:
        meta, weights = obj["metadata"], obj["state_dict"]
    if isinstance(meta, Mapping) and meta.get("format") == "pt" and "polyak_format" in meta:
        # a Hugging Face folder's shard: "format" is transformers' ("pt"), polyak's is beside it
        meta = {**meta, "format": meta["polyak_format"]}
    if not isinstance(meta, Mapping) or not str(meta.get("format", "")).startswith("polyak-"):
        return None
    if not is_state_dict(weights):
        return None
    meta = {str(k): str(v) for k, v in meta.items()}
    fmt = meta["format"] if meta["format"] in EXPORTS else "polyak-export"
    rec: dict[str, Any] = {"class": None, "schedule": None}
    if fmt == "polyak-average":
        rec["method"] = meta.get("method") or "uniform"
        inputs = _json(meta.get("inputs"))
        if isinstance(inputs, list):
            rec["inputs"] = len(inputs)
        name = "average"
    elif fmt in ("polyak-posthoc-synthesis", "polyak-posthoc"):
        rec["method"] = "posthoc-ema" if fmt == "polyak-posthoc-synthesis" else "posthoc-snapshot"
        name = "ema"
    else:
        if meta.get("class") not in (None, "", "None"):
            rec["class"] = meta["class"]
        if meta.get("method") in ("uniform", "weighted", "posthoc-ema", "posthoc-snapshot"):
            rec["method"] = meta["method"]  # an export of an average of checkpoints, or of a synthesis
        name = meta.get("average") or _kind(meta.get("method", ""))
    if meta.get("schedule"):
        schedule = _json(meta["schedule"])
        if isinstance(schedule, dict) and isinstance(schedule.get("type"), str):
            rec["schedule"] = schedule
    elif meta.get("gamma"):  # a post-hoc synthesis or snapshot: the power function it stands for
        with contextlib.suppress(ValueError):
            rec["schedule"] = {"type": "PowerFunction", "args": {"gamma": float(meta["gamma"])}}
    if meta.get("step", "").isdigit():
        rec["steps"] = int(meta["step"])
    rec["source"] = {"format": fmt, "metadata": meta}
    return Found(fmt, "", dict(weights), None, {name: rec}, name, metadata=meta)


def _json(text: str | None) -> Any:
    """A JSON value from a metadata string, or None when there is none or it does not parse
    (deep nesting included)."""
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
