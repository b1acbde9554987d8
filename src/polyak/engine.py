"""The averaging engine: name-matched tensors and one fused in-place update per group.

The engine knows named tensors, not frameworks. It is built once over the module that holds
the average (the *target*) and, for each source module it is asked to read, resolves once:

* the pairs of tensors, matched by name after wrapper prefixes are stripped
  (:func:`polyak.tensors.canonical_name`), never by position;
* what each pair does: *average* (floating parameters, and floating persistent buffers when
  ``update_buffers``) or *copy* (every other buffer: integer and bool buffers such as
  BatchNorm's ``num_batches_tracked`` are always copied, never averaged or truncated);
* groups by (device, dtype) of both sides, with runs of tensors that are adjacent in memory on
  both sides merged into one view (so a model laid out by :func:`flatten_parameters` is
  updated by a single ``lerp_``);
* for pairs whose dtype or device differ (an fp32 average of a bf16 model, an average kept on
  the CPU), a staging plan through a bounded scratch buffer, so no model-sized temporary is
  ever allocated.

An update is then one ``torch._foreach_lerp_`` per group (on the CPU, the plan chosen by timing:
:mod:`polyak.tuning`) plus one ``cat`` or ``torch._foreach_copy_`` per copy group: no module
walk, no dict building, no ``.item()``, no host-device synchronisation. The binding is checked
on every call with C-level passes (:class:`_Fingerprint`: the data pointer in every resolved
slot of the source, its structure after any registration), so it stays right after ``.to()``,
``.cuda()``, ``.half()``, ``p.data = ...`` or a new Parameter on either side.
"""

from __future__ import annotations

import functools
import itertools
import operator
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .kernels import Weight, adjacent, chunk_ranges, flat_view, foreach_lerp_
from .tensors import StateEntry, is_averaged, is_dtensor, local, named_state
from .tuning import Candidate, PlanTuner

__all__ = ["flatten_parameters", "AveragingEngine", "Weight", "average_many_"]

#: Elements per staging chunk (4 MiB in fp32): large enough to amortise the per-chunk launch,
#: small enough to stay in cache between the copy and the lerp that reads it.
STAGING_CHUNK = 1 << 20

#: Source elements per interleaved chunk when several averages read the same source
#: (:func:`average_many_`): 1 MiB in fp32, so the chunk is still in cache for the second average.
SHARED_READ_CHUNK = 1 << 18

#: Source tensors of at most this many elements are gathered by one ``cat`` per chunk rather
#: than updated one dispatch each, where that is faster (the CPU, and across devices).
GATHER_MAX_NUMEL = 4096
#: ... and only in runs of at least this many tensors: a cat and a lerp for two BatchNorm
#: tensors cost more than their two entries in the multi-tensor kernel.
GATHER_MIN_RUN = 8
#: Elements per chunk of a gathered run (1 MiB in fp32): the cat's output is still in cache
#: when the lerp reads it.
GATHER_CHUNK = 1 << 18
#: Elements per chunk of a *serial* gathered run or gathered copy: below torch's parallel grain
#: (``at::internal::GRAIN_SIZE``, 32768), so each ``cat`` takes its one-thread kernel (one
#: memcpy per input; above the grain, with several threads, it copies input by input) and
#: neither kernel opens a parallel region that a busy core would hold up.
SERIAL_CHUNK = (1 << 15) - 1

_data_ptr = Tensor.data_ptr
_getitem = operator.getitem
_is = operator.is_
_local_of = operator.attrgetter("_local_tensor")


def _is_plain(t: Tensor) -> bool:
    return type(t) in (Tensor, nn.Parameter)


def flatten_parameters(module: nn.Module) -> nn.Module:
    """Lay out ``module``'s parameters in one contiguous buffer per (device, dtype).

    Each parameter becomes a view of its group's buffer (identity, ``requires_grad`` and
    values unchanged). When both the model and its average are laid out this way the
    engine updates each group with a single ``lerp_`` over the whole buffer instead of a
    multi-tensor kernel. Call it before building the optimizer; ``.to()`` or ``.half()``
    undo the layout (call it again after them). Returns ``module``.
    """
    flatten_tensors_(list(module.parameters()))
    return module


def flatten_tensors_(params: list[Tensor]) -> None:
    """Move the data of plain tensors into one contiguous buffer per (device, dtype): the
    tensors of at most ``GATHER_MAX_NUMEL`` elements first, then the others, each in the given
    order. A model and its average laid out by this rule line up, and on the CPU the small
    tensors of an average form one run that is updated by one ``cat`` and one ``lerp_`` per
    chunk whatever the model's layout."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        if _is_plain(p):
            groups.setdefault((p.device, p.dtype), []).append(p)
    with torch.no_grad():
        for (device, dtype), members in groups.items():
            members.sort(key=lambda p: p.numel() > GATHER_MAX_NUMEL)  # stable: small ones first
            flat = torch.empty(sum(p.numel() for p in members), device=device, dtype=dtype)
            offset = 0
            for p in members:
                n = p.numel()
                view = flat[offset : offset + n].view_as(p)
                view.copy_(p)
                p.data = view
                offset += n


# --------------------------------------------------------------------------------------------
# Plans: what one call does to one group of tensors.


def _coalesce(dst: list[Tensor], src: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Merge runs of pairs that are adjacent in memory on both sides into single 1-d views."""

    out_d: list[Tensor] = []
    out_s: list[Tensor] = []
    i, n = 0, len(dst)
    while i < n:
        j = i
        while j + 1 < n and adjacent(dst[j], dst[j + 1]) and adjacent(src[j], src[j + 1]):
            j += 1
        if j == i:
            out_d.append(dst[i])
            out_s.append(src[i])
        else:
            numel = sum(t.numel() for t in dst[i : j + 1])
            out_d.append(flat_view(dst[i], numel))
            out_s.append(flat_view(src[i], numel))
        i = j + 1
    return out_d, out_s


def _pieces(dst: list[Tensor], src: list[Tensor], chunk: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Split pairs into pieces of at most ``chunk`` elements (contiguous tensors only)."""
    for d, s in zip(dst, src, strict=True):
        n = d.numel()
        if n <= chunk or not (d.is_contiguous() and s.is_contiguous()):
            yield d, s
            continue
        d1, s1 = d.view(-1), s.reshape(-1)
        for a in range(0, n, chunk):
            yield d1[a : a + chunk], s1[a : a + chunk]


@dataclass
class _Group:
    """The pairs of one (target device, dtype, source device, dtype), and how to update them.

    * ``dst``/``src``: pairs updated by one multi-tensor kernel (same dtype and device);
    * ``staged``: per chunk, (target pieces, source pieces, scratch views): the source is
      copied into a bounded scratch of the target's dtype and device, then lerped;
    * ``gathered``: per chunk, (target run as one 1-d view, 1-d source views, source-dtype
      scratch, target-dtype scratch or None): small source tensors are concatenated into
      the scratch by one ``cat`` and the run is updated by one ``lerp_``. On the CPU, where a
      multi-tensor kernel still costs one dispatch per tensor, this is faster for tensors of
      a few thousand elements; and across devices it moves one chunk instead of many tensors.
    * ``copied``: per chunk, (target run as one 1-d view, 1-d source views): tensors copied,
      not averaged, concatenated straight into the target by one ``cat`` (same dtype and
      device, small serial chunks: BatchNorm statistics and counters).
    """

    dst: list[Tensor] = field(default_factory=list)
    src: list[Tensor] = field(default_factory=list)
    staged: list[tuple[list[Tensor], list[Tensor], list[Tensor]]] = field(default_factory=list)
    gathered: list[tuple[Tensor, list[Tensor], Tensor, Tensor | None]] = field(default_factory=list)
    copied: list[tuple[Tensor, list[Tensor]]] = field(default_factory=list)

    def lerp_(self, weight: Weight) -> None:
        if self.dst:
            foreach_lerp_(self.dst, self.src, weight)
        for dst, src, scratch in self.staged:
            torch._foreach_copy_(scratch, src)
            foreach_lerp_(dst, scratch, weight)
        for run, srcs, gathered, converted in self.gathered:
            torch.cat(srcs, out=gathered)
            if converted is not None:
                converted.copy_(gathered)
                gathered = converted
            run.lerp_(gathered, weight)

    def copy_(self) -> None:
        if self.dst:
            torch._foreach_copy_(self.dst, self.src)
        for run, srcs in self.copied:
            torch.cat(srcs, out=run)


#: Elements per chunk of a stochastically rounded update (1 MiB in fp32): its five passes over
#: a chunk then stay in cache (measured on the CPU: 1.8x a float32 average's update, against
#: 2.3x with 4 MiB chunks).
ROUNDING_CHUNK = 1 << 18

#: Entries of the table of random 16-bit values that stochastic rounding reads its noise from,
#: at a new random offset for every chunk of every update (twice the chunk, so that any offset
#: below the chunk size leaves a whole chunk of table after it).
NOISE_TABLE = 2 * ROUNDING_CHUNK


def _splitmix64(x: int) -> int:
    """One step of SplitMix64: a well-mixed 64-bit integer from any integer (host arithmetic)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class _StochasticGroup:
    """bfloat16 averages updated in float32 and rounded back stochastically:

    .. math:: \\bar\\theta \\leftarrow \\operatorname{SR}\\bigl(\\bar\\theta + w\\,(\\theta - \\bar\\theta)\\bigr),
              \\qquad \\operatorname{SR}(x) = \\operatorname{trunc}_{16}(x + u),
              \\; u \\sim U\\{0, \\dots, 2^{16} - 1\\}

    where the update is computed in float32, :math:`u` is added to the low 16 bits of its
    float32 representation, and those bits are dropped: the result is one of the two nearest
    bfloat16 values, the farther with the probability of its share of the distance, so the
    rounding is unbiased and an update far below half a bfloat16 ulp still moves the average
    on average (round-to-nearest drops it: a bf16 average at decay 0.999 never moves).

    The work is done in chunks of at most ``ROUNDING_CHUNK`` elements through bounded float32
    scratch buffers (no model-sized temporary). The noise comes from a table of ``NOISE_TABLE``
    uniform 16-bit values drawn once from the engine's seed, read at an offset chosen for every
    chunk of every update from (seed, step, chunk): no random number is drawn per element, and
    an update at the same step of an average with the same seed rounds the same way, so a run
    and its resume give the same bits.
    """

    def __init__(self, dst: list[Tensor], src: list[Tensor], seed: int) -> None:
        self.batches = list(_contiguous_batches(dst, src, ROUNDING_CHUNK))
        size = max(d.numel() for d, _ in self.batches)
        device = dst[0].device
        self.a = torch.empty(size, dtype=torch.float32, device=device)
        self.b = torch.empty(size, dtype=torch.float32, device=device)
        several = any(len(s) > 1 for _, s in self.batches)
        self.cat = torch.empty(size, dtype=src[0].dtype, device=src[0].device) if several else None
        generator = torch.Generator(device=device).manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
        self.table = torch.randint(0, 1 << 16, (NOISE_TABLE,), dtype=torch.int32, generator=generator, device=device)
        self.seed = seed
        self.step = 0

    @property
    def dst(self) -> list[Tensor]:
        return [d for d, _ in self.batches]

    def lerp_(self, weight: Weight) -> None:
        for i, (d, srcs) in enumerate(self.batches):
            n = d.numel()
            a, b = self.a[:n], self.b[:n]
            a.copy_(d)
            if len(srcs) == 1:
                b.copy_(srcs[0])
            else:
                assert self.cat is not None
                torch.cat(srcs, out=self.cat[:n])
                b.copy_(self.cat[:n])
            a.lerp_(b, weight)
            offset = _splitmix64(_splitmix64(self.seed ^ self.step) + i) % (NOISE_TABLE - n + 1)
            bits = a.view(torch.int32)
            bits.add_(self.table[offset : offset + n])
            bits.bitwise_and_(-(1 << 16))
            d.copy_(a)

    def copy_(self) -> None:  # pragma: no cover - stochastic groups only average
        raise AssertionError("a stochastic-rounding group only averages")


def _contiguous_batches(dst: list[Tensor], src: list[Tensor], limit: int) -> Iterator[tuple[Tensor, list[Tensor]]]:
    """Runs of pairs whose targets follow each other in memory, cut into 1-d target views of at
    most ``limit`` elements, each with the (flattened) source pieces it reads."""
    pieces = list(_pieces(dst, src, limit))
    run_d: list[Tensor] = []
    run_s: list[Tensor] = []
    used = 0
    for d, s in pieces:
        n = d.numel()
        if run_d and (used + n > limit or not (d.is_contiguous() and adjacent(run_d[-1], d))):
            yield flat_view(run_d[0], used), run_s
            run_d, run_s, used = [], [], 0
        if not d.is_contiguous():  # a strided target: on its own, through a contiguous copy
            raise ValueError("stochastic rounding needs contiguous averaged tensors")
        run_d.append(d)
        run_s.append(s.reshape(-1))
        used += n
    if run_d:
        yield flat_view(run_d[0], used), run_s


def _plan_average(dst: list[Tensor], src: list[Tensor], *, mismatch: bool, chunk: int | None = GATHER_CHUNK) -> _Group:
    """How one (device, dtype) group of averaged pairs is updated: runs of small tensors
    gathered in chunks of at most ``chunk`` elements where that pays (the CPU, and across
    devices or dtypes; ``chunk=None``: not on the CPU), the rest by one multi-tensor kernel,
    or staged through a scratch buffer when ``mismatch``."""
    gather = mismatch or (chunk is not None and dst[0].device.type == "cpu")
    runs, rest = _gather_runs(dst, src) if gather else ([], list(range(len(dst))))
    limit = chunk or GATHER_CHUNK
    group = _Group(gathered=_gathered_plan(dst, src, runs, mismatch=mismatch, chunk=limit))
    rest_dst, rest_src = [dst[k] for k in rest], [src[k] for k in rest]
    if mismatch:
        group.staged = _staged_plan(rest_dst, rest_src)
    else:
        group.dst, group.src = rest_dst, rest_src
    return group


def _gather_runs(dst: list[Tensor], src: list[Tensor]) -> tuple[list[tuple[int, int]], list[int]]:
    """Split pair indices into runs worth gathering ([start, stop): at least
    ``GATHER_MIN_RUN`` small contiguous pairs, adjacent in the target) and the rest."""

    def small(i: int) -> bool:
        return dst[i].numel() <= GATHER_MAX_NUMEL and dst[i].is_contiguous() and src[i].is_contiguous()

    runs: list[tuple[int, int]] = []
    rest: list[int] = []
    i, n = 0, len(dst)
    while i < n:
        j = i
        if small(i):
            while j + 1 < n and small(j + 1) and adjacent(dst[j], dst[j + 1]):
                j += 1
        if j + 1 - i >= GATHER_MIN_RUN:
            runs.append((i, j + 1))
        else:
            rest.extend(range(i, j + 1))
        i = j + 1
    return runs, rest


def _gathered_plan(
    dst: list[Tensor], src: list[Tensor], runs: list[tuple[int, int]], *, mismatch: bool, chunk: int
) -> list[tuple[Tensor, list[Tensor], Tensor, Tensor | None]]:
    """The runs cut into chunks of at most ``chunk`` elements, each with its target as one 1-d
    view and views of one shared source-dtype scratch (and a target-dtype one when
    ``mismatch``) to ``cat`` the sources into."""
    batches = []
    for a, b in runs:
        for c, d in chunk_ranges([dst[k].numel() for k in range(a, b)], chunk):
            batches.append((a + c, a + d))
    if not batches:
        return []
    numels = [sum(dst[k].numel() for k in range(c, d)) for c, d in batches]
    size = max(numels)
    scratch = torch.empty(size, device=src[0].device, dtype=src[0].dtype)
    converted = torch.empty(size, device=dst[0].device, dtype=dst[0].dtype) if mismatch else None
    return [
        (
            flat_view(dst[c], numel),
            [src[k].view(-1) for k in range(c, d)],
            scratch[:numel],
            None if converted is None else converted[:numel],
        )
        for (c, d), numel in zip(batches, numels, strict=True)
    ]


def _staged_plan(dst: list[Tensor], src: list[Tensor]) -> list[tuple[list[Tensor], list[Tensor], list[Tensor]]]:
    """Pairs whose dtype or device differ, cut into pieces of at most ``STAGING_CHUNK``
    elements and grouped into chunks, each with views of one target-dtype scratch buffer that
    the sources are copied into before the lerp."""
    pieces = list(_pieces(dst, src, STAGING_CHUNK))
    if not pieces:
        return []
    sizes = [d.numel() for d, _ in pieces]
    scratch = torch.empty(max(max(sizes), min(STAGING_CHUNK, sum(sizes))), device=dst[0].device, dtype=dst[0].dtype)
    staged = []
    for c, d in chunk_ranges(sizes, scratch.numel()):
        views, used = [], 0
        for k in range(c, d):
            views.append(scratch[used : used + sizes[k]].view(pieces[k][0].shape))
            used += sizes[k]
        staged.append(([p[0] for p in pieces[c:d]], [p[1] for p in pieces[c:d]], views))
    return staged


def _plan_copy(dst: list[Tensor], src: list[Tensor]) -> _Group:
    """How one group of copied pairs is copied: runs of at least two contiguous tensors that
    follow each other in the target are concatenated into it, in serial chunks (one ``cat``
    each); the rest by one multi-tensor copy."""
    if dst[0].device != src[0].device or dst[0].dtype != src[0].dtype:
        return _Group(dst, src)
    group = _Group()
    i, n = 0, len(dst)
    while i < n:
        j = i
        if dst[i].is_contiguous() and src[i].is_contiguous():
            while j + 1 < n and src[j + 1].is_contiguous() and adjacent(dst[j], dst[j + 1]):
                j += 1
        if j == i:
            group.dst.append(dst[i])
            group.src.append(src[i])
        else:
            for c, d in chunk_ranges([dst[k].numel() for k in range(i, j + 1)], SERIAL_CHUNK):
                numel = sum(dst[k].numel() for k in range(i + c, i + d))
                group.copied.append((flat_view(dst[i + c], numel), [src[k].view(-1) for k in range(i + c, i + d)]))
        i = j + 1
    return group


def _in_memory_order(pairs: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """``pairs`` ordered by where their targets lie: storages in the order they first appear,
    and within a storage by offset. Tensors that follow each other in a flat buffer become
    neighbours (runs to merge or gather); separately allocated ones keep their order."""
    first: dict[int, int] = {}
    keys = []
    for d, _ in pairs:
        ptr = d.untyped_storage().data_ptr()
        keys.append((first.setdefault(ptr, len(first)), d.storage_offset()))
    order = sorted(range(len(pairs)), key=keys.__getitem__)
    return [pairs[i] for i in order]


#: How small CPU tensors are averaged: gathered in cache-sized chunks, gathered in serial
#: chunks, or left to the multi-tensor kernel (:func:`_build_groups`'s ``gather``).
GATHER_MODES: dict[str, int | None] = {"gathered": GATHER_CHUNK, "serial": SERIAL_CHUNK, "foreach": None}


def _build_groups(
    pairs: list[tuple[Tensor, Tensor]],
    *,
    average: bool,
    stochastic_seed: int | None = None,
    gather: str = "gathered",
) -> list[_Group | _StochasticGroup]:
    """One plan per (target device, dtype, source device, dtype); bfloat16 targets averaged
    with stochastic rounding when ``stochastic_seed`` is given; CPU targets of CUDA sources
    through pinned double buffers (:class:`polyak.gpu.OffloadGroup`)."""
    by_key: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
    for d, s in pairs:
        by_key.setdefault((d.device, d.dtype, s.device, s.dtype), []).append((d, s))
    groups: list[_Group | _StochasticGroup] = []
    for (ddev, ddt, sdev, sdt), members in by_key.items():
        if all(_is_plain(d) for d, _ in members):
            members = _in_memory_order(members)
        dst, src = _coalesce([d for d, _ in members], [s for _, s in members])
        if average and stochastic_seed is not None and ddt == torch.bfloat16:
            groups.append(_StochasticGroup(dst, src, stochastic_seed))
        elif ddev.type == "cpu" and sdev.type == "cuda":
            from .gpu import OffloadGroup  # an average kept on the CPU of a CUDA model

            groups.append(OffloadGroup(dst, src, chunk=STAGING_CHUNK))
        elif average:
            groups.append(_plan_average(dst, src, mismatch=ddev != sdev or ddt != sdt, chunk=GATHER_MODES[gather]))
        else:
            groups.append(_plan_copy(dst, src))
    return groups


# --------------------------------------------------------------------------------------------
# The binding of the target to one source module.


#: Registrations of parameters, buffers and submodules anywhere in the process, counted by
#: torch's global registration hooks (installed with the first fingerprint): assigning or
#: registering a tensor or a submodule, ``load_state_dict(assign=True)``, ``model.fc = ...``.
_REGISTRATIONS = [0]
_HOOKS: list[Any] = []

#: While no registration happens, the structure of a source module (its tables' sizes and its
#: submodules' identities) is re-read at least every this many checks; what no hook reports
#: (``del model.fc``, a write into ``module._modules``) is seen within that many updates.
STRUCTURE_EVERY = 64


def _count_registration(module: nn.Module, name: str, value: Any) -> None:
    _REGISTRATIONS[0] += 1


def _install_registration_hooks() -> None:
    if not _HOOKS:
        from torch.nn.modules import module as torch_module

        _HOOKS.extend(
            register(_count_registration)
            for register in (
                torch_module.register_module_parameter_registration_hook,
                torch_module.register_module_buffer_registration_hook,
                torch_module.register_module_module_registration_hook,
            )
        )


class _Fingerprint:
    """What a module's resolved tensor lists depend on, checked with C-level passes per call.

    ``Module._apply`` (``.to()``, ``.cuda()``, ``.half()``) and ``p.data = ...`` keep each
    Parameter object but give it new data; assigning a new Parameter or buffer replaces the
    object in its module's table; registering or deleting one, or a submodule, changes the
    size of a table. Every call reads the data pointer of the tensor now in each resolved slot
    (a new object, new data or a conversion each move it; a replacement that keeps the very
    same memory reads the same values; a deleted slot fails the lookup). The structure (the
    size of every module's tables, the identity of every submodule in its parent's table) is
    read again after any registration anywhere (torch's global registration hooks count them)
    and otherwise every ``STRUCTURE_EVERY`` calls. Tensors without a plain data pointer
    (DTensors, whose own is 0, meta or sparse tensors) are checked by identity, DTensors also
    by their shard's pointer (FSDP2 updates shards in place).

    With ``own=True`` (the average's own module, whose tensors polyak lays out and only
    ``Module._apply`` or a deliberate replacement changes) one tensor per storage stands for
    the storage: ``.to()``, ``.half()``, ``load_state_dict(assign=True)`` or
    ``flatten_parameters`` on it move that tensor's pointer too. No table sizes or children.
    """

    def __init__(self, module: nn.Module, state: dict[str, StateEntry], *, own: bool = False) -> None:
        _install_registration_hooks()
        entries = list(state.values())
        plain = [e for e in entries if _has_pointer(e.tensor)]
        if own:
            first: dict[int, StateEntry] = {}
            for e in plain:
                first.setdefault(e.tensor.untyped_storage().data_ptr(), e)
            plain = list(first.values())
        self.owners = [e.owner for e in plain]
        self.keys = [e.key for e in plain]
        self.other_owners = [e.owner for e in entries if not _has_pointer(e.tensor)]
        self.other_keys = [e.key for e in entries if not _has_pointer(e.tensor)]
        self.other_tensors = [e.tensor for e in entries if not _has_pointer(e.tensor)]
        modules = [] if own else list(module.modules())
        self.tables = [t for m in modules for t in (m._parameters, m._buffers, m._modules)]
        self.sizes = tuple(map(len, self.tables))
        children = [(m._modules, k, c) for m in modules for k, c in m._modules.items()]
        self.child_tables = [t for t, _, _ in children]
        self.child_keys = [k for _, k, _ in children]
        self.children = [c for _, _, c in children]
        self.sharded = [t for t in self.other_tensors if is_dtensor(t)]
        self.ptrs = self._ptrs()
        self.sharded_ptrs = self._sharded_ptrs()
        self.registrations = _REGISTRATIONS[0]
        self.structure_left = STRUCTURE_EVERY

    def _ptrs(self) -> tuple[int, ...]:
        return tuple(map(_data_ptr, map(_getitem, self.owners, self.keys)))

    def _sharded_ptrs(self) -> tuple[int, ...]:
        return tuple(map(_data_ptr, map(_local_of, self.sharded)))

    def structure_holds(self) -> bool:
        return tuple(map(len, self.tables)) == self.sizes and all(
            map(_is, map(_getitem, self.child_tables, self.child_keys), self.children)
        )

    def holds(self, *, full: bool = False) -> bool:
        """Whether the resolved lists still hold (``full``: read the structure whatever the
        registration count says)."""
        if full or self.registrations != _REGISTRATIONS[0] or self.structure_left <= 0:
            if not self.structure_holds():
                return False
            self.registrations = _REGISTRATIONS[0]
            self.structure_left = STRUCTURE_EVERY
        self.structure_left -= 1
        try:
            return (
                self._ptrs() == self.ptrs
                and all(map(_is, map(_getitem, self.other_owners, self.other_keys), self.other_tensors))
                and (not self.sharded or self._sharded_ptrs() == self.sharded_ptrs)
            )
        except KeyError:  # a resolved slot was deleted
            return False


def _has_pointer(t: Tensor) -> bool:
    """A plain strided tensor with storage, whose ``data_ptr`` says where its values are."""
    return _is_plain(t) and t.layout == torch.strided and t.device.type != "meta"


@dataclass
class _Binding:
    source: weakref.ref
    source_print: _Fingerprint
    target_print: _Fingerprint
    names: list[str]  # canonical names, target order
    kinds: list[str]  # "avg" | "copy" per name
    dst: list[Tensor]  # target tensors (detached), target order
    src: list[Tensor]  # source tensors (detached), target order
    is_buffer: list[bool]
    stochastic_seed: int | None = None  # bfloat16 averages rounded stochastically, from this seed
    plans: dict[str, list[Any]] = field(default_factory=dict)
    shared: dict[tuple[int, ...], Any] = field(default_factory=dict)  # average_many_ plans
    tuner: PlanTuner | None = None  # CPU: the averaging plan chosen by timing (see polyak.tuning)
    tuned_threads: int = 0  # torch's thread count when the tuner was made (0: none made yet)

    def fresh(self, *, full: bool = False) -> bool:
        return self.source_print.holds(full=full) and self.target_print.holds(full=full)

    def plan(self, subset: str, gather: str = "gathered") -> list[Any]:
        key = subset if gather == "gathered" else f"{subset}:{gather}"
        plan = self.plans.get(key)
        if plan is None:
            select = {
                "avg": lambda i: self.kinds[i] == "avg",
                "copy": lambda i: self.kinds[i] == "copy",
                "all": lambda i: True,
                "buffers": lambda i: self.is_buffer[i],
            }[subset]
            idx = [i for i in range(len(self.dst)) if select(i)]
            pairs = [(self.dst[i], self.src[i]) for i in idx]
            average = subset == "avg"
            plan = _build_groups(
                pairs, average=average, stochastic_seed=self.stochastic_seed if average else None, gather=gather
            )
            self.plans[key] = plan
        return plan


class AveragingEngine:
    """Fused in-place averaging of a target module's tensors toward a source module's.

    Args:
        target: the module that holds the average (its tensors are updated in place).
        update_buffers: average floating persistent buffers too; otherwise every buffer is
            copied from the source on every call.
        kinds: per canonical name, ``"avg"``, ``"copy"`` or ``"skip"`` (the tensor is shared
            with the source, or left alone: never read nor written), overriding the rule
            above. Integer tensors are copied whatever it says.
        rounding: ``"nearest"`` (torch's rounding of every kernel), or ``"stochastic"``: bfloat16
            averaged tensors are updated in float32 and rounded back stochastically
            (:class:`_StochasticGroup`), seeded by ``seed`` and the update's ``step``.
        seed: the seed of stochastic rounding.

    On the CPU the averaging plan (how small tensors are grouped, and whether the update runs
    with torch's thread count or one thread) is chosen by timing the first updates and
    re-checked as the machine's load changes (:mod:`polyak.tuning`); every candidate writes
    the same bits. Set ``tune = False`` for a fixed plan (reproducible timings).
    """

    def __init__(
        self,
        target: nn.Module,
        *,
        update_buffers: bool = False,
        kinds: Mapping[str, str] | None = None,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        self.target = target
        self.update_buffers = bool(update_buffers)
        self.kinds = dict(kinds or {})
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        self.rounding = rounding
        self.seed = int(seed)
        self._calls = 0  # the step of an update that does not say its own
        self._target_state: dict[str, StateEntry] | None = None
        self._target_print: _Fingerprint | None = None
        self._bindings: dict[int, _Binding] = {}
        #: Choose the CPU averaging plan by timing real updates (see the class docstring).
        self.tune = True

    # -- resolution ---------------------------------------------------------------------

    def invalidate(self) -> None:
        """Forget every resolved tensor list (call after the target's tensors were replaced)."""
        self._target_state = None
        self._target_print = None
        self._bindings.clear()

    def target_state(self) -> dict[str, StateEntry]:
        if self._target_print is not None and not self._target_print.holds():
            self.invalidate()
        if self._target_state is None:
            state = named_state(self.target)
            if not state:
                raise ValueError("the averaged model has no parameters or buffers: nothing to average")
            self._target_state = state
            self._target_print = _Fingerprint(self.target, state, own=True)
        return self._target_state

    def kind(self, entry: StateEntry) -> str:
        """``"avg"``, ``"copy"`` or ``"skip"`` for one of the target's tensors."""
        t = entry.tensor
        chosen = self.kinds.get(entry.name)
        if chosen == "skip":
            return "skip"
        if not is_averaged(t):
            return "copy"
        if chosen is not None:
            return chosen
        if entry.is_buffer and not (self.update_buffers and entry.persistent):
            return "copy"
        return "avg"

    def bind(self, source: nn.Module) -> _Binding:
        """The resolved pairs between the target and ``source`` (cached, re-checked per call)."""
        old = self._bindings.get(id(source))
        if old is not None and old.source() is source:
            if old.fresh():
                return old
        else:
            old = None
        try:
            b = self._bind(source)
        except ValueError as e:
            if old is None:
                raise
            raise ValueError(f"the model changed since the average last read it: {e}") from None
        self._bindings = {k: v for k, v in self._bindings.items() if v.source() is not None}
        self._bindings[id(source)] = b
        return b

    def _bind(self, source: nn.Module) -> _Binding:
        if not isinstance(source, nn.Module):
            raise TypeError(f"expected an nn.Module to average, got {type(source).__name__}")
        tgt = self.target_state()
        src = named_state(source)
        missing = [n for n in tgt if n not in src]
        unexpected = [n for n in src if n not in tgt]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing from the source: {_few(missing)}")
            if unexpected:
                parts.append(f"not in the average: {_few(unexpected)}")
            raise ValueError(
                "the source model does not match the average (names compared after stripping "
                "wrapper prefixes); " + "; ".join(parts)
            )
        names, kinds, dst, srcs, is_buf = [], [], [], [], []
        for name, e in tgt.items():
            s = src[name].tensor
            if is_dtensor(s) != is_dtensor(e.tensor):
                raise ValueError(
                    f"tensor {name!r} is {'a DTensor' if is_dtensor(s) else 'a plain tensor'} in the source but "
                    f"{'a DTensor' if is_dtensor(e.tensor) else 'a plain tensor'} in the average: build the "
                    "average from the model as it is sharded"
                )
            if is_dtensor(s) and (s.placements != e.tensor.placements or local(s).shape != local(e.tensor).shape):
                raise ValueError(
                    f"tensor {name!r} is sharded as {s.placements} (local {tuple(local(s).shape)}) in the source "
                    f"but {e.tensor.placements} (local {tuple(local(e.tensor).shape)}) in the average"
                )
            if s.shape != e.tensor.shape:
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(s.shape)} in the source but "
                    f"{tuple(e.tensor.shape)} in the average"
                )
            kind = self.kind(e)
            if kind == "skip":
                continue
            if kind == "avg" and not is_averaged(s):
                raise ValueError(f"tensor {name!r} is {s.dtype} in the source but averaged as {e.tensor.dtype}")
            if s.is_complex() and not e.tensor.is_complex():
                raise ValueError(
                    f"tensor {name!r} is {s.dtype} in the source but {e.tensor.dtype} in the average: its "
                    "imaginary part would be dropped"
                )
            names.append(name)
            kinds.append(kind)
            dst.append(local(e.tensor))
            srcs.append(local(s))
            is_buf.append(e.is_buffer)
        return _Binding(
            source=weakref.ref(source),
            source_print=_Fingerprint(source, src),
            target_print=_Fingerprint(self.target, tgt, own=True),
            names=names,
            kinds=kinds,
            dst=dst,
            src=srcs,
            is_buffer=is_buf,
            stochastic_seed=self.seed if self.rounding == "stochastic" else None,
        )

    # -- the hot path ------------------------------------------------------------------

    @torch.no_grad()
    def average_(self, source: nn.Module, weight: Weight, *, step: int | None = None) -> None:
        """Move averaged tensors toward ``source`` by ``weight`` and copy the others.

        .. math:: \\bar\\theta \\leftarrow \\bar\\theta + w\\,(\\theta - \\bar\\theta)

        for every averaged tensor, with :math:`w` the ``weight`` (a float, or a 0-d tensor
        on the average's device); one fused kernel per (device, dtype) group. ``step`` seeds
        stochastic rounding (the averaged model passes its ``steps``; default: a count of
        this engine's calls).
        """
        b = self.bind(source)
        self.lerp_(b, weight, step)
        for g in b.plan("copy"):
            g.copy_()

    def lerp_(self, binding: _Binding, weight: Weight, step: int | None) -> None:
        """The averaging half of :meth:`average_`, on a resolved binding."""
        if step is None:
            step, self._calls = self._calls, self._calls + 1
        if self.tune and binding.stochastic_seed is None:
            threads = torch.get_num_threads()
            if binding.tuned_threads != threads:
                binding.tuner = _make_tuner(binding, threads)
                binding.tuned_threads = threads
            if binding.tuner is not None:
                binding.tuner.run(weight)
                return
        for g in binding.plan("avg"):
            if isinstance(g, _StochasticGroup):
                g.step = step
            g.lerp_(weight)

    @torch.no_grad()
    def copy_(self, source: nn.Module, subset: str = "all") -> None:
        """Copy tensors from ``source``: ``"all"``, ``"copy"`` (the non-averaged ones) or
        ``"buffers"``."""
        for g in self.bind(source).plan(subset):
            g.copy_()

    # -- per-tensor access (user ``avg_func``, swapping) ----------------------------------

    def pairs(self, source: nn.Module) -> Iterable[tuple[str, str, Tensor, Tensor]]:
        """``(name, kind, target tensor, source tensor)`` for every matched pair."""
        b = self.bind(source)
        return zip(b.names, b.kinds, b.dst, b.src, strict=True)

    @torch.no_grad()
    def write_to_(self, model: nn.Module, subset: str = "all") -> None:
        """Copy the target's tensors into ``model`` (``"all"`` or ``"avg"``)."""
        for _, kind, avg, live in self.pairs(model):
            if subset == "all" or kind == subset:
                live.copy_(avg)


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in itertools.islice(names, n))
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _run_groups(groups: list[Any], weight: Weight) -> None:
    for g in groups:
        g.lerp_(weight)


def _make_tuner(binding: _Binding, threads: int) -> PlanTuner | None:
    """The candidate CPU plans of a binding's averaging update (how small tensors are grouped ×
    torch's thread count or one thread), or None where there is one way only (a GPU, or
    nothing to choose)."""
    base = binding.plan("avg")
    if not base or any(not isinstance(g, _Group) or not _on_cpu(g) for g in base):
        return None
    variants = {"gathered": base}
    if any(g.gathered for g in base):
        variants["serial"] = binding.plan("avg", "serial")
        variants["foreach"] = binding.plan("avg", "foreach")
    counts = [None, 1] if threads > 1 else [None]
    candidates = [
        Candidate(_label(mode, n or threads), functools.partial(_run_groups, groups), n)
        for mode, groups in variants.items()
        for n in counts
    ]
    return PlanTuner(candidates) if len(candidates) > 1 else None


def _label(mode: str, threads: int) -> str:
    return f"{mode}, {threads} thread{'s' if threads > 1 else ''}"


def _on_cpu(group: _Group) -> bool:
    tensors = [*group.dst, *group.src]
    tensors += [t for run, srcs, scratch, _ in group.gathered for t in (run, scratch, *srcs)]
    tensors += [t for dst, src, _ in group.staged for t in (*dst, *src)]
    return all(t.device.type == "cpu" for t in tensors)


# --------------------------------------------------------------------------------------------
# Several averages of one source, reading it once.


def _same(a: Tensor, b: Tensor) -> bool:
    """The same memory, read the same way (two views of one source tensor)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _aligned(groups: Sequence[_Group]) -> bool:
    """Whether the groups of several averages pair the same source tensors, in the same order,
    with targets of the same shapes and dtypes: then one pass over the source serves them all."""
    g0 = groups[0]
    return all(_aligned_pair(g, g0) for g in groups[1:])


def _aligned_pair(g: _Group, g0: _Group) -> bool:
    if (len(g.dst), len(g.staged), len(g.gathered)) != (len(g0.dst), len(g0.staged), len(g0.gathered)):
        return False
    return (
        all(map(_same, g.src, g0.src))
        and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(g.dst, g0.dst, strict=True))
        and all(
            a[0].numel() == b[0].numel()
            and a[0].dtype == b[0].dtype
            and len(a[1]) == len(b[1])
            and all(map(_same, a[1], b[1]))
            for a, b in zip(g.gathered, g0.gathered, strict=True)
        )
        and all(
            len(a[0]) == len(b[0])
            and len(a[1]) == len(b[1])
            and all(map(_same, a[1], b[1]))
            and all(x.shape == y.shape for x, y in zip(a[0], b[0], strict=True))
            and a[2][0].dtype == b[2][0].dtype
            and a[2][0].device == b[2][0].device
            for a, b in zip(g.staged, g0.staged, strict=True)
        )
    )


@dataclass
class _SharedPlan:
    """For one group across N averages: direct pairs cut into cache-sized chunks, each chunk
    ``(source pieces, [target pieces of average i])``; staging and gathering are shared."""

    groups: list[_Group]
    chunks: list[tuple[list[Tensor], list[list[Tensor]]]]

    def lerp_(self, weights: Sequence[Weight]) -> None:
        for src, dsts in self.chunks:
            for dst, w in zip(dsts, weights, strict=True):
                foreach_lerp_(dst, src, w)
        g0 = self.groups[0]
        for k, (_, src, scratch) in enumerate(g0.staged):
            torch._foreach_copy_(scratch, src)
            for g, w in zip(self.groups, weights, strict=True):
                foreach_lerp_(g.staged[k][0], scratch, w)
        for k, (_, srcs, gathered, converted) in enumerate(g0.gathered):
            torch.cat(srcs, out=gathered)
            if converted is not None:
                converted.copy_(gathered)
                gathered = converted
            for g, w in zip(self.groups, weights, strict=True):
                g.gathered[k][0].lerp_(gathered, w)


@dataclass
class _SharedUpdate:
    """The shared plans of several bindings, and on the CPU a tuner that chooses between
    torch's thread count and one thread for them (as :func:`_make_tuner` does for one average;
    the two write the same bits)."""

    bindings: list[_Binding]
    plans: list[_SharedPlan]
    tuner: PlanTuner | None = None
    tuned_threads: int = 0

    def __post_init__(self) -> None:
        self.on_cpu = all(_on_cpu(g) for p in self.plans for g in p.groups)

    def _lerp(self, weights: Sequence[Weight]) -> None:
        for plan in self.plans:
            plan.lerp_(weights)

    def run(self, weights: Sequence[Weight], *, tune: bool) -> None:
        threads = torch.get_num_threads()
        if not (tune and threads > 1 and self.on_cpu):
            self._lerp(weights)
            return
        tuner = self.tuner
        if tuner is None or self.tuned_threads != threads:
            one = Candidate(_label("shared", 1), self._lerp, 1)
            tuner = self.tuner = PlanTuner([Candidate(_label("shared", threads), self._lerp), one])
            self.tuned_threads = threads
        tuner.run(weights)


def _shared_plan(groups: list[_Group]) -> _SharedPlan:
    g0 = groups[0]
    cut = [list(_pieces(g.dst, g0.src, SHARED_READ_CHUNK)) for g in groups]
    sizes = [d.numel() for d, _ in cut[0]]
    chunks = []
    for lo, hi in chunk_ranges(sizes, SHARED_READ_CHUNK):
        src = [s for _, s in cut[0][lo:hi]]
        chunks.append((src, [[d for d, _ in pieces[lo:hi]] for pieces in cut]))
    return _SharedPlan(groups, chunks)


@torch.no_grad()
def average_many_(
    engines: Sequence[AveragingEngine],
    source: nn.Module,
    weights: Sequence[Weight],
    *,
    steps: Sequence[int] | None = None,
) -> None:
    """:meth:`AveragingEngine.average_` for several averages of the same model at once,

    .. math:: \\bar\\theta_i \\leftarrow \\bar\\theta_i + w_i\\,(\\theta - \\bar\\theta_i), \\quad i = 1 \\dots N

    reading each source tensor from memory once for all of them: large tensors are cut into
    cache-sized chunks and every average is updated from a chunk before the next is read;
    staged and gathered sources are staged once. Averages whose layouts differ (another dtype
    or device) or that round stochastically fall back to one pass each (``steps`` seed their
    rounding). Every binding is checked before anything changes.
    """
    if len(engines) != len(weights):
        raise ValueError(f"{len(engines)} averages but {len(weights)} weights")
    bindings = [e.bind(source) for e in engines]
    plans = [b.plan("avg") for b in bindings]
    stochastic = any(isinstance(g, _StochasticGroup) for p in plans for g in p)
    if (
        stochastic
        or len({len(p) for p in plans}) != 1
        or not all(_aligned(list(gs)) for gs in zip(*plans, strict=True))
    ):
        for i, (e, b, w) in enumerate(zip(engines, bindings, weights, strict=True)):
            e.lerp_(b, w, None if steps is None else steps[i])
    else:
        key = tuple(id(b) for b in bindings)
        cached = bindings[0].shared.get(key)
        if cached is None or any(x is not y for x, y in zip(cached.bindings, bindings, strict=True)):
            cached = _SharedUpdate(bindings, [_shared_plan(list(gs)) for gs in zip(*plans, strict=True)])
            bindings[0].shared[key] = cached
        cached.run(weights, tune=all(e.tune for e in engines))
    for b in bindings:
        for g in b.plan("copy"):
            g.copy_()
