"""``ParameterAverage``: an average of a list of tensors, for torch_ema and diffusers users."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .averaged_model import AveragedModel
from .health import Health
from .schedules import ConstantMomentum, Schedule

__all__ = ["ParameterAverage"]


class _Tensors(nn.Module):
    """The given tensors registered by position (``"0"``, ``"1"``, …), not copied:
    Parameters as parameters, other tensors as persistent buffers."""

    def __init__(self, tensors: list[Tensor]) -> None:
        super().__init__()
        for i, t in enumerate(tensors):
            if isinstance(t, nn.Parameter):
                self.register_parameter(str(i), t)
            elif isinstance(t, Tensor):
                self.register_buffer(str(i), t)
            else:
                raise TypeError(f"parameters[{i}] is a {type(t).__name__}, not a tensor")


class ParameterAverage:
    """An exponential moving average of an iterable of tensors (torch_ema, diffusers ``EMAModel``).

    .. math:: \\bar\\theta_i \\leftarrow \\beta\\,\\bar\\theta_i + (1 - \\beta)\\,\\theta_i

    for every tensor :math:`\\theta_i`, where :math:`\\beta` is ``decay`` (or the decay of
    ``schedule`` at the update count). The average starts as a copy of the tensors, made at
    construction (as torch_ema and diffusers), and ``update()`` number :math:`n` is made at
    ``steps == n``, so ``schedule=NumUpdatesWarmup(decay)`` gives torch_ema's
    ``use_num_updates=True`` numbers exactly. diffusers' ``EMAModel`` is one update behind:
    its first ``step()`` copies again, so its warm-up at ``optimization_step`` :math:`n` is this
    class's at ``steps`` :math:`n - 1`. Floating tensors are averaged with one fused kernel per
    (device, dtype), integer ones copied; low-precision tensors get an fp32 average. Every
    given tensor is averaged, trainable or not (diffusers copies those with
    ``requires_grad=False``; use :class:`~polyak.AveragedModel` with ``frozen="copy"`` for that).

    Args:
        parameters: the tensors (e.g. ``model.parameters()``); kept by reference.
        decay: the decay :math:`\\beta` (or give ``schedule``).
        schedule: a :class:`~polyak.schedules.Schedule`.
        interval, dtype, device, compensate_interval: as :class:`~polyak.BaseAveragedModel`.

    >>> import torch, polyak
    >>> w = torch.nn.Parameter(torch.zeros(3))
    >>> avg = polyak.ParameterAverage([w], decay=0.5)
    >>> with torch.no_grad():
    ...     _ = w.fill_(1.0)
    >>> avg.update()
    >>> avg.shadow[0].tolist()
    [0.5, 0.5, 0.5]
    """

    def __init__(
        self,
        parameters: Iterable[Tensor],
        decay: float | None = None,
        *,
        schedule: Schedule | None = None,
        interval: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        compensate_interval: bool = True,
    ) -> None:
        if (decay is None) == (schedule is None):
            raise ValueError("give exactly one of decay and schedule")
        if schedule is None:
            schedule = ConstantMomentum(decay=decay)
        self._tensors = list(parameters)
        self._source = _Tensors(self._tensors)
        self.average = AveragedModel(
            self._source,
            device,
            use_buffers=True,
            schedule=schedule,
            interval=interval,
            dtype=dtype,
            compensate_interval=compensate_interval,
        )
        self.average.update_parameters(self._source)  # the initial copy, as torch_ema
        self._stored: list[Tensor] | None = None

    def _resolve(self, parameters: Iterable[Tensor] | None) -> nn.Module:
        if parameters is None:
            return self._source
        given = list(parameters)
        if len(given) == len(self._tensors) and all(a is b for a, b in zip(given, self._tensors, strict=True)):
            return self._source
        return _Tensors(given)

    @property
    def steps(self) -> int:
        """Updates made, the initial copy included."""
        return self.average.steps

    @property
    def shadow(self) -> list[Tensor]:
        """The averaged tensors, in the order given."""
        module = self.average.module
        return [getattr(module, str(i)) for i in range(len(self._tensors))]

    @property
    def current_decay(self) -> float | None:
        """The decay of the latest update, for logging."""
        return self.average.current_decay

    def update(self, parameters: Iterable[Tensor] | None = None) -> None:
        """Fold the tensors' current values into the average (torch_ema's ``update``)."""
        self.average.update_parameters(self._resolve(parameters))

    step = update  # diffusers' name

    def health(self, parameters: Iterable[Tensor] | None = None, *, warn: bool = True) -> Health:
        """The average's health report against the tensors (see
        :meth:`polyak.BaseAveragedModel.health`; tensors are named by position)."""
        return self.average.health(self._resolve(parameters), warn=warn)

    def copy_to(self, parameters: Iterable[Tensor] | None = None) -> None:
        """Write the average into the tensors."""
        self.average.copy_to(self._resolve(parameters))

    def store(self, parameters: Iterable[Tensor] | None = None) -> None:
        """Keep a copy of the tensors' current values, for :meth:`restore`."""
        self._stored = [t.detach().clone() for t in (self._tensors if parameters is None else list(parameters))]

    def restore(self, parameters: Iterable[Tensor] | None = None) -> None:
        """Put back the values saved by :meth:`store`."""
        if self._stored is None:
            raise RuntimeError("restore() without a store()")
        targets = self._tensors if parameters is None else list(parameters)
        if len(targets) != len(self._stored):
            raise ValueError(f"restore() got {len(targets)} tensors, store() saved {len(self._stored)}")
        with torch.no_grad():
            for t, s in zip(targets, self._stored, strict=True):
                t.copy_(s)
        self._stored = None

    @contextlib.contextmanager
    def average_parameters(self, parameters: Iterable[Tensor] | None = None) -> Iterator[None]:
        """Use the average in the tensors for the block, then restore them (also on error)."""
        with self.average.swapped(self._resolve(parameters)):
            yield

    def state_dict(self) -> dict[str, Any]:
        """The averaged model's state: ``n_averaged`` (and ``steps`` when ``interval`` > 1) and
        ``module.<i>`` for the i-th tensor."""
        return dict(self.average.state_dict())

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict`'s output (checked before anything changes)."""
        self.average.load_state_dict(state_dict)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ParameterAverage:
        """Move (and cast the floating tensors of) the average."""
        self.average.to(device=device, dtype=dtype)
        return self
