"""``AveragedModel``: torch.optim.swa_utils' averaged model, on polyak's engine, with any schedule."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .models import AVERAGES, BaseAveragedModel
from .schedules import ConstantMomentum, EqualAverage, Schedule
from .tensors import StateEntry, is_averaged
from .validation import check_choice, check_count

__all__ = ["AveragedModel"]

AvgFn = Callable[[Tensor, Tensor, Tensor], Tensor]
MultiAvgFn = Callable[[list[Tensor], list[Tensor], Tensor], None]
Filter = Callable[[nn.Module, str], bool]

_FROZEN = ("average", "copy", "skip")


def _torch_rule(fn: Callable[..., Any] | None) -> Schedule | None:
    """The schedule equivalent to one of torch's ``get_{ema,swa}_[multi_]avg_fn`` closures, so
    that they run on the fused path; None for anything else (called as given)."""
    if fn is None:
        return None
    fn = inspect.unwrap(fn)  # torch decorates them with no_grad
    if getattr(fn, "__module__", None) != "torch.optim.swa_utils":
        return None
    outer = getattr(fn, "__qualname__", "").split(".<locals>.")[0]
    if outer in ("get_swa_multi_avg_fn", "get_swa_avg_fn"):
        return EqualAverage()
    if outer in ("get_ema_multi_avg_fn", "get_ema_avg_fn"):
        names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
        cells = getattr(fn, "__closure__", None) or ()
        values = {n: c.cell_contents for n, c in zip(names, cells, strict=True)}
        decay = values.get("decay")
        if isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0:
            return ConstantMomentum(decay=float(decay))
    return None


@AVERAGES.register
class AveragedModel(BaseAveragedModel):
    """A running average of a model: ``torch.optim.swa_utils.AveragedModel``'s interface, with
    any polyak schedule and a choice of what is averaged.

    .. math:: \\bar\\theta_{n+1} = \\bar\\theta_n + m_k(s)\\,(\\theta - \\bar\\theta_n)

    where :math:`m_k(s)` is ``schedule``'s interval-compensated momentum at ``steps``
    :math:`s` (see :class:`~polyak.BaseAveragedModel`); by default the equal average of
    SWA, :math:`m = 1/(n+1)` after :math:`n` snapshots, as torch.

    Used torch's way it is a drop-in replacement: ``avg_fn(averaged, current, n_averaged)``
    (returns the new value) or ``multi_avg_fn(averaged_list, current_list, n_averaged)`` (in
    place) are called as torch calls them, ``n_averaged`` counts the averaged snapshots, the
    first ``update_parameters`` copies, and ``state_dict()`` holds ``n_averaged`` and
    ``module.*``. torch's own ``get_ema_multi_avg_fn(decay)``, ``get_ema_avg_fn``,
    ``get_swa_multi_avg_fn`` and ``get_swa_avg_fn`` are recognised and run on the fused path
    with the same numbers. Unlike torch, integer buffers are copied, never averaged and
    truncated, and tensors are matched by name.

    What is averaged: floating parameters (and floating buffers with ``use_buffers=True``) that
    pass ``include`` / ``exclude`` (fnmatch globs on the names without wrapper prefixes) and
    ``filter(module, name)``; the others are copied from the model at every update.
    Parameters with ``requires_grad=False`` in the model at construction follow ``frozen``:
    ``"average"`` (as the others), ``"copy"`` (copied, as diffusers does), or ``"skip"``
    (shared with the model: never copied, updated or saved, so the average of a LoRA
    fine-tune holds only the adapter). ``trainable_only=True`` means ``frozen="skip"`` unless
    ``frozen="copy"`` is given.

    Args:
        model: the model to average (wrappers removed).
        device: keep the average there.
        avg_fn, multi_avg_fn: torch's averaging functions (at most one, and not with
            ``schedule``).
        use_buffers: average floating buffers too (torch's name for ``update_buffers``).
        schedule: a :class:`~polyak.schedules.Schedule`; default: equal average (SWA).
        interval, dtype, compensate_interval, rounding,
            side_stream: as :class:`~polyak.BaseAveragedModel`.
        include, exclude, filter, trainable_only, frozen: what is averaged (above). A
            selection that leaves nothing to average is a :class:`ValueError`.

    >>> import polyak, torch
    >>> model = torch.nn.Linear(2, 2)
    >>> ema = polyak.AveragedModel(model, schedule=polyak.schedules.ConstantMomentum(decay=0.999))
    >>> ema.update_parameters(model); int(ema.n_averaged)
    1
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str | None = None,
        avg_fn: AvgFn | None = None,
        multi_avg_fn: MultiAvgFn | None = None,
        use_buffers: bool = False,
        *,
        schedule: Schedule | None = None,
        interval: int = 1,
        dtype: torch.dtype | None = None,
        compensate_interval: bool = True,
        rounding: str = "nearest",
        side_stream: bool = False,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        filter: Filter | None = None,
        trainable_only: bool = False,
        frozen: str | None = None,
    ) -> None:
        given = [n for n, v in (("avg_fn", avg_fn), ("multi_avg_fn", multi_avg_fn), ("schedule", schedule)) if v]
        if len(given) > 1:
            raise ValueError(f"give at most one of avg_fn, multi_avg_fn and schedule, got {' and '.join(given)}")
        if schedule is not None and not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a polyak.schedules.Schedule, got {schedule!r}")
        for name, fn in (("avg_fn", avg_fn), ("multi_avg_fn", multi_avg_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable, got {fn!r}")
        if frozen is None:
            frozen = "skip" if trainable_only else "average"
        check_choice("frozen", frozen, _FROZEN)
        if trainable_only and frozen == "average":
            raise ValueError("trainable_only=True averages no frozen parameter: use frozen='copy' or 'skip'")
        self._include = [include] if isinstance(include, str) else list(include or [])
        self._exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])
        self._filter = filter
        self._frozen = frozen
        known = _torch_rule(avg_fn or multi_avg_fn)
        self._schedule = schedule or known or EqualAverage()
        self.avg_fn = None if known else avg_fn
        self.multi_avg_fn = None if known else multi_avg_fn
        self.use_buffers = bool(use_buffers)
        options = {
            "dtype": dtype,
            "compensate_interval": compensate_interval,
            "rounding": rounding,
            "side_stream": side_stream,
        }
        super().__init__(model, interval, device, use_buffers, **options)

    # -- what is averaged -----------------------------------------------------------------

    def select_tensors(self, source: nn.Module, state: Mapping[str, StateEntry]) -> dict[str, str]:
        owners = {}
        if self._filter is not None:
            for mod in source.modules():
                for table in (mod._parameters, mod._buffers):
                    owners[id(table)] = mod
        kinds: dict[str, str] = {}
        averaged = 0
        for name, e in state.items():
            t = e.tensor
            candidate = is_averaged(t) and (not e.is_buffer or (self.update_buffers and e.persistent))
            if not candidate:
                continue
            if not e.is_buffer and not t.requires_grad and self._frozen != "average":
                kinds[name] = self._frozen
                continue
            chosen = (
                (not self._include or any(fnmatch.fnmatchcase(name, p) for p in self._include))
                and not any(fnmatch.fnmatchcase(name, p) for p in self._exclude)
                and (self._filter is None or bool(self._filter(owners[id(e.owner)], name)))
            )
            if chosen:
                averaged += 1
            else:
                kinds[name] = "copy"
        if averaged == 0:
            raise ValueError(
                "nothing to average: no floating tensor of the model passes the selection "
                f"(include={self._include}, exclude={self._exclude}, filter={self._filter!r}, "
                f"frozen={self._frozen!r})"
            )
        return kinds

    # -- the rule ---------------------------------------------------------------------------

    def make_schedule(self) -> Schedule:
        return self._schedule

    @property
    def custom_rule(self) -> bool:
        return self.avg_fn is not None or self.multi_avg_fn is not None

    @property
    def n_averaged(self) -> Tensor:
        """The number of snapshots in the average (the initial copy included), as torch's
        buffer: a 0-d int64 CPU tensor."""
        return torch.tensor(self._n_averaged(self.steps), dtype=torch.long)

    def _n_averaged(self, steps: int) -> int:
        return -(-steps // self.interval)  # calls at steps 0, k, 2k, ... before `steps`

    def apply_custom_rule(self, model: nn.Module, steps: int) -> None:
        pairs = [(a, s) for _, kind, a, s in self.pairs(model) if kind == "avg"]
        n = self._n_averaged(steps)
        with torch.no_grad():
            sources = [s.to(device=a.device, dtype=a.dtype) for a, s in pairs]
            if self.multi_avg_fn is not None:
                groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
                for (a, _), s in zip(pairs, sources, strict=True):
                    dst, src = groups.setdefault((a.device, a.dtype), ([], []))
                    dst.append(a)
                    src.append(s)
                for (device, _), (dst, src) in groups.items():
                    self.multi_avg_fn(dst, src, torch.tensor(n, dtype=torch.long, device=device))
            else:
                assert self.avg_fn is not None
                for (a, _), s in zip(pairs, sources, strict=True):
                    a.copy_(self.avg_fn(a, s, torch.tensor(n, dtype=torch.long, device=a.device)))
        self.engine.copy_(model, "copy")

    # -- state: torch's keys ----------------------------------------------------------------

    counter_keys = ("n_averaged", "steps")

    def counters(self) -> dict[str, int]:
        counters = {"n_averaged": self._n_averaged(self.steps)}
        if self.interval != 1:
            counters["steps"] = self.steps
        return counters

    def load_counters(self, values: Mapping[str, int]) -> None:
        if "steps" in values:
            self.steps = values["steps"]
        elif "n_averaged" in values:
            n = check_count("n_averaged", values["n_averaged"])
            self.steps = 0 if n == 0 else (n - 1) * self.interval + 1
        else:
            super().load_counters(values)
