"""Polyak target-network updates for reinforcement learning."""

from __future__ import annotations

import weakref

from torch import Tensor, nn

from .engine import AveragingEngine
from .validation import check_momentum

__all__ = ["soft_update", "hard_update"]

_ENGINES: weakref.WeakKeyDictionary[nn.Module, dict[bool, AveragingEngine]] = weakref.WeakKeyDictionary()


def _engine(target: nn.Module, update_buffers: bool) -> AveragingEngine:
    if not isinstance(target, nn.Module):
        raise TypeError(f"target must be an nn.Module, got {type(target).__name__}")
    per_target = _ENGINES.setdefault(target, {})
    engine = per_target.get(update_buffers)
    if engine is None:
        engine = per_target[update_buffers] = AveragingEngine(target, update_buffers=update_buffers)
    return engine


def soft_update(target: nn.Module, online: nn.Module, tau: float | Tensor, *, update_buffers: bool = False) -> None:
    """Move the target network toward the online one (Polyak averaging, as in DDPG, TD3, SAC).

    .. math:: \\theta_{\\text{target}} \\leftarrow (1 - \\tau)\\,\\theta_{\\text{target}}
              + \\tau\\,\\theta_{\\text{online}}

    where :math:`\\tau` is ``tau``, the weight of the **online** network: ``tau=0.005`` moves the
    target 0.5% of the way (the usual value), ``tau=1`` copies. Parameters are updated with one
    fused kernel per (device, dtype) group, matched by name through ``DDP``/``torch.compile``
    wrappers; buffers are copied (``update_buffers=True`` soft-updates floating ones too) and
    integer buffers always copied. A mismatch raises before anything changes.

    Args:
        target: the target network, updated in place.
        online: the network being trained.
        tau: in [0, 1]; a float, or a 0-d tensor on the target's device (never read on the host).
            A float above 0.5 (almost surely a decay) gives a
            :class:`~polyak.validation.ConventionWarning`.
        update_buffers: soft-update floating buffers too.
    """
    if isinstance(tau, Tensor):
        if tau.numel() != 1 or not tau.is_floating_point():
            raise ValueError(
                f"tau must be a float or a 0-d floating tensor, got {tau.dtype} of shape {tuple(tau.shape)}"
            )
        weight: float | Tensor = tau
    else:
        weight = check_momentum("tau", tau)
    _engine(target, update_buffers).average_(online, weight)


def hard_update(target: nn.Module, online: nn.Module) -> None:
    """Copy every parameter and buffer of ``online`` into ``target`` (matched by name).

    .. math:: \\theta_{\\text{target}} \\leftarrow \\theta_{\\text{online}}
    """
    _engine(target, False).copy_(online, "all")
