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
from collections.abc import Callable, Mapping
from typing import Any

from .registry import Registry
from .validation import check_decay, check_int, check_momentum, check_number

__all__ = [
    "Schedule",
    "SCHEDULES",
    "ConstantMomentum",
    "MomentumAnnealing",
    "EqualAverage",
    "RampUpMomentum",
    "CosineMomentum",
    "Warmup",
    "NumUpdatesWarmup",
    "ExpMomentum",
    "MMCVWarmup",
    "PowerFunction",
    "StartAt",
    "interval_momentum",
    "resolve_decay",
    "schedule_from_dict",
    "gamma_to_sigma_rel",
    "sigma_rel_to_gamma",
]


#: Every schedule class by name, for :func:`schedule_from_dict` and configs.
SCHEDULES: Registry[type[Schedule]] = Registry("schedule")


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

    def update_momentum(self, step: int, interval: int = 1, *, compensate: bool = True) -> float:
        """The momentum of an averaging update at ``step`` that stands for ``interval`` steps
        (see :func:`interval_momentum`)."""
        return _compensated(self.momentum, step, interval, compensate)

    def _args(self) -> dict[str, object]:
        return {}

    def to_dict(self) -> dict[str, object]:
        """``{"type": class name, "args": constructor arguments}``: names and numbers only, so a
        checkpoint holding it loads with ``torch.load(weights_only=True)``; see
        :func:`schedule_from_dict`."""
        args = {k: v.to_dict() if isinstance(v, Schedule) else v for k, v in self._args().items()}
        return {"type": type(self).__name__, "args": args}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._args().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._args() == self._args()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self._args().items())))


@SCHEDULES.register
class ConstantMomentum(Schedule):
    """The same momentum at every step (mmengine/mmagic ``ExponentialMovingAverage``).

    .. math:: m(t) = m

    where :math:`m` is ``momentum``, or :math:`1 - \\beta` given ``decay`` :math:`\\beta`, or
    given ``half_life`` (see :func:`resolve_decay`); momentum and decay are in [0, 1]. The
    schedule keeps the argument it was given (its ``repr`` and :meth:`to_dict` say
    ``decay=0.99``, not the momentum computed from it).

    >>> ConstantMomentum(0.0002)(0), ConstantMomentum(0.0002).decay(10)
    (0.0002, 0.9998)
    >>> round(ConstantMomentum(decay=0.999)(0), 6), round(ConstantMomentum(half_life=693.147).decay(0), 6)
    (0.001, 0.999)
    >>> ConstantMomentum(decay=0.99)
    ConstantMomentum(decay=0.99)
    """

    def __init__(
        self,
        momentum: float | None = None,
        *,
        decay: float | None = None,
        half_life: float | None = None,
        half_life_unit: str = "updates",
        batch_size: int | None = None,
    ) -> None:
        beta = resolve_decay(
            momentum=momentum, decay=decay, half_life=half_life, half_life_unit=half_life_unit, batch_size=batch_size
        )
        self.value = float(momentum) if momentum is not None else 1.0 - beta
        if momentum is not None:
            self._given: dict[str, object] = {"momentum": self.value}
        elif decay is not None:
            self._given = {"decay": float(decay)}
        else:
            self._given = {"half_life": float(half_life)}  # type: ignore[arg-type]
            if half_life_unit != "updates":
                self._given.update(half_life_unit=half_life_unit, batch_size=batch_size)

    def momentum(self, step: int) -> float:
        return self.value

    def decay(self, step: int) -> float:
        return 1.0 - self.value if "decay" not in self._given else float(self._given["decay"])  # type: ignore[arg-type]

    def _args(self) -> dict[str, object]:
        return dict(self._given)


@SCHEDULES.register
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
        self.floor = check_momentum("momentum", momentum)
        self.gamma = check_number("gamma", gamma, 0.0, math.inf, open_low=True, open_high=True)

    def momentum(self, step: int) -> float:
        return max(self.floor, self.gamma / (self.gamma + step))

    def _args(self) -> dict[str, object]:
        return {"momentum": self.floor, "gamma": self.gamma}


@SCHEDULES.register
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

    def update_momentum(self, step: int, interval: int = 1, *, compensate: bool = True) -> float:
        return self.momentum(step // interval)


@SCHEDULES.register
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
    >>> f"{s.decay(0):.3g}", round(s.decay(10**6), 6)
    ('9.54e-07', 0.997784)
    """

    def __init__(
        self,
        ema_kimg: float = 10,
        ema_rampup: float | None = 0.05,
        batch_size: int = 32,
        eps: float = 1e-8,
    ) -> None:
        self.ema_kimg = check_number("ema_kimg", ema_kimg, 0.0, math.inf, open_low=False, open_high=True)
        self.ema_rampup = (
            None
            if ema_rampup is None
            else check_number("ema_rampup", ema_rampup, 0.0, math.inf, open_low=True, open_high=True)
        )
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.eps = check_number("eps", eps, 0.0, math.inf, open_low=True, open_high=True)

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


@SCHEDULES.register
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
        self.start = check_momentum("momentum", momentum)
        self.end = check_momentum("end_momentum", end_momentum)
        self.max_steps = check_int("max_steps", max_steps, 1)

    def momentum(self, step: int) -> float:
        k = min(step, self.max_steps)
        return self.end - (self.end - self.start) * (math.cos(math.pi * k / self.max_steps) + 1) / 2

    def _args(self) -> dict[str, object]:
        return {"momentum": self.start, "end_momentum": self.end, "max_steps": self.max_steps}


def schedule_from_dict(data: Mapping[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.to_dict`'s output (polyak's own classes only).

    >>> schedule_from_dict(StartAt(ConstantMomentum(0.01), start=5).to_dict())
    StartAt(schedule=ConstantMomentum(momentum=0.01), start=5)
    """
    try:
        name, args = data["type"], dict(data.get("args", {}))
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a schedule description: {data!r}") from e
    cls = SCHEDULES.lookup(name, what="schedule type")
    args = {k: schedule_from_dict(v) if isinstance(v, Mapping) and "type" in v else v for k, v in args.items()}
    return cls(**args)


def resolve_decay(
    *,
    decay: float | None = None,
    half_life: float | None = None,
    half_life_unit: str = "updates",
    batch_size: int | None = None,
    momentum: float | None = None,
    default: float | None = None,
) -> float:
    """One decay :math:`\\beta` from exactly one of ``momentum``, ``decay`` or ``half_life``.

    .. math:: \\beta = 1 - m, \\qquad \\beta = 0.5^{1/h} \\;(\\text{updates}), \\qquad
              \\beta = 0.5^{b/h} \\;(\\text{samples})

    where :math:`h` is ``half_life`` and :math:`b` is ``batch_size`` (required when
    ``half_life_unit='samples'``): after :math:`h` updates (or samples) a value's weight in
    the average has halved. ``default`` is used when none is given.

    >>> resolve_decay(half_life=693.147)  # doctest: +ELLIPSIS
    0.99900...
    >>> resolve_decay(half_life=32_000, half_life_unit="samples", batch_size=32)  # doctest: +ELLIPSIS
    0.99930...
    """
    given = [k for k, v in (("momentum", momentum), ("decay", decay), ("half_life", half_life)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of momentum, decay and half_life, got {' and '.join(given)}")
    if half_life_unit not in ("updates", "samples"):
        raise ValueError(f"half_life_unit must be 'updates' or 'samples', got {half_life_unit!r}")
    if momentum is not None:
        return 1.0 - check_momentum("momentum", momentum)
    if decay is not None:
        return check_decay("decay", decay)
    if half_life is not None:
        h = check_number("half_life", half_life, 0.0, math.inf, open_low=True, open_high=True)
        if half_life_unit == "samples":
            if batch_size is None:
                raise ValueError("half_life_unit='samples' needs batch_size= (samples per update)")
            return 0.5 ** (check_int("batch_size", batch_size, 1) / h)
        return 0.5 ** (1.0 / h)
    if default is None:
        raise ValueError("give one of momentum, decay and half_life")
    return default


@SCHEDULES.register
class Warmup(Schedule):
    """A decay that warms up as an inverse power of the step (timm, diffusers, ema-pytorch).

    .. math::

        s &= t - t_0 \\\\
        \\beta(t) &= \\begin{cases}
            0 & s \\le 0 \\text{ (copy)} \\\\
            \\max\\left(\\beta_{\\min}, \\min\\left(\\beta_{\\max},
                1 - (1 + s/\\gamma)^{-p}\\right)\\right) & \\text{warm-up on} \\\\
            \\beta_{\\max} & \\text{warm-up off}
        \\end{cases}

    where :math:`t_0` is ``update_after_step``, :math:`\\gamma` is ``inv_gamma``, :math:`p`
    is ``power``, :math:`\\beta_{\\max}` is ``decay`` (or from ``half_life``) and
    :math:`\\beta_{\\min}` is ``min_decay``. With :math:`t` the averaged model's ``steps``
    this reproduces timm ``ModelEmaV3.get_decay(step=t+1)``, diffusers ``EMAModel`` with
    ``use_ema_warmup=True`` and ema-pytorch ``EMA``. :math:`p = 2/3` reaches 0.999 at 31.6k
    steps and 0.9999 at 1M (good for long runs); :math:`p = 3/4` reaches 0.999 at 10k and
    0.9999 at 215k. ``warmup=False`` really turns the warm-up off (diffusers' switch falls
    back to :class:`NumUpdatesWarmup` instead).

    >>> s = Warmup(0.9999)
    >>> s.decay(0), round(s.decay(1), 4), round(s.decay(31_623), 4), s.decay(10**9)
    (0.0, 0.37, 0.999, 0.9999)
    """

    def __init__(
        self,
        decay: float | None = None,
        *,
        half_life: float | None = None,
        half_life_unit: str = "updates",
        batch_size: int | None = None,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        warmup: bool = True,
    ) -> None:
        self.max_decay = resolve_decay(
            decay=decay, half_life=half_life, half_life_unit=half_life_unit, batch_size=batch_size, default=0.9999
        )
        self.inv_gamma = check_number("inv_gamma", inv_gamma, 0.0, math.inf, open_low=True, open_high=True)
        self.power = check_number("power", power, 0.0, math.inf, open_low=True, open_high=True)
        self.min_decay = check_number("min_decay", min_decay, 0.0, self.max_decay, open_low=False, open_high=False)
        self.update_after_step = check_int("update_after_step", update_after_step, 0)
        self.warmup = bool(warmup)

    def momentum(self, step: int) -> float:
        return 1.0 - self.decay(step)

    def decay(self, step: int) -> float:
        s = step - self.update_after_step
        if s <= 0:
            return 0.0
        if not self.warmup:
            return self.max_decay
        value = 1.0 - (1.0 + s / self.inv_gamma) ** -self.power
        return max(self.min_decay, min(self.max_decay, value))

    def _args(self) -> dict[str, object]:
        return {
            "decay": self.max_decay,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "min_decay": self.min_decay,
            "update_after_step": self.update_after_step,
            "warmup": self.warmup,
        }


@SCHEDULES.register
class NumUpdatesWarmup(Schedule):
    """TensorFlow's ``num_updates`` warm-up (torch_ema, diffusers without ``use_ema_warmup``).

    .. math:: \\beta(t) = \\min\\left(\\beta_{\\max}, \\frac{1 + t}{10 + t}\\right)

    where :math:`\\beta_{\\max}` is ``decay`` and :math:`t` is ``steps`` (torch_ema's
    ``num_updates`` after its increment). :math:`\\beta` reaches 0.999 at :math:`t \\approx
    8{,}990`.

    >>> s = NumUpdatesWarmup(0.999)
    >>> round(s.decay(1), 6), round(s.decay(100), 6), s.decay(10**6)
    (0.181818, 0.918182, 0.999)
    """

    def __init__(
        self,
        decay: float | None = None,
        *,
        half_life: float | None = None,
        half_life_unit: str = "updates",
        batch_size: int | None = None,
    ) -> None:
        self.max_decay = resolve_decay(
            decay=decay, half_life=half_life, half_life_unit=half_life_unit, batch_size=batch_size, default=0.9999
        )

    def momentum(self, step: int) -> float:
        return 1.0 - self.decay(step)

    def decay(self, step: int) -> float:
        return min(self.max_decay, (1.0 + step) / (10.0 + step))

    def _args(self) -> dict[str, object]:
        return {"decay": self.max_decay}


@SCHEDULES.register
class ExpMomentum(Schedule):
    """A momentum that decays exponentially to a floor (mmdet ``ExpMomentumEMA``, YOLOX).

    .. math:: m(t) = (1 - m)\\,e^{-(1 + t)/\\gamma} + m

    where :math:`m` is ``momentum`` and :math:`\\gamma` is ``gamma``.

    >>> s = ExpMomentum(0.0002, gamma=2000)
    >>> round(s(0), 6), round(s(20_000), 6)
    (0.9995, 0.000245)
    """

    def __init__(self, momentum: float = 0.0002, gamma: float = 2000) -> None:
        self.floor = check_momentum("momentum", momentum)
        self.gamma = check_number("gamma", gamma, 0.0, math.inf, open_low=True, open_high=True)

    def momentum(self, step: int) -> float:
        return (1.0 - self.floor) * math.exp(-(1.0 + step) / self.gamma) + self.floor

    def _args(self) -> dict[str, object]:
        return {"momentum": self.floor, "gamma": self.gamma}


@SCHEDULES.register
class MMCVWarmup(Schedule):
    """mmcv 1.x ``EMAHook``'s warm-up of the momentum.

    .. math:: m(t) = \\min\\left(m, \\frac{1 + t}{w + t}\\right)

    where :math:`m` is ``momentum``, :math:`w` is ``warm_up`` and :math:`t` is the runner's
    0-based iteration. The second term is at least :math:`1/w`, so with mmcv's defaults
    (2e-4, 100) it never binds (mmcv issue #901): kept for exact migration. mmcv's
    ``momentum ** interval`` is not reproduced; polyak's interval compensation applies.

    >>> MMCVWarmup(0.0002, warm_up=100)(0), MMCVWarmup(0.5, warm_up=100)(0)
    (0.0002, 0.01)
    """

    def __init__(self, momentum: float = 0.0002, warm_up: int = 100) -> None:
        self.value = check_momentum("momentum", momentum)
        self.warm_up = check_int("warm_up", warm_up, 1)

    def momentum(self, step: int) -> float:
        return min(self.value, (1.0 + step) / (self.warm_up + step))

    def _args(self) -> dict[str, object]:
        return {"momentum": self.value, "warm_up": self.warm_up}


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2's relative standard deviation of a power-function EMA profile.

    .. math:: \\sigma_{\\text{rel}} = \\sqrt{\\frac{\\gamma + 1}{(\\gamma + 2)^2 (\\gamma + 3)}}

    >>> round(gamma_to_sigma_rel(6.94), 4)
    0.1
    """
    g = check_number("gamma", gamma, -1.0, math.inf, open_low=True, open_high=True)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


#: Where gamma_to_sigma_rel peaks (its log-derivative vanishes where g^2 + 3g + 1 = 0).
_GAMMA_AT_SIGMA_MAX = (math.sqrt(5) - 3) / 2
_SIGMA_REL_MAX = gamma_to_sigma_rel(_GAMMA_AT_SIGMA_MAX)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent :math:`\\gamma` of the power-function EMA with relative width
    ``sigma_rel``: the largest real root of

    .. math:: \\gamma^3 + 7\\gamma^2 + (16 - \\sigma_{\\text{rel}}^{-2})\\gamma
              + (12 - \\sigma_{\\text{rel}}^{-2}) = 0

    (EDM2, Algorithm 2), found by bisection in float64 on the branch
    :math:`\\gamma > (\\sqrt 5 - 3)/2`, where :func:`gamma_to_sigma_rel` decreases
    monotonically from its maximum, about 0.3003, to 0. ``sigma_rel`` must be in
    :math:`(0, 0.3003)`.

    >>> round(sigma_rel_to_gamma(0.05), 2), round(sigma_rel_to_gamma(0.10), 2)
    (16.97, 6.94)
    """
    s = check_number("sigma_rel", sigma_rel, 0.0, _SIGMA_REL_MAX, open_low=True, open_high=True)
    t = s**-2

    def cubic(g: float) -> float:
        return ((g + 7) * g + 16 - t) * g + 12 - t

    lo, hi = _GAMMA_AT_SIGMA_MAX, 1.0
    while cubic(hi) < 0:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if cubic(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@SCHEDULES.register
class PowerFunction(Schedule):
    """EDM2's power-function EMA, whose profile keeps a fixed relative width at every step.

    .. math:: \\beta(t) = \\left(1 - \\frac{1}{t + 1}\\right)^{\\gamma + 1}
              = \\left(\\frac{t}{t + 1}\\right)^{\\gamma + 1}

    where :math:`t` is ``steps`` and :math:`\\gamma` is ``gamma`` (or the exponent of
    ``sigma_rel``, see :func:`sigma_rel_to_gamma`). After :math:`T` updates the average
    weights the value of step :math:`\\tau` in proportion to :math:`\\tau^{\\gamma}`: its
    width relative to :math:`T` is :math:`\\sigma_{\\text{rel}}`, whatever :math:`T`. With
    ``interval`` :math:`k` the compensated update is
    :math:`(1 - k/(t + 1))^{\\gamma + 1}`, EDM2's ``t_delta``. The first update
    (:math:`t = 0`) copies.

    >>> s = PowerFunction(sigma_rel=0.10)
    >>> round(s.gamma, 2), s.decay(0), round(s.decay(1000), 4)
    (6.94, 0.0, 0.9921)
    """

    def __init__(self, gamma: float | None = None, *, sigma_rel: float | None = None) -> None:
        if (gamma is None) == (sigma_rel is None):
            raise ValueError("give exactly one of gamma and sigma_rel")
        if gamma is not None:
            self.gamma = check_number("gamma", gamma, -1.0, math.inf, open_low=True, open_high=True)
        else:
            self.gamma = sigma_rel_to_gamma(sigma_rel)  # type: ignore[arg-type]

    @property
    def sigma_rel(self) -> float:
        return gamma_to_sigma_rel(self.gamma)

    def momentum(self, step: int) -> float:
        return 1.0 - self.decay(step)

    def decay(self, step: int) -> float:
        return (step / (step + 1.0)) ** (self.gamma + 1.0)

    def _args(self) -> dict[str, object]:
        return {"gamma": self.gamma}


@SCHEDULES.register
class StartAt(Schedule):
    """Copy the model until ``start``, then follow ``schedule`` counted from there.

    .. math:: m(t) = \\begin{cases} 1 & t < t_s \\text{ (copy)} \\\\
                                    m_{\\text{inner}}(t - t_s) & t \\ge t_s \\end{cases}

    where :math:`t_s` is ``start``: steps before it are not counted by the inner schedule.
    ``start`` may be given as ``start_epoch`` with ``steps_per_epoch`` (Lightning's
    ``swa_epoch_start``), or as ``start_fraction`` of ``total_steps``. An averaging update
    whose interval reaches back before ``start`` copies.

    >>> s = StartAt(EqualAverage(), start=100)
    >>> s(99), s(100), s(101), s(103)
    (1.0, 1.0, 0.5, 0.25)
    """

    def __init__(
        self,
        schedule: Schedule,
        start: int | None = None,
        *,
        start_epoch: int | None = None,
        steps_per_epoch: int | None = None,
        start_fraction: float | None = None,
        total_steps: int | None = None,
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a polyak Schedule, got {schedule!r}")
        given = [
            n
            for n, v in (("start", start), ("start_epoch", start_epoch), ("start_fraction", start_fraction))
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(f"give exactly one of start, start_epoch and start_fraction, got {given or 'none'}")
        if start_epoch is not None:
            if steps_per_epoch is None:
                raise ValueError("start_epoch needs steps_per_epoch")
            start = check_int("start_epoch", start_epoch, 0) * check_int("steps_per_epoch", steps_per_epoch, 1)
        elif start_fraction is not None:
            if total_steps is None:
                raise ValueError("start_fraction needs total_steps")
            f = check_number("start_fraction", start_fraction, 0.0, 1.0, open_low=False, open_high=False)
            start = math.ceil(f * check_int("total_steps", total_steps, 1))
        self.inner = schedule
        self.start = check_int("start", start, 0)

    def momentum(self, step: int) -> float:
        return 1.0 if step < self.start else self.inner.momentum(step - self.start)

    def update_momentum(self, step: int, interval: int = 1, *, compensate: bool = True) -> float:
        if step < self.start or (compensate and step - interval + 1 < self.start):
            return 1.0
        return self.inner.update_momentum(step - self.start, interval, compensate=compensate)

    def _args(self) -> dict[str, object]:
        return {"schedule": self.inner, "start": self.start}


def interval_momentum(momentum: Callable[[int], float], step: int, interval: int, *, compensate: bool = True) -> float:
    """The momentum of an averaging update at ``step`` that stands for ``interval`` steps.

    .. math::

        m_k(s) = 1 - \\prod_{j = s - k + 1}^{s} \\bigl(1 - m(j)\\bigr)

    where :math:`m` is the schedule, :math:`s` is ``step`` and :math:`k` is ``interval`` (a
    window reaching back before step 0 starts at 0).
    One update with :math:`m_k(s)` moves the average exactly as :math:`k` updates with
    :math:`m(s-k+1), \\dots, m(s)` would toward the same value, so the averaging horizon in
    training steps does not depend on :math:`k`. For a constant momentum this is
    :math:`1 - (1 - m)^k`; for :class:`RampUpMomentum` it is the decay of :math:`k`
    batches. The product is taken in log space (``log1p``/``expm1``) so that tiny
    momenta keep their precision.

    A :class:`Schedule` may define its own rule (:meth:`Schedule.update_momentum`):
    :class:`EqualAverage` is evaluated at the number of earlier updates,
    ``step // interval``, without compensation, and :class:`StartAt` copies while the
    window reaches back before its start. With
    ``compensate=False`` the result is the uncompensated ``momentum(step)`` of
    mmengine, mmagic and mmpretrain.

    >>> round(interval_momentum(ConstantMomentum(0.5), 4, 2), 6)
    0.75
    >>> interval_momentum(ConstantMomentum(0.5), 4, 2, compensate=False)
    0.5
    """
    if isinstance(momentum, Schedule):
        return momentum.update_momentum(step, interval, compensate=compensate)
    return _compensated(momentum, step, interval, compensate)


def _compensated(momentum: Callable[[int], float], step: int, interval: int, compensate: bool) -> float:
    if not compensate or interval == 1:
        return momentum(step)
    log_keep = 0.0
    for j in range(max(step - interval + 1, 0), step + 1):
        m = momentum(j)
        if m >= 1.0:
            return 1.0
        log_keep += math.log1p(-m)
    return -math.expm1(log_keep)
