"""Collectives for averages under torch.distributed: DCP checkpoints, export to one rank, and
averaging buffers over the ranks.

With DDP every rank holds the whole model and keeps an identical average (the parameters
are identical after each step); :func:`all_reduce_buffers` makes the averaged BatchNorm
statistics identical too, before an evaluation.

With FSDP2 (``torch.distributed.fsdp.fully_shard``) the model's parameters are DTensors sharded
over ranks, and each rank's average holds only its shards (:mod:`polyak.sharded`, where the
per-rank copy and load live), with no communication in the update.

Checkpoints go through ``torch.distributed.checkpoint`` (:func:`save`, :func:`load`): the keys
are those of an unsharded average (``steps``, ``module.<name>``), and a checkpoint saved by some
number of ranks loads into any other (or into an unsharded average). :func:`export_full` gathers
the full averaged weights to one rank one tensor at a time, as a state dict or a safetensors
file the unsharded model loads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .files import AtomicDirectory, atomic_write, torch_save, write_safetensors
from .tensors import is_averaged, is_dtensor

__all__ = ["all_reduce_buffers", "save", "load", "export_full", "iter_full_state"]


def all_reduce_buffers(average: nn.Module, group: Any = None) -> None:
    """Average the floating buffers of ``average`` (BatchNorm statistics) over the ranks, so
    every rank evaluates with the same ones; integer buffers are taken from rank 0.

    .. math:: b \\leftarrow \\frac{1}{W} \\sum_{r=1}^{W} b_r

    where :math:`W` is the world size. A collective: every rank must call it.
    """
    if not dist.is_available() or not dist.is_initialized():
        return
    module = getattr(average, "module", average)
    world = dist.get_world_size(group)
    with torch.no_grad():
        for b in module.buffers():
            if is_dtensor(b):
                continue
            if is_averaged(b):
                dist.all_reduce(b, op=dist.ReduceOp.SUM, group=group)
                b.div_(world)
            else:
                dist.broadcast(b, src=_global_rank(0, group), group=group)


def _global_rank(group_rank: int, group: Any) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def save(
    average: nn.Module, checkpoint_id: str | os.PathLike[str], *, reduce_buffers: bool = True, **kwargs: Any
) -> None:
    """Save ``average.state_dict()`` with ``torch.distributed.checkpoint`` (a collective).

    Keys are those of the unsharded average (``steps``, ``module.<name>``); each rank writes
    its own shards. The folder appears whole or not at all: the ranks write into a temporary
    folder beside it, which replaces ``checkpoint_id`` once every rank is done (an interrupted
    save leaves the previous checkpoint as it was). Plain tensors are written once, from one
    rank: with ``reduce_buffers`` the floating buffers are first averaged over the ranks
    (:func:`all_reduce_buffers`), so what is saved does not depend on which rank writes them. ``kwargs`` go to
    ``torch.distributed.checkpoint.save``.
    """
    import torch.distributed.checkpoint as dcp

    if reduce_buffers:
        all_reduce_buffers(average)
    state = {"average": average.state_dict()}
    with _shared_atomic_directory(checkpoint_id) as folder:
        dcp.save(state, checkpoint_id=folder, **kwargs)


@contextlib.contextmanager
def _shared_atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """The folder a DCP save writes into, whole or not at all (:class:`polyak.files.AtomicDirectory`):
    rank 0 makes a temporary folder and tells the others its name; once every rank has
    written, rank 0 puts it in place of ``path``."""
    distributed = dist.is_available() and dist.is_initialized()
    me = dist.get_rank() if distributed else 0
    folder = AtomicDirectory(path) if me == 0 else None
    names = [str(folder.tmp) if folder is not None else None]
    if distributed:
        dist.broadcast_object_list(names, src=_global_rank(0, None))
    try:
        yield Path(names[0])  # type: ignore[arg-type]
    except BaseException:
        if folder is not None:
            folder.abort()
        raise
    if distributed:
        dist.barrier()
    if folder is not None:
        folder.commit()
    if distributed:
        dist.barrier()


def load(average: nn.Module, checkpoint_id: str | os.PathLike[str], **kwargs: Any) -> None:
    """Load what :func:`save` wrote into ``average`` (a collective), resharding as needed: a
    checkpoint saved by 2 ranks loads into 1 or 4, or into an unsharded average."""
    import torch.distributed.checkpoint as dcp

    state = {"average": average.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint_id, **kwargs)
    average.load_state_dict(state["average"])


def iter_full_state(average: nn.Module, *, rank: int = 0) -> Iterator[tuple[str, Tensor | None]]:
    """Yield ``(name, tensor)`` for every averaged weight, gathered in full, one at a time.

    Every rank must iterate (each DTensor's gather is a collective); the tensors are on the CPU
    on ``rank`` and ``None`` elsewhere, so the peak memory is about one full tensor. Names are
    the model's (no ``module.`` prefix).
    """
    module = getattr(average, "module", average)
    me = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    for name, t in module.state_dict().items():
        full = t.full_tensor() if is_dtensor(t) else t
        yield name, (full.detach().cpu() if me == rank else None)
        del full


def export_full(
    average: nn.Module,
    path: str | os.PathLike[str] | None = None,
    *,
    rank: int = 0,
    metadata: dict[str, str] | None = None,
    reduce_buffers: bool = True,
) -> dict[str, Tensor] | None:
    """Gather the full averaged weights to ``rank``, one tensor at a time (a collective).

    With ``path`` ending in ``.safetensors`` the weights stream into that file (written on
    ``rank`` to a temporary name, then renamed), so the peak memory stays near one tensor;
    otherwise ``rank`` gets a plain state dict (``None`` on the other ranks) that the
    unsharded model loads, and ``path`` (if given) is written with ``torch.save``. With
    ``reduce_buffers`` the floating buffers are first averaged over the ranks.

    A failure of the writing rank (a full disk, a bad path) reaches every rank: the writer
    still takes part in the remaining gathers, then all ranks learn of it, so none is left
    waiting in a collective; the writer raises its own error, the others a
    :class:`RuntimeError` naming the writer. The file is then absent or as it was.
    """
    if reduce_buffers:
        all_reduce_buffers(average)
    me = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    stream = iter_full_state(average, rank=rank)
    out: dict[str, Tensor] | None = None
    error: Exception | None = None
    try:
        if me == rank:
            out = _write_export(average, path, stream, metadata)
    except Exception as e:  # reported to every rank below, once the gathers are done
        error = e
    for _ in stream:  # take part in every gather the writer did not reach
        pass
    _raise_if_any_rank_failed(error, rank)
    return out if me == rank else None


def _write_export(
    average: nn.Module,
    path: str | os.PathLike[str] | None,
    stream: Iterator[tuple[str, Tensor | None]],
    metadata: dict[str, str] | None,
) -> dict[str, Tensor] | None:
    """On the writing rank: stream into a safetensors file, or collect a state dict (and
    ``torch.save`` it when ``path`` is given)."""
    if path is not None and str(path).endswith(".safetensors"):
        module = getattr(average, "module", average)
        layout = {name: (tuple(t.shape), t.dtype) for name, t in module.state_dict().items()}
        atomic_write(path, lambda tmp: write_safetensors(tmp, layout, stream, metadata))  # type: ignore[arg-type]
        return None
    out = {name: full for name, full in stream if full is not None}
    if path is not None:
        atomic_write(path, lambda tmp: torch_save(out, tmp))
    return out


def _raise_if_any_rank_failed(error: Exception | None, writer: int) -> None:
    """Every rank learns whether the writer failed (a collective), and raises if it did."""
    failed = error is not None
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        flag = torch.tensor([int(failed)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = bool(flag.item())
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"export_full failed on rank {writer}, which writes the weights: see its error")
