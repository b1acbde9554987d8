"""A health report of an average: the numbers that show an average failing without a sound (it
never moves, drifts away from the model, matches nothing, or is left swapped in), computed on
the device when asked for and read on the host only when its values are.

Nothing here runs on the update path: an average that is never asked pays nothing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .validation import warning_stacklevel

__all__ = ["FAR", "STALLED_BELOW", "Averaged", "Health", "HealthWatch", "measure", "stall_ratio"]

#: A tensor whose average is farther from the live tensor than the live tensor's own norm is
#: reported as drifted. An average is a weighted mean of the model's past weights, so it is that
#: far only when the model moved by more than its own norm within the average's horizon: when
#: its weights were replaced, when the average is fed another model, or when training diverges.
FAR = 1.0
#: The share of an update's intended change below which a tensor is reported as stalled.
STALLED_BELOW = 0.5


class Averaged(Protocol):
    """What a report needs of an average: the public face of :class:`polyak.BaseAveragedModel`."""

    interval: int
    rounding: str

    @property
    def steps(self) -> int: ...

    @property
    def is_swapped(self) -> bool: ...

    @property
    def current_momentum(self) -> float | None: ...

    def pairs(self, model: nn.Module) -> Iterator[tuple[str, str, Tensor, Tensor]]: ...

    def tensor_kinds(self) -> dict[str, str]: ...


@dataclass
class Health:
    """One report of an average against the live model (:meth:`polyak.BaseAveragedModel.health`).

    The tensor fields stay on the average's device until :meth:`values` reads them, once (one
    host synchronisation). With :math:`\\bar\\theta_i` an averaged tensor, :math:`\\theta_i` the
    model's, :math:`d_i = \\theta_i - \\bar\\theta_i`, :math:`m` the weight of the latest update
    and :math:`k` the interval:

    * ``distance`` :math:`= \\lVert \\bar\\theta - \\theta \\rVert / \\lVert \\theta \\rVert` over all
      averaged tensors (this rank's shards under FSDP2): how far the average is from the live
      weights, relative to their size;
    * ``moved`` :math:`= \\sum_i \\langle a_i, m d_i \\rangle / \\sum_i \\lVert m d_i \\rVert^2` with
      :math:`a_i = \\mathrm{round}(\\bar\\theta_i + m d_i) - \\bar\\theta_i` in the average's dtype:
      the share of its intended change that an update at the latest weight makes now. 1 for
      float32 averages and for stochastic rounding (unbiased); near 0 for a stalled bfloat16 or
      float16 average;
    * ``horizon`` :math:`= k / m`: the steps the average spans (about ``steps`` for an equal
      average); ``None`` before the first update or for a custom ``avg_func``;
    * ``averaged``, ``copied``, ``skipped``: how many of the average's tensors are each;
    * ``problems``: what is wrong, in words, naming the tensors concerned.
    """

    steps: int
    averaged: int
    copied: int
    skipped: int
    horizon: float | None = None
    distance: Tensor | None = None
    moved: Tensor | None = None
    #: the names of the averaged tensors, in the order of ``per_tensor``'s columns
    names: list[str] = field(default_factory=list)
    #: blocks of shape (2, k): each tensor's relative distance and share moved, on the device
    per_tensor: list[Tensor] = field(default_factory=list)
    #: the tensors whose relative distance is judged (two or more dimensions: weights, kernels
    #: and embeddings, whose norms are set by their initialisation; a bias or a norm's scale can
    #: sit near zero, where any lag is large relative to its norm)
    judged: set[str] = field(default_factory=set)
    #: problems known without reading the device, by kind
    known: dict[str, str] = field(default_factory=dict)
    owner: str = "average"
    #: the average's memory of reports: the latest read is kept there (for checkpoints)
    watch: HealthWatch | None = None
    #: warn about new kinds of problem through ``watch`` when read
    warn: bool = True
    _read: dict[str, Any] | None = field(default=None, repr=False)

    def values(self) -> dict[str, Any]:
        """The report as host numbers (reads the device once; warns once per average about each
        kind of problem when the average watches its health): ``steps``, ``distance``,
        ``moved``, ``horizon``, ``averaged``, ``copied``, ``skipped``, ``stalled`` and ``drifted``
        (tensor names) and ``problems`` (sentences)."""
        if self._read is None:
            self._read = self._evaluate()
            if self.watch is not None:
                self.watch.remember(self._read)
                if self.warn:
                    self.watch.warn(self.owner, self._read["kinds"])
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._read.items() if k != "kinds"}

    def scalars(self) -> dict[str, float]:
        """The numbers of :meth:`values` worth logging as metrics: ``distance``, ``moved`` and
        ``horizon``, those known (the problems are warned about, not logged)."""
        v = self.values()
        return {k: float(v[k]) for k in ("distance", "moved", "horizon") if v[k] is not None}

    def __str__(self) -> str:
        v = self.values()
        parts = [f"steps={v['steps']}"]
        for key in ("distance", "moved", "horizon"):
            if v[key] is not None:
                parts.append(f"{key}={v[key]:.4g}")
        parts.append(f"tensors: {v['averaged']} averaged, {v['copied']} copied, {v['skipped']} skipped")
        lines = [f"{self.owner} health: " + ", ".join(parts)]
        lines += [f"  problem: {p}" for p in v["problems"]] or ["  no problems found"]
        return "\n".join(lines)

    def _evaluate(self) -> dict[str, Any]:
        names = self.names
        device = [t for t in (self.distance, self.moved) if t is not None]
        if self.per_tensor:
            device.append(torch.cat([b.to(torch.float64) for b in self.per_tensor], dim=1).T.reshape(-1))
        host: list[float] = (
            torch.cat([t.detach().double().reshape(-1).cpu() for t in device]).tolist() if device else []
        )
        distance = host[0] if self.distance is not None else None
        moved = host[1] if self.moved is not None else None
        per = host[2:]
        broken = [n for i, n in enumerate(names) if not math.isfinite(per[2 * i])]
        far = [n for i, n in enumerate(names) if n in self.judged and math.isfinite(per[2 * i]) and per[2 * i] > FAR]
        stalled = [n for i, n in enumerate(names) if per[2 * i + 1] < STALLED_BELOW]
        kinds = dict(self.known)
        if broken or (distance is not None and not math.isfinite(distance)):
            where = f" ({_few(broken)})" if broken else ""
            kinds["not_finite"] = f"the average or the live weights hold NaN or inf{where}"
        if stalled:
            kinds["stalled"] = (
                f"an update now would make less than half its intended change to {len(stalled)} averaged "
                f"tensor(s) ({_few(stalled)}): the average's precision cannot hold changes this "
                "small and the average stalls; keep it in float32 (the default) or use rounding='stochastic'"
            )
        if far or (distance is not None and math.isfinite(distance) and distance > FAR):
            which = f"{len(far)} averaged tensor(s) ({_few(far)}) are" if far else "the averaged tensors are"
            kinds["drifted"] = (
                f"{which} farther from the live weights than the live weights' own norm: the model's "
                "weights were replaced after the average was built (load the checkpoint before "
                "building the average, or load it into both), the average is fed another model than "
                "the one it was built from, or training diverges"
            )
        return {
            "steps": self.steps,
            "distance": distance,
            "moved": moved,
            "horizon": self.horizon,
            "averaged": self.averaged,
            "copied": self.copied,
            "skipped": self.skipped,
            "stalled": stalled,
            "drifted": far,
            "problems": list(kinds.values()),
            "kinds": kinds,
        }


def measure(
    average: Averaged, model: nn.Module, *, owner: str = "average", watch: HealthWatch | None = None, warn: bool = True
) -> Health:
    """The :class:`Health` of ``average`` against the live ``model``: one pass over the averaged
    tensors of both on their device (float32 and float64 ones by multi-tensor kernels in batches
    of ``MEASURE_CHUNK`` elements, whose difference, and for a model in another dtype its
    converted copy, are the temporaries; 16-bit ones one at a time), no host synchronisation
    (the numbers are read by :meth:`Health.values`)."""
    kinds = average.tensor_kinds()
    counts = {kind: sum(1 for k in kinds.values() if k == kind) for kind in ("avg", "copy", "skip")}
    weight = average.current_momentum
    report = Health(
        average.steps,
        counts["avg"],
        counts["copy"],
        counts["skip"],
        horizon=average.interval / weight if weight else None,
        owner=owner,
        watch=watch,
        warn=warn,
    )
    if average.steps == 0:
        report.known["never_updated"] = (
            "the average was never updated: call update_parameters(model) after each optimizer step"
        )
    if counts["avg"] == 0:
        report.known["nothing_averaged"] = "the average holds no averaged tensor: every tensor is copied or skipped"
    if average.is_swapped:
        report.known["swapped"] = (
            "the average is swapped into the model: a swapped() block was left open, so training runs on the "
            "averaged weights and the average is not updated"
        )
        return report
    pairs = [(n, a, s) for n, kind, a, s in average.pairs(model) if kind == "avg"]
    if not pairs:
        return report
    check_rounding = bool(weight) and average.rounding != "stochastic"

    def fast(avg: Tensor) -> bool:  # float32/float64: no rounding to check, batched kernels
        return avg.dtype in (torch.float32, torch.float64)

    diff2: list[Tensor] = []
    live2: list[Tensor] = []
    along: list[Tensor] = []
    intended: list[Tensor] = []
    with torch.no_grad():
        for chunk in _chunked([p for p in pairs if fast(p[1])], MEASURE_CHUNK):
            _measure_wide(chunk, report, diff2, live2)
        for name, avg, live in (p for p in pairs if not fast(p[1])):
            d = live.to(device=avg.device, dtype=torch.float32) - avg.float()
            d2 = d.square().sum(dtype=torch.float64)
            l2 = live.float().square().sum(dtype=torch.float64)
            diff2.append(d2.reshape(1))
            live2.append(l2.reshape(1))
            if check_rounding and stall_ratio(avg.dtype, 1.0) > 0:
                step = d.mul_(weight)
                made = (avg.float() + step).to(avg.dtype).float().sub_(avg.float())
                a = (made * step).sum(dtype=torch.float64)
                i = step.square().sum(dtype=torch.float64)
                along.append(a)
                intended.append(i)
                share = torch.where(i > 0, a / i, torch.ones_like(i))
            else:
                share = torch.ones_like(d2)
            report.names.append(name)
            report.per_tensor.append(torch.stack([_relative(d2, l2), share]).reshape(2, 1))
            if avg.dim() >= 2:
                report.judged.add(name)
        report.distance = torch.cat(diff2).sum().sqrt() / torch.cat(live2).sum().sqrt()
        if intended:
            total = torch.stack(intended).sum()
            report.moved = torch.where(total > 0, torch.stack(along).sum() / total, torch.ones_like(total))
        else:
            report.moved = torch.ones((), dtype=torch.float64, device=report.distance.device)
    return report


#: Elements per batch of tensors measured together by multi-tensor kernels (a batch's
#: difference is a temporary of 16 MiB in float32; so is the model's batch converted to the
#: average's dtype, when they differ).
MEASURE_CHUNK = 1 << 22


def _chunked(pairs: list[tuple[str, Tensor, Tensor]], limit: int) -> Iterator[list[tuple[str, Tensor, Tensor]]]:
    batch: list[tuple[str, Tensor, Tensor]] = []
    used = 0
    for p in pairs:
        n = p[1].numel()
        if batch and used + n > limit:
            yield batch
            batch, used = [], 0
        batch.append(p)
        used += n
    if batch:
        yield batch


def _relative(d2: Tensor, l2: Tensor) -> Tensor:
    """sqrt(d2 / l2), and 0 where both are 0 (equal zeros)."""
    return torch.where(d2 == 0, torch.zeros_like(d2), d2.sqrt() / l2.sqrt())


def _measure_wide(
    chunk: list[tuple[str, Tensor, Tensor]], report: Health, diff2: list[Tensor], live2: list[Tensor]
) -> None:
    """Float32/float64 averages, a batch at a time: the difference by one multi-tensor kernel,
    the norms by two (no rounding to check: their share moved is 1)."""
    avgs = [a for _, a, _ in chunk]
    lives = [s.to(device=a.device, dtype=a.dtype) for _, a, s in chunk]  # no copy when they match
    diffs = torch._foreach_sub(lives, avgs)
    d2 = torch.stack(torch._foreach_norm(diffs)).double().square()
    l2 = torch.stack(torch._foreach_norm(lives)).double().square()
    diff2.append(d2)
    live2.append(l2)
    report.names.extend(n for n, _, _ in chunk)
    report.per_tensor.append(torch.stack([_relative(d2, l2), torch.ones_like(d2)]))
    report.judged.update(n for n, a, _ in chunk if a.dim() >= 2)


def stall_ratio(dtype: torch.dtype, weight: float) -> float:
    """How many times its own magnitude the model must differ from a round-to-nearest average in
    ``dtype`` for an update of ``weight`` to move it: :math:`\\epsilon / (2 m)`, with
    :math:`\\epsilon` the dtype's machine epsilon. 0 for float32 and wider (never a concern)."""
    if not dtype.is_floating_point or torch.finfo(dtype).bits >= 32 or weight <= 0:
        return 0.0
    return torch.finfo(dtype).eps / (2 * weight)


def _few(names: list[str], n: int = 4) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


#: The fields of a read report that an average keeps as :attr:`HealthWatch.last` (and
#: :func:`polyak.checkpoint.record` saves as ``"health"``).
KEPT = ("steps", "distance", "moved", "horizon", "averaged", "copied", "skipped", "problems")


class HealthWatch:
    """What an average remembers between reports: the kinds of problem it has warned about
    (each once), and the latest report read."""

    def __init__(self) -> None:
        self.warned: set[str] = set()
        #: the latest report read (:data:`KEPT` fields, plain numbers and strings), or None
        self.last: dict[str, Any] | None = None

    def remember(self, values: dict[str, Any]) -> None:
        """Keep the :data:`KEPT` fields of a report just read."""
        self.last = {k: (list(values[k]) if k == "problems" else values[k]) for k in KEPT}

    def warn(self, owner: str, problems: dict[str, str]) -> None:
        """Warn (:class:`UserWarning`) about each kind of problem not warned about before."""
        for kind, problem in problems.items():
            if kind not in self.warned:
                self.warned.add(kind)
                warnings.warn(f"{owner}: {problem}", UserWarning, stacklevel=warning_stacklevel())
