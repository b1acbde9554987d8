"""BatchNorm re-estimation for averaged weights."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["update_bn"]


def _to(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _default_call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)) and batch:
        return model(batch[0])
    raise TypeError(
        f"update_bn does not know how to feed a batch of type {type(batch).__name__} to the model: "
        "pass call_fn=lambda model, batch: model(...)"
    )


@torch.no_grad()
def update_bn(
    loader: Iterable[Any],
    model: nn.Module,
    device: torch.device | str | None = None,
    call_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> None:
    """Recompute the BatchNorm running statistics of ``model`` with one pass over ``loader``.

    Each BatchNorm's statistics are reset and re-estimated as the equal (cumulative) average
    over the batches,

    .. math:: \\mu = \\frac{1}{N} \\sum_{i=1}^{N} \\mu_i, \\qquad
              \\sigma^2 = \\frac{1}{N} \\sum_{i=1}^{N} \\sigma^2_i

    where :math:`\\mu_i, \\sigma^2_i` are the batch statistics of batch :math:`i`. Needed
    after SWA, whose averaged weights never produced the statistics they are evaluated with.
    Each BatchNorm's ``momentum`` and every submodule's train/eval mode are restored afterwards,
    also when a batch raises.

    Args:
        loader: an iterable of batches.
        model: the model (an averaged model works too: its ``forward`` runs the average).
        device: if given, tensors in each batch are moved there (recursively through
            tuples, lists, dicts and namedtuples).
        call_fn: ``call_fn(model, batch)`` runs one batch. By default a tensor batch is
            called as ``model(batch)``, a tuple or list as ``model(batch[0])`` (input, target)
            and a dict as ``model(**batch)``.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return
    call = call_fn or _default_call
    saved = [(m, m.momentum) for m in bns]
    modes = [(m, m.training) for m in model.modules()]
    # Snapshot the statistics so that a failing batch leaves them as they were.
    stats = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for batch in loader:
            call(model, _to(batch, device))
    except BaseException:
        for m, mean, var, n in stats:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)
        raise
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
