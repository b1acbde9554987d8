"""polyak's checkpoint format (docs/checkpoint-format.md), implemented once for every hook,
integration and the command line.

A training checkpoint holds the primary average's weights under the framework's usual weights
key (deployable as is), the live weights under their own key, and a ``"polyak"`` block that
names and numbers everything needed to continue exactly. :func:`pack` writes it into a
framework's checkpoint dict; :func:`unpack` reads it back. Both work on anything that has the
public face of an averaged model (:class:`Averaged`), so this module sits below the averaged
models and imports none of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from .schedules import Schedule
from .tensors import canonical_name

__all__ = [
    "FORMAT_VERSION",
    "KEY",
    "Averaged",
    "record",
    "pack",
    "pack_state",
    "unpack",
    "has_averages",
    "deployable_weights",
    "merge_into",
]

#: The version of polyak's file formats written by this release: the checkpoint block, post-hoc
#: snapshots and exported weights (``"1"`` in safetensors metadata, which holds strings).
FORMAT_VERSION = 1
#: The checkpoint key of the block that describes the averages.
KEY = "polyak"


class Averaged(Protocol):
    """What the checkpoint format needs of an average: the public face of
    :class:`polyak.BaseAveragedModel`."""

    counter_keys: tuple[str, ...]
    interval: int
    compensate_interval: bool
    update_buffers: bool

    @property
    def steps(self) -> int: ...

    @property
    def custom_rule(self) -> bool: ...

    @property
    def schedule(self) -> Schedule: ...

    @property
    def last_health(self) -> dict[str, Any] | None: ...

    def counters(self) -> dict[str, int]: ...

    def averaged_state_dict(self) -> dict[str, Tensor]: ...

    def state_dict(self) -> Mapping[str, Any]: ...

    def prepare_load(self, state_dict: Mapping[str, Any], strict: bool = True) -> tuple[Callable[[], None], Any]: ...


def _dtype_name(weights: Mapping[str, Tensor]) -> str | None:
    dtypes = {t.dtype for t in weights.values() if t.is_floating_point()}
    return str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None


def _schedule_dict(average: Averaged) -> dict[str, Any] | None:
    if average.custom_rule:
        return None
    try:
        return average.schedule.to_dict()
    except ValueError:  # not yet defined (CosineEMA before max_steps is known)
        return None


def record(average: Averaged, *, weights: bool = True) -> dict[str, Any]:
    """The averaging state of one average (one entry of ``checkpoint["polyak"]["averages"]``)."""
    own = average.averaged_state_dict()
    return {
        "class": type(average).__name__,
        "schedule": _schedule_dict(average),
        "counters": average.counters(),
        "steps": average.steps,
        "interval": average.interval,
        "compensate_interval": average.compensate_interval,
        "update_buffers": average.update_buffers,
        "dtype": _dtype_name(own),
        "health": average.last_health,
        "weights": own if weights else None,
    }


def merge_into(live: Mapping[str, Any] | None, averaged: Mapping[str, Tensor]) -> dict[str, Any]:
    """``live`` with every averaged tensor put in place of the live one (matched by canonical
    name, so the live keys keep whatever prefix the framework saved them with): a complete
    state dict that deploys the average. Without live weights, the averaged tensors alone."""
    if not live:
        return dict(averaged)
    by_name = {canonical_name(k): k for k in live}
    out = dict(live)
    for name, t in averaged.items():
        out[by_name.get(canonical_name(name), name)] = t
    return out


def pack(
    checkpoint: dict[str, Any],
    averages: Mapping[str, Averaged],
    *,
    weights_key: str = "state_dict",
    live_key: str = "live_state_dict",
    live_prefix: str = "",
    primary: str | None = None,
    live: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the averages into a framework's ``checkpoint`` dict, in place, and return it.

    The live weights (``live``, or what the framework put under ``weights_key``) move to
    ``live_key`` (their keys prefixed with ``live_prefix``); ``weights_key`` then holds the
    live state with the ``primary`` average's tensors in place of the live ones, a complete
    state dict that deploys the average; every other average keeps its weights in its record.

    Args:
        checkpoint: the framework's checkpoint dict.
        averages: the averages, by name (the first is the primary unless ``primary`` says).
        weights_key: the framework's weights key (``"state_dict"`` for Lightning, mmengine).
        live_key: where the live weights go.
        live_prefix: a prefix for the live keys (mmengine's ``ema_state_dict`` uses
            ``"module."``).
        primary: the average deployed under ``weights_key``.
        live: the live state dict; default ``checkpoint[weights_key]``.
    """
    primary = _primary(averages, primary, "pack() needs at least one average", "averages")
    if live is None:
        if weights_key not in checkpoint:
            raise KeyError(f"the checkpoint has no {weights_key!r} to take the live weights from")
        live = checkpoint[weights_key]
    records = {name: record(avg, weights=name != primary) for name, avg in averages.items()}
    weights = merge_into(live, averages[primary].averaged_state_dict())
    return _write(checkpoint, weights, records, live, primary, weights_key, live_key, live_prefix)


def _primary(names: Mapping[str, Any], primary: str | None, empty: str, what: str) -> str:
    """The primary's name: ``primary``, or the first of ``names``; checked."""
    if not names:
        raise ValueError(empty)
    primary = next(iter(names)) if primary is None else primary
    if primary not in names:
        raise ValueError(f"primary {primary!r} is not one of the {what} {list(names)}")
    return primary


def _write(
    checkpoint: dict[str, Any],
    weights: Mapping[str, Any],
    records: dict[str, dict[str, Any]],
    live: Mapping[str, Any] | None,
    primary: str,
    weights_key: str,
    live_key: str,
    live_prefix: str,
) -> dict[str, Any]:
    """The layout itself: the primary's deployable weights, the live weights, the block."""
    checkpoint[weights_key] = dict(weights)
    if live is not None:
        checkpoint[live_key] = {live_prefix + k: v for k, v in live.items()}
    checkpoint[KEY] = {
        "format_version": FORMAT_VERSION,
        "weights_key": weights_key,
        "live_key": live_key,
        "live_prefix": live_prefix,
        "primary": primary,
        "averages": records,
    }
    return checkpoint


#: The record fields :func:`pack_state` fills in when a saved state does not say.
RECORD_DEFAULTS: dict[str, Any] = {
    "schedule": None,
    "counters": {},
    "interval": 1,
    "compensate_interval": True,
    "update_buffers": False,
}


def pack_state(
    checkpoint: dict[str, Any],
    weights: Mapping[str, Tensor],
    records: Mapping[str, Mapping[str, Any]],
    *,
    live: Mapping[str, Any] | None = None,
    primary: str | None = None,
    weights_key: str = "state_dict",
    live_key: str = "live_state_dict",
    live_prefix: str = "",
) -> dict[str, Any]:
    """:func:`pack` for averages known only from saved tensors and numbers (no averaged model
    at hand: ``polyak convert`` reading another library's checkpoint). Writes the same layout,
    in place, and returns ``checkpoint``.

    Args:
        checkpoint: the dict to write into.
        weights: the primary average as a complete state dict that deploys it (plain names).
        records: one record per average, by name (the first is the primary unless
            ``primary`` says), with :func:`record`'s fields; ``class`` is required, missing
            fields get :data:`RECORD_DEFAULTS`, ``dtype`` is computed, ``steps`` is left out
            when unknown, and the primary's ``weights`` is None. Extra fields are kept.
        live: the live weights, when known; otherwise ``live_key`` is left out of the
            checkpoint (:func:`unpack` then cannot resume from it).
        primary, weights_key, live_key, live_prefix: as :func:`pack`.
    """
    primary = _primary(records, primary, "pack_state() needs at least one record", "records")
    out_records: dict[str, dict[str, Any]] = {}
    for name, rec in records.items():
        if not rec.get("class"):
            raise ValueError(f"record {name!r} names no class")
        full = {**RECORD_DEFAULTS, **rec}
        full["counters"] = {k: int(v) for k, v in dict(full["counters"] or {}).items()}
        if full.get("steps") is None:
            full.pop("steps", None)
        own = weights if name == primary else full.get("weights")
        full["dtype"] = _dtype_name(own) if own else None
        full["weights"] = None if name == primary else full.get("weights")
        out_records[name] = full
    return _write(checkpoint, weights, out_records, live, primary, weights_key, live_key, live_prefix)


def deployable_weights(checkpoint: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    """The state dict that deploys average ``name`` (default: the primary) of a checkpoint in
    polyak's format: the primary's is the checkpoint's ``weights_key``; another's is the live
    state with the record's averaged tensors in place of the live ones (as :func:`pack` builds
    the primary's). Raises :class:`KeyError` naming what is missing."""
    meta = _meta(checkpoint)
    records = meta.get("averages", {})
    name = meta.get("primary") if name is None else name
    if name not in records:
        raise KeyError(f"the checkpoint has no average {name!r}; it has {sorted(records)}")
    if name == meta.get("primary"):
        if meta["weights_key"] not in checkpoint:
            raise KeyError(f"the checkpoint's primary average is under {meta['weights_key']!r}, which is absent")
        return dict(checkpoint[meta["weights_key"]])
    weights = records[name].get("weights")
    if weights is None:
        raise KeyError(f"average {name!r} has no weights in the checkpoint")
    prefix = meta.get("live_prefix", "")
    live = checkpoint.get(meta["live_key"])
    if not isinstance(live, Mapping):
        return dict(weights)
    live = {k[len(prefix) :]: v for k, v in live.items() if k.startswith(prefix)}
    return merge_into(live, weights)


def has_averages(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` holds a polyak block."""
    return isinstance(checkpoint.get(KEY), Mapping)


def _meta(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = checkpoint.get(KEY)
    if not isinstance(meta, Mapping):
        raise KeyError(f"the checkpoint has no {KEY!r} block: it was not written with averages")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"the checkpoint's polyak format_version is {version!r}; this polyak reads up to {FORMAT_VERSION}"
        )
    return meta


def _state_for(average: Averaged, rec: Mapping[str, Any], weights: Mapping[str, Any]) -> dict[str, Any]:
    own = {k[len("module.") :] for k in average.state_dict() if k.startswith("module.")}
    by_name = {canonical_name(k): k for k in weights}
    sd: dict[str, Any] = {}
    for name in own:
        key = by_name.get(canonical_name(name))
        if key is not None:
            sd["module." + name] = weights[key]
    for k, v in dict(rec.get("counters") or {}).items():
        if v is not None:
            sd[k] = torch.tensor(int(v), dtype=torch.long)
    if "steps" not in sd and rec.get("steps") is not None:
        sd["steps"] = torch.tensor(int(rec["steps"]), dtype=torch.long)
    return sd


def unpack(
    checkpoint: Mapping[str, Any],
    averages: Mapping[str, Averaged],
    *,
    strict: bool = True,
) -> tuple[dict[str, Any] | None, list[str]]:
    """Restore the named ``averages`` from ``checkpoint`` and return ``(live, missing)``.

    ``live`` is the live (training) state dict to load into the model (``None`` when the
    checkpoint holds no live weights, as after converting an average saved alone); ``missing`` names the
    averages the checkpoint has no record of (a hook initialises those from the model).
    Every record is checked before any average changes, so a failure changes nothing.
    Raises :class:`KeyError` if the checkpoint has no polyak block.
    """
    meta = _meta(checkpoint)
    weights_key, live_key = meta["weights_key"], meta["live_key"]
    prefix = meta.get("live_prefix", "")
    records = meta.get("averages", {})
    applies: list[Callable[[], None]] = []
    missing = []
    for name, average in averages.items():
        rec = records.get(name)
        if rec is None:
            missing.append(name)
            continue
        if rec.get("class") != type(average).__name__:
            raise ValueError(
                f"average {name!r} was saved by {rec.get('class')!r} but is restored into {type(average).__name__!r}"
            )
        saved = rec.get("schedule")
        if saved is not None and _schedule_dict(average) is not None:
            if saved != _schedule_dict(average):
                warnings.warn(
                    f"average {name!r}: the checkpoint was trained with {saved} and resumes with "
                    f"{average.schedule!r} (the current arguments win)",
                    stacklevel=2,
                )
        weights = checkpoint[weights_key] if name == meta.get("primary") else rec.get("weights")
        if weights is None:
            raise KeyError(f"average {name!r} has no weights in the checkpoint")
        apply, _ = average.prepare_load(_state_for(average, rec, weights), strict=strict)
        applies.append(apply)
    for apply in applies:
        apply()
    if live_key not in checkpoint:  # e.g. converted from a library that saves only the average
        return None, missing
    live = {k[len(prefix) :]: v for k, v in checkpoint[live_key].items() if k.startswith(prefix)}
    return live, missing
