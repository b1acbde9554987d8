"""polyak: weight averaging for PyTorch (EMA, SWA, Polyak updates, post-hoc EMA), exact and fast.

The top level holds what a training script types; everything else is in a submodule, reached as
an attribute (``polyak.schedules.Warmup``, ``polyak.distributed.save``,
``polyak.integrations.lightning.EMA``) and imported on first use, so ``import polyak`` imports no
framework. docs/architecture.md maps the modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .averaged_model import AveragedModel
from .bn import update_bn
from .engine import flatten_parameters
from .group import AverageGroup
from .models import BaseAveragedModel
from .openmmlab import (
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

if TYPE_CHECKING:
    from . import checkpoint, distributed, integrations, schedules

__version__ = "0.1.0"

__all__ = [
    # averaged models: the OpenMMLab API
    "BaseAveragedModel",
    "ExponentialMovingAverage",
    "MomentumAnnealingEMA",
    "StochasticWeightAverage",
    "RampUpEMA",
    "CosineEMA",
    "ExpMomentumEMA",
    # any schedule; several averages; tensors; post-hoc
    "AveragedModel",
    "AverageGroup",
    "ParameterAverage",
    "PostHocEMA",
    # tools
    "update_bn",
    "soft_update",
    "hard_update",
    "flatten_parameters",
    # submodules, imported on first use
    "schedules",
    "checkpoint",
    "distributed",
    "integrations",
]

#: Submodules reachable as attributes of ``polyak`` without an import of their own (PEP 562).
_SUBMODULES = frozenset(
    {
        "checkpoint",
        "compat",
        "distributed",
        "engine",
        "files",
        "gpu",
        "health",
        "hooks",
        "integrations",
        "models",
        "openmmlab",
        "posthoc",
        "schedules",
        "sharded",
        "tensors",
    }
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES})
