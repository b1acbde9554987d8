"""Averages saved as a list of tensors in ``model.parameters()`` order: torch_ema's
``ExponentialMovingAverage`` and diffusers' ``EMAModel``, named by a plain checkpoint of the
same model (``--names-from``) or by a state dict beside them."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ...checkpoint import merge_into
from ...files import tensors_only
from ...files.errors import FormatError
from ...tensors import canonical_name, is_averaged
from .base import Context, Found, int_value, make_record, schedule_dict

__all__ = ["match_by_position", "read_torch_ema", "read_diffusers"]

_BUFFER_LEAVES = ("running_mean", "running_var", "num_batches_tracked")


def match_by_position(
    shadows: Sequence[Tensor], named: Mapping[str, Tensor], *, buffer_names: Sequence[str] = (), what: str = "shadow"
) -> dict[str, Tensor]:
    """Name ``shadows`` (an average saved as a list, in ``model.parameters()`` order) by the
    parameters of the plain state dict ``named``: its floating tensors in order, less buffers
    (BatchNorm statistics, and names matching a ``buffer_names`` glob) and later names for a
    tensor already seen (tied weights, which ``parameters()`` yields once). Shapes must agree;
    the error names the first mismatch."""
    params: list[str] = []
    tied: dict[str, str] = {}
    first_of: dict[tuple[Any, ...], str] = {}
    for k, t in named.items():
        if not is_averaged(t):
            continue
        if k.rsplit(".", 1)[-1] in _BUFFER_LEAVES or any(fnmatch.fnmatchcase(k, g) for g in buffer_names):
            continue
        try:
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        except RuntimeError:
            ident = (id(t),)
        if ident[0] and ident in first_of:
            tied[k] = first_of[ident]
            continue
        first_of[ident] = k
        params.append(k)
    for i, (name, s) in enumerate(zip(params, shadows, strict=False)):
        if not isinstance(s, Tensor):
            raise FormatError(f"{what}[{i}] is a {type(s).__name__}, not a tensor")
        if tuple(s.shape) != tuple(named[name].shape):
            raise FormatError(
                f"{what}[{i}] has shape {tuple(s.shape)} but parameter {i} of the names, {name!r}, has "
                f"{tuple(named[name].shape)}: the names come from another model, or it has buffers that are "
                "not parameters (name them with --buffer-names)"
            )
    if len(shadows) != len(params):
        extra = params[len(shadows) :] if len(params) > len(shadows) else []
        raise FormatError(
            f"{what} holds {len(shadows)} tensors but the names have {len(params)} parameters"
            + (f" (unmatched: {extra[:4]}; if they are buffers, name them with --buffer-names)" if extra else "")
        )
    out = dict(zip(params, shadows, strict=True))
    for k, first in tied.items():
        out[k] = out[first]
    return out


def _positional(obj: Any, ctx: Context, fmt: str, schedule: dict[str, Any] | None, steps: int | None) -> Found:
    """The average of a positional format as an ``AveragedModel`` record, its tensors named by
    ``--names-from`` or by a state dict beside them (else ``Found.needs`` says so)."""
    counters = {"n_averaged": steps} if steps is not None else {}
    rec = make_record("AveragedModel", fmt, schedule=schedule, counters=counters, steps=steps)
    shadows = list(obj["shadow_params"])
    names: Mapping[str, Tensor] | None = ctx.names
    notes: list[str] = []
    where = ctx.names_from
    if names is None:
        top = ctx.top
        if isinstance(top, Mapping) and top is not obj:
            for k, v in top.items():
                candidate = tensors_only(v) if v is not obj and isinstance(v, Mapping) else {}
                if candidate:
                    with contextlib.suppress(FormatError):
                        match_by_position(shadows, candidate, buffer_names=ctx.buffer_names)
                        names, where = candidate, repr(k)
                        notes.append(f"parameter names taken from {k!r} beside it")
                        break
    if names is None:
        return Found(
            fmt,
            "",
            None,
            None,
            {"ema": rec},
            "ema",
            notes,
            needs=f"{fmt} saves its {len(shadows)} tensors by position: give --names-from MODEL_CKPT "
            "(a plain state dict of the same model) to name them",
        )
    named = {canonical_name(k): v for k, v in names.items()}
    averaged = match_by_position(shadows, named, buffer_names=ctx.buffer_names, what=f"{fmt} shadow_params")
    notes.append(f"buffers (not averaged by {fmt}) and the live weights are those of {where}")
    return Found(fmt, "", merge_into(named, averaged), dict(named), {"ema": rec}, "ema", notes)


def read_torch_ema(obj: Any, ctx: Context) -> Found | None:
    if not (isinstance(obj, Mapping) and isinstance(obj.get("shadow_params"), list)):
        return None
    if "num_updates" not in obj or "optimization_step" in obj:
        return None
    from ... import schedules as s

    decay, n = obj.get("decay"), obj.get("num_updates")
    if not isinstance(decay, (int, float)):
        decay = None
    if isinstance(n, int):  # use_num_updates=True: TensorFlow's warm-up
        schedule = schedule_dict(lambda: s.NumUpdatesWarmup(decay)) if decay is not None else None
        steps: int | None = n + 1  # polyak counts the initial copy as an update
    else:
        schedule = schedule_dict(lambda: s.ConstantMomentum(decay=decay)) if decay is not None else None
        steps = None
    return _positional(obj, ctx, "torch-ema", schedule, steps)


def read_diffusers(obj: Any, ctx: Context) -> Found | None:
    if not (isinstance(obj, Mapping) and isinstance(obj.get("shadow_params"), list)):
        return None
    if "optimization_step" not in obj:
        return None
    from ... import schedules as s

    n = obj.get("optimization_step")
    n = n if isinstance(n, int) else int_value(n)
    decay = obj.get("decay", 0.9999)
    after = int(obj.get("update_after_step", 0) or 0)
    if obj.get("use_ema_warmup"):
        # diffusers' step k uses s = k - update_after_step - 1; polyak's k-th update is at steps k
        schedule = schedule_dict(
            lambda: s.Warmup(
                decay,
                inv_gamma=obj.get("inv_gamma", 1.0),
                power=obj.get("power", 2 / 3),
                min_decay=obj.get("min_decay", 0.0),
                update_after_step=after + 1,
            )
        )
    else:
        schedule = schedule_dict(lambda: s.StartAt(s.NumUpdatesWarmup(decay), start=after + 1))
    steps = None if n is None else n + 1
    return _positional(obj, ctx, "diffusers", schedule, steps)
