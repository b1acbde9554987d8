"""Averages of DTensor-sharded (FSDP2, tensor-parallel) models on one rank: the per-rank copy,
load and reshard, with no communication.

An averaged model of a model whose parameters are DTensors is built tensor by tensor from this
rank's shards (:func:`sharded_copy`, never a deep copy): each average tensor is a DTensor with the
model's mesh and placements whose local shard is this rank's copy, so each rank holds and updates
only its shards, about ``1/world`` of the model. The engine updates the local shards like any
other tensors (:func:`polyak.tensors.local`). Collectives (checkpoints, export, buffer averaging)
are in :mod:`polyak.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .tensors import canonical_name, is_dtensor, local

__all__ = ["is_sharded", "ShardedAverageModule", "sharded_copy", "reshard", "copy_full_"]


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
    dtype_of: Callable[[Tensor], torch.dtype],
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
