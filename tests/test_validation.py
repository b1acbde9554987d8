"""The one rule for momentum and decay (closed [0, 1], a warning on the wrong side of 0.5) across
every class and schedule, and the shared argument checks."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import polyak
from polyak.schedules import (
    ConstantMomentum,
    CosineMomentum,
    ExpMomentum,
    MMCVWarmup,
    MomentumAnnealing,
    NumUpdatesWarmup,
    Warmup,
)
from polyak.validation import ConventionWarning, check_decay, check_int, check_momentum, check_number

# Each builds something from one value given in one convention.
MOMENTUM_TAKERS: dict[str, Callable[[float], object]] = {
    "ConstantMomentum": lambda m: ConstantMomentum(m),
    "MomentumAnnealing": lambda m: MomentumAnnealing(m),
    "ExpMomentum": lambda m: ExpMomentum(m),
    "MMCVWarmup": lambda m: MMCVWarmup(m),
    "CosineMomentum": lambda m: CosineMomentum(m, 0.0, max_steps=10),
    "CosineMomentum end": lambda m: CosineMomentum(0.004, m, max_steps=10),
    "soft_update": lambda m: polyak.soft_update(nn.Linear(2, 2), nn.Linear(2, 2), tau=m),
    "ExponentialMovingAverage": lambda m: polyak.ExponentialMovingAverage(nn.Linear(2, 2), momentum=m),
}
DECAY_TAKERS: dict[str, Callable[[float], object]] = {
    "ConstantMomentum": lambda d: ConstantMomentum(decay=d),
    "Warmup": lambda d: Warmup(d),
    "NumUpdatesWarmup": lambda d: NumUpdatesWarmup(d),
    "ParameterAverage": lambda d: polyak.ParameterAverage([nn.Parameter(torch.zeros(2))], decay=d),
    "lightning EMA": lambda d: _lightning_ema(d),
}


def _lightning_ema(decay: float) -> object:
    pytest.importorskip("lightning")
    from polyak.integrations.lightning import EMA

    return EMA(decay=decay)


def _no_warning(build: Callable[[], object]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build()


@pytest.mark.parametrize("name", list(MOMENTUM_TAKERS))
def test_a_momentum_above_one_half_warns_and_the_ends_are_legal(name: str) -> None:
    make = MOMENTUM_TAKERS[name]
    with pytest.warns(ConventionWarning, match="did you mean"):
        make(0.999)
    with pytest.warns(ConventionWarning):
        make(1.0)
    for m in (0.0, 0.0002, 0.5):
        _no_warning(lambda m=m: make(m))
    with pytest.raises(ValueError):
        make(1.5)
    with pytest.raises(ValueError):
        make(-0.1)


@pytest.mark.parametrize("name", list(DECAY_TAKERS))
def test_a_decay_below_one_half_warns_and_the_ends_are_legal(name: str) -> None:
    make = DECAY_TAKERS[name]
    with pytest.warns(ConventionWarning, match="did you mean"):
        make(0.0001)
    with pytest.warns(ConventionWarning):
        make(0.0)
    for d in (1.0, 0.999, 0.5):
        _no_warning(lambda d=d: make(d))
    with pytest.raises(ValueError):
        make(1.5)
    with pytest.raises(ValueError):
        make(math.nan)


def test_the_warning_points_at_the_callers_line() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ConstantMomentum(0.999)
        Warmup(0.0001)
        polyak.soft_update(nn.Linear(2, 2), nn.Linear(2, 2), tau=0.995)
    assert [w.filename for w in caught] == [__file__] * 3
    assert all(issubclass(w.category, UserWarning) for w in caught)


def test_a_decay_of_one_freezes_the_average() -> None:
    """torch_ema accepts decay in [0, 1]: decay 1 keeps the construction-time copy."""
    w = nn.Parameter(torch.zeros(3))
    avg = polyak.ParameterAverage([w], decay=1.0)
    for _ in range(3):
        with torch.no_grad():
            w.add_(1.0)
        avg.update()
    assert avg.shadow[0].tolist() == [0.0, 0.0, 0.0]


def test_a_decay_of_zero_copies() -> None:
    w = nn.Parameter(torch.zeros(3))
    with pytest.warns(ConventionWarning):
        avg = polyak.ParameterAverage([w], decay=0.0)
    with torch.no_grad():
        w.add_(2.5)
    avg.update()
    assert avg.shadow[0].tolist() == [2.5, 2.5, 2.5]


def test_the_preset_warns_once_also_when_its_schedule_is_built_later() -> None:
    """CosineEMA without max_steps builds its schedule at the first update: one warning, at
    construction."""
    model = nn.Linear(2, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ema = polyak.CosineEMA(model, momentum=0.996)
        ema.set_total_steps(10)
        for _ in range(3):
            ema.update_parameters(model)
    assert len([w for w in caught if issubclass(w.category, ConventionWarning)]) == 1


@settings(max_examples=200, deadline=None)
@given(x=st.floats(allow_nan=True, allow_infinity=True))
def test_momentum_and_decay_checks_agree_on_the_range(x: float) -> None:
    inside = 0.0 <= x <= 1.0
    for check in (check_momentum, check_decay):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConventionWarning)
            if inside:
                assert check("v", x) == x
            else:
                with pytest.raises(ValueError, match=r"^v must be in \[0\.0, 1\.0\]"):
                    check("v", x)


@pytest.mark.parametrize("value", [True, False, "1", None, 1.5])
def test_check_int_refuses_non_ints(value: object) -> None:
    with pytest.raises(ValueError, match=r"^n must be an int >= 0"):
        check_int("n", value, 0)


def test_check_number_names_open_and_closed_ends() -> None:
    with pytest.raises(ValueError, match=r"must be in \(0\.0, inf\)"):
        check_number("gamma", 0.0, 0.0, open_low=True)
    with pytest.raises(ValueError, match=r"must be in \[0\.0, 1\.0\]"):
        check_number("p", 1.01, 0.0, 1.0)
    with pytest.raises(ValueError, match="must be a number"):
        check_number("p", True)
