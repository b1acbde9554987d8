"""polyak: weight averaging for PyTorch (EMA, SWA, Polyak updates), exact and fast."""

from __future__ import annotations

from . import checkpoint, schedules
from .averaged_model import AveragedModel
from .bn import update_bn
from .engine import AveragingEngine, canonical_name, flatten_parameters, unwrap_model
from .group import AverageGroup
from .hooks import EMAHook, OptimizerStepCounter
from .models import (
    BaseAveragedModel,
    CosineEMA,
    ExpMomentumEMA,
    ExponentialMovingAverage,
    MomentumAnnealingEMA,
    RampUpEMA,
    StochasticWeightAverage,
)
from .parameter_average import ParameterAverage
from .posthoc import PostHocEMA
from .rl import hard_update, soft_update

__version__ = "0.1.0"

__all__ = [
    # averaged models (the OpenMMLab API)
    "BaseAveragedModel",
    "ExponentialMovingAverage",
    "MomentumAnnealingEMA",
    "StochasticWeightAverage",
    "RampUpEMA",
    "CosineEMA",
    "ExpMomentumEMA",
    # the generic averaged model
    "AveragedModel",
    "ParameterAverage",
    "AverageGroup",
    "PostHocEMA",
    # reinforcement learning
    "soft_update",
    "hard_update",
    # training hooks
    "EMAHook",
    "OptimizerStepCounter",
    # tools
    "update_bn",
    "flatten_parameters",
    # engine
    "AveragingEngine",
    "canonical_name",
    "unwrap_model",
    "schedules",
    "checkpoint",
]
