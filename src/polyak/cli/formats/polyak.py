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


def read_export(obj: Any, ctx: Context) -> Found | None:
    meta = ctx.metadata if ctx.metadata is not None else None
    weights = obj
    if meta is None and isinstance(obj, Mapping) and set(obj) == {"state_dict", "metadata"}:
        meta, weights = obj["metadata"], obj["state_dict"]
    if not isinstance(meta, Mapping) or not str(meta.get("format", "")).startswith("polyak-"):
        return None
    if not is_state_dict(weights):
        return None
    meta = {str(k): str(v) for k, v in meta.items()}
    rec: dict[str, Any] = {"class": meta.get("class") or meta.get("method") or "unknown"}
    if meta.get("schedule"):
        with contextlib.suppress(ValueError):
            rec["schedule"] = json.loads(meta["schedule"])
    elif meta.get("gamma"):  # a post-hoc synthesis: the power function it stands for
        with contextlib.suppress(ValueError):
            rec["schedule"] = {"type": "PowerFunction", "args": {"gamma": float(meta["gamma"])}}
    if meta.get("step", "").isdigit():
        rec["steps"] = int(meta["step"])
    rec["source"] = {"format": "polyak-export", "metadata": meta}
    return Found("polyak-export", "", dict(weights), None, {"ema": rec}, "ema", metadata=meta)
