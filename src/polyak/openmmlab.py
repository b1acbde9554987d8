"""The OpenMMLab averaged models, as presets: each binds its mmengine/mmagic/mmpretrain/mmdet
signature to one schedule of :mod:`polyak.schedules`, whose docstring has the formula.

=============================  ===========================================  =======================
class                          schedule                                     from
=============================  ===========================================  =======================
``ExponentialMovingAverage``   :class:`~polyak.schedules.ConstantMomentum`  mmengine, mmagic
``MomentumAnnealingEMA``       :class:`~polyak.schedules.MomentumAnnealing` mmengine
``StochasticWeightAverage``    :class:`~polyak.schedules.EqualAverage`      mmengine
``RampUpEMA``                  :class:`~polyak.schedules.RampUpMomentum`    mmagic
``CosineEMA``                  :class:`~polyak.schedules.CosineMomentum`    mmpretrain
``ExpMomentumEMA``             :class:`~polyak.schedules.ExpMomentum`       mmdet
=============================  ===========================================  =======================

The arguments, defaults and ``state_dict`` layout are OpenMMLab's; the keyword-only ``dtype`` and
``compensate_interval`` and the rest of the behaviour are :class:`~polyak.BaseAveragedModel`'s.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import AVERAGES, BaseAveragedModel, Update
from .schedules import (
    ConstantMomentum,
    CosineMomentum,
    EqualAverage,
    ExpMomentum,
    MomentumAnnealing,
    RampUpMomentum,
    Schedule,
)
from .validation import check_count, check_int

__all__ = [
    "ExponentialMovingAverage",
    "MomentumAnnealingEMA",
    "StochasticWeightAverage",
    "RampUpEMA",
    "CosineEMA",
    "ExpMomentumEMA",
]


@AVERAGES.register
class ExponentialMovingAverage(BaseAveragedModel):
    """Exponential moving average with a constant momentum (mmengine, mmagic): the preset of
    :class:`~polyak.schedules.ConstantMomentum`.

    ``momentum`` is the weight of the new value (the *decay* of torch, timm and diffusers is
    ``1 - momentum``): the average forgets with a half-life of about 3,466 steps at the
    default 2e-4, 693 at 1e-3. With ``interval`` :math:`k` each update uses
    :math:`1 - (1 - m)^k`, so the half-life stays the same in steps.

    Args:
        model, interval, device, update_buffers, dtype, compensate_interval, rounding,
            side_stream: as :class:`~polyak.BaseAveragedModel`.
        momentum: in :math:`[0, 1]`; a value above 0.5 (likely a decay passed as a
            momentum) gives a :class:`~polyak.validation.ConventionWarning`. Defaults to 0.0002.
    """

    schedule_type = ConstantMomentum

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.0002,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        dtype: torch.dtype | None = None,
        compensate_interval: bool = True,
        rounding: str = "nearest",
        side_stream: bool = False,
    ) -> None:
        if momentum is None:  # ConstantMomentum(None) would read it as "not given"
            raise ValueError("momentum must be a number, got None")
        options = {
            "dtype": dtype,
            "compensate_interval": compensate_interval,
            "rounding": rounding,
            "side_stream": side_stream,
        }
        super().__init__(model, interval, device, update_buffers, momentum=momentum, **options)


@AVERAGES.register
class MomentumAnnealingEMA(ExponentialMovingAverage):
    """EMA whose momentum starts large and anneals to ``momentum`` (mmengine): the preset of
    :class:`~polyak.schedules.MomentumAnnealing`. The floor 2e-4 is reached at about 499,900
    steps with ``gamma=100``.

    Args:
        model, momentum, interval, device, update_buffers, dtype, compensate_interval, rounding,
            side_stream: as :class:`ExponentialMovingAverage`.
        gamma: > 0. Defaults to 100.
    """

    schedule_type = MomentumAnnealing

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.0002,
        gamma: int = 100,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        dtype: torch.dtype | None = None,
        compensate_interval: bool = True,
        rounding: str = "nearest",
        side_stream: bool = False,
    ) -> None:
        options = {
            "dtype": dtype,
            "compensate_interval": compensate_interval,
            "rounding": rounding,
            "side_stream": side_stream,
        }
        BaseAveragedModel.__init__(
            self, model, interval, device, update_buffers, momentum=momentum, gamma=gamma, **options
        )


@AVERAGES.register
class StochasticWeightAverage(BaseAveragedModel):
    """Stochastic weight averaging (mmengine): the preset of
    :class:`~polyak.schedules.EqualAverage`, the equal average of every averaged snapshot.

    ``interval`` chooses which steps are snapshots; it is not compensated (an equal average has
    no horizon to keep). Run :func:`polyak.update_bn` before evaluating a BatchNorm model
    (Izmailov et al., 2018).

    Args: as :class:`~polyak.BaseAveragedModel`.
    """

    schedule_type = EqualAverage


@AVERAGES.register
class RampUpEMA(BaseAveragedModel):
    """EMA with StyleGAN's half-life in images and a ramp-up (mmagic): the preset of
    :class:`~polyak.schedules.RampUpMomentum`. Calls before ``start_iter`` copy the model and do
    not advance ``steps``. With ``interval`` :math:`k` each update uses the decay of :math:`k`
    batches.

    Args:
        model, interval, device, update_buffers, dtype, compensate_interval, rounding,
            side_stream: as :class:`~polyak.BaseAveragedModel`.
        ema_kimg: half-life in thousands of images. Defaults to 10.
        ema_rampup: ramp-up ratio, or None. Defaults to 0.05.
        batch_size: global batch size. Defaults to 32.
        eps: floor of the half-life. Defaults to 1e-8.
        start_iter: number of initial calls that only copy. Defaults to 0.
    """

    schedule_type = RampUpMomentum
    counter_keys = ("steps", "start_calls")

    def __init__(
        self,
        model: nn.Module,
        interval: int = 1,
        ema_kimg: int = 10,
        ema_rampup: float | None = 0.05,
        batch_size: int = 32,
        eps: float = 1e-8,
        start_iter: int = 0,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        dtype: torch.dtype | None = None,
        compensate_interval: bool = True,
        rounding: str = "nearest",
        side_stream: bool = False,
    ) -> None:
        start = check_int("start_iter", start_iter, 0)
        rampup = {"ema_kimg": ema_kimg, "ema_rampup": ema_rampup, "batch_size": batch_size, "eps": eps}
        options = {
            "dtype": dtype,
            "compensate_interval": compensate_interval,
            "rounding": rounding,
            "side_stream": side_stream,
        }
        super().__init__(model, interval, device, update_buffers, **options, **rampup)
        self.start_iter = start
        self._start_calls = 0

    @staticmethod
    def rampup(
        steps: int, ema_kimg: float = 10, ema_rampup: float | None = 0.05, batch_size: int = 4, eps: float = 1e-8
    ) -> float:
        """The decay :math:`\\beta` (not the momentum) at ``steps``, as mmagic's ``rampup``."""
        return RampUpMomentum(ema_kimg, ema_rampup, batch_size, eps).decay(int(steps))

    def next_update(self) -> Update:
        update = super().next_update()
        # Copy the model while fewer than start_iter calls were made, then average.
        return Update("copy", counted=False) if self._start_calls < self.start_iter else update

    def commit_update(self, update: Update) -> None:
        if not update.counted:
            self._start_calls += 1
        super().commit_update(update)

    def counters(self) -> dict[str, int]:
        counters = super().counters()
        if self.start_iter:
            counters["start_calls"] = self._start_calls
        return counters

    def load_counters(self, values: dict[str, int]) -> None:  # type: ignore[override]
        super().load_counters(values)
        self._start_calls = check_count("start_calls", values.get("start_calls", self.start_iter if self.steps else 0))


@AVERAGES.register
class CosineEMA(ExponentialMovingAverage):
    """EMA whose momentum follows a half cosine from ``momentum`` to ``end_momentum``
    (mmpretrain; BYOL, MoCo v3): the preset of :class:`~polyak.schedules.CosineMomentum`.

    ``max_steps`` may be given after construction (:meth:`set_total_steps`: the hooks and
    integrations give the run's total optimizer steps); averaging without it raises
    :class:`ValueError`.

    Args:
        model, interval, device, update_buffers, dtype, compensate_interval, rounding,
            side_stream: as :class:`~polyak.BaseAveragedModel`.
        momentum: start momentum, in [0, 1]. Defaults to 0.004.
        end_momentum: end momentum, in [0, 1]. Defaults to 0.
        max_steps: the step at which ``end_momentum`` is reached.
    """

    schedule_type = CosineMomentum
    deferred_args = ("max_steps",)

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.004,
        end_momentum: float = 0.0,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        max_steps: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        compensate_interval: bool = True,
        rounding: str = "nearest",
        side_stream: bool = False,
    ) -> None:
        options = {
            "dtype": dtype,
            "compensate_interval": compensate_interval,
            "rounding": rounding,
            "side_stream": side_stream,
        }
        cosine = {"momentum": momentum, "end_momentum": end_momentum, "max_steps": max_steps}
        BaseAveragedModel.__init__(self, model, interval, device, update_buffers, **options, **cosine)

    def make_schedule(self) -> Schedule:
        if self.max_steps is None:
            raise ValueError(
                "CosineEMA needs max_steps (the total number of training steps) before it can average: "
                "pass max_steps= or set ema.max_steps"
            )
        return super().make_schedule()

    @property
    def needs_total_steps(self) -> bool:
        return self.max_steps is None

    def set_total_steps(self, total: int) -> None:
        if self.max_steps is None:
            self.max_steps = check_int("total steps", total, 1)


@AVERAGES.register
class ExpMomentumEMA(ExponentialMovingAverage):
    """EMA whose momentum decays exponentially to ``momentum`` (mmdet; YOLOX, RTMDet): the
    preset of :class:`~polyak.schedules.ExpMomentum`.

    Args:
        model, momentum, interval, device, update_buffers, dtype, compensate_interval, rounding,
            side_stream: as :class:`ExponentialMovingAverage`.
        gamma: > 0. Defaults to 2000.
    """

    schedule_type = ExpMomentum

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.0002,
        gamma: int = 2000,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        dtype: torch.dtype | None = None,
        compensate_interval: bool = True,
        rounding: str = "nearest",
        side_stream: bool = False,
    ) -> None:
        options = {
            "dtype": dtype,
            "compensate_interval": compensate_interval,
            "rounding": rounding,
            "side_stream": side_stream,
        }
        BaseAveragedModel.__init__(
            self, model, interval, device, update_buffers, momentum=momentum, gamma=gamma, **options
        )
