"""polyak: weight averaging for PyTorch (EMA, SWA, Polyak updates), exact and fast."""

from __future__ import annotations

from . import schedules
from .bn import update_bn
from .engine import AveragingEngine, canonical_name, flatten_parameters, unwrap_model
from .models import (
    BaseAveragedModel,
    CosineEMA,
    ExponentialMovingAverage,
    MomentumAnnealingEMA,
    RampUpEMA,
    StochasticWeightAverage,
)

__version__ = "0.1.0"

__all__ = [
    # averaged models (the OpenMMLab API)
    "BaseAveragedModel",
    "ExponentialMovingAverage",
    "MomentumAnnealingEMA",
    "StochasticWeightAverage",
    "RampUpEMA",
    "CosineEMA",
    # tools
    "update_bn",
    "flatten_parameters",
    # engine
    "AveragingEngine",
    "canonical_name",
    "unwrap_model",
    "schedules",
]
