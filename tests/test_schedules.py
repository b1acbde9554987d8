"""Momentum schedules and interval compensation against their closed forms.

Every expected value is computed here from the formula (plain float64 arithmetic, or exact
rationals with :class:`fractions.Fraction`), never by calling another part of polyak.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from polyak.schedules import (
    ConstantMomentum,
    CosineMomentum,
    EqualAverage,
    MomentumAnnealing,
    RampUpMomentum,
    interval_momentum,
)

SETTINGS = settings(deadline=None, max_examples=50)

steps = st.integers(min_value=0, max_value=10**7)
unit_open_low = st.floats(min_value=0.0, max_value=1.0, exclude_min=True)  # (0, 1]
unit_closed = st.floats(min_value=0.0, max_value=1.0)  # [0, 1]
positive = st.floats(min_value=1e-6, max_value=1e6)


# --------------------------------------------------------------------------------------------
# Closed forms


@SETTINGS
@given(m=unit_open_low, t=steps)
def test_constant_momentum_closed_form(m: float, t: int) -> None:
    s = ConstantMomentum(m)
    assert s.momentum(t) == m
    assert s(t) == m
    assert s.decay(t) == 1.0 - m


@SETTINGS
@given(m=unit_open_low, gamma=positive, t=steps)
def test_momentum_annealing_closed_form(m: float, gamma: float, t: int) -> None:
    s = MomentumAnnealing(m, gamma=gamma)
    expected = max(m, gamma / (gamma + t))
    assert math.isclose(s(t), expected, rel_tol=1e-15, abs_tol=0.0)
    assert math.isclose(s.decay(t), 1.0 - expected, rel_tol=1e-12, abs_tol=1e-15)


@SETTINGS
@given(m=unit_open_low, gamma=positive, t=st.integers(min_value=0, max_value=10**6))
def test_momentum_annealing_is_non_increasing_to_its_floor(m: float, gamma: float, t: int) -> None:
    s = MomentumAnnealing(m, gamma=gamma)
    assert s(0) == 1.0
    assert s(t + 1) <= s(t)
    assert s(t) >= m


def test_momentum_annealing_defaults() -> None:
    s = MomentumAnnealing()
    assert s(0) == 1.0
    assert s(100) == 0.5
    # gamma / (gamma + t) = 2e-4 at t = 100 / 2e-4 - 100 = 499_900
    assert s(499_899) > 0.0002
    assert math.isclose(s(499_900), 0.0002, rel_tol=1e-12)
    assert s(10**9) == 0.0002


@SETTINGS
@given(n=st.integers(min_value=0, max_value=10**9))
def test_equal_average_is_one_over_n_plus_one(n: int) -> None:
    assert EqualAverage()(n) == 1.0 / (n + 1)
    assert EqualAverage.per_update is True


@SETTINGS
@given(values=st.lists(st.floats(min_value=-1e3, max_value=1e3), min_size=1, max_size=40))
def test_equal_average_recurrence_gives_the_mean(values: list[float]) -> None:
    s = EqualAverage()
    avg = values[0]
    for n, x in enumerate(values[1:], start=1):
        avg += s(n) * (x - avg)
    assert math.isclose(avg, math.fsum(values) / len(values), rel_tol=1e-9, abs_tol=1e-9)


def _rampup_beta(t: int, kimg: float, rampup: float | None, b: int, eps: float) -> float:
    nimg = kimg * 1000.0
    if rampup is not None:
        nimg = min(nimg, (t + 1) * b * rampup)
    return 0.5 ** (b / max(nimg, eps))


@SETTINGS
@given(
    t=steps,
    kimg=st.floats(min_value=0.0, max_value=1e3),
    rampup=st.one_of(st.none(), st.floats(min_value=1e-4, max_value=10.0)),
    b=st.integers(min_value=1, max_value=4096),
    eps=st.floats(min_value=1e-12, max_value=1.0),
)
def test_rampup_momentum_closed_form(t: int, kimg: float, rampup: float | None, b: int, eps: float) -> None:
    s = RampUpMomentum(ema_kimg=kimg, ema_rampup=rampup, batch_size=b, eps=eps)
    beta = _rampup_beta(t, kimg, rampup, b, eps)
    assert math.isclose(s.decay(t), beta, rel_tol=1e-12, abs_tol=1e-300)
    assert math.isclose(s(t), 1.0 - beta, rel_tol=1e-12, abs_tol=1e-15)


def test_rampup_momentum_defaults() -> None:
    s = RampUpMomentum()  # ema_kimg=10, ema_rampup=0.05, batch_size=32, eps=1e-8
    assert math.isclose(s.decay(0), 0.5 ** (32 / (32 * 0.05)), rel_tol=1e-12)
    # the ramp ends at 200k images: (t + 1) * 32 * 0.05 = 10_000 at t + 1 = 6250
    assert math.isclose(s.decay(6249), 0.5 ** (32 / 10_000), rel_tol=1e-12)
    assert math.isclose(s.decay(10**6), 0.5 ** (32 / 10_000), rel_tol=1e-12)
    assert s.decay(6248) < s.decay(6249)


def _cosine(t: int, start: float, end: float, total: int) -> float:
    return end - (end - start) * (math.cos(math.pi * min(t, total) / total) + 1) / 2


@SETTINGS
@given(start=unit_closed, end=unit_closed, total=st.integers(min_value=1, max_value=10**6), t=steps)
def test_cosine_momentum_closed_form(start: float, end: float, total: int, t: int) -> None:
    s = CosineMomentum(start, end, max_steps=total)
    assert math.isclose(s(t), _cosine(t, start, end, total), rel_tol=1e-12, abs_tol=1e-15)
    assert math.isclose(s.decay(t), 1.0 - _cosine(t, start, end, total), rel_tol=1e-12, abs_tol=1e-15)


@SETTINGS
@given(start=unit_closed, end=unit_closed, total=st.integers(min_value=1, max_value=200))
def test_cosine_momentum_boundaries_and_monotonicity(start: float, end: float, total: int) -> None:
    s = CosineMomentum(start, end, max_steps=total)
    assert math.isclose(s(0), start, rel_tol=0.0, abs_tol=1e-15)
    assert s(total) == end
    assert s(total + 1) == end
    assert s(10 * total) == end
    values = [s(t) for t in range(total + 3)]
    for a, b in itertools.pairwise(values):
        if start >= end:
            assert b <= a + 1e-15
        else:
            assert b >= a - 1e-15
    assert all(min(start, end) - 1e-15 <= v <= max(start, end) + 1e-15 for v in values)


def test_cosine_momentum_follows_the_code_not_the_docstring_typo() -> None:
    # mmpretrain's docstring would give 2 * end - start = -0.004 at t = 0; its code gives start.
    s = CosineMomentum(0.004, 0.0, max_steps=100)
    assert math.isclose(s(0), 0.004, abs_tol=1e-18)
    assert math.isclose(s(50), 0.002, rel_tol=1e-12)
    assert s(100) == 0.0


# --------------------------------------------------------------------------------------------
# interval_momentum


@st.composite
def momentum_windows(draw: st.DrawFn) -> tuple[list[float], int, int]:
    interval = draw(st.integers(min_value=1, max_value=8))
    n = draw(st.integers(min_value=interval + 1, max_value=interval + 30))
    momenta = draw(
        st.lists(
            st.one_of(
                st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
                st.floats(min_value=1e-12, max_value=1e-4),
            ),
            min_size=n,
            max_size=n,
        )
    )
    step = draw(st.integers(min_value=interval, max_value=n - 1))
    return momenta, interval, step


@SETTINGS
@given(case=momentum_windows())
def test_interval_momentum_is_one_minus_the_product_of_decays(case: tuple[list[float], int, int]) -> None:
    momenta, interval, step = case
    keep = 1.0
    for j in range(step - interval + 1, step + 1):
        keep *= 1.0 - momenta[j]
    expected = 1.0 - keep
    got = interval_momentum(momenta.__getitem__, step, interval)
    # plain multiplication loses up to ~interval ulps of 1 to cancellation
    assert math.isclose(got, expected, rel_tol=1e-12, abs_tol=1e-14)
    assert 0.0 <= got <= 1.0


@SETTINGS
@given(case=momentum_windows())
def test_interval_momentum_exact_rational_reference(case: tuple[list[float], int, int]) -> None:
    # Tiny momenta keep their precision: compare relatively against exact rational arithmetic.
    momenta, interval, step = case
    keep = Fraction(1)
    for j in range(step - interval + 1, step + 1):
        keep *= 1 - Fraction(momenta[j])
    expected = float(1 - keep)
    got = interval_momentum(momenta.__getitem__, step, interval)
    assert math.isclose(got, expected, rel_tol=1e-12, abs_tol=1e-300)


@SETTINGS
@given(case=momentum_windows())
def test_interval_momentum_uncompensated_is_the_momentum_of_the_step(case: tuple[list[float], int, int]) -> None:
    momenta, interval, step = case
    assert interval_momentum(momenta.__getitem__, step, interval, compensate=False) == momenta[step]
    assert interval_momentum(momenta.__getitem__, step, 1) == momenta[step]


@SETTINGS
@given(m=st.floats(min_value=1e-12, max_value=0.99), k=st.integers(min_value=1, max_value=64), n=st.integers(1, 100))
def test_interval_momentum_of_a_constant(m: float, k: int, n: int) -> None:
    expected = float(1 - (1 - Fraction(m)) ** k)
    got = interval_momentum(ConstantMomentum(m), n * k, k)
    assert math.isclose(got, expected, rel_tol=1e-12)
    # one compensated update moves the average as far as k plain ones toward the same value
    avg, x = 0.0, 1.0
    for _ in range(k):
        avg += m * (x - avg)
    assert math.isclose(got, avg, rel_tol=1e-9)


@SETTINGS
@given(
    interval=st.integers(min_value=1, max_value=16),
    updates=st.integers(min_value=0, max_value=1000),
    offset=st.integers(min_value=0, max_value=15),
    compensate=st.booleans(),
)
def test_interval_momentum_of_a_per_update_schedule(interval: int, updates: int, offset: int, compensate: bool) -> None:
    assume(offset < interval)
    step = updates * interval + offset
    got = interval_momentum(EqualAverage(), step, interval, compensate=compensate)
    assert got == 1.0 / (updates + 1)


def test_interval_momentum_window_with_a_full_momentum_is_a_copy() -> None:
    momenta = [0.1, 0.2, 1.0, 0.3, 0.4]
    assert interval_momentum(momenta.__getitem__, 3, 3) == 1.0
    assert interval_momentum(momenta.__getitem__, 4, 3) == 1.0
    assert math.isclose(interval_momentum(momenta.__getitem__, 4, 2), 1 - 0.7 * 0.6, rel_tol=1e-15)


def test_interval_momentum_of_rampup_is_the_decay_of_k_batches() -> None:
    s = RampUpMomentum(ema_kimg=0.1, ema_rampup=0.5, batch_size=4)
    for step in (3, 6, 30, 300):
        keep = 1.0
        for j in range(step - 2, step + 1):
            keep *= _rampup_beta(j, 0.1, 0.5, 4, 1e-8)
        assert math.isclose(interval_momentum(s, step, 3), 1.0 - keep, rel_tol=1e-12)


# --------------------------------------------------------------------------------------------
# Argument checking


# momentum and decay are in the closed interval [0, 1] (docs/averaging.md, "Momentum and decay")
finite_outside_unit = st.one_of(
    st.floats(max_value=0.0, exclude_max=True, allow_nan=False, allow_infinity=True),
    st.floats(min_value=1.0, exclude_min=True, allow_nan=False),
)


@SETTINGS
@given(m=finite_outside_unit)
def test_constant_momentum_rejects_out_of_range(m: float) -> None:
    with pytest.raises(ValueError, match="momentum"):
        ConstantMomentum(m)


@pytest.mark.parametrize("m", [math.nan, True, False, "0.1", None])
def test_constant_momentum_rejects_nan_and_non_numbers(m: object) -> None:
    with pytest.raises(ValueError, match="momentum"):
        ConstantMomentum(m)  # type: ignore[arg-type]


@SETTINGS
@given(gamma=st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf)))
def test_momentum_annealing_rejects_bad_gamma(gamma: float) -> None:
    with pytest.raises(ValueError, match="gamma"):
        MomentumAnnealing(0.0002, gamma=gamma)


@SETTINGS
@given(m=finite_outside_unit)
def test_momentum_annealing_rejects_bad_momentum(m: float) -> None:
    with pytest.raises(ValueError, match="momentum"):
        MomentumAnnealing(m, gamma=100)


@SETTINGS
@given(
    name=st.sampled_from(["momentum", "end_momentum"]),
    value=st.one_of(
        st.floats(max_value=0.0, exclude_max=True),
        st.floats(min_value=1.0, exclude_min=True),
        st.just(math.nan),
    ),
)
def test_cosine_momentum_rejects_out_of_range_momenta(name: str, value: float) -> None:
    kwargs = {"momentum": 0.004, "end_momentum": 0.0, "max_steps": 10, name: value}
    with pytest.raises(ValueError, match=f"^{name} "):
        CosineMomentum(**kwargs)


@pytest.mark.parametrize("max_steps", [0, -1, 1.5, True, None])
def test_cosine_momentum_rejects_bad_max_steps(max_steps: object) -> None:
    with pytest.raises(ValueError, match="max_steps"):
        CosineMomentum(0.004, 0.0, max_steps=max_steps)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ema_kimg", -1.0),
        ("ema_kimg", math.nan),
        ("ema_rampup", 0.0),
        ("ema_rampup", -0.05),
        ("batch_size", 0),
        ("batch_size", 2.5),
        ("batch_size", True),
        ("eps", 0.0),
        ("eps", -1e-8),
    ],
)
def test_rampup_momentum_rejects_bad_arguments(name: str, value: object) -> None:
    kwargs: dict[str, object] = {name: value}
    with pytest.raises(ValueError, match=f"^{name} "):
        RampUpMomentum(**kwargs)  # type: ignore[arg-type]


@SETTINGS
@given(b=st.integers(max_value=0))
def test_rampup_momentum_rejects_non_positive_batch_size(b: int) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        RampUpMomentum(batch_size=b)


# --------------------------------------------------------------------------------------------
# Value semantics


def test_schedules_compare_by_arguments() -> None:
    assert ConstantMomentum(0.1) == ConstantMomentum(0.1)
    assert hash(ConstantMomentum(0.1)) == hash(ConstantMomentum(0.1))
    assert ConstantMomentum(0.1) != ConstantMomentum(0.2)
    assert ConstantMomentum(0.1) != MomentumAnnealing(0.1)
    assert CosineMomentum(0.1, 0.0, 5) == CosineMomentum(0.1, 0.0, 5)
    assert CosineMomentum(0.1, 0.0, 5) != CosineMomentum(0.1, 0.0, 6)
    assert repr(ConstantMomentum(0.1)) == "ConstantMomentum(momentum=0.1)"
    assert repr(EqualAverage()) == "EqualAverage()"
