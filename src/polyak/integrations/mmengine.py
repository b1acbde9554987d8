"""mmengine integration: ``PolyakEMAHook`` and polyak's averaged models in mmengine's registries.

Importing this module (from a config: ``custom_imports=dict(imports=["polyak.integrations.mmengine"],
allow_failed_imports=False)``) does three things:

* registers :class:`PolyakEMAHook` in mmengine's ``HOOKS`` registry. mmengine owns the name
  ``"EMAHook"``; polyak's hook takes the same arguments, so a config changes only the type:
  ``custom_hooks=[dict(type="PolyakEMAHook", ema_type="ExponentialMovingAverage", momentum=2e-4)]``;
* registers polyak's averaged models in mmengine's ``MODELS`` registry as ``"Polyak" + name``
  (``PolyakExponentialMovingAverage``, ``PolyakMomentumAnnealingEMA``,
  ``PolyakStochasticWeightAverage``, ``PolyakRampUpEMA``, ``PolyakCosineEMA``,
  ``PolyakExpMomentumEMA``, ``PolyakAveragedModel``), so ``MODELS.build`` makes them too;
* allow-lists, for ``torch.load(..., weights_only=True)`` (torch's default since 2.6, and what
  mmengine's ``Runner.resume`` / ``load_checkpoint`` call), the non-tensor globals that an
  mmengine checkpoint holds in its ``message_hub``, and nothing more (:data:`ALLOWED_GLOBALS`
  names them; :func:`allow_mmengine_checkpoints` adds them): mmengine's ``HistoryBuffer``, a
  ``getattr`` limited to its four statistics methods, and numpy's array and scalar
  reconstructors with the float64 and int64 dtypes.

The hook is :class:`polyak.hooks.EMAHook` (one implementation) with mmengine's ``Hook`` as a base and
the current momentum logged as ``train/ema_momentum`` through ``runner.message_hub``, so it
appears in mmengine's log lines and in every visualisation backend (``vis_data/scalars.json``).
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import torch
from mmengine.hooks import Hook, LoggerHook
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS, MODELS, Registry

from ..hooks import EMAHook
from ..models import AVERAGES, BaseAveragedModel
from ..validation import check_int

__all__ = [
    "PolyakEMAHook",
    "REGISTERED_MODELS",
    "ALLOWED_GLOBALS",
    "HISTORY_BUFFER_METHODS",
    "allow_mmengine_checkpoints",
    "history_buffer_getattr",
    "safe_globals_for_mmengine",
]

#: The name prefix of polyak's entries in mmengine's registries.
PREFIX = "Polyak"

#: mmengine ``MODELS`` name -> polyak class, as registered at import.
REGISTERED_MODELS: dict[str, type[BaseAveragedModel]] = {PREFIX + name: cls for name, cls in AVERAGES.items()}


def _resolve_ema_type(ema_type: Any) -> Any:
    """A polyak averaged-model class from an ``ema_type`` string: mmengine's own names
    (``"ExponentialMovingAverage"``) and polyak's registered ones
    (``"PolyakExponentialMovingAverage"``) map to polyak's classes; any other name is looked
    up in mmengine's ``MODELS`` and must be a polyak :class:`~polyak.BaseAveragedModel`."""
    if not isinstance(ema_type, str) or ema_type in AVERAGES:
        return ema_type
    if ema_type in REGISTERED_MODELS:
        return REGISTERED_MODELS[ema_type]
    cls = MODELS.get(ema_type)
    if isinstance(cls, type) and issubclass(cls, BaseAveragedModel):
        return cls
    known = sorted({*AVERAGES, *REGISTERED_MODELS})
    found = "" if cls is None else f" (MODELS has {cls!r}, which is not a polyak averaged model)"
    raise ValueError(f"unknown ema_type {ema_type!r}{found}; known: {known}")


class PolyakEMAHook(EMAHook, Hook):
    """polyak's :class:`~polyak.hooks.EMAHook` as an mmengine hook (registered as ``"PolyakEMAHook"``).

    The arguments are mmengine ``EMAHook``'s (``ema_type``, ``strict_load``, ``begin_iter``,
    ``begin_epoch``, ``**kwargs`` for the averaged model) plus polyak's keyword-only ``swap``,
    ``warm_up``, ``resume_from`` (see :class:`polyak.hooks.EMAHook`) and ``log_key``. ``ema_type``
    takes mmengine's names (``"ExponentialMovingAverage"``, ``"MomentumAnnealingEMA"``, ...,
    built as polyak's classes), the registered ``"Polyak..."`` names, or the ``MODELS`` name of
    a polyak :class:`~polyak.BaseAveragedModel` subclass of your own.

    The average is updated once per optimizer step that ran (``accumulative_counts`` in
    ``optim_wrapper`` gives one update per cycle; a step skipped by ``AmpOptimWrapper``'s
    GradScaler gives none), swapped in for validation and test, and saved as mmengine's hook
    saves it (``state_dict``: the average; ``ema_state_dict``: the live weights), with polyak's
    ``"polyak"`` block (docs/checkpoint-format.md). Checkpoints of mmengine's own ``EMAHook``
    resume into it.

    Args:
        log_key: the ``message_hub`` scalar the momentum of the latest update (the weight of
            the live model; 1.0 for the initial copy) is written to after every training
            iteration, once there is one. ``None``: no logging. Defaults to
            ``"train/ema_momentum"`` (shown as ``ema_momentum`` in the training log).
        health_interval: every that many training iterations, the average's health report
            (:meth:`polyak.BaseAveragedModel.health`) is written to ``message_hub`` as
            ``train/ema_distance``, ``train/ema_moved`` and ``train/ema_horizon`` (smoothed in the log lines over
            ``log_processor``'s window, as every scalar), and each problem it finds is warned
            about once. ``"log"`` (the default): the ``LoggerHook``'s interval (10 if there is
            none); ``None``: never (a report costs a pass over the weights and one host read).
    """

    priority = "NORMAL"

    def __init__(
        self,
        ema_type: str | type[BaseAveragedModel] = "ExponentialMovingAverage",
        *args: Any,
        log_key: str | None = "train/ema_momentum",
        health_interval: int | str | None = "log",
        **kwargs: Any,
    ) -> None:
        super().__init__(_resolve_ema_type(ema_type), *args, **kwargs)
        if log_key is not None and not isinstance(log_key, str):
            raise ValueError(f"log_key must be a string or None, got {log_key!r}")
        self.log_key = log_key
        if health_interval is not None and health_interval != "log":
            health_interval = check_int("health_interval", health_interval, 1)
        self.health_interval = health_interval

    def before_train(self, runner: Any) -> None:
        super().before_train(runner)
        if self.health_interval == "log":
            loggers = [h for h in runner.hooks if isinstance(h, LoggerHook)]
            self.health_interval = loggers[0].interval if loggers else 10

    def _unwrap(self, model: Any) -> Any:
        # mmengine's own wrappers (MMDistributedDataParallel, ...) first, as mmengine's EMAHook
        while is_model_wrapper(model):
            model = model.module
        return super()._unwrap(model)

    def after_train_iter(self, runner: Any, batch_idx: int = 0, data_batch: Any = None, outputs: Any = None) -> None:
        super().after_train_iter(runner, batch_idx, data_batch, outputs)
        momentum = self.momentum
        if self.log_key is not None and momentum is not None:
            runner.message_hub.update_scalar(self.log_key, float(momentum))
        every = self.health_interval
        ready = self.ema_model is not None and self.ema_model.steps > 0  # begin_iter/begin_epoch reached
        if isinstance(every, int) and ready and self.every_n_train_iters(runner, every):
            for key, value in self.ema_model.health(self.src_model).scalars().items():  # type: ignore[union-attr]
                runner.message_hub.update_scalar(f"train/ema_{key}", value)


# -- registration ---------------------------------------------------------------------------------


def _register(registry: Registry, name: str, cls: type) -> None:
    """Register ``cls`` under ``name``; a second import of this module (a test runner that
    imports it again under another name) replaces polyak's own entry, anything else is an
    error."""
    old = registry.module_dict.get(name)
    if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise KeyError(f"{name!r} is already registered in mmengine's {registry.name} registry by {old!r}")
    registry.register_module(name=name, module=cls, force=True)


_register(HOOKS, "PolyakEMAHook", PolyakEMAHook)
for _name, _cls in REGISTERED_MODELS.items():
    _register(MODELS, _name, _cls)


# -- weights_only loading -------------------------------------------------------------------------

#: The ``HistoryBuffer`` attributes :func:`history_buffer_getattr` resolves: mmengine's default
#: statistics methods, which ``HistoryBuffer.__getstate__`` pickles as ``getattr(HistoryBuffer,
#: name)``.
HISTORY_BUFFER_METHODS = frozenset({"min", "max", "current", "mean"})


def history_buffer_getattr(obj: Any, name: str, *default: Any) -> Any:
    """``getattr`` for ``weights_only`` loading, limited to ``getattr(HistoryBuffer, name)`` for
    a name in :data:`HISTORY_BUFFER_METHODS`; anything else raises
    :class:`pickle.UnpicklingError`. Allow-listed under the name ``builtins.getattr``.

    >>> history_buffer_getattr(HistoryBuffer, "mean") is HistoryBuffer.mean
    True
    """
    if obj is HistoryBuffer and name in HISTORY_BUFFER_METHODS and not default:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f"weights_only load refused getattr({obj!r}, {name!r}): polyak.integrations.mmengine allows "
        f"getattr only for mmengine's HistoryBuffer statistics {sorted(HISTORY_BUFFER_METHODS)}"
    )


def _numpy_core() -> Any:
    return np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1


#: The numpy dtypes whose arrays and scalars may be loaded: those of mmengine's own checkpoints
#: (``HistoryBuffer`` keeps float64 values and int64 counts; ``runtime_info["eta"]`` is a float64
#: scalar). Their ``numpy.dtypes`` classes are allow-listed so the unpickler may set a dtype's state.
_NUMPY_DTYPES = (np.float64, np.int64)


def safe_globals_for_mmengine() -> list[Any]:
    """What :func:`allow_mmengine_checkpoints` allow-lists (the argument of
    ``torch.serialization.add_safe_globals`` / ``safe_globals``)."""
    core = _numpy_core().multiarray
    entries: list[Any] = [
        # message_hub["log_scalars"]: every logged scalar is a HistoryBuffer; its __setstate__
        # only updates its __dict__ and registers its statistics methods.
        HistoryBuffer,
        # ... whose state pickles those methods as getattr(HistoryBuffer, "mean"): a getattr
        # that resolves nothing else.
        (history_buffer_getattr, "builtins.getattr"),
        # ... and holds its history as numpy arrays; message_hub["runtime_info"]["eta"] is a
        # numpy float64 scalar. Arrays and scalars are rebuilt from bytes and a dtype.
        np.ndarray,
        np.dtype,
        core._reconstruct,
        core.scalar,
        # the same functions as written by numpy 1.x (numpy.core) and numpy 2.x (numpy._core)
        (core._reconstruct, "numpy.core.multiarray._reconstruct"),
        (core._reconstruct, "numpy._core.multiarray._reconstruct"),
        (core.scalar, "numpy.core.multiarray.scalar"),
        (core.scalar, "numpy._core.multiarray.scalar"),
    ]
    # A dtype is rebuilt by numpy.dtype(...) and then given its state, which the unpickler
    # allows only for allow-listed classes: numpy >= 1.25 gives each dtype its own class.
    entries += sorted({type(np.dtype(t)) for t in _NUMPY_DTYPES} - {np.dtype}, key=lambda c: c.__name__)
    return entries


def _global_name(entry: Any) -> str:
    """The name under which a pickle asks for an allow-listed entry."""
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


#: What importing this module adds to torch's ``weights_only`` allow-list, by the names a pickle
#: uses: everything an mmengine checkpoint's ``message_hub`` needs, nothing more.
ALLOWED_GLOBALS: tuple[str, ...] = tuple(sorted({_global_name(e) for e in safe_globals_for_mmengine()}))


def allow_mmengine_checkpoints() -> None:
    """Allow-list, process-wide, what an mmengine checkpoint needs besides tensors for
    ``torch.load(path, weights_only=True)`` (:data:`ALLOWED_GLOBALS`): mmengine's
    ``HistoryBuffer``, a ``getattr`` limited to its statistics methods
    (:func:`history_buffer_getattr`), and numpy's array and scalar reconstructors with the
    float64 and int64 dtypes (the only ones mmengine's message hub writes). Called at import of this
    module; calling it again changes nothing. Where ``builtins.getattr`` itself is already
    allow-listed, the limited one is not added (the broader choice stands).
    """
    current = torch.serialization.get_safe_globals()
    entries = safe_globals_for_mmengine()
    if getattr in current or any(isinstance(e, tuple) and e[1] == "builtins.getattr" for e in current):
        entries = [e for e in entries if not (isinstance(e, tuple) and e[1] == "builtins.getattr")]
    torch.serialization.add_safe_globals([e for e in entries if e not in current])


allow_mmengine_checkpoints()
