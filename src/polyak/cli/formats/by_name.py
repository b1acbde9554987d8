"""Averages saved as named state dicts beside (or inside) a training checkpoint: torch's
``AveragedModel``, Lightning's ``WeightAveraging``, timm's ``state_dict_ema`` and ema-pytorch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ...checkpoint import merge_into
from ...files import tensors_only
from ...tensors import canonical_name
from .base import Context, Found, int_value, make_record, sibling_live, strip_prefix

__all__ = ["read_torch_averaged", "read_lightning", "read_timm", "read_ema_pytorch", "module_state"]


def module_state(obj: Any, counter: str) -> dict[str, Tensor] | None:
    if not (isinstance(obj, Mapping) and int_value(obj.get(counter)) is not None):
        return None
    inner = strip_prefix(obj, "module.")
    if not inner or any(not (k == counter or k.startswith("module.") or k == "steps") for k in obj):
        return None
    return inner


def read_torch_averaged(obj: Any, ctx: Context) -> Found | None:
    inner = module_state(obj, "n_averaged")
    if inner is None:
        return None
    n = int_value(obj["n_averaged"])
    averaged = {canonical_name(k): v for k, v in inner.items()}
    live, where = sibling_live(obj, ctx, averaged)
    rec = make_record("AveragedModel", "torch-averaged-model", schedule=None, counters={"n_averaged": n}, steps=n)
    notes = ["AveragedModel does not save avg_fn: the schedule is unknown"]
    if live is not None:
        notes.append(f"live weights taken from {where!r} beside it")
    # avg_fn is not saved: an equal average (torch's default) or an EMA, nobody can tell
    return Found("torch-averaged-model", "", merge_into(live, averaged), live, {"average": rec}, "average", notes)


def read_lightning(obj: Any, ctx: Context) -> Found | None:
    if not isinstance(obj, Mapping):
        return None
    if not (isinstance(obj.get("current_model_state"), Mapping) and isinstance(obj.get("averaging_state"), Mapping)):
        return None
    if not isinstance(obj.get("state_dict"), Mapping):
        return None
    n = int_value(obj["averaging_state"].get("n_averaged"))
    callbacks = obj.get("callbacks") if isinstance(obj.get("callbacks"), Mapping) else {}
    names = [str(k) for k in callbacks]
    notes = []
    name = "average"  # a WeightAveraging with its own avg_fn, or callbacks not saved
    if any(k.startswith("EMAWeightAveraging") for k in names):
        name = "ema"
        notes.append("Lightning's EMAWeightAveraging does not save its decay: the schedule is unknown")
    elif any(k.startswith("StochasticWeightAveraging") or k == "WeightAveraging" for k in names):
        name = "swa" if any(k.startswith("StochasticWeightAveraging") for k in names) else name
        notes.append("WeightAveraging does not save its avg_fn: the schedule is unknown")
    rec = make_record(
        "AveragedModel",
        "lightning",
        schedule=None,
        counters={"n_averaged": n} if n is not None else {},
        steps=n,
        update_buffers=True,  # WeightAveraging's default use_buffers=True
        callbacks=names,
    )
    live = tensors_only(obj["current_model_state"])
    return Found("lightning", "", tensors_only(obj["state_dict"]), live, {name: rec}, name, notes)


def read_timm(obj: Any, ctx: Context) -> Found | None:
    if not (isinstance(obj, Mapping) and isinstance(obj.get("state_dict_ema"), Mapping)):
        return None
    ema = {canonical_name(k): v for k, v in tensors_only(obj["state_dict_ema"]).items()}
    live = {canonical_name(k): v for k, v in tensors_only(obj.get("state_dict") or {}).items()} or None
    rec = make_record("AveragedModel", "timm", schedule=None, update_buffers=True)
    notes = ["timm saves neither the decay nor the update count: schedule and steps are unknown"]
    if isinstance(obj.get("epoch"), int):
        rec["epoch"] = obj["epoch"]
    return Found("timm", "", merge_into(live, ema), live, {"ema": rec}, "ema", notes)


def read_ema_pytorch(obj: Any, ctx: Context) -> Found | None:
    if not isinstance(obj, Mapping):
        return None
    prefixes = [k[: -len("initted")] for k in obj if isinstance(k, str) and k.endswith("initted")]
    for p in prefixes:
        if p + "step" not in obj or not any(isinstance(k, str) and k.startswith(p + "ema_model.") for k in obj):
            continue
        averaged = strip_prefix(obj, p + "ema_model.")
        live = strip_prefix(obj, p + "online_model.") or None
        steps = int_value(obj[p + "step"])
        rec = make_record("AveragedModel", "ema-pytorch", schedule=None, counters={"n_averaged": steps}, steps=steps)
        notes = ["ema-pytorch does not save beta or update_every: the schedule is unknown"]
        if live is None:
            live, where = sibling_live(obj, ctx, averaged)
            if live is not None:
                notes.append(f"live weights taken from {where!r} beside it")
        key = p[:-1] if p else ""
        found = Found("ema-pytorch", key, merge_into(live, averaged), live, {"ema": rec}, "ema", notes)
        return found
    return None
