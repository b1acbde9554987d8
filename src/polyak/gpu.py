"""The GPU path: a side stream for the update, a pinned double-buffered offload, a capturable update.

Three options for training on a GPU, where the averaging update competes with the next forward
pass. Each does nothing on a machine without CUDA: there it falls back to the plain update
(the first two) or runs the same kernels on the CPU (the third).

* **Side stream** (``side_stream=True`` on any averaged model, :class:`SideStream`): the
  averaging kernels are enqueued on a second CUDA stream that first waits for the current one
  (so it sees the optimizer step) and records an event when done. The training stream waits
  on that event (``wait_event``, never a host synchronisation) before the next optimizer step
  (one global optimizer step pre-hook) and before anything reads or writes the average
  (``swapped``, ``copy_to``, ``state_dict``, ``forward`` ...): the update overlaps with the
  next forward and backward pass.
* **Pinned offload** (``device="cpu"`` for a CUDA model, :class:`OffloadGroup`): the model's
  tensors are copied to the host in chunks through two pinned staging buffers; the CPU folds
  chunk :math:`i` into the average while chunk :math:`i + 1` is in flight, and the GPU never
  waits for the host.
* **Capturable update** (:class:`CapturableUpdate`): the step count lives on the device and
  the weight is computed there from the schedule's formula, so an update reads nothing back
  to the host and can be captured in a CUDA graph and replayed.

This module imports only torch, :mod:`polyak.kernels` and :mod:`polyak.schedules`; the engine
selects :class:`OffloadGroup` for pairs whose source is on a CUDA device and whose average is
on the CPU.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .kernels import Weight, adjacent, chunk_ranges, flat_view, foreach_lerp_
from .schedules import (
    ConstantMomentum,
    CosineMomentum,
    EqualAverage,
    ExpMomentum,
    MMCVWarmup,
    MomentumAnnealing,
    NumUpdatesWarmup,
    PowerFunction,
    RampUpMomentum,
    Schedule,
    StartAt,
    Warmup,
)

__all__ = [
    "SideStream",
    "side_stream_for",
    "wait_for_averages",
    "OffloadGroup",
    "CapturableUpdate",
    "update_momentum_on_device",
    "OFFLOAD_CHUNK",
]

#: Elements per chunk of an offloaded update when the engine does not say (its
#: ``STAGING_CHUNK``: 4 MiB in fp32).
OFFLOAD_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# Side stream


#: The side streams whose latest update the training stream has not waited for yet.
_PENDING: weakref.WeakSet[SideStream] = weakref.WeakSet()
_hook: Any = None  # the handle of the global optimizer step pre-hook, once installed


def wait_for_averages() -> None:
    """Make the current CUDA stream wait for every averaging update enqueued on a side stream
    that it has not waited for yet (``wait_event``: no host synchronisation).

    Called before every ``torch.optim.Optimizer.step`` (a global step pre-hook, installed when
    the first side stream is made) and by the averaged models before they are read or written.
    Call it yourself before writing a model's parameters outside an optimizer step (a manual
    ``p.add_``, ``load_state_dict``) while an update may still be running. Does nothing when
    no update is pending (and on a machine without CUDA).
    """
    for side in list(_PENDING):
        side.wait()


def _before_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if _PENDING:
        wait_for_averages()


def _install_hook() -> None:
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_before_optimizer_step)


class SideStream:
    """A CUDA stream that runs the averaging kernels of one average beside the training stream.

    :meth:`average_` enqueues, in order: on the side stream, a wait for the current stream (the
    update sees the optimizer step that came before it), the engine's averaging kernels, and an
    event. :meth:`wait` makes the current stream wait for that event. Until then the update may
    still be reading the model and writing the average, so every write to the model's
    parameters (the optimizer step: a global pre-hook calls :func:`wait_for_averages`) and every
    use of the average waits first.

    The caching allocator stays safe: every tensor the update touches that was allocated on
    another stream (the model's and the average's tensors, the engine's scratch buffers, a
    tensor weight) is marked with ``record_stream`` once per resolved binding, so its memory is
    not given to another stream's allocation before the side stream is done with it; the
    scratch buffers the engine creates during the update are allocated on the side stream.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.event = torch.cuda.Event()
        self.pending = False
        self._recorded: tuple[weakref.ref, int] | None = None  # (binding, number of its plans) marked
        _install_hook()

    def average_(self, engine: Any, source: nn.Module, weight: Weight, step: int | None) -> None:
        """Enqueue ``engine.lerp_`` (the averaging half of an update: one fused kernel per
        group) of ``source`` by ``weight`` on the side stream. ``engine`` is the average's
        :class:`~polyak.engine.AveragingEngine`."""
        binding = engine.bind(source)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(self.stream):
            engine.lerp_(binding, weight, step)
        self.event.record(self.stream)
        self.pending = True
        _PENDING.add(self)
        if isinstance(weight, Tensor) and weight.is_cuda:
            weight.record_stream(self.stream)
        marked = self._recorded
        if marked is None or marked[0]() is not binding or marked[1] != len(binding.plans):
            for t in _tensors_in([binding.dst, binding.src, list(binding.plans.values())]):
                if t.is_cuda:
                    t.record_stream(self.stream)
            self._recorded = (weakref.ref(binding), len(binding.plans))

    def wait(self) -> None:
        """Make the current stream wait for the latest update enqueued here (if it has not)."""
        if self.pending:
            torch.cuda.current_stream(self.device).wait_event(self.event)
            self.pending = False
            _PENDING.discard(self)


def side_stream_for(module: nn.Module) -> SideStream | None:
    """A :class:`SideStream` on the CUDA device that holds ``module``'s tensors, or None when
    they are not all on one CUDA device (a CPU average: the update then runs inline)."""
    devices = {t.device for t in module.parameters()} | {t.device for t in module.buffers()}
    if len(devices) != 1:
        return None
    (device,) = devices
    return SideStream(device) if device.type == "cuda" else None


def _tensors_in(obj: Any, depth: int = 0) -> Iterator[Tensor]:
    """Every tensor reachable from ``obj`` through lists, tuples, dicts and the attributes of
    polyak's own plain objects (the engine's plans), a few levels deep."""
    if isinstance(obj, Tensor):
        yield obj
    elif depth > 6:
        return
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors_in(x, depth + 1)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors_in(x, depth + 1)
    elif type(obj).__module__.startswith("polyak.") and hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
        for x in vars(obj).values():
            yield from _tensors_in(x, depth + 1)


# --------------------------------------------------------------------------------------------
# Pinned, double-buffered offload


def _offload_pieces(dst: Sequence[Tensor], src: Sequence[Tensor], chunk: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Pairs cut into 1-d pieces of at most ``chunk`` elements where both sides are contiguous;
    a pair with a strided side stays whole (the staging buffer is made large enough)."""
    for d, s in zip(dst, src, strict=True):
        n = d.numel()
        if n == 0:
            continue
        if d.is_contiguous() and s.is_contiguous():
            d1, s1 = d.view(-1), s.view(-1)
            for a in range(0, n, chunk):
                yield d1[a : a + chunk], s1[a : a + chunk]
        else:
            yield d, s


@dataclass
class _Chunk:
    """One chunk of an offloaded group: how its sources reach staging buffer ``k`` (``i % 2``)
    and how the average's pieces are then folded from it."""

    numel: int
    direct: Tensor | None = None  # a single contiguous source piece, copied straight to the host
    cat_src: list[Tensor] = field(default_factory=list)  # contiguous 1-d source pieces ...
    cat_out: Tensor | None = None  # ... concatenated here (device scratch, or the host buffer)
    strided_src: list[Tensor] = field(default_factory=list)  # strided sources ...
    strided_out: list[Tensor] = field(default_factory=list)  # ... copied into these shaped views
    targets: list[Tensor] = field(default_factory=list)  # runs of the average
    staged: list[Tensor] = field(default_factory=list)  # the matching views of the staged values


class OffloadGroup:
    """Averages kept on the CPU of a model on a CUDA device: a pipelined, double-buffered update.

    Each update moves the source tensors to the host in chunks of at most ``chunk`` elements
    and folds each chunk into the average,

    .. math:: \\bar\\theta_c \\leftarrow \\bar\\theta_c + w\\,(\\theta_c - \\bar\\theta_c)

    (or :math:`\\bar\\theta_c \\leftarrow \\theta_c` for :meth:`copy_`), one chunk :math:`c`
    at a time, in this order:

    1. a copy stream waits for the current stream (the update sees the optimizer step);
    2. chunk :math:`c` is gathered on the device (one ``cat`` of its contiguous source pieces,
       one ``_foreach_copy_`` of strided ones, into a chunk-sized device scratch; a single
       contiguous piece skips this) and copied with ``non_blocking=True`` into pinned host
       buffer :math:`c \\bmod 2`, then a CUDA event is recorded;
    3. while chunk :math:`c + 1` is gathered and in flight into the other buffer, the host
       waits for chunk :math:`c`'s event, converts it to the average's dtype if they differ
       (a float16/bfloat16 model crosses the bus at its own size) and folds it with one
       ``_foreach_lerp_`` over runs of the average that are adjacent in memory.

    The GPU stream never waits for the host; the host waits for each chunk's copy. A buffer is
    refilled only after the host has folded the chunk it held. Memory: two pinned host buffers
    and two device scratch buffers of one chunk in the source's dtype, and one host buffer in
    the average's dtype when they differ (a tensor with a strided side is staged whole, so a
    buffer holds at least the largest such tensor). The update returns when the average is
    complete, so nothing it reads or writes is used by the device afterwards.

    With sources on the CPU (for tests and CPU-only machines) the same chunks go through
    ordinary host buffers with the same double-buffer order, without streams or events.

    ``dst``, ``src`` and ``gathered`` (empty) and ``staged`` (the same pairs as a plain staging
    plan through one host buffer of the average's dtype, with blocking copies) are what
    :func:`polyak.engine.average_many_` reads of a group when it updates several averages of
    one model at once: there the group takes that simpler path.

    Args:
        dst: the average's tensors (one device and dtype).
        src: the model's tensors, paired by position with ``dst`` (one device and dtype).
        chunk: elements per chunk.
    """

    def __init__(self, dst: Sequence[Tensor], src: Sequence[Tensor], *, chunk: int = OFFLOAD_CHUNK) -> None:
        if len(dst) != len(src):
            raise ValueError(f"{len(dst)} averaged tensors but {len(src)} sources")
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of elements, got {chunk}")
        self.dst: list[Tensor] = []
        self.src: list[Tensor] = []
        self.gathered: list[Any] = []
        self.staged: list[tuple[list[Tensor], list[Tensor], list[Tensor]]] = []
        self.chunks: list[_Chunk] = []
        pieces = list(_offload_pieces(dst, src, chunk))
        if not pieces:
            self.pinned = False
            self.stream = None
            return
        target, source = pieces[0][0], pieces[0][1]
        self.pinned = source.device.type == "cuda" and target.device.type == "cpu"
        sizes = [d.numel() for d, _ in pieces]
        size = max(min(chunk, sum(sizes)), max(sizes))
        host_kw: dict[str, Any] = {"pin_memory": True} if self.pinned else {}
        self.host = [torch.empty(size, dtype=source.dtype, **host_kw) for _ in range(2)]
        self.convert = (
            torch.empty(size, dtype=target.dtype, device=target.device) if target.dtype != source.dtype else None
        )
        self.device_scratch: list[Tensor] = []
        self.stream = torch.cuda.Stream(source.device) if self.pinned else None
        self.events = [torch.cuda.Event(), torch.cuda.Event()] if self.pinned else []
        self.source_device = source.device
        ranges = list(chunk_ranges(sizes, size))
        for i, (a, b) in enumerate(ranges):
            self.chunks.append(self._plan_chunk(pieces[a:b], i % 2, size))
        fallback = self.convert if self.convert is not None else self.host[0]
        for a, b in ranges:
            views, used = [], 0
            for d, _ in pieces[a:b]:
                views.append(fallback[used : used + d.numel()].view(d.shape))
                used += d.numel()
            self.staged.append(([d for d, _ in pieces[a:b]], [s for _, s in pieces[a:b]], views))

    def _scratch(self, k: int, size: int) -> Tensor:
        """Where chunk sources are gathered before the transfer: device scratch ``k`` (made on
        first use) in pinned mode, the host buffer itself otherwise."""
        if not self.pinned:
            return self.host[k]
        while len(self.device_scratch) <= k:
            self.device_scratch.append(torch.empty(size, dtype=self.host[0].dtype, device=self.source_device))
        return self.device_scratch[k]

    def _plan_chunk(self, pieces: list[tuple[Tensor, Tensor]], k: int, size: int) -> _Chunk:
        flat = [(d, s) for d, s in pieces if s.is_contiguous()]
        strided = [(d, s) for d, s in pieces if not s.is_contiguous()]
        ordered = flat + strided  # their order in the staging buffer
        numel = sum(d.numel() for d, _ in ordered)
        c = _Chunk(numel)
        if len(ordered) == 1 and flat:
            c.direct = flat[0][1].view(-1)
        else:
            scratch = self._scratch(k, size)
            n_flat = sum(s.numel() for _, s in flat)
            c.cat_src = [s.view(-1) for _, s in flat]
            c.cat_out = scratch[:n_flat] if flat else None
            used = n_flat
            for _, s in strided:
                c.strided_src.append(s)
                c.strided_out.append(scratch[used : used + s.numel()].view(s.shape))
                used += s.numel()
        staging = self.convert if self.convert is not None else self.host[k]
        # Runs of the average: consecutive contiguous pieces adjacent in memory become one 1-d view.
        runs: list[list[Any]] = []  # [first piece, last piece, offset in the staging buffer, numel]
        offset = 0
        for d, _ in ordered:
            n = d.numel()
            last = runs[-1][1] if runs else None
            if last is not None and last.is_contiguous() and adjacent(last, d):
                runs[-1][1] = d
                runs[-1][3] += n
            else:
                runs.append([d, d, offset, n])
            offset += n
        for first, last, start, m in runs:
            if first is last:
                c.targets.append(first)
                c.staged.append(staging[start : start + m].view(first.shape))
            else:
                c.targets.append(flat_view(first, m))
                c.staged.append(staging[start : start + m])
        return c

    def _fill(self, i: int) -> None:
        """Start moving chunk ``i`` into host buffer ``i % 2`` (asynchronous in pinned mode)."""
        c, k = self.chunks[i], i % 2
        host = self.host[k][: c.numel]
        if c.direct is not None:
            host.copy_(c.direct, non_blocking=self.pinned)
        else:
            if c.cat_out is not None:
                if len(c.cat_src) == 1:
                    c.cat_out.copy_(c.cat_src[0])
                else:
                    torch.cat(c.cat_src, out=c.cat_out)
            if c.strided_src:
                torch._foreach_copy_(c.strided_out, c.strided_src)
            if self.pinned:
                host.copy_(self.device_scratch[k][: c.numel], non_blocking=True)
        if self.pinned:
            self.events[k].record(self.stream)

    def _fold(self, i: int, weight: Weight | None) -> None:
        """Wait for chunk ``i`` on the host and fold it into the average (copy when ``weight``
        is None)."""
        c, k = self.chunks[i], i % 2
        if self.pinned:
            self.events[k].synchronize()
        if self.convert is not None:
            self.convert[: c.numel].copy_(self.host[k][: c.numel])
        if weight is None:
            torch._foreach_copy_(c.targets, c.staged)
        else:
            foreach_lerp_(c.targets, c.staged, weight)

    def _run(self, weight: Weight | None) -> None:
        n = len(self.chunks)
        if not n:
            return
        if self.pinned:
            assert self.stream is not None
            self.stream.wait_stream(torch.cuda.current_stream(self.source_device))
            with torch.cuda.stream(self.stream):
                self._pipeline(n, weight)
        else:
            self._pipeline(n, weight)

    def _pipeline(self, n: int, weight: Weight | None) -> None:
        self._fill(0)
        for i in range(n):
            if i + 1 < n:
                self._fill(i + 1)  # in flight while chunk i is folded
            self._fold(i, weight)

    def lerp_(self, weight: Weight) -> None:
        """Move the average toward the source by ``weight`` (a float, or a 0-d tensor on the
        average's device)."""
        self._run(weight)

    def copy_(self) -> None:
        """Copy the source into the average."""
        self._run(None)


# --------------------------------------------------------------------------------------------
# The weight on the device, for a capturable update


def _momentum_on_device(schedule: Schedule) -> Callable[[Tensor], Tensor]:
    """The schedule's ``momentum(step)`` as torch operations on a float64 tensor of steps, the
    same formula as its docstring and its host code; :class:`ValueError` for a schedule whose
    formula has no torch form here."""
    s = schedule
    kind = type(s)
    if kind is ConstantMomentum:
        value = s.momentum(0)
        return lambda j: torch.full_like(j, value)
    if kind is MomentumAnnealing:
        floor, gamma = s.floor, s.gamma
        return lambda j: torch.clamp_min(gamma / (gamma + j), floor)
    if kind is RampUpMomentum:
        kimg, rampup, batch, eps = s.ema_kimg * 1000.0, s.ema_rampup, float(s.batch_size), s.eps

        def ramp(j: Tensor) -> Tensor:
            nimg = torch.full_like(j, kimg)
            if rampup is not None:
                nimg = torch.clamp_max((j + 1) * batch * rampup, kimg)
            return 1.0 - torch.pow(0.5, batch / torch.clamp_min(nimg, eps))

        return ramp
    if kind is CosineMomentum:
        start, end, total = s.start, s.end, float(s.max_steps)
        return lambda j: end - (end - start) * (torch.cos(math.pi * torch.clamp_max(j, total) / total) + 1) / 2
    if kind is Warmup:
        t0, inv_gamma, power, lo, hi, on = (
            s.update_after_step,
            s.inv_gamma,
            s.power,
            s.min_decay,
            s.max_decay,
            s.warmup,
        )

        def warm(j: Tensor) -> Tensor:
            since = j - t0
            if on:
                decay = torch.clamp(1.0 - (1.0 + torch.clamp_min(since, 0.0) / inv_gamma) ** -power, lo, hi)
            else:
                decay = torch.full_like(j, hi)
            return 1.0 - torch.where(since <= 0, 0.0, decay)

        return warm
    if kind is NumUpdatesWarmup:
        hi = s.max_decay
        return lambda j: 1.0 - torch.clamp_max((1.0 + j) / (10.0 + j), hi)
    if kind is ExpMomentum:
        floor, gamma = s.floor, s.gamma
        return lambda j: (1.0 - floor) * torch.exp(-(1.0 + j) / gamma) + floor
    if kind is MMCVWarmup:
        value, warm_up = s.value, float(s.warm_up)
        return lambda j: torch.clamp_max((1.0 + j) / (warm_up + j), value)
    if kind is PowerFunction:
        exponent = s.gamma + 1.0
        return lambda j: 1.0 - (j / (j + 1.0)) ** exponent
    supported = ", ".join(
        c.__name__
        for c in (
            ConstantMomentum,
            MomentumAnnealing,
            EqualAverage,
            RampUpMomentum,
            CosineMomentum,
            Warmup,
            NumUpdatesWarmup,
            ExpMomentum,
            MMCVWarmup,
            PowerFunction,
            StartAt,
        )
    )
    raise ValueError(
        f"the schedule {s!r} ({kind.__module__}.{kind.__qualname__}) has no formula on the device: a "
        f"capturable update supports {supported} (exactly these classes, not subclasses)"
    )


def update_momentum_on_device(schedule: Schedule, steps: Tensor, interval: int, *, compensate: bool = True) -> Tensor:
    """:func:`polyak.schedules.interval_momentum` computed on the device: the weight of an
    averaging update at ``steps`` (an int64 0-d tensor) that stands for ``interval`` steps,

    .. math:: m_k(s) = 1 - \\prod_{j = s - k + 1}^{s} \\bigl(1 - m(j)\\bigr)

    in float64, as a 0-d tensor on ``steps``' device, with no host read: the product is taken
    in log space (``log1p``/``expm1``) and is 1 when any :math:`m(j) \\ge 1`, as on the host;
    :class:`~polyak.schedules.EqualAverage` is :math:`1/(\\lfloor s/k \\rfloor + 1)` and
    :class:`~polyak.schedules.StartAt` copies (1) while the window reaches back before its
    start. ``compensate=False`` gives :math:`m(s)`. Raises :class:`ValueError` naming a
    schedule whose formula is not written in torch operations here.
    """
    kind = type(schedule)
    if kind is EqualAverage:
        return 1.0 / (torch.div(steps, interval, rounding_mode="floor").to(torch.float64) + 1.0)
    if kind is StartAt:
        assert isinstance(schedule, StartAt)
        start = schedule.start
        inner = update_momentum_on_device(
            schedule.inner, torch.clamp_min(steps - start, 0), interval, compensate=compensate
        )
        copy = steps < start
        if compensate:
            copy = copy | (steps - interval + 1 < start)
        return torch.where(copy, 1.0, inner)
    momentum = _momentum_on_device(schedule)
    if not compensate or interval == 1:
        return momentum(steps.to(torch.float64))
    window = steps + torch.arange(1 - interval, 1, device=steps.device)  # s - k + 1 ... s
    inside = window >= 0  # a window reaching back before step 0 starts at 0
    m = momentum(torch.clamp_min(window, 0).to(torch.float64))
    saturated = ((m >= 1.0) & inside).any()
    log_keep = torch.where(inside, torch.log1p(-torch.clamp_max(m, 1.0)), 0.0).sum()
    return torch.where(saturated, 1.0, -torch.expm1(log_keep))


def _defines(obj: Any, name: str, owner: str) -> bool:
    """Whether ``obj``'s method ``name`` is the one defined on the class named ``owner``."""
    return getattr(type(obj), name).__qualname__ == f"{owner}.{name}"


class CapturableUpdate:
    """``average.update_parameters(model)`` with the step count on the device: no host read,
    so it can be captured in a CUDA graph and replayed.

    Each :meth:`step` does, with :math:`s` the device step counter (started from
    ``average.steps``) and :math:`k` the average's ``interval``,

    .. math::

        w = \\begin{cases} 1 & s = 0 \\text{ (the initial copy)} \\\\
                           0 & s \\bmod k \\ne 0 \\text{ (hold)} \\\\
                           m_k(s) & \\text{otherwise} \\end{cases}
        \\qquad \\bar\\theta \\leftarrow \\bar\\theta + w\\,(\\theta - \\bar\\theta),
        \\qquad s \\leftarrow s + 1

    for the averaged tensors, and copies the others (buffers), as ``update_parameters`` does:
    :math:`m_k(s)` is the schedule's interval-compensated momentum computed on the device
    (:func:`update_momentum_on_device`), the weight a 0-d tensor in the averaged tensors' dtype
    (float32 when they have several) read by the kernels only. A lerp by exactly 1 or 0 gives
    the source or the average bit for bit, so the numbers are those of ``update_parameters`` up
    to the rounding of the weight (a float64 formula on the device against one on the host, and
    the average's dtype for a float16/bfloat16 average).

    The schedule, ``interval`` and ``compensate_interval`` are read when this object is built;
    after changing them, build a new one (and capture again). ``average.steps`` does not move
    during the steps (nor does ``current_momentum``): :meth:`sync` writes the device count back
    (one host read), so call it before saving, swapping or calling ``update_parameters`` on the
    average. The update runs on the current stream; with an average built with
    ``side_stream=True``, do not mix its side-stream updates with these.

    Supported: averages updated by a schedule (not a per-tensor ``avg_func``), with
    round-to-nearest, whose class keeps ``BaseAveragedModel``'s counting rule (not
    :class:`~polyak.RampUpEMA`, whose copies before ``start_iter`` do not count: use
    ``AveragedModel(model, schedule=RampUpMomentum(...))``), and the schedules listed by
    :func:`update_momentum_on_device`; anything else is a :class:`ValueError`.

    >>> # update = polyak.gpu.CapturableUpdate(ema, model)
    >>> # graph = torch.cuda.CUDAGraph()
    >>> # with torch.cuda.graph(graph):
    >>> #     update.step()
    >>> # ... after each optimizer step: graph.replay(); before saving: update.sync()
    """

    def __init__(self, average: Any, model: nn.Module) -> None:
        name = type(average).__name__
        if not all(hasattr(type(average), a) for a in ("engine", "schedule", "steps", "pairs", "next_update")):
            raise ValueError(f"expected a polyak averaged model (BaseAveragedModel), got {name}")
        if getattr(average, "custom_rule", False):
            raise ValueError(f"{name} averages with a rule written per tensor (avg_func): it has no device formula")
        if getattr(average, "rounding", "nearest") != "nearest":
            raise ValueError(
                f"{name} rounds stochastically (host-seeded per step): it cannot run as a capturable update"
            )
        for method in ("next_update", "commit_update"):
            if not _defines(average, method, "BaseAveragedModel"):
                raise ValueError(
                    f"{name} overrides {method} (its counting rule is not update_parameters' default); a capturable "
                    "update supports averages that keep it (for RampUpEMA use AveragedModel with RampUpMomentum)"
                )
        average.check_model(model, "CapturableUpdate")
        self.average = average
        self.model = model
        self.schedule: Schedule = average.schedule
        self.interval: int = int(average.interval)
        self.compensate: bool = bool(average.compensate_interval)
        averaged = [a for _, kind, a, _ in average.pairs(model) if kind == "avg"]
        devices = {a.device for a in averaged} or {next(iter(average.module.parameters())).device}
        if len(devices) != 1:
            raise ValueError(f"{name}'s averaged tensors are on several devices ({sorted(map(str, devices))})")
        (self.device,) = devices
        dtypes = {a.dtype for a in averaged}
        self.dtype: torch.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        self.engine = average.engine
        binding = self.engine.bind(model)
        binding.plan("avg")  # scratch buffers now, not during a capture
        binding.plan("copy")
        self._count = torch.tensor(int(average.steps), dtype=torch.int64, device=self.device)
        self.next_weight()  # a schedule without a device formula fails here

    @property
    def steps(self) -> Tensor:
        """The device step counter (an int64 0-d tensor): ``average.steps`` plus the steps taken."""
        return self._count

    def next_weight(self) -> Tensor:
        """The weight :math:`w` of the next :meth:`step` (the class formula), as a 0-d tensor in
        the averaged tensors' dtype on their device; reads nothing on the host."""
        s = self._count
        averaging = update_momentum_on_device(self.schedule, s, self.interval, compensate=self.compensate)
        w = torch.where(torch.remainder(s, self.interval) != 0, 0.0, averaging)
        w = torch.where(s == 0, 1.0, w)
        return w.to(self.dtype)

    def step(self) -> None:
        """One update (the class formula): the weight and the counter on the device, no host
        read, no host synchronisation."""
        if self.average.is_swapped:
            raise RuntimeError("CapturableUpdate.step() inside swapped(): the average holds the live weights")
        self.engine.average_(self.model, self.next_weight())
        self._count.add_(1)

    def sync(self) -> int:
        """Write the device step count into ``average.steps`` (one host read) and return it."""
        steps = int(self._count.item())
        self.average.steps = steps
        return steps

    def __repr__(self) -> str:
        return f"CapturableUpdate({type(self.average).__name__}, schedule={self.schedule!r}, interval={self.interval})"
