"""OpenMMLab's files: mmengine ``EMAHook`` checkpoints, mmcv 1.x ``EMAHook`` checkpoints, and
``BaseAveragedModel`` state dicts; the hook's settings are read from the config text the
checkpoint carries (parsed, never run)."""

from __future__ import annotations

import ast
import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from ...checkpoint import merge_into
from ...files import tensors_only
from ...files.errors import FormatError
from ...tensors import canonical_name
from .base import Context, Found, int_value, make_record, schedule_dict, sibling_live, strip_prefix
from .by_name import module_state

__all__ = ["read_mmengine", "read_mmcv", "read_averaged_model"]


def _config_text(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("meta")
    if isinstance(meta, Mapping):
        for k in ("cfg", "config"):
            if isinstance(meta.get(k), str) and meta[k].strip():
                return meta[k]
    return None


def _hook_config(text: str | None, types_: Sequence[str]) -> dict[str, Any] | None:
    """The literal arguments of the first ``dict(type=<one of types_>, ...)`` in an OpenMMLab
    config's text. The text is parsed (``ast``), never run; non-literal arguments are left out."""
    if not text:
        return None
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    for node in ast.walk(tree):
        pairs: list[tuple[str, ast.expr]] = []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
            pairs = [(kw.arg, kw.value) for kw in node.keywords if kw.arg]
        elif isinstance(node, ast.Dict):
            pairs = [
                (k.value, v)
                for k, v in zip(node.keys, node.values, strict=True)
                if isinstance(k, ast.Constant) and isinstance(k.value, str)
            ]
        args: dict[str, Any] = {}
        for name, value in pairs:
            with contextlib.suppress(ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                args[name] = ast.literal_eval(value)
        if args.get("type") in types_:
            return args
    return None


def _openmmlab_record(cfg: Mapping[str, Any] | None, steps: int | None, fmt: str) -> dict[str, Any]:
    """polyak's record for an mmengine ``EMAHook`` configured with ``cfg`` (its literal
    arguments; mmengine's defaults where absent)."""
    from ... import schedules as s

    cfg = dict(cfg or {})
    ema_type = cfg.get("ema_type", "ExponentialMovingAverage")
    momentum = cfg.get("momentum", 0.0002)
    builders: dict[str, Callable[[], Any]] = {
        "ExponentialMovingAverage": lambda: s.ConstantMomentum(momentum),
        "MomentumAnnealingEMA": lambda: s.MomentumAnnealing(momentum, cfg.get("gamma", 100)),
        "StochasticWeightAverage": lambda: s.EqualAverage(),
        "ExpMomentumEMA": lambda: s.ExpMomentum(momentum, cfg.get("gamma", 2000)),
    }
    name = ema_type.removeprefix("Polyak") if isinstance(ema_type, str) else "ExponentialMovingAverage"
    schedule = schedule_dict(builders[name]) if name in builders and cfg else None
    interval = cfg.get("interval", 1) if isinstance(cfg.get("interval", 1), int) else 1
    return make_record(
        name,
        fmt,
        schedule=schedule,
        counters={"steps": steps} if steps is not None else {},
        steps=steps,
        interval=interval,
        compensate_interval=False,  # mmengine's numbers
        update_buffers=bool(cfg.get("update_buffers", False)),
    )


def _kind_of(cls: str) -> str:
    """The name of an ``EMAHook``'s average by its ``ema_type``: ``ema``, ``swa``, else ``average``."""
    if cls == "ExponentialMovingAverage" or cls.endswith("EMA"):
        return "ema"
    return "swa" if cls == "StochasticWeightAverage" else "average"


def read_mmengine(obj: Any, ctx: Context) -> Found | None:
    if not (isinstance(obj, Mapping) and isinstance(obj.get("ema_state_dict"), Mapping)):
        return None
    if not isinstance(obj.get("state_dict"), Mapping):
        return None
    ema = obj["ema_state_dict"]
    if not any(isinstance(k, str) and k.startswith("module.") for k in ema):
        return None
    state = tensors_only(obj["state_dict"])
    live_part = strip_prefix(ema, "module.")
    missing = [k for k in live_part if k not in state]
    if missing:
        raise FormatError(f"mmengine checkpoint: ema_state_dict names tensors absent from state_dict: {missing[:5]}")
    # EMAHook swaps on save: state_dict holds the average, ema_state_dict the live weights.
    live = {**state, **live_part}
    steps = int_value(ema.get("steps"))
    cfg = _hook_config(_config_text(obj), ("EMAHook", "PolyakEMAHook"))
    rec = _openmmlab_record(cfg, steps, "mmengine")
    notes = [] if cfg else ["no EMAHook settings in meta.cfg: the schedule is unknown"]
    name = _kind_of(rec["class"])
    return Found("mmengine", "", state, live, {name: rec}, name, notes)


def read_mmcv(obj: Any, ctx: Context) -> Found | None:
    if not (isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)):
        return None
    sd = tensors_only(obj["state_dict"])
    ema_keys = {k for k in sd if k.startswith("ema_")}
    if not ema_keys:
        return None
    # mmcv registers ema_<name with "." as "_"> on the model for every parameter.
    by_ema: dict[str, list[str]] = {}
    for k in sd:
        if k in ema_keys:
            continue
        by_ema.setdefault("ema_" + k.replace(".", "_"), []).append(k)
    averaged: dict[str, Tensor] = {}
    for e in sorted(ema_keys):
        owners = by_ema.get(e, [])
        if len(owners) > 1:
            raise FormatError(f"mmcv checkpoint: {e!r} could belong to any of {owners}")
        if not owners:
            continue
        if sd[e].shape != sd[owners[0]].shape:
            shapes = f"{tuple(sd[e].shape)} but {owners[0]!r} has {tuple(sd[owners[0]].shape)}"
            raise FormatError(f"mmcv checkpoint: {e!r} has shape {shapes}")
        averaged[owners[0]] = sd[e]
    if not averaged:
        return None  # ema_* names that are the model's own, not mmcv's buffers
    buffers = {e for e in ema_keys if e in by_ema}
    live = {k: v for k, v in sd.items() if k not in buffers}
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    steps = int_value(meta.get("iter"))
    cfg = _hook_config(_config_text(obj), ("EMAHook",))
    from ... import schedules as s

    schedule = None
    if cfg is not None:
        schedule = schedule_dict(lambda: s.MMCVWarmup(cfg.get("momentum", 0.0002), cfg.get("warm_up", 100)))
    rec = make_record(
        "AveragedModel",
        "mmcv",
        schedule=schedule,
        counters={"n_averaged": steps} if steps is not None else {},
        steps=steps,
        interval=cfg.get("interval", 1) if cfg and isinstance(cfg.get("interval", 1), int) else 1,
    )
    notes = [] if cfg else ["no EMAHook settings in meta.config: the schedule is unknown"]
    return Found("mmcv", "", merge_into(live, averaged), live, {"ema": rec}, "ema", notes)


def read_averaged_model(obj: Any, ctx: Context) -> Found | None:
    inner = module_state(obj, "steps")
    if inner is None or "n_averaged" in obj:
        return None
    steps = int_value(obj["steps"])
    averaged = {canonical_name(k): v for k, v in inner.items()}
    live, where = sibling_live(obj, ctx, averaged)
    rec = make_record(
        "ExponentialMovingAverage",
        "averaged-model",
        schedule=None,
        counters={"steps": steps},
        steps=steps,
        compensate_interval=False,
    )
    notes = ["a BaseAveragedModel state dict does not name its class: ExponentialMovingAverage assumed (--class)"]
    if live is not None:
        notes.append(f"live weights taken from {where!r} beside it")
    return Found("averaged-model", "", merge_into(live, averaged), live, {"average": rec}, "average", notes)
