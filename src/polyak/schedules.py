"""Momentum schedules: the weight given to the new value at each step.

Every schedule is a small immutable object with ``momentum(step) -> float``, the weight
:math:`m` of the source in

.. math::

    \\bar\\theta \\leftarrow (1 - m)\\,\\bar\\theta + m\\,\\theta ,

and ``decay(step) = 1 - momentum(step)`` (the :math:`\\beta` of torch, timm and diffusers).
``step`` is the averaged model's ``steps``: the number of earlier counted
``update_parameters`` calls, so the first averaging call sees ``step == interval``.

Schedules hold no tensors and no modules; they validate their arguments in ``__init__``
with a :class:`ValueError` naming the argument. :func:`interval_momentum` turns the
momentum of one step into the momentum of an update that stands for ``interval`` steps;
it is the one place where interval compensation is computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = [
    "Schedule",
    "ConstantMomentum",
    "MomentumAnnealing",
    "EqualAverage",
    "RampUpMomentum",
    "CosineMomentum",
    "interval_momentum",
]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_float(name: str, value: object, low: float, high: float, *, open_low: bool, open_high: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    below = v <= low if open_low else v < low
    above = v >= high if open_high else v > high
    if math.isnan(v) or below or above:
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return v


class Schedule:
    """Base class: the momentum (weight of the new value) as a function of the step.

    Subclasses implement :meth:`momentum`. ``per_update`` is ``True`` for schedules whose
    argument counts averaging updates rather than steps (the equal average of SWA); those
    are never interval-compensated.
    """

    per_update: bool = False

    def momentum(self, step: int) -> float:  # pragma: no cover - abstract
        """Weight of the new value at ``step``, in ``[0, 1]``."""
        raise NotImplementedError

    def decay(self, step: int) -> float:
        """``1 - momentum(step)``: the weight kept on the average."""
        return 1.0 - self.momentum(step)

    def __call__(self, step: int) -> float:
        return self.momentum(step)

    def _args(self) -> dict[str, object]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._args().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._args() == self._args()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self._args().items())))


class ConstantMomentum(Schedule):
    """The same momentum at every step (mmengine/mmagic ``ExponentialMovingAverage``).

    .. math:: m(t) = m

    where :math:`m` is ``momentum``, in :math:`(0, 1]`.

    >>> ConstantMomentum(0.0002)(0), ConstantMomentum(0.0002).decay(10)
    (0.0002, 0.9998)
    """

    def __init__(self, momentum: float) -> None:
        self.value = _check_float("momentum", momentum, 0.0, 1.0, open_low=True, open_high=False)

    def momentum(self, step: int) -> float:
        return self.value

    def _args(self) -> dict[str, object]:
        return {"momentum": self.value}


class MomentumAnnealing(Schedule):
    """A large momentum early, annealed to a floor (mmengine ``MomentumAnnealingEMA``).

    .. math:: m(t) = \\max\\left(m, \\frac{\\gamma}{\\gamma + t}\\right)

    where :math:`m` is ``momentum`` and :math:`\\gamma` is ``gamma``. With the defaults
    (2e-4, 100) the floor is reached at :math:`t \\approx 499{,}900`.

    >>> s = MomentumAnnealing(0.0002, gamma=100)
    >>> s(0), s(100), s(1_000_000)
    (1.0, 0.5, 0.0002)
    """

    def __init__(self, momentum: float = 0.0002, gamma: float = 100) -> None:
        self.floor = _check_float("momentum", momentum, 0.0, 1.0, open_low=True, open_high=False)
        self.gamma = _check_float("gamma", gamma, 0.0, math.inf, open_low=True, open_high=True)

    def momentum(self, step: int) -> float:
        return max(self.floor, self.gamma / (self.gamma + step))

    def _args(self) -> dict[str, object]:
        return {"momentum": self.floor, "gamma": self.gamma}


class EqualAverage(Schedule):
    """The equal average of every averaged snapshot (SWA).

    .. math:: m(n) = \\frac{1}{n + 1}

    where :math:`n` is the number of snapshots already in the average (the argument of
    this schedule counts averaging updates, not steps: ``step // interval``), so that
    after :math:`n` updates every snapshot has weight :math:`1/(n+1)`. No interval
    compensation applies.

    >>> EqualAverage()(0), EqualAverage()(1), EqualAverage()(3)
    (1.0, 0.5, 0.25)
    """

    per_update = True

    def momentum(self, step: int) -> float:
        return 1.0 / (step + 1)


class RampUpMomentum(Schedule):
    """StyleGAN's half-life in images with a ramp-up (mmagic ``RampUpEMA.rampup``).

    .. math::

        n_{\\text{img}}(t) &= (t + 1)\\,b \\\\
        h(t) &= \\min\\left(1000\\,k,\\; r\\,n_{\\text{img}}(t)\\right) \\\\
        m(t) &= 1 - 0.5^{\\,b / \\max(h(t),\\, \\epsilon)}

    where :math:`b` is ``batch_size``, :math:`k` is ``ema_kimg`` (the half-life in
    thousands of images), :math:`r` is ``ema_rampup`` (``None`` disables the ramp) and
    :math:`\\epsilon` is ``eps``. With the defaults the ramp ends at 200k images, after
    which the decay is :math:`0.5^{32/10000} \\approx 0.99778`.

    >>> s = RampUpMomentum(ema_kimg=10, ema_rampup=0.05, batch_size=32)
    >>> round(s.decay(0), 6), round(s.decay(10**6), 6)
    (0.0, 0.997784)
    """

    def __init__(
        self,
        ema_kimg: float = 10,
        ema_rampup: float | None = 0.05,
        batch_size: int = 32,
        eps: float = 1e-8,
    ) -> None:
        self.ema_kimg = _check_float("ema_kimg", ema_kimg, 0.0, math.inf, open_low=False, open_high=True)
        self.ema_rampup = (
            None
            if ema_rampup is None
            else _check_float("ema_rampup", ema_rampup, 0.0, math.inf, open_low=True, open_high=True)
        )
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.eps = _check_float("eps", eps, 0.0, math.inf, open_low=True, open_high=True)

    def momentum(self, step: int) -> float:
        return 1.0 - self._beta(step)

    def decay(self, step: int) -> float:
        return self._beta(step)

    def _beta(self, step: int) -> float:
        ema_nimg = self.ema_kimg * 1000.0
        if self.ema_rampup is not None:
            ema_nimg = min(ema_nimg, (step + 1) * self.batch_size * self.ema_rampup)
        return 0.5 ** (self.batch_size / max(ema_nimg, self.eps))

    def _args(self) -> dict[str, object]:
        return {
            "ema_kimg": self.ema_kimg,
            "ema_rampup": self.ema_rampup,
            "batch_size": self.batch_size,
            "eps": self.eps,
        }


class CosineMomentum(Schedule):
    """Cosine annealing of the momentum (mmpretrain ``CosineEMA``, BYOL, MoCo v3).

    .. math::

        m(t) = m_{\\text{end}} - (m_{\\text{end}} - m_{\\text{start}})
               \\,\\frac{\\cos(\\pi \\min(t, T) / T) + 1}{2}

    where :math:`m_{\\text{start}}` is ``momentum``, :math:`m_{\\text{end}}` is
    ``end_momentum`` and :math:`T` is ``max_steps``: :math:`m(0) = m_{\\text{start}}`,
    :math:`m(T) = m_{\\text{end}}`, held after :math:`T`. (mmpretrain's docstring has the
    sign of the second term flipped; its code, followed here, does not.)

    >>> s = CosineMomentum(0.004, 0.0, max_steps=100)
    >>> s(0), round(s(50), 6), s(100), s(200)
    (0.004, 0.002, 0.0, 0.0)
    """

    def __init__(self, momentum: float = 0.004, end_momentum: float = 0.0, max_steps: int = 1) -> None:
        self.start = _check_float("momentum", momentum, 0.0, 1.0, open_low=False, open_high=False)
        self.end = _check_float("end_momentum", end_momentum, 0.0, 1.0, open_low=False, open_high=False)
        self.max_steps = _check_int("max_steps", max_steps, 1)

    def momentum(self, step: int) -> float:
        k = min(step, self.max_steps)
        return self.end - (self.end - self.start) * (math.cos(math.pi * k / self.max_steps) + 1) / 2

    def _args(self) -> dict[str, object]:
        return {"momentum": self.start, "end_momentum": self.end, "max_steps": self.max_steps}


def interval_momentum(momentum: Callable[[int], float], step: int, interval: int, *, compensate: bool = True) -> float:
    """The momentum of an averaging update at ``step`` that stands for ``interval`` steps.

    .. math::

        m_k(s) = 1 - \\prod_{j = s - k + 1}^{s} \\bigl(1 - m(j)\\bigr)

    where :math:`m` is the schedule, :math:`s` is ``step`` and :math:`k` is ``interval``.
    One update with :math:`m_k(s)` moves the average exactly as :math:`k` updates with
    :math:`m(s-k+1), \\dots, m(s)` would toward the same value, so the averaging horizon in
    training steps does not depend on :math:`k`. For a constant momentum this is
    :math:`1 - (1 - m)^k`; for :class:`RampUpMomentum` it is the decay of :math:`k`
    batches. The product is taken in log space (``log1p``/``expm1``) so that tiny
    momenta keep their precision.

    A schedule with ``per_update = True`` (:class:`EqualAverage`) is evaluated at the
    number of earlier updates, ``step // interval``, without compensation. With
    ``compensate=False`` the result is the uncompensated ``momentum(step)`` of
    mmengine, mmagic and mmpretrain.

    >>> round(interval_momentum(ConstantMomentum(0.5), 4, 2), 6)
    0.75
    >>> interval_momentum(ConstantMomentum(0.5), 4, 2, compensate=False)
    0.5
    """
    if getattr(momentum, "per_update", False):
        return momentum(step // interval)
    if not compensate or interval == 1:
        return momentum(step)
    log_keep = 0.0
    for j in range(step - interval + 1, step + 1):
        m = momentum(j)
        if m >= 1.0:
            return 1.0
        log_keep += math.log1p(-m)
    return -math.expm1(log_keep)
