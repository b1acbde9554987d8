"""``BaseAveragedModel``: the ``nn.Module`` face of an average, and its public update protocol.

The class and its signature are mmengine's ``BaseAveragedModel``, with its ``state_dict`` layout
(``steps`` and ``module.*``), so configs and checkpoints move over unchanged. The OpenMMLab
classes built on it are presets (:mod:`polyak.openmmlab`); ``AveragedModel``
(:mod:`polyak.averaged_model`) takes any schedule. Deliberate differences from mmengine:

* ``interval`` is compensated exactly by default (:func:`polyak.schedules.interval_momentum`);
  ``compensate_interval=False`` gives the uncompensated OpenMMLab numbers;
* bad arguments raise :class:`ValueError` instead of failing an ``assert``;
* a low-precision model gets an fp32 average (``dtype=`` chooses), integer buffers are always
  copied, tensors are matched by name through ``DDP``/``torch.compile`` wrappers, and a failed
  update or load changes nothing.

Counting rule: ``steps`` is the number of earlier ``update_parameters`` calls that counted.
The call with ``steps == 0`` copies the source; a later call averages when
``steps % interval == 0`` and otherwise only copies the tensors that are not averaged
(buffers); then ``steps += 1``.

An update is three public steps, so that :class:`~polyak.AverageGroup`, the hooks and the
checkpoint code drive averages without reaching into them: :meth:`BaseAveragedModel.next_update`
says what the next call does and with which weight (an :class:`Update`, decided before any
tensor changes), :meth:`BaseAveragedModel.apply_update` changes the tensors, and
:meth:`BaseAveragedModel.commit_update` advances the counters.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from .engine import AveragingEngine, Weight, flatten_tensors_
from .gpu import side_stream_for
from .health import Health, HealthWatch, measure, stall_ratio
from .interrupts import HeldInterrupts
from .registry import Registry
from .schedules import Schedule, interval_momentum
from .sharded import ShardedAverageModule, copy_full_, reshard, sharded_copy
from .tensors import StateEntry, is_averaged, is_dtensor, named_state, unwrap_model
from .validation import (
    ConventionWarning,
    check_choice,
    check_count,
    check_float_dtype,
    check_int,
    check_number,
    warning_stacklevel,
)

__all__ = ["BaseAveragedModel", "Update", "AVERAGES", "average_dtype", "copy_module"]

#: The averaged-model classes by name: what an ``ema_type`` string (hooks, configs) may name.
AVERAGES: Registry[type[BaseAveragedModel]] = Registry("averaged model")

_LOW_PRECISION = frozenset({torch.float16, torch.bfloat16})

#: The modules that hold an average (``BaseAveragedModel.module``): what must never be given to an
#: average as the model it averages.
_AVERAGE_MODULES: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def average_dtype(t: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the average of tensor ``t``: ``dtype`` for a floating tensor when given,
    else float32 for a float16/bfloat16/float8 tensor and ``t``'s own otherwise; an integer,
    bool or complex tensor keeps its dtype."""
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
    new_buffers = []
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo:
            continue
        if id(t) in share:
            memo[id(t)] = t
            continue
        new = t.detach().to(device=device or t.device, dtype=average_dtype(t, dtype), copy=True)
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=False)
            new_params.append(new)
        else:
            new_buffers.append(new)
        memo[id(t)] = new
    clone = copy.deepcopy(model, memo)
    for p in new_params:
        p.requires_grad_(False)
    # One buffer per (device, dtype): a model laid out the same way is then averaged by a
    # single lerp_ per group (see flatten_parameters); the buffers, copied on every update,
    # are then one run per dtype, filled by one cat per chunk.
    flatten_tensors_(new_params)
    flatten_tensors_(new_buffers)
    return clone


#: :meth:`BaseAveragedModel.update_parameters` warns when a round-to-nearest average would
#: move an element only where the model differs from it by more than this share of its value.
LOST_RATIO = 0.5


class Update(NamedTuple):
    """What one ``update_parameters`` call does, decided before any tensor changes.

    ``kind`` is one of:

    * ``"copy"``: copy every tensor from the model (the first call; ``weight`` is 1.0), or,
      with ``counted=False``, a copy that does not count (:class:`~polyak.RampUpEMA` before
      ``start_iter``);
    * ``"average"``: move the averaged tensors toward the model's by ``weight`` and copy the
      others (one fused kernel per group);
    * ``"custom"``: a rule written per tensor (mmengine's ``avg_func``, torch's ``avg_fn``);
    * ``"hold"``: between averaging calls (``steps % interval != 0``): the averaged tensors
      hold, the others are copied.
    """

    kind: str
    weight: float | None = None
    counted: bool = True


class BaseAveragedModel(nn.Module):
    """A copy of a model whose weights track a running average of the model's.

    .. math::

        \\bar\\theta_{s+1} = \\begin{cases}
            \\theta_s & s = 0 \\\\
            (1 - m_k(s))\\,\\bar\\theta_s + m_k(s)\\,\\theta_s & s \\bmod k = 0 \\\\
            \\bar\\theta_s & \\text{otherwise}
        \\end{cases}

    where :math:`s` is ``steps``, :math:`k` is ``interval`` and :math:`m_k(s)` is the
    interval-compensated momentum of the subclass's schedule
    (:func:`polyak.schedules.interval_momentum`). Buffers that are not averaged are copied
    from the model on every call.

    Subclass it in one of three ways: as a preset, naming a
    :class:`~polyak.schedules.Schedule` class in ``schedule_type`` whose arguments are passed
    as keywords (``schedule_args``) and kept as attributes of the same names (the OpenMMLab
    classes); by overriding :meth:`make_schedule`; or mmengine's way, by overriding
    :meth:`avg_func` (called per tensor with ``steps`` an int). The first two update with one
    fused kernel per (device, dtype) group.

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
        rounding: ``"nearest"``, or ``"stochastic"`` with ``dtype=torch.bfloat16``: a half-size
            average, updated in float32 chunks and rounded back to bfloat16 stochastically, so
            that it keeps moving where a round-to-nearest bfloat16 average stalls (a run and its
            resume round alike: the rounding is seeded by ``steps``). See docs/averaging.md,
            "Precision". Defaults to ``"nearest"``.
        side_stream: on a CUDA average, enqueue the averaging kernels on a side stream that
            waits for the current one, so the update overlaps with the next forward pass; the
            training stream waits for it (on the device) before the next optimizer step and
            before the average is read or written (:class:`polyak.gpu.SideStream`). Buffers
            that are copied rather than averaged are copied on the current stream first, so
            the forward's writes to them (BatchNorm statistics) cannot race with the update;
            averaged buffers (``update_buffers=True``) could, and are refused. On a CPU average
            the update runs inline, as without it. Defaults to False.
        **schedule_args: for presets: the arguments of ``schedule_type``, checked before the
            model is copied and kept as attributes (``self.momentum``: changing one takes
            effect at the next update).
    """

    #: The schedule class of a preset (``None``: the subclass defines its rule otherwise).
    schedule_type: ClassVar[type[Schedule] | None] = None
    #: Arguments of ``schedule_type`` that may be None at construction and given later.
    deferred_args: ClassVar[tuple[str, ...]] = ()
    #: The counters :meth:`counters` saves and :meth:`load_counters` reads.
    counter_keys: ClassVar[tuple[str, ...]] = ("steps",)

    def __init__(
        self,
        model: nn.Module,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        dtype: torch.dtype | None = None,
        compensate_interval: bool = True,
        rounding: str = "nearest",
        side_stream: bool = False,
        **schedule_args: Any,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_float_dtype("dtype", dtype)
        self.interval = check_int("interval", interval, 1)
        self.update_buffers = bool(update_buffers)
        self.compensate_interval = bool(compensate_interval)
        self.rounding = check_choice("rounding", rounding, ("nearest", "stochastic"))
        if rounding == "stochastic" and dtype != torch.bfloat16:
            raise ValueError(
                f"rounding='stochastic' rounds the average to bfloat16: give dtype=torch.bfloat16, got dtype={dtype}"
            )
        self._schedule_args = tuple(schedule_args)
        self._schedule_cache: tuple[tuple[Any, ...], Schedule] | None = None
        self._check_rule(schedule_args)
        for name, value in schedule_args.items():
            setattr(self, name, value)
        source = unwrap_model(model)
        state = named_state(source)
        self._kinds = self.select_tensors(source, state)
        shared = frozenset(id(state[n].tensor) for n, k in self._kinds.items() if k == "skip")
        target_device = torch.device(device) if device else None
        if any(is_dtensor(e.tensor) for e in state.values()):
            # FSDP2: shard by shard, never a deep copy
            self._skipped = tuple(n for n, k in self._kinds.items() if k == "skip")
            self.module = sharded_copy(
                source, dtype_of=lambda t: average_dtype(t, dtype), device=target_device, share=shared
            )
        else:
            self._skipped = tuple(state[n].path for n, k in self._kinds.items() if k == "skip")
            self.module = copy_module(source, device=target_device, dtype=dtype, share=shared)
        _AVERAGE_MODULES.add(self.module)
        self._accepted: weakref.ref[nn.Module] | None = None  # the last model check_model accepted
        self._steps = 0
        self._swapped = False
        self._last_momentum: float | None = None
        self._engine = self._make_engine()
        self._engine.target_state()  # nothing to average is an error now, not at the first update
        self.side_stream = bool(side_stream)
        if self.side_stream and any(
            e.is_buffer and self._engine.kind(e) == "avg" for e in self._engine.target_state().values()
        ):
            raise ValueError(
                "side_stream=True with update_buffers=True: the next forward writes the averaged buffers "
                "(BatchNorm statistics) in place while the side stream reads them; use update_buffers=False "
                "(the buffers are then copied on the current stream) or side_stream=False"
            )
        self._side = side_stream_for(self.module) if self.side_stream else None
        self._watch = HealthWatch()
        self._register_state_dict_hook(_drop_skipped)

    def _make_engine(self) -> AveragingEngine:
        return AveragingEngine(
            self.module, update_buffers=self.update_buffers, kinds=self._kinds, rounding=self.rounding
        )

    def _check_rule(self, schedule_args: Mapping[str, Any]) -> None:
        """Raise before the model is copied if this class has no averaging rule or a preset's
        arguments are bad."""
        cls = type(self)
        if self.schedule_type is not None:
            # A deferred argument may be None until later (CosineEMA's max_steps): check the
            # others. The schedule built here is the one in force when none is deferred.
            known = {k: v for k, v in schedule_args.items() if not (v is None and k in self.deferred_args)}
            schedule = self.schedule_type(**known)
            if len(known) == len(schedule_args):
                self._schedule_cache = (tuple(schedule_args.values()), schedule)
            return
        if schedule_args:
            raise TypeError(f"{cls.__name__} takes no schedule arguments, got {sorted(schedule_args)}")
        if not self.custom_rule and cls.make_schedule is BaseAveragedModel.make_schedule:
            raise TypeError(
                f"{cls.__name__} defines no averaging rule: set schedule_type, override avg_func or "
                "make_schedule, or use ExponentialMovingAverage / StochasticWeightAverage"
            )

    def select_tensors(self, source: nn.Module, state: Mapping[str, StateEntry]) -> dict[str, str]:
        """Per canonical name, ``"avg"``, ``"copy"`` or ``"skip"`` where the default rule
        (average floating parameters, and floating buffers if ``update_buffers``) does not
        apply. ``"skip"`` tensors are shared with the model, never copied or saved. Called once,
        at construction; override it to choose what is averaged."""
        return {}

    # -- the rule ------------------------------------------------------------------------

    def make_schedule(self) -> Schedule:
        """The momentum schedule in force: ``schedule_type`` built from the attributes named
        by the preset's arguments (rebuilt only when one of them changed)."""
        if self.schedule_type is None:
            raise NotImplementedError(f"{type(self).__name__} has no schedule_type: override make_schedule")
        key = tuple(getattr(self, name) for name in self._schedule_args)
        if self._schedule_cache is None or self._schedule_cache[0] != key:
            with warnings.catch_warnings():  # given once, when the average was built
                warnings.simplefilter("ignore", ConventionWarning)
                schedule = self.schedule_type(**dict(zip(self._schedule_args, key, strict=True)))
            self._schedule_cache = (key, schedule)
        return self._schedule_cache[1]

    @property
    def schedule(self) -> Schedule:
        """The :class:`~polyak.schedules.Schedule` in force (changing ``momentum`` takes effect
        at the next update)."""
        return self.make_schedule()

    @property
    def custom_rule(self) -> bool:
        """Whether updates run a rule written per tensor (an overridden :meth:`avg_func`)
        instead of the schedule on the fused path."""
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

    @property
    def needs_total_steps(self) -> bool:
        """Whether the schedule still needs the run's total number of optimizer steps
        (:meth:`set_total_steps`); the integrations ask this, so that they compute it only
        when it is needed."""
        return False

    def set_total_steps(self, total: int) -> None:
        """Give the average the run's total number of optimizer steps, for schedules defined
        over the whole run (:class:`~polyak.CosineEMA`); others ignore it."""

    # -- counting ------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """The number of earlier ``update_parameters`` calls that counted."""
        return self._steps

    @steps.setter
    def steps(self, value: int | Tensor) -> None:
        self._steps = check_count("steps", value)

    def counters(self) -> dict[str, int]:
        """The integers saved beside the weights (as int64 CPU tensors in ``state_dict()``)."""
        return {"steps": self._steps}

    def load_counters(self, values: Mapping[str, int]) -> None:
        """Set the counters from saved ones (the keys of :attr:`counter_keys` that are present).
        A missing ``steps`` means 0, with a warning: the next update re-initialises the
        average from the model, as mmagic does."""
        if "steps" not in values:
            warnings.warn(
                f"{type(self).__name__}: the state dict has no 'steps'; starting from 0, so the next "
                "update re-initialises the average from the model",
                stacklevel=warning_stacklevel(),
            )
        self._steps = check_count("steps", values.get("steps", 0))

    # -- updates -------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the averaged model."""
        if self._side is not None:
            self._side.wait()
        return self.module(*args, **kwargs)

    def update_parameters(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (see the class formula)."""
        update = self.next_update()
        self.apply_update(model, update)
        self.commit_update(update)

    def next_update(self) -> Update:
        """What the next :meth:`update_parameters` does, and with which weight; changes
        nothing. Raises :class:`RuntimeError` inside :meth:`swapped`."""
        self._check_not_swapped("update_parameters")
        steps = self._steps
        if steps == 0:
            return Update("copy", 1.0)
        if steps % self.interval:
            return Update("hold")
        if self.custom_rule:
            return Update("custom")
        return Update("average", self.momentum_at(steps))

    def apply_update(self, model: nn.Module, update: Update) -> None:
        """Change the averaged tensors as ``update`` says (the counters do not move: see
        :meth:`commit_update`)."""
        self.check_model(model)
        kind = update.kind
        if kind == "average":
            if self._side is not None:
                self._side_average(model, update.weight, self._steps)  # type: ignore[arg-type]
                return
            self._engine.average_(model, update.weight, step=self._steps)  # type: ignore[arg-type]
        elif kind == "copy":
            self._engine.copy_(model, "all")
        elif kind == "hold":
            self._engine.copy_(model, "copy")
        elif kind == "custom":
            self.apply_custom_rule(model, self._steps)
        else:
            raise ValueError(f"unknown update kind {kind!r}")

    def _side_average(self, model: nn.Module, weight: Weight, step: int | None) -> None:
        """An averaging update with ``side_stream``: the copied tensors on the current stream,
        the averaging kernels on the side stream."""
        self._engine.copy_(model, "copy")
        self._side.average_(self._engine, model, weight, step)  # type: ignore[union-attr]

    def wait(self) -> None:
        """With ``side_stream``: make the current CUDA stream wait (on the device) for the
        latest update enqueued on the side stream. Every method of the average that reads or
        writes it does this itself; call it before using ``.module``'s tensors directly. Does
        nothing otherwise."""
        if self._side is not None:
            self._side.wait()

    def commit_update(self, update: Update) -> None:
        """Count an applied update: ``steps += 1`` (unless it does not count) and remember its
        weight for :attr:`current_momentum`."""
        if not update.counted:
            return
        if update.kind != "hold":
            self._last_momentum = update.weight
            if update.kind == "average" and isinstance(update.weight, float):
                self._warn_if_lost(update.weight)
        self._steps += 1

    def _warn_if_lost(self, weight: float) -> None:
        """Warn once when round-to-nearest in a coarse dtype swallows updates of ``weight``
        (host arithmetic on the weight alone: no device read)."""
        if self.rounding == "stochastic" or "lost" in self.health_watch.warned:
            return
        coarse = self.__dict__.get("_coarse")
        if coarse is None:
            kinds = self.tensor_kinds()
            dtypes = {t.dtype for n, t in self.module.state_dict().items() if kinds.get(n) == "avg"}
            coarse = self.__dict__["_coarse"] = {d: stall_ratio(d, 1.0) for d in dtypes if stall_ratio(d, 1.0)}
        if not coarse or max(coarse.values()) / weight < LOST_RATIO:
            return
        self.health_watch.warned.add("lost")
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in coarse))
        warnings.warn(
            f"{type(self).__name__}: an update of weight {weight:.3g} into a {names} average moves an element "
            f"only where the model differs from it by more than {max(coarse.values()) / weight:.3g} times the "
            "element's value, so nearly every update is lost and the average stalls: keep the average in "
            "float32 (the default) or use rounding='stochastic'",
            UserWarning,
            stacklevel=warning_stacklevel(),
        )

    def check_model(self, model: nn.Module, what: str = "update_parameters") -> None:
        """Raise :class:`ValueError` if ``model`` is an average (this one, another, or the module
        inside one) rather than the model it averages: ``update_parameters(ema)`` would fold the
        average into itself and count a step, ``swapped(ema)`` would exchange it with itself."""
        accepted = self._accepted
        if accepted is not None and accepted() is model:
            return
        inner = unwrap_model(model) if isinstance(model, nn.Module) else model
        if isinstance(inner, BaseAveragedModel) or inner in _AVERAGE_MODULES:
            whose = "this average" if inner is self or inner is self.module else "another average"
            raise ValueError(
                f"{what}() was given {whose} ({type(inner).__name__}), not the model being trained: "
                f"pass the live model, e.g. ema.{what}(model)"
            )
        self._accepted = weakref.ref(model)

    def apply_custom_rule(self, model: nn.Module, steps: int) -> None:
        """One update by the per-tensor rule: :meth:`avg_func` on every averaged tensor, then a
        copy of the others. Override it for rules over all tensors at once (torch's
        ``multi_avg_fn``)."""
        with torch.no_grad():
            for _, kind, avg, src in self._engine.pairs(model):
                if kind == "avg":
                    self.avg_func(avg, src.to(device=avg.device, dtype=avg.dtype), steps)
        self._engine.copy_(model, "copy")

    @property
    def engine(self) -> AveragingEngine:
        """The engine that updates ``.module`` (for :func:`polyak.engine.average_many_`). With
        ``side_stream``, the current stream first waits for the side stream's latest update:
        whoever drives the engine (:class:`~polyak.AverageGroup`) works on the current stream."""
        self.wait()
        return self._engine

    def pairs(self, model: nn.Module) -> Iterator[tuple[str, str, Tensor, Tensor]]:
        """``(name, kind, averaged tensor, model tensor)`` for every tensor matched with
        ``model`` (names without wrapper prefixes; kind ``"avg"`` or ``"copy"``; for a sharded
        model, the local shards)."""
        self.wait()
        return iter(self._engine.pairs(model))

    def tensor_kinds(self) -> dict[str, str]:
        """What each tensor of ``.module`` is, by its name in ``module.state_dict()``:
        ``"avg"`` (averaged), ``"copy"`` (copied from the model) or ``"skip"`` (shared with the
        model)."""
        return {e.path: self._engine.kind(e) for e in self._engine.target_state().values()}  # no tensor read

    def health(self, model: nn.Module, *, warn: bool = True) -> Health:
        """A health report of the average against the live ``model`` (:class:`polyak.health.Health`):
        distance to the live weights, the share of an update the average's precision keeps,
        the horizon in steps, the tensors averaged, copied and skipped, and what is wrong.

        Computed on the device with no host synchronisation; :meth:`Health.values` (or
        printing the report) reads it. With ``warn`` (the default), reading it warns once per
        average about each kind of problem found: a stalled low-precision average (naming the
        tensors), tensors farther from the live weights than their own norm (naming them), an
        average never updated, a :meth:`swapped` block left open, NaN or inf.

        >>> # print(ema.health(model))
        """
        self.check_model(model, "health")
        self.wait()
        return measure(self, model, owner=type(self).__name__, watch=self.health_watch, warn=warn)

    @property
    def last_health(self) -> dict[str, Any] | None:
        """The latest health report read (:meth:`health`, then :meth:`Health.values`): ``steps``,
        ``distance``, ``moved``, ``horizon``, ``averaged``, ``copied``, ``skipped``,
        ``problems``; saved in polyak's checkpoints and printed by ``polyak inspect``. None
        before the first read."""
        last = self.health_watch.last
        return None if last is None else dict(last)

    @property
    def health_watch(self) -> HealthWatch:
        """The problems this average has warned about (each kind once)."""
        watch = self.__dict__.get("_watch")
        if watch is None:  # an average pickled before health reports existed
            watch = self.__dict__["_watch"] = HealthWatch()
        return watch

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
        """One averaging update with an explicit ``weight``: a float in [0, 1], or a 0-d
        floating tensor on the average's device, for callers that keep their step count on the
        device. A tensor weight is read by the kernel, never by the host, so it is not checked:
        its value is the caller's responsibility. Does not touch ``steps``."""
        if isinstance(weight, Tensor):
            if weight.numel() != 1 or not weight.is_floating_point():
                raise ValueError(
                    f"weight must be a float or a 0-d floating tensor, got {weight.dtype} {tuple(weight.shape)}"
                )
        else:
            weight = check_number("weight", weight, 0.0, 1.0)
        self._check_not_swapped("average_")
        self.check_model(model, "average_")
        if self._side is not None:
            self._side_average(model, weight, None)
            return
        self._engine.average_(model, weight)

    def sync_parameters(self, model: nn.Module) -> None:
        """Copy every parameter and buffer of ``model`` into the average (mmagic's name)."""
        self._check_not_swapped("sync_parameters")
        self.check_model(model, "sync_parameters")
        self.wait()
        self._engine.copy_(model, "all")

    def sync_buffers(self, model: nn.Module) -> None:
        """Copy every buffer of ``model`` into the average (mmagic's name)."""
        self._check_not_swapped("sync_buffers")
        self.check_model(model, "sync_buffers")
        self.wait()
        self._engine.copy_(model, "buffers")

    # -- using the average ----------------------------------------------------------------

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

        The exchange in and out is never left halfway: a Ctrl-C arriving during it is held back
        and delivered once it is complete (in the block, or after the live weights are back),
        and an error during it undoes the tensors already exchanged.

        The block must not change the model's averaged tensors: what it finds in them is the
        average. At the end of the block polyak checks, and raises :class:`RuntimeError` after
        putting back what it can, when:

        * the tensors were replaced (``model.half()``, ``.to()``, ``p.data = ...``, a new
          Parameter or submodule): the average gets its own values back, and, where the model
          still matches the average by name and shape, its new tensors get the live weights
          (cast); otherwise the model keeps what the block made of it;
        * they were written in place (``model.load_state_dict(...)``, an optimizer step; seen
          through tensor version counters): the model gets its live weights back; with an
          exchange (same dtype) the average's values were those overwritten, so the average
          then holds a copy of the live weights, and the error says the average is lost; with a
          backup (different dtypes) the average is intact.

        >>> # with ema.swapped(model):
        >>> #     evaluate(model)
        """
        self._check_not_swapped("swapped")
        self.check_model(model, "swapped")
        if self._steps == 0:
            raise RuntimeError(
                f"{type(self).__name__} has not been updated yet: call update_parameters(model) "
                "before swapping the average in"
            )
        self._reshard(model)
        self.wait()
        binding = self._engine.bind(model)
        pairs = [(a, b) for _, kind, a, b in self._engine.pairs(model) if kind == "avg"]
        exact = all(a.dtype == b.dtype for a, b in pairs)
        with HeldInterrupts() as held, torch.no_grad():
            backup = _swap_in(pairs, exact)
            self._swapped = True
            versions = [b._version for _, b in pairs]
        try:
            held.deliver()
            yield model
        finally:
            with HeldInterrupts() as held:
                self._reshard(model)
                problem = self._swap_out(model, binding, pairs, backup, versions)
                self._swapped = False
            held.deliver()
            if problem is not None:
                raise RuntimeError(problem)

    def _swap_out(
        self,
        model: nn.Module,
        binding: Any,
        pairs: list[tuple[Tensor, Tensor]],
        backup: list[Tensor] | None,
        versions: list[int],
    ) -> str | None:
        """Put the live weights back after a :meth:`swapped` block; returns what went wrong
        inside it (see :meth:`swapped`), or None."""
        replaced = not binding.fresh(full=True)
        written = [b._version for _, b in pairs] != versions
        with torch.no_grad():
            if backup is None and written and not replaced:
                # The average's values in the model were overwritten: the live weights go back
                # into the model and the average keeps a copy of them.
                torch._foreach_copy_([b for _, b in pairs], [a for a, _ in pairs])
            else:
                _swap_back(pairs, backup)
        if replaced:
            moved = self._give_live_weights(model, pairs)
            what = "the live weights are in its new tensors" if moved else "it keeps what the block made of it"
            return (
                "the model's averaged tensors were replaced inside swapped() (model.half(), .to(), p.data = ..., "
                f"or a new parameter or submodule): the average is restored; {what}"
            )
        if written:
            lost = "the average was lost (it held those values) and now holds a copy of the live weights"
            kept = "the average is intact"
            return (
                "the model's averaged tensors were written in place inside swapped() (load_state_dict, an "
                f"optimizer step?): the model has its live weights back; {lost if backup is None else kept}"
            )
        return None

    def _give_live_weights(self, model: nn.Module, pairs: list[tuple[Tensor, Tensor]]) -> bool:
        """After the model's tensors were replaced in a swapped block: copy the live weights (in
        the old tensors) into its new ones, where it still matches the average."""
        try:
            now = [live for _, kind, _, live in self._engine.pairs(model) if kind == "avg"]
        except ValueError:
            return False
        if [t.shape for t in now] != [b.shape for _, b in pairs]:
            return False
        with torch.no_grad():
            for new, (_, old) in zip(now, pairs, strict=True):
                if new is not old:
                    new.copy_(old)
        return True

    def copy_to(self, model: nn.Module) -> None:
        """Write the average (parameters and buffers) into ``model`` permanently."""
        self._check_not_swapped("copy_to")
        self.check_model(model, "copy_to")
        self._reshard(model)
        self.wait()
        self._engine.write_to_(model, "all")

    def _reshard(self, model: nn.Module) -> None:
        if isinstance(self.module, ShardedAverageModule):
            reshard(model)

    def _check_not_swapped(self, what: str) -> None:
        if self._swapped:
            raise RuntimeError(f"{what}() inside swapped(): the average holds the live weights until the block ends")

    # -- state ---------------------------------------------------------------------------

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """The average as a plain state dict of the model: ``module.state_dict()`` without the
        tensors shared with the model (``frozen="skip"``), detached; what a bare model loads."""
        counters = set(self.counter_keys)
        out = {}
        for k, v in self.state_dict().items():
            if k not in counters:
                out[k.removeprefix("module.")] = v.detach()
        return out

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self._check_not_swapped("state_dict")
        self.wait()
        for k, v in self.counters().items():
            destination[prefix + k] = torch.tensor(v, dtype=torch.long)
        super()._save_to_state_dict(destination, prefix, keep_vars)

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
        counters = self.counter_keys
        missing = [k for k in own if k not in sd and k not in counters]
        unexpected = [k for k in sd if k not in own and k not in counters]
        errors = _key_errors(missing, unexpected) if strict else []
        errors += _value_errors(sd, own, counters)
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(errors))

        def apply() -> None:
            self.wait()
            _copy_into(own, {k: v for k, v in sd.items() if k in own and k not in counters})
            self.load_counters({k: int(sd[k]) for k in counters if k in sd})

        return apply, _IncompatibleKeys(missing, unexpected)

    def _normalise_keys(self, state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        """Add the ``module.`` prefix to keys saved without it (OpenMMLab 1.0 layout)."""
        counters = self.counter_keys
        out = {}
        for k, v in state_dict.items():
            if k.startswith(prefix):
                rest = k[len(prefix) :]
                if rest not in counters and not rest.startswith("module."):
                    k = prefix + "module." + rest
            out[k] = v
        return out

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
        # ``generator_ema``): accept legacy keys, check everything as load_state_dict does, and
        # read the counters here; torch's recursion into ``.module`` then copies the tensors.
        normalised = self._normalise_keys(state_dict, prefix)
        state_dict.clear()
        state_dict.update(normalised)
        ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        try:
            self.prepare_load(ours, strict)
        except RuntimeError as e:
            # Nothing of the average may change: the recursion copies its own values back.
            error_msgs.append(str(e))
            for k, t in self.state_dict(keep_vars=True).items():
                if k not in self.counter_keys:
                    state_dict[prefix + k] = t.detach()
            for k in self.counter_keys:
                state_dict.pop(prefix + k, None)
            return
        counters = self.counter_keys
        self.load_counters({k: int(state_dict.pop(prefix + k)) for k in counters if prefix + k in state_dict})
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn: Any, recurse: bool = True) -> BaseAveragedModel:
        # Tensors shared with the model (frozen="skip") are the model's: leave them alone.
        self.wait()
        shared = [(owner, key, owner.pop(key)) for owner, key in self._shared_slots()]
        try:
            out = super()._apply(fn, recurse)
        finally:
            for owner, key, t in shared:
                owner[key] = t
            self._engine.invalidate()
            self.__dict__.pop("_coarse", None)  # the dtypes may have changed
            if self.__dict__.get("side_stream"):
                self._side = side_stream_for(self.module)  # the device may have changed
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
        state["_accepted"] = None
        state["_side"] = None  # a CUDA stream is not pickled: made again on load
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _AVERAGE_MODULES.add(self.module)
        self._engine = self._make_engine()
        self.__dict__.setdefault("side_stream", False)  # an average pickled before the option existed
        self._side = side_stream_for(self.module) if self.side_stream else None

    def extra_repr(self) -> str:
        try:
            rule = "avg_func" if self.custom_rule else repr(self.schedule)
        except ValueError as e:  # e.g. CosineEMA before max_steps is known
            rule = f"<{e}>"
        return f"steps={self._steps}, interval={self.interval}, rule={rule}"


def _swap_in(pairs: list[tuple[Tensor, Tensor]], exact: bool) -> list[Tensor] | None:
    """Put each average tensor ``a`` into its live tensor ``b``: exchanged when the dtypes are
    the same (returns None), else copied after a backup of the live ones (returns it). On an
    error nothing stays changed."""
    if exact:
        _exchange(pairs)
        return None
    backup = [b.clone() for _, b in pairs]
    try:
        for a, b in pairs:
            b.copy_(a)
    except BaseException:
        torch._foreach_copy_([b for _, b in pairs], backup)
        raise
    return backup


def _swap_back(pairs: list[tuple[Tensor, Tensor]], backup: list[Tensor] | None) -> None:
    if backup is None:
        _exchange(pairs)
    else:
        torch._foreach_copy_([b for _, b in pairs], backup)


def _exchange(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """Exchange the values of each pair in place, one tensor of extra memory at a time; on an
    error, the pairs already exchanged are exchanged back."""
    done = 0
    try:
        for a, b in pairs:
            tmp = b.clone()
            b.copy_(a)
            a.copy_(tmp)
            done += 1
    except BaseException:
        for a, b in reversed(pairs[:done]):
            tmp = b.clone()
            b.copy_(a)
            a.copy_(tmp)
        raise


def _drop_skipped(module: BaseAveragedModel, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for path in module._skipped:
        state_dict.pop(prefix + "module." + path, None)


def _few(keys: list[str], n: int = 5) -> str:
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"


def _key_errors(missing: list[str], unexpected: list[str]) -> list[str]:
    """What a strict load reports about keys."""
    errors = []
    if missing:
        errors.append(f"missing keys: {_few(missing)}")
    if unexpected:
        errors.append(f"unexpected keys: {_few(unexpected)}")
    return errors


def _value_errors(sd: Mapping[str, Any], own: Mapping[str, Tensor], counters: tuple[str, ...]) -> list[str]:
    """What is wrong with the values of the keys the average reads: each must be a tensor, a
    counter a single integer, a tensor of the average's shape, and averaged where the average
    averages."""
    errors = []
    for k, v in sd.items():
        if k not in own and k not in counters:
            continue
        if not isinstance(v, Tensor):
            errors.append(f"{k!r} is a {type(v).__name__}, not a tensor")
        elif k in counters:
            try:
                check_count(k, v)
            except ValueError:
                shown = v.item() if v.numel() == 1 else f"shape {tuple(v.shape)}"
                errors.append(f"{k!r} must be a single non-negative integer, got {v.dtype} {shown}")
        elif v.shape != own[k].shape:
            errors.append(f"{k!r} has shape {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the average")
        elif (is_averaged(v) and not is_averaged(own[k])) or (v.is_complex() and not own[k].is_complex()):
            errors.append(f"{k!r} is {v.dtype} in the file but {own[k].dtype} in the average")
    return errors


def _copy_into(own: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> None:
    """Write checked values into the average's tensors (a full tensor into a DTensor's shard)."""
    with torch.no_grad():
        for k, v in values.items():
            if is_dtensor(own[k]) or is_dtensor(v):
                copy_full_(own[k], v)
            else:
                own[k].copy_(v)
