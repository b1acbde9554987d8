"""Averages under torch.distributed: FSDP2-sharded averages, DCP checkpoints, export, DDP buffers.

With DDP every rank holds the whole model and keeps an identical average (the parameters
are identical after each step); :func:`all_reduce_buffers` makes the averaged BatchNorm
statistics identical too, before an evaluation.

With FSDP2 (``torch.distributed.fsdp.fully_shard``) the model's parameters are DTensors sharded
over ranks. An averaged model of it is built tensor by tensor from the local shards
(:func:`sharded_copy`, never a deep copy): each average tensor is a DTensor with the model's
mesh and placements whose local shard is this rank's copy, so each rank holds and updates only
its shards, about ``1/world`` of the model, with no communication in the update.

Checkpoints go through ``torch.distributed.checkpoint`` (:func:`save`, :func:`load`): the keys
are those of an unsharded average (``steps``, ``module.<name>``), and a checkpoint saved by some
number of ranks loads into any other (or into an unsharded average). :func:`export_full` gathers
the full averaged weights to one rank one tensor at a time, as a state dict or a safetensors
file the unsharded model loads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .engine import canonical_name, is_dtensor, local

__all__ = [
    "is_sharded",
    "copy_full_",
    "reshard",
    "ShardedAverageModule",
    "sharded_copy",
    "all_reduce_buffers",
    "save",
    "load",
    "export_full",
    "iter_full_state",
]


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (FSDP2, tensor parallel)."""
    return any(is_dtensor(p) for p in module.parameters())


class ShardedAverageModule(nn.Module):
    """Holds the averaged shards under the model's own names; cannot run ``forward``.

    The averaged tensors are DTensors with the model's placements, so ``state_dict()`` has the
    keys of the unsharded model and ``torch.distributed.checkpoint`` reshards them on load.
    Evaluate with ``average.swapped(model)``, which puts the average into the sharded model.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "the average of a sharded (FSDP2) model holds only this rank's shards and cannot run forward "
            "on its own: evaluate with `with average.swapped(model): model(...)`, or export_full() the weights"
        )


def _child(root: nn.Module, path: list[str]) -> nn.Module:
    mod = root
    for part in path:
        nxt = mod._modules.get(part)
        if nxt is None:
            nxt = nn.Module()
            mod.add_module(part, nxt)
        mod = nxt
    return mod


def sharded_copy(
    model: nn.Module,
    *,
    dtype_of: Any,
    device: torch.device | None = None,
    share: frozenset[int] = frozenset(),
) -> ShardedAverageModule:
    """A :class:`ShardedAverageModule` holding a copy of each of ``model``'s tensors under its
    name (wrapper prefixes removed): DTensors rebuilt from a copy of this rank's shard with the
    same mesh and placements, plain tensors copied. ``dtype_of(t)`` gives each copy's dtype;
    tensors whose ``id`` is in ``share`` are referenced, not copied."""
    if device is not None:
        raise ValueError("device= is not supported for a sharded model: the average's shards live with the model's")
    from torch.distributed.tensor import DTensor

    out = ShardedAverageModule()
    for mod_name, mod in model.named_modules(remove_duplicate=True):
        prefix = mod_name + "." if mod_name else ""
        for is_buffer, table in ((False, mod._parameters), (True, mod._buffers)):
            for key, t in table.items():
                if t is None:
                    continue
                name = canonical_name(prefix + key)
                *path, leaf = name.split(".")
                owner = _child(out, path)
                if leaf in owner._parameters or leaf in owner._buffers:
                    continue  # tied
                if id(t) in share:
                    new: Tensor = t
                else:
                    data = local(t).to(dtype=dtype_of(t), copy=True)
                    if is_dtensor(t):
                        data = DTensor.from_local(
                            data, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
                        )
                    new = nn.Parameter(data, requires_grad=False) if not is_buffer else data
                if is_buffer:
                    owner.register_buffer(leaf, new, persistent=key not in mod._non_persistent_buffers_set)
                else:
                    owner.register_parameter(leaf, new if isinstance(new, nn.Parameter) else nn.Parameter(new))
    return out


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back in its sharded state (after a forward without
    backward the root stays unsharded), so its parameters are the sharded DTensors again."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def copy_full_(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)`` where ``dst`` may be a DTensor and ``src`` the full tensor (or a
    DTensor): this rank's slice of ``src`` goes into ``dst``'s shard, with no communication."""
    if not is_dtensor(dst):
        dst.copy_(local(src) if is_dtensor(src) else src)
        return
    if is_dtensor(src):
        dst.copy_(src)
        return
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(src.shape, dst.device_mesh, dst.placements)
    piece = src[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))] if src.dim() else src
    local(dst).copy_(piece)


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
            if b.is_floating_point() or b.is_complex():
                dist.all_reduce(b, op=dist.ReduceOp.SUM, group=group)
                b.div_(world)
            else:
                dist.broadcast(b, src=_global_rank(0, group), group=group)


def _global_rank(group_rank: int, group: Any) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def save(
    average: nn.Module, checkpoint_id: str | os.PathLike[str], *, sync_buffers: bool = True, **kwargs: Any
) -> None:
    """Save ``average.state_dict()`` with ``torch.distributed.checkpoint`` (a collective).

    Keys are those of the unsharded average (``steps``, ``module.<name>``); each rank writes
    its own shards. Plain tensors are written once, from one rank: with ``sync_buffers`` the
    floating buffers are first averaged over the ranks (:func:`all_reduce_buffers`), so what
    is saved does not depend on which rank writes them. ``kwargs`` go to
    ``torch.distributed.checkpoint.save``.
    """
    import torch.distributed.checkpoint as dcp

    if sync_buffers:
        all_reduce_buffers(average)
    dcp.save({"average": average.state_dict()}, checkpoint_id=checkpoint_id, **kwargs)


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
    sync_buffers: bool = True,
) -> dict[str, Tensor] | None:
    """Gather the full averaged weights to ``rank``, one tensor at a time (a collective).

    With ``path`` ending in ``.safetensors`` the weights stream into that file (written on
    ``rank`` to a temporary name, then renamed), so the peak memory stays near one tensor;
    otherwise ``rank`` gets a plain state dict (``None`` on the other ranks) that the
    unsharded model loads, and ``path`` (if given) is written with ``torch.save``. With
    ``sync_buffers`` the floating buffers are first averaged over the ranks.
    """
    if sync_buffers:
        all_reduce_buffers(average)
    from .formats import atomic_write, write_safetensors

    me = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if path is not None and str(path).endswith(".safetensors"):
        module = getattr(average, "module", average)
        layout = {name: (tuple(t.shape), t.dtype) for name, t in module.state_dict().items()}
        stream = iter_full_state(average, rank=rank)
        if me == rank:
            atomic_write(path, lambda tmp: write_safetensors(tmp, layout, stream, metadata))  # type: ignore[arg-type]
        else:
            for _ in stream:  # take part in every gather
                pass
        return None
    out: dict[str, Tensor] = {}
    for name, full in iter_full_state(average, rank=rank):
        if full is not None:
            out[name] = full
    if me != rank:
        return None
    if path is not None:
        atomic_write(path, lambda tmp: torch.save(out, tmp))
    return out
