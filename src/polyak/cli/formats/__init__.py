"""Readers of the averages other libraries save, for the command line (their only user): each
format read from a loaded file becomes a :class:`~polyak.cli.formats.base.Found`: the averaged
weights as a deployable state dict, the live weights where known, and polyak's record of the
averaging (class, schedule, counters) for :func:`polyak.checkpoint.pack_state`.

=========================  ==================================================================
``polyak``                 polyak's checkpoint format (docs/checkpoint-format.md)
``polyak-export``          weights written by ``polyak export`` / ``average`` / ``posthoc``
``mmengine``               mmengine ``EMAHook``: ``state_dict`` = average, ``ema_state_dict``
                           = live (``module.`` + ``steps``)
``lightning``              Lightning ``WeightAveraging``: ``state_dict`` = average,
                           ``current_model_state`` = live, ``averaging_state``
``timm``                   ``state_dict_ema`` beside ``state_dict``
``mmcv``                   mmcv 1.x ``EMAHook``: ``ema_<name with . as _>`` buffers in
                           ``state_dict``
``torch-averaged-model``   ``torch.optim.swa_utils.AveragedModel.state_dict()``
                           (``n_averaged``, ``module.*``)
``averaged-model``         mmengine/mmagic ``BaseAveragedModel.state_dict()`` (``steps``,
                           ``module.*``)
``ema-pytorch``            ema-pytorch ``EMA`` / ``KarrasEMA`` (``initted``, ``step``,
                           ``ema_model.*``, ``online_model.*``)
``torch-ema``              torch_ema ``ExponentialMovingAverage`` (``shadow_params`` by position)
``diffusers``              diffusers ``EMAModel`` (``shadow_params`` by position)
=========================  ==================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...files import Loaded, Opaque, is_state_dict
from ...files.errors import FormatError
from ...registry import Registry
from .base import Context, Format, Found
from .by_name import read_ema_pytorch, read_lightning, read_timm, read_torch_averaged
from .by_position import match_by_position, read_diffusers, read_torch_ema
from .openmmlab import read_averaged_model, read_mmcv, read_mmengine
from .polyak import read_checkpoint, read_export

__all__ = ["FORMATS", "Found", "Context", "Format", "identify", "detect", "match_by_position"]

#: Every format read, in the order they are tried (``nested``: also one level down, under a key
#: of the file, e.g. ``{"model": ..., "ema": ema.state_dict()}``).
FORMATS: Registry[Format] = Registry("checkpoint format")
for _format in (
    Format("polyak", "polyak's checkpoint format (a 'polyak' block)", read_checkpoint),
    Format("polyak-export", "weights written by polyak export/average/posthoc", read_export),
    Format("mmengine", "mmengine EMAHook (state_dict = average, ema_state_dict = live)", read_mmengine),
    Format("lightning", "Lightning WeightAveraging (current_model_state, averaging_state)", read_lightning),
    Format("timm", "timm state_dict_ema", read_timm),
    Format("mmcv", "mmcv 1.x EMAHook ema_* buffers in state_dict", read_mmcv),
    Format("torch-averaged-model", "torch AveragedModel state dict (n_averaged, module.*)", read_torch_averaged, True),
    Format(
        "averaged-model", "mmengine/mmagic BaseAveragedModel state dict (steps, module.*)", read_averaged_model, True
    ),
    Format("ema-pytorch", "ema-pytorch EMA/KarrasEMA (initted, step, ema_model.*)", read_ema_pytorch, True),
    Format("torch-ema", "torch_ema ExponentialMovingAverage (shadow_params, num_updates)", read_torch_ema, True),
    Format("diffusers", "diffusers EMAModel (shadow_params, optimization_step)", read_diffusers, True),
):
    FORMATS.register(_format, name=_format.name)


def identify(loaded: Loaded, *, key: str | None = None, only: str | None = None, **context: Any) -> list[Found]:
    """Every average the file holds, as :class:`Found` (its ``weights`` None where names are
    needed), the top level first, then one level down for ``nested`` formats. ``key`` looks
    only under that top-level key; ``only`` tries only that format."""
    if only is not None and only not in FORMATS:
        raise FormatError(f"unknown format {only!r}; known: {', '.join(FORMATS)}")
    top = loaded.obj
    ctx = Context(path=loaded.path, metadata=loaded.metadata, top=top, **context)
    formats = [f for _, f in FORMATS.items() if only is None or f.name == only]
    if key is not None:
        if not isinstance(top, Mapping) or key not in top:
            have = list(top)[:10] if isinstance(top, Mapping) else type(top).__name__
            raise FormatError(f"{loaded.path}: no key {key!r} (the file has {have})")
        candidates = [(key, top[key])]
        ctx.metadata = None
    else:
        candidates = [("", top)]
    found: list[Found] = []
    for where, obj in candidates:
        for f in formats:
            got = f.read(obj, ctx)
            if got is not None:
                got.key = ".".join(p for p in (where, got.key) if p)
                found.append(got)
                break
    if found or key is not None or not isinstance(top, Mapping):
        return found
    ctx.metadata = None
    for k, v in top.items():
        if not isinstance(v, Mapping):
            continue
        for f in formats:
            if not f.nested:
                continue
            got = f.read(v, ctx)
            if got is not None:
                got.key = ".".join(p for p in (str(k), got.key) if p)
                found.append(got)
                break
    return found


def detect(loaded: Loaded, *, key: str | None = None, only: str | None = None, **context: Any) -> Found:
    """The one average in the file (:func:`identify`), with its weights named. Raises
    :class:`FormatError` listing the formats tried, naming the candidates when there are
    several, or saying what is needed (``--names-from``)."""
    found = identify(loaded, key=key, only=only, **context)
    if not found:
        tried = ", ".join(name for name in FORMATS if only is None or name == only)
        if is_state_dict(loaded.obj):
            what = "a plain state dict"
        elif isinstance(loaded.obj, Opaque):
            what = f"a pickled {loaded.obj.origin} object, not loaded: save a state dict instead"
        else:
            what = "no known layout"
        raise FormatError(f"{loaded.path}: no averaged weights found ({what}); formats tried: {tried}")
    if len(found) > 1:
        listing = ", ".join(f"{f.key!r} ({f.format})" for f in found)
        raise FormatError(f"{loaded.path} holds several averages: {listing}; choose one with --key")
    one = found[0]
    if one.weights is None:
        raise FormatError(f"{loaded.path}: {one.needs}")
    return one
