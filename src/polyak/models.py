"""Averaged models: ``nn.Module`` faces over the engine and a momentum schedule.

The classes and signatures are OpenMMLab's (mmengine ``BaseAveragedModel``,
``ExponentialMovingAverage``, ``MomentumAnnealingEMA``, ``StochasticWeightAverage``; mmagic
``RampUpEMA``; mmpretrain ``CosineEMA``), with their ``state_dict`` layout (``steps`` and
``module.*``), so configs and checkpoints move over unchanged. Deliberate differences:

* ``interval`` is compensated exactly by default (:func:`polyak.schedules.interval_momentum`);
  ``compensate_interval=False`` gives the uncompensated OpenMMLab numbers.
* bad arguments raise :class:`ValueError` instead of failing an ``assert``;
* a low-precision model gets an fp32 average (``dtype=`` chooses), integer buffers are always
  copied, tensors are matched by name through ``DDP``/``torch.compile`` wrappers, and a failed
  update or load changes nothing.

Counting rule: ``steps`` is the number of earlier ``update_parameters`` calls that counted.
The call with ``steps == 0`` copies the source; a later call averages when
``steps % interval == 0`` and otherwise only copies the non-averaged tensors (buffers); then
``steps += 1``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from .engine import AveragingEngine, StateEntry, Weight, flatten_tensors_, is_dtensor, named_state, unwrap_model
from .schedules import (
    ConstantMomentum,
    CosineMomentum,
    EqualAverage,
    ExpMomentum,
    MomentumAnnealing,
    RampUpMomentum,
    Schedule,
    interval_momentum,
)

__all__ = [
    "BaseAveragedModel",
    "ExponentialMovingAverage",
    "MomentumAnnealingEMA",
    "StochasticWeightAverage",
    "RampUpEMA",
    "CosineEMA",
    "ExpMomentumEMA",
]

_LOW_PRECISION = frozenset({torch.float16, torch.bfloat16})


def _average_dtype(t: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if not t.is_floating_point():
        return t.dtype
    if dtype is not None:
        return dtype
    return torch.float32 if t.dtype in _LOW_PRECISION or t.element_size() < 2 else t.dtype


def copy_module(
    model: nn.Module,
    *,
    device: torch.device | None,
    dtype: torch.dtype | None,
    share: frozenset[int] = frozenset(),
) -> nn.Module:
    """A deep copy of ``model`` with ``requires_grad`` off, each tensor created directly on
    ``device`` and in its average dtype (no transient copy on the model's device). Tensors
    whose ``id`` is in ``share`` are not copied: the copy refers to the model's own."""
    memo: dict[int, Any] = {}
    new_params = []
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo:
            continue
        if id(t) in share:
            memo[id(t)] = t
            continue
        new = t.detach().to(device=device or t.device, dtype=_average_dtype(t, dtype), copy=True)
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=False)
            new_params.append(new)
        memo[id(t)] = new
    clone = copy.deepcopy(model, memo)
    for p in new_params:
        p.requires_grad_(False)
    # One buffer per (device, dtype): a model laid out the same way is then averaged by a
    # single lerp_ per group (see flatten_parameters).
    flatten_tensors_(new_params)
    return clone


def _sharded_module_type() -> type:
    mod = sys.modules.get("polyak.distributed")  # imported when a sharded average was built
    return mod.ShardedAverageModule if mod is not None else type(None)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside polyak."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("polyak"):
        frame, level = frame.f_back, level + 1
    return level


def _check_interval(interval: object) -> int:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be a positive int, got {interval!r}")
    return interval


class BaseAveragedModel(nn.Module):
    """A copy of a model whose weights track a running average of the model's.

    .. math::

        \\bar\\theta_{s+1} = \\begin{cases}
            \\theta_s & s = 0 \\\\
            (1 - m_k(s))\\,\\bar\\theta_s + m_k(s)\\,\\theta_s & s \\bmod k = 0 \\\\
            \\bar\\theta_s & \\text{otherwise}
        \\end{cases}

    where :math:`s` is ``steps``, :math:`k` is ``interval`` and :math:`m_k(s)` is the
    interval-compensated momentum of the subclass
    (:func:`polyak.schedules.interval_momentum`). Buffers that are not averaged are copied
    from the model on every call.

    Subclass it either with a :class:`~polyak.schedules.Schedule` (override
    :meth:`make_schedule`; the update is then one fused kernel per (device, dtype) group) or
    mmengine's way, by overriding :meth:`avg_func` (called per tensor with ``steps`` an int).

    Args:
        model: the model to average. ``DistributedDataParallel``, ``DataParallel`` and
            ``torch.compile`` wrappers are removed first, so ``.module`` is the plain model.
        interval: average every ``interval`` calls. Defaults to 1.
        device: keep the average on this device (e.g. ``"cpu"`` to offload). Defaults to
            the model's.
        update_buffers: average floating buffers (BatchNorm statistics) too; otherwise copy
            them. Integer buffers are always copied. Defaults to False.
        dtype: dtype of the floating tensors of the average. Defaults to float32 for
            float16/bfloat16 models (a bf16 average at decay 0.999 never moves) and to the
            model's dtype otherwise.
        compensate_interval: use :math:`1 - \\prod(1 - m(j))` over the ``interval`` steps an
            update stands for, so the horizon in steps does not depend on ``interval``.
            ``False`` reproduces mmengine/mmagic/mmpretrain. Defaults to True.
    """

    def __init__(
        self,
        model: nn.Module,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        dtype: torch.dtype | None = None,
        compensate_interval: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        if not self._has_avg_func() and type(self).make_schedule is BaseAveragedModel.make_schedule:
            raise TypeError(
                f"{type(self).__name__} defines no averaging rule: override avg_func or "
                "make_schedule, or use ExponentialMovingAverage / StochasticWeightAverage"
            )
        self.interval = _check_interval(interval)
        self.update_buffers = bool(update_buffers)
        self.compensate_interval = bool(compensate_interval)
        source = unwrap_model(model)
        state = named_state(source)
        self._kinds = self._select(source, state)
        shared = frozenset(id(state[n].tensor) for n, k in self._kinds.items() if k == "skip")
        target_device = torch.device(device) if device else None
        if any(is_dtensor(e.tensor) for e in state.values()):
            from .distributed import sharded_copy  # FSDP2: shard by shard, never a deep copy

            self._skipped = tuple(n for n, k in self._kinds.items() if k == "skip")
            self.module = sharded_copy(
                source, dtype_of=lambda t: _average_dtype(t, dtype), device=target_device, share=shared
            )
        else:
            self._skipped = tuple(state[n].path for n, k in self._kinds.items() if k == "skip")
            self.module = copy_module(source, device=target_device, dtype=dtype, share=shared)
        self._steps = 0
        self._swapped = False
        self._last_momentum: float | None = None
        self._engine = self._make_engine()
        self._engine.target_state()  # nothing to average is an error now, not at the first update
        self._register_state_dict_hook(_drop_skipped)

    def _select(self, source: nn.Module, state: dict[str, StateEntry]) -> dict[str, str]:
        """Per canonical name, ``"avg"``, ``"copy"`` or ``"skip"`` where the default rule
        (average floating parameters, and floating buffers if ``update_buffers``) does not
        apply. ``"skip"`` tensors are shared with the model, never copied or saved."""
        return {}

    def _make_engine(self) -> AveragingEngine:
        return AveragingEngine(self.module, update_buffers=self.update_buffers, kinds=self._kinds)

    # -- the rule ----------------------------------------------------------------------

    def make_schedule(self) -> Schedule:
        """The momentum schedule of this class, built from its current attributes."""
        raise NotImplementedError

    @property
    def schedule(self) -> Schedule:
        """The :class:`~polyak.schedules.Schedule` in force (rebuilt from the attributes, so
        changing ``momentum`` takes effect at the next update)."""
        return self.make_schedule()

    def _has_avg_func(self) -> bool:
        return type(self).avg_func is not BaseAveragedModel.avg_func

    def momentum_at(self, steps: int) -> float:
        """The weight of the source in the update made at ``steps`` (interval compensation
        included)."""
        return interval_momentum(self.schedule, steps, self.interval, compensate=self.compensate_interval)

    def avg_func(self, averaged_param: Tensor, source_param: Tensor, steps: int) -> None:
        """Average one tensor in place: ``averaged_param.lerp_(source_param, m)``.

        Override it (mmengine's way) to define a custom rule; the built-in classes do not
        call it in their updates, which use one fused kernel for all tensors.
        """
        averaged_param.lerp_(source_param, self.momentum_at(steps))

    # -- counting ----------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """The number of earlier ``update_parameters`` calls that counted."""
        return self._steps

    @steps.setter
    def steps(self, value: int | Tensor) -> None:
        value = int(value)
        if value < 0:
            raise ValueError(f"steps must be >= 0, got {value}")
        self._steps = value

    # -- updates -----------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the averaged model."""
        return self.module(*args, **kwargs)

    def update_parameters(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (see the class formula)."""
        self._check_not_swapped("update_parameters")
        action, momentum = self._next_action()
        if action == "average":
            self._engine.average_(model, momentum)  # type: ignore[arg-type]
        else:
            self._run_action(model, action)
        self._count(action, momentum)

    def _next_action(self) -> tuple[str, float | None]:
        """What the next ``update_parameters`` does, and with which momentum: ``"copy_all"``
        (the first call), ``"average"``, ``"avg_func"`` (a custom rule), ``"copy"`` (between
        averaging calls) or ``"sync"`` (a copy phase that does not count)."""
        steps = self._steps
        if steps == 0:
            return "copy_all", 1.0
        if steps % self.interval:
            return "copy", None
        if self._has_avg_func():
            return "avg_func", None
        return "average", self.momentum_at(steps)

    def _run_action(self, model: nn.Module, action: str) -> None:
        if action in ("copy_all", "sync"):
            self._engine.copy_(model, "all")
        elif action == "avg_func":
            self._avg_func_update(model, self._steps)
        elif action == "copy":
            self._engine.copy_(model, "copy")
        else:  # pragma: no cover - "average" is run by the caller, possibly fused with others
            raise AssertionError(action)

    def _count(self, action: str, momentum: float | None) -> None:
        if action == "sync":
            return
        if action != "copy":
            self._last_momentum = momentum
        self._steps += 1

    def pairs(self, model: nn.Module) -> Iterator[tuple[str, str, Tensor, Tensor]]:
        """``(name, kind, averaged tensor, model tensor)`` for every tensor matched with
        ``model`` (names without wrapper prefixes; kind ``"avg"`` or ``"copy"``; for a sharded
        model, the local shards)."""
        return iter(self._engine.pairs(model))

    def tensor_kinds(self) -> dict[str, str]:
        """What each tensor of ``.module`` is, by its name in ``module.state_dict()``:
        ``"avg"`` (averaged), ``"copy"`` (copied from the model) or ``"skip"`` (shared with the
        model)."""
        return {e.path: self._engine.kind(e) for e in named_state(self.module).values()}

    @property
    def is_swapped(self) -> bool:
        """Whether a :meth:`swapped` block is running."""
        return self._swapped

    @property
    def current_momentum(self) -> float | None:
        """The weight of the model in the latest averaging update (1.0 for the initial copy;
        ``None`` before any update, or when a custom ``avg_func`` made it): for logging."""
        return self._last_momentum

    @property
    def current_decay(self) -> float | None:
        """``1 - current_momentum``: the decay of the latest averaging update, for logging."""
        return None if self._last_momentum is None else 1.0 - self._last_momentum

    def average_(self, model: nn.Module, weight: Weight) -> None:
        """One averaging update with an explicit ``weight`` (a float or a 0-d tensor on the
        average's device, for callers that keep their step count on the device). Does not
        touch ``steps``."""
        self._check_not_swapped("average_")
        self._engine.average_(model, weight)

    def _avg_func_update(self, model: nn.Module, steps: int) -> None:
        pairs = list(self._engine.pairs(model))
        with torch.no_grad():
            for _, kind, avg, src in pairs:
                if kind == "avg":
                    self.avg_func(avg, src.to(device=avg.device, dtype=avg.dtype), steps)
        self._engine.copy_(model, "copy")

    def sync_parameters(self, model: nn.Module) -> None:
        """Copy every parameter and buffer of ``model`` into the average."""
        self._check_not_swapped("sync_parameters")
        self._engine.copy_(model, "all")

    def sync_buffers(self, model: nn.Module) -> None:
        """Copy every buffer of ``model`` into the average."""
        self._check_not_swapped("sync_buffers")
        self._engine.copy_(model, "buffers")

    # -- using the average --------------------------------------------------------------

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Put the average into ``model`` in place for the block, then restore it.

        The averaged tensors are cast to the model's dtype and written into its own
        parameters, so compiled and wrapped models see them; the live weights come back when
        the block ends, also when it raises. When the average and the model have the same
        dtype the two are exchanged in place, one tensor at a time (one tensor of extra
        memory); otherwise (an fp32 average of a bf16 model) the live weights are backed up
        in their own dtype (a copy of the model's parameters) and the average is untouched.
        Raises :class:`RuntimeError` before the first update, when the average is still the
        construction-time copy.

        >>> # with ema.swapped(model):
        >>> #     evaluate(model)
        """
        self._check_not_swapped("swapped")
        if self._steps == 0:
            raise RuntimeError(
                f"{type(self).__name__} has not been updated yet: call update_parameters(model) "
                "before swapping the average in"
            )
        self._reshard(model)
        pairs = [(a, b) for _, kind, a, b in self._engine.pairs(model) if kind == "avg"]
        exact = all(a.dtype == b.dtype for a, b in pairs)
        backup = None
        with torch.no_grad():
            if exact:
                self._engine.swap_(model)
            else:
                backup = [b.clone() for _, b in pairs]
                for a, b in pairs:
                    b.copy_(a)
        self._swapped = True
        try:
            yield model
        finally:
            self._reshard(model)
            with torch.no_grad():
                if backup is None:
                    self._engine.swap_(model)
                else:
                    torch._foreach_copy_([b for _, b in pairs], backup)
            self._swapped = False

    def copy_to(self, model: nn.Module) -> None:
        """Write the average (parameters and buffers) into ``model`` permanently."""
        self._check_not_swapped("copy_to")
        self._reshard(model)
        self._engine.write_to_(model, "all")

    def _reshard(self, model: nn.Module) -> None:
        if isinstance(self.module, _sharded_module_type()):
            from .distributed import reshard

            reshard(model)

    def _check_not_swapped(self, what: str) -> None:
        if self._swapped:
            raise RuntimeError(f"{what}() inside swapped(): the average holds the live weights until the block ends")

    # -- state --------------------------------------------------------------------------

    def _counters(self) -> dict[str, int]:
        """The integers saved beside the weights (as int64 CPU tensors)."""
        return {"steps": self._steps}

    def _counter_keys(self) -> tuple[str, ...]:
        """Every counter key :meth:`load_state_dict` reads."""
        return ("steps",)

    def _read_counters(self, values: Mapping[str, int]) -> None:
        if "steps" not in values:
            warnings.warn(
                f"{type(self).__name__}: the state dict has no 'steps'; starting from 0, so the next "
                "update re-initialises the average from the model",
                stacklevel=_caller_stacklevel(),
            )
        self._steps = values.get("steps", 0)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self._check_not_swapped("state_dict")
        for k, v in self._counters().items():
            destination[prefix + k] = torch.tensor(v, dtype=torch.long)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _normalise_keys(self, state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        """Add the ``module.`` prefix to keys saved without it (OpenMMLab 1.0 layout)."""
        counters = self._counter_keys()
        out = {}
        for k, v in state_dict.items():
            if k.startswith(prefix):
                rest = k[len(prefix) :]
                if rest not in counters and not rest.startswith("module."):
                    k = prefix + "module." + rest
            out[k] = v
        return out

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Load an average saved by this class, mmengine, mmagic or mmpretrain.

        Keys without the ``module.`` prefix are accepted, and so is a missing ``steps``
        (then 0, as in mmagic: the next update re-initialises from the model). Tensors keep
        the average's own dtype and device. Everything is checked before anything is
        written, so a failed load changes nothing. ``assign`` is not supported.
        """
        if assign:
            raise ValueError("assign=True is not supported: the average keeps its own tensors, dtype and device")
        apply, result = self.prepare_load(state_dict, strict)
        apply()
        return result

    def prepare_load(
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> tuple[Callable[[], None], _IncompatibleKeys]:
        """Check ``state_dict`` as :meth:`load_state_dict` would and return ``(apply, keys)``:
        calling ``apply()`` writes it. Lets a caller check several averages before changing any.
        Raises :class:`RuntimeError` naming every problem."""
        self._check_not_swapped("load_state_dict")
        sd = self._normalise_keys(state_dict, "")
        for path in self._skipped:
            sd.pop("module." + path, None)
        own = self.state_dict(keep_vars=True)
        counters = self._counter_keys()
        missing = [k for k in own if k not in sd and k not in counters]
        unexpected = [k for k in sd if k not in own and k not in counters]
        errors = []
        if strict and (missing or unexpected):
            if missing:
                errors.append(f"missing keys: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if unexpected:
                errors.append(f"unexpected keys: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        for k, v in sd.items():
            if k not in own and k not in counters:
                continue
            if not isinstance(v, Tensor):
                errors.append(f"{k!r} is a {type(v).__name__}, not a tensor")
            elif k in counters:
                if v.numel() != 1 or v.is_floating_point() or v.is_complex():
                    errors.append(f"{k!r} must be a single integer, got {v.dtype} of shape {tuple(v.shape)}")
            elif v.shape != own[k].shape:
                errors.append(f"{k!r} has shape {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the average")
            elif (v.is_floating_point() or v.is_complex()) and not (own[k].is_floating_point() or own[k].is_complex()):
                errors.append(f"{k!r} is {v.dtype} in the file but {own[k].dtype} in the average")
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(errors))

        def apply() -> None:
            with torch.no_grad():
                for k, v in sd.items():
                    if k in own and k not in counters:
                        if is_dtensor(own[k]) or is_dtensor(v):
                            from .distributed import copy_full_

                            copy_full_(own[k], v)
                        else:
                            own[k].copy_(v)
            self._read_counters({k: int(sd[k]) for k in counters if k in sd})

        return apply, _IncompatibleKeys(missing, unexpected)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        # Reached when the average is a submodule of the module being loaded (mmagic's
        # ``generator_ema``): accept legacy keys and read the counters here.
        normalised = self._normalise_keys(state_dict, prefix)
        state_dict.clear()
        state_dict.update(normalised)
        counters = self._counter_keys()
        self._read_counters({k: int(state_dict.pop(prefix + k)) for k in counters if prefix + k in state_dict})
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn: Any, recurse: bool = True) -> BaseAveragedModel:
        # Tensors shared with the model (frozen="skip") are the model's: leave them alone.
        shared = [(owner, key, owner.pop(key)) for owner, key in self._shared_slots()]
        try:
            out = super()._apply(fn, recurse)
        finally:
            for owner, key, t in shared:
                owner[key] = t
            self._engine.invalidate()
        return out

    def _shared_slots(self) -> list[tuple[dict, str]]:
        if not self._skipped:
            return []
        paths = {"module." + p for p in self._skipped}
        slots = []
        for mod_name, mod in self.named_modules():
            prefix = mod_name + "." if mod_name else ""
            for table in (mod._parameters, mod._buffers):
                slots += [(table, k) for k in table if prefix + k in paths]
        return slots

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_engine"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._engine = self._make_engine()

    def extra_repr(self) -> str:
        try:
            rule = "avg_func" if self._has_avg_func() else repr(self.schedule)
        except ValueError as e:  # e.g. CosineEMA before max_steps is known
            rule = f"<{e}>"
        return f"steps={self._steps}, interval={self.interval}, rule={rule}"


def _drop_skipped(module: BaseAveragedModel, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for path in module._skipped:
        state_dict.pop(prefix + "module." + path, None)


class ExponentialMovingAverage(BaseAveragedModel):
    """Exponential moving average of a model's weights with a constant momentum.

    .. math:: \\bar\\theta_{t+1} = (1 - m)\\,\\bar\\theta_t + m\\,\\theta_t

    where :math:`m` is ``momentum``, the weight of the new value (the *decay* of torch,
    timm and diffusers is :math:`\\beta = 1 - m`). The average forgets with a half-life of
    :math:`\\ln 2 / -\\ln(1 - m)` steps: about 3,466 steps at the default 2e-4, 693 at
    1e-3. With ``interval`` :math:`k` each update uses :math:`1 - (1 - m)^k` (see
    :class:`BaseAveragedModel`), so the half-life stays the same in steps.

    Args:
        model, interval, device, update_buffers, dtype, compensate_interval: as
            :class:`BaseAveragedModel`.
        momentum: in :math:`(0, 1)`; a value above 0.5 (likely a decay passed as a
            momentum) gives a warning. Defaults to 0.0002.
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.0002,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        dtype: torch.dtype | None = None,
        compensate_interval: bool = True,
    ) -> None:
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1), got {momentum!r}")
        if momentum > 0.5:
            warnings.warn(
                f"momentum={momentum} is the weight of the new value and is usually small; "
                f"did you mean momentum={1 - momentum:.6g} (a decay of {momentum})?",
                UserWarning,
                stacklevel=_caller_stacklevel(),
            )
        super().__init__(model, interval, device, update_buffers, dtype=dtype, compensate_interval=compensate_interval)
        self.momentum = float(momentum)

    def make_schedule(self) -> Schedule:
        return ConstantMomentum(self.momentum)


class MomentumAnnealingEMA(ExponentialMovingAverage):
    """EMA whose momentum starts large and anneals to ``momentum`` (mmengine).

    .. math:: m(t) = \\max\\left(m, \\frac{\\gamma}{\\gamma + t}\\right)

    where :math:`m` is ``momentum``, :math:`\\gamma` is ``gamma`` and :math:`t` is
    ``steps``. The floor 2e-4 is reached at about 499,900 steps with ``gamma=100``.

    Args:
        model, momentum, interval, device, update_buffers, dtype, compensate_interval: as
            :class:`ExponentialMovingAverage`.
        gamma: > 0. Defaults to 100.
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.0002,
        gamma: int = 100,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        dtype: torch.dtype | None = None,
        compensate_interval: bool = True,
    ) -> None:
        MomentumAnnealing(momentum, gamma)  # validates (gamma finite and > 0)
        super().__init__(
            model, momentum, interval, device, update_buffers, dtype=dtype, compensate_interval=compensate_interval
        )
        self.gamma = gamma

    def make_schedule(self) -> Schedule:
        return MomentumAnnealing(self.momentum, self.gamma)


class StochasticWeightAverage(BaseAveragedModel):
    """Stochastic weight averaging: the equal average of every averaged snapshot.

    .. math:: \\bar\\theta_{n+1} = \\bar\\theta_n + \\frac{\\theta - \\bar\\theta_n}{n + 1}

    where :math:`n` is the number of snapshots already averaged (``steps // interval``), so
    after :math:`N` snapshots each has weight :math:`1/N`. ``interval`` chooses which steps
    are snapshots; it is not compensated (an equal average has no horizon to keep). Run
    :func:`polyak.update_bn` before evaluating a BatchNorm model (Izmailov et al., 2018).

    Args: as :class:`BaseAveragedModel`.
    """

    def make_schedule(self) -> Schedule:
        return EqualAverage()


class RampUpEMA(BaseAveragedModel):
    """EMA with StyleGAN's half-life in images and a ramp-up (mmagic).

    .. math::

        \\beta(t) = 0.5^{\\,b / \\max(\\min(1000\\,k,\\; r\\,(t+1)\\,b),\\; \\epsilon)}, \\qquad
        m(t) = 1 - \\beta(t)

    where :math:`b` is ``batch_size``, :math:`k` is ``ema_kimg``, :math:`r` is
    ``ema_rampup`` (``None``: no ramp) and :math:`t` is ``steps``. Calls before
    ``start_iter`` copy the model and do not advance ``steps``. With ``interval`` :math:`k`
    each update uses the decay of :math:`k` batches.

    Args:
        model, interval, device, update_buffers, dtype, compensate_interval: as
            :class:`BaseAveragedModel`.
        ema_kimg: half-life in thousands of images. Defaults to 10.
        ema_rampup: ramp-up ratio, or None. Defaults to 0.05.
        batch_size: global batch size. Defaults to 32.
        eps: floor of the half-life. Defaults to 1e-8.
        start_iter: number of initial calls that only copy. Defaults to 0.
    """

    def __init__(
        self,
        model: nn.Module,
        interval: int = 1,
        ema_kimg: int = 10,
        ema_rampup: float | None = 0.05,
        batch_size: int = 32,
        eps: float = 1e-8,
        start_iter: int = 0,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        dtype: torch.dtype | None = None,
        compensate_interval: bool = True,
    ) -> None:
        RampUpMomentum(ema_kimg, ema_rampup, batch_size, eps)  # validates
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter must be an int >= 0, got {start_iter!r}")
        super().__init__(model, interval, device, update_buffers, dtype=dtype, compensate_interval=compensate_interval)
        self.ema_kimg = ema_kimg
        self.ema_rampup = ema_rampup
        self.batch_size = batch_size
        self.eps = eps
        self.start_iter = start_iter
        self._start_calls = 0

    def make_schedule(self) -> Schedule:
        return RampUpMomentum(self.ema_kimg, self.ema_rampup, self.batch_size, self.eps)

    @staticmethod
    def rampup(
        steps: int, ema_kimg: float = 10, ema_rampup: float | None = 0.05, batch_size: int = 4, eps: float = 1e-8
    ) -> float:
        """The decay :math:`\\beta` (not the momentum) at ``steps``, as mmagic's ``rampup``."""
        return RampUpMomentum(ema_kimg, ema_rampup, batch_size, eps).decay(int(steps))

    def _next_action(self) -> tuple[str, float | None]:
        # Copy the model while fewer than start_iter calls were made, then average.
        if self._start_calls < self.start_iter:
            return "sync", None
        return super()._next_action()

    def _count(self, action: str, momentum: float | None) -> None:
        if action == "sync":
            self._start_calls += 1
        super()._count(action, momentum)

    def _counters(self) -> dict[str, int]:
        counters = super()._counters()
        if self.start_iter:
            counters["start_calls"] = self._start_calls
        return counters

    def _counter_keys(self) -> tuple[str, ...]:
        return ("steps", "start_calls")

    def _read_counters(self, values: Mapping[str, int]) -> None:
        super()._read_counters(values)
        self._start_calls = values.get("start_calls", self.start_iter if self._steps else 0)


class CosineEMA(ExponentialMovingAverage):
    """EMA whose momentum follows a half cosine from ``momentum`` to ``end_momentum``
    (mmpretrain; BYOL, MoCo v3).

    .. math::

        m(t) = m_{\\text{end}} - (m_{\\text{end}} - m_{\\text{start}})
               \\,\\frac{\\cos(\\pi \\min(t, T) / T) + 1}{2}

    where :math:`m_{\\text{start}}` is ``momentum``, :math:`m_{\\text{end}}` is
    ``end_momentum``, :math:`T` is ``max_steps`` and :math:`t` is ``steps`` (mmpretrain's
    docstring flips the sign of the second term; its code, followed here, does not).
    ``max_steps`` may be set after construction (the hooks set it from the trainer's
    ``max_iters``); averaging without it raises :class:`ValueError`.

    Args:
        model, interval, device, update_buffers, dtype, compensate_interval: as
            :class:`BaseAveragedModel`.
        momentum: start momentum, in (0, 1). Defaults to 0.004.
        end_momentum: end momentum, in [0, 1]. Defaults to 0.
        max_steps: the step :math:`T` at which ``end_momentum`` is reached.
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.004,
        end_momentum: float = 0.0,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        max_steps: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        compensate_interval: bool = True,
    ) -> None:
        CosineMomentum(momentum, end_momentum, max_steps if max_steps is not None else 1)  # validates
        super().__init__(
            model, momentum, interval, device, update_buffers, dtype=dtype, compensate_interval=compensate_interval
        )
        self.end_momentum = float(end_momentum)
        self.max_steps = max_steps

    def make_schedule(self) -> Schedule:
        if self.max_steps is None:
            raise ValueError(
                "CosineEMA needs max_steps (the total number of training steps) before it can average: "
                "pass max_steps= or set ema.max_steps"
            )
        return CosineMomentum(self.momentum, self.end_momentum, self.max_steps)


class ExpMomentumEMA(ExponentialMovingAverage):
    r"""EMA whose momentum decays exponentially to ``momentum`` (mmdet; YOLOX, RTMDet).

    .. math:: m(t) = (1 - m)\,e^{-(1 + t)/\gamma} + m

    where :math:`m` is ``momentum``, :math:`\gamma` is ``gamma`` and :math:`t` is ``steps``.

    Args:
        model, momentum, interval, device, update_buffers, dtype, compensate_interval: as
            :class:`ExponentialMovingAverage`.
        gamma: > 0. Defaults to 2000.
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.0002,
        gamma: int = 2000,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        dtype: torch.dtype | None = None,
        compensate_interval: bool = True,
    ) -> None:
        ExpMomentum(momentum, gamma)  # validates
        super().__init__(
            model, momentum, interval, device, update_buffers, dtype=dtype, compensate_interval=compensate_interval
        )
        self.gamma = gamma

    def make_schedule(self) -> Schedule:
        return ExpMomentum(self.momentum, self.gamma)
