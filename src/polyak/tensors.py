"""The named tensors of a module, as the engine sees them: names without wrapper prefixes, which
tensors are averaged, and this rank's shard of a DTensor.

Every part of polyak that asks "is this tensor averaged?" or "what is this tensor called?"
asks here: the engine, the averaged models, the checkpoint format, post-hoc synthesis and the
command line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "WRAPPER_COMPONENTS",
    "canonical_name",
    "unwrap_model",
    "StateEntry",
    "named_state",
    "is_averaged",
    "is_dtensor",
    "local",
]

#: Module names that wrappers insert into parameter names and that are dropped when matching:
#: ``_orig_mod`` (``torch.compile``), ``_fsdp_wrapped_module`` (FSDP1) and
#: ``_checkpoint_wrapped_module`` (activation checkpointing), anywhere in the name. A leading
#: ``module.`` (DistributedDataParallel, DataParallel) is dropped too.
WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def canonical_name(name: str) -> str:
    """The name of a tensor with wrapper prefixes removed.

    >>> canonical_name("module._orig_mod.layer1._checkpoint_wrapped_module.weight")
    'layer1.weight'
    """
    parts = [p for p in name.split(".") if p not in WRAPPER_COMPONENTS]
    while len(parts) > 1 and parts[0] == "module":
        del parts[0]
    return ".".join(parts)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel ``DistributedDataParallel``, ``DataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def is_averaged(t: Tensor | torch.dtype) -> bool:
    """Whether a tensor of this dtype can be averaged: floating and complex tensors can; integer
    and bool tensors (``num_batches_tracked``, masks, indices) are copied, never averaged.

    >>> is_averaged(torch.bfloat16), is_averaged(torch.complex64), is_averaged(torch.int64)
    (True, True, False)
    """
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    return dtype.is_floating_point or dtype.is_complex


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing it)."""
    return hasattr(t, "_local_tensor") and hasattr(t, "placements")


def local(t: Tensor) -> Tensor:
    """The tensor the kernels work on: this rank's shard of a DTensor, else ``t`` itself,
    detached (sharing storage)."""
    return (t._local_tensor if is_dtensor(t) else t).detach()


@dataclass(frozen=True)
class StateEntry:
    """One named tensor of a module, with where it lives."""

    name: str  # canonical name
    tensor: Tensor  # the Parameter object, or the buffer tensor
    is_buffer: bool
    persistent: bool
    owner: dict  # the owning module's _parameters or _buffers dict
    key: str  # its key in ``owner``
    path: str  # its full name in the module, before stripping


def named_state(module: nn.Module) -> dict[str, StateEntry]:
    """Every parameter and buffer of ``module`` by canonical name, in registration order.

    Tied tensors appear once. Raises :class:`ValueError` if stripping wrapper prefixes makes
    two names collide.
    """
    out: dict[str, StateEntry] = {}
    seen: set[int] = set()
    for mod_name, mod in module.named_modules(remove_duplicate=True):
        prefix = mod_name + "." if mod_name else ""
        for is_buffer, table in ((False, mod._parameters), (True, mod._buffers)):
            for key, t in table.items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                name = canonical_name(prefix + key)
                if name in out:
                    raise ValueError(
                        f"two tensors are both named {name!r} once wrapper prefixes are stripped "
                        f"(one is {prefix + key!r})"
                    )
                persistent = not is_buffer or key not in mod._non_persistent_buffers_set
                out[name] = StateEntry(name, t, is_buffer, persistent, table, key, prefix + key)
    return out
