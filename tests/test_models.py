"""The averaged models against an independent float64 reference and against mmengine.

The reference (:class:`Reference`) is written here from the counting rule and the per-class
momentum formulas; it never calls polyak. Each test drives a small random CNN with BatchNorm
through train-like steps (random perturbation of every parameter, then a forward in train mode
so that the BN statistics and ``num_batches_tracked`` change) and checks the average after
every ``update_parameters`` call.

Tolerances: an fp32 average against the float64 reference over 20 calls: ``atol=FP32_ATOL``
(values are O(1); observed errors are a few fp32 ulps); a float64 average: ``atol=1e-12``.
Copied tensors (non-averaged buffers, ``num_batches_tracked``) must be equal exactly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mmengine import model as mm
from torch import Tensor, nn

import polyak
from polyak import (
    BaseAveragedModel,
    CosineEMA,
    ExponentialMovingAverage,
    MomentumAnnealingEMA,
    RampUpEMA,
    StochasticWeightAverage,
)

N_CALLS = 20
FP32_ATOL = 1e-6
FP64_ATOL = 1e-12


# --------------------------------------------------------------------------------------------
# The float64 reference


class Reference:
    """The counting rule, in float64, from the specification.

    ``steps`` counts earlier counted calls. The call with ``steps == 0`` copies everything; a
    later call averages when ``steps % interval == 0`` (weight ``m_k(steps)``) and otherwise
    copies only the non-averaged tensors. ``m_k(s) = 1 - prod_{j=s-k+1..s} (1 - m(j))`` when
    compensating with ``k > 1``, else ``m(s)``. ``equal_average``: the averaged tensors are the
    plain mean of the snapshots taken at steps 0, k, 2k, ... (closed form, no recurrence).
    The first ``start_iter`` calls copy everything and do not count.
    """

    def __init__(
        self,
        param_names: set[str],
        momentum: Callable[[int], float] | None,
        *,
        interval: int,
        compensate: bool,
        update_buffers: bool,
        equal_average: bool = False,
        start_iter: int = 0,
    ) -> None:
        self.param_names = param_names
        self.m = momentum
        self.interval = interval
        self.compensate = compensate
        self.update_buffers = update_buffers
        self.equal_average = equal_average
        self.start_iter = start_iter
        self.steps = 0
        self.calls = 0
        self.state: dict[str, Tensor] = {}
        self.snapshots: list[dict[str, Tensor]] = []

    def averaged(self, name: str) -> bool:
        t = self.state[name]
        return name in self.param_names or (self.update_buffers and t.is_floating_point())

    def weight(self, s: int) -> float:
        assert self.m is not None
        k = self.interval
        if self.compensate and k > 1:
            keep = 1.0
            for j in range(s - k + 1, s + 1):
                keep *= 1.0 - self.m(j)
            return 1.0 - keep
        return self.m(s)

    def update(self, snap: dict[str, Tensor]) -> None:
        self.calls += 1
        if self.calls <= self.start_iter:
            self.state = {k: v.clone() for k, v in snap.items()}
            return
        s = self.steps
        if s == 0:
            self.state = {k: v.clone() for k, v in snap.items()}
            self.snapshots = [snap]
        elif s % self.interval == 0:
            self.snapshots.append(snap)
            w = None if self.equal_average else self.weight(s)
            for name in self.state:
                if not self.averaged(name):
                    self.state[name] = snap[name].clone()
                elif self.equal_average:
                    self.state[name] = torch.stack([x[name] for x in self.snapshots]).mean(dim=0)
                else:
                    self.state[name] = (1.0 - w) * self.state[name] + w * snap[name]
        else:
            for name in self.state:
                if not self.averaged(name):
                    self.state[name] = snap[name].clone()
        self.steps += 1


def assert_matches(avg: BaseAveragedModel, ref: Reference, atol: float) -> None:
    got = avg.module.state_dict()
    assert set(got) == set(ref.state)
    for name, expected in ref.state.items():
        g = got[name]
        if not expected.is_floating_point():
            assert g.dtype == expected.dtype, name
            assert torch.equal(g, expected), f"{name}: {g} != {expected}"
        elif ref.averaged(name):
            torch.testing.assert_close(g.double(), expected, rtol=0.0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(g.double(), expected), f"{name} was not copied exactly"


def param_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()}


# --------------------------------------------------------------------------------------------
# The classes under test, with their momentum m(t) written out independently


def _rampup_m(kimg: float, rampup: float | None, b: int, eps: float = 1e-8) -> Callable[[int], float]:
    def m(t: int) -> float:
        nimg = kimg * 1000.0
        if rampup is not None:
            nimg = min(nimg, (t + 1) * b * rampup)
        return 1.0 - 0.5 ** (b / max(nimg, eps))

    return m


def _cosine_m(start: float, end: float, total: int) -> Callable[[int], float]:
    return lambda t: end - (end - start) * (math.cos(math.pi * min(t, total) / total) + 1) / 2


# name -> (build(model, **kw), m(t) or None for the equal average)
CASES: dict[str, tuple[Callable[..., BaseAveragedModel], Callable[[int], float] | None]] = {
    "ema": (lambda model, **kw: ExponentialMovingAverage(model, momentum=0.2, **kw), lambda t: 0.2),
    "annealing": (
        lambda model, **kw: MomentumAnnealingEMA(model, momentum=0.1, gamma=2, **kw),
        lambda t: max(0.1, 2 / (2 + t)),
    ),
    "rampup": (
        lambda model, **kw: RampUpEMA(model, ema_kimg=0.02, ema_rampup=0.5, batch_size=4, **kw),
        _rampup_m(0.02, 0.5, 4),
    ),
    "rampup_no_ramp": (
        lambda model, **kw: RampUpEMA(model, ema_kimg=0.02, ema_rampup=None, batch_size=4, **kw),
        _rampup_m(0.02, None, 4),
    ),
    "cosine": (
        lambda model, **kw: CosineEMA(model, momentum=0.3, end_momentum=0.02, max_steps=12, **kw),
        _cosine_m(0.3, 0.02, 12),
    ),
    "swa": (lambda model, **kw: StochasticWeightAverage(model, **kw), None),
}


def make_reference(case: str, model: nn.Module, **kw: object) -> Reference:
    m = CASES[case][1]
    return Reference(param_names(model), m, equal_average=m is None, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Every class against the reference


@pytest.mark.parametrize("update_buffers", [False, True], ids=["copy_buffers", "avg_buffers"])
@pytest.mark.parametrize("compensate", [True, False], ids=["comp", "nocomp"])
@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, interval, compensate, update_buffers, make_model, train_step, snapshot):
    model = make_model(seed=1)
    avg = CASES[case][0](model, interval=interval, update_buffers=update_buffers, compensate_interval=compensate)
    ref = make_reference(case, model, interval=interval, compensate=compensate, update_buffers=update_buffers)
    for _ in range(N_CALLS):
        train_step(model)
        avg.update_parameters(model)
        ref.update(snapshot(model))
        assert avg.steps == ref.steps
        assert isinstance(avg.steps, int)
        assert_matches(avg, ref, FP32_ATOL)

    # Not vacuous: the average is not the live model, and the buffers follow update_buffers.
    assert not torch.allclose(avg.module.conv.weight, model.conv.weight, atol=1e-3)
    assert torch.equal(avg.module.bn.num_batches_tracked, model.bn.num_batches_tracked)
    assert int(model.bn.num_batches_tracked) == N_CALLS
    if update_buffers:
        assert not torch.allclose(avg.module.bn.running_mean, model.bn.running_mean, atol=1e-4)
    else:
        assert torch.equal(avg.module.bn.running_mean, model.bn.running_mean)
        assert torch.equal(avg.module.bn.running_var, model.bn.running_var)


@pytest.mark.parametrize("case", [c for c in CASES if c != "swa"])
def test_compensated_interval_keeps_the_horizon_in_steps(case, make_model, train_step):
    """With a source that changes only once per window of k steps, one compensated update per
    window moves the average exactly as k updates at interval 1 do."""
    k = 3
    model = make_model(seed=2)
    every = CASES[case][0](model, interval=1)
    sparse = CASES[case][0](model, interval=k, compensate_interval=True)
    uncompensated = CASES[case][0](model, interval=k, compensate_interval=False)
    train_step(model)
    for avg in (every, sparse, uncompensated):
        avg.update_parameters(model)
    for _ in range(4):
        train_step(model)
        for _ in range(k):
            for avg in (every, sparse, uncompensated):
                avg.update_parameters(model)
        for p_every, p_sparse in zip(every.module.parameters(), sparse.module.parameters(), strict=True):
            torch.testing.assert_close(p_sparse, p_every, rtol=0.0, atol=FP32_ATOL)
    # and without compensation the horizon is k times longer: not the same numbers
    assert not torch.allclose(uncompensated.module.conv.weight, every.module.conv.weight, atol=1e-4)


@pytest.mark.parametrize("compensate", [True, False], ids=["comp", "nocomp"])
@pytest.mark.parametrize("interval", [1, 3])
def test_swa_is_the_equal_average_of_the_snapshots(interval, compensate, make_model, train_step):
    model = make_model(seed=3)
    swa = StochasticWeightAverage(model, interval=interval, compensate_interval=compensate)
    kept = []
    for step in range(N_CALLS):
        train_step(model)
        swa.update_parameters(model)
        if step % interval == 0:
            kept.append(model.conv.weight.detach().double().clone())
    expected = sum(kept) / len(kept)
    torch.testing.assert_close(swa.module.conv.weight.double(), expected, rtol=0.0, atol=FP32_ATOL)


# --------------------------------------------------------------------------------------------
# dtype and device


@pytest.mark.parametrize("update_buffers", [False, True], ids=["copy_buffers", "avg_buffers"])
def test_bf16_model_gets_an_fp32_average_that_moves(update_buffers, make_model, snapshot):
    torch.manual_seed(4)
    model = make_model(seed=4, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(1.0, 1.5)  # in [1, 2): one bf16 ulp is 2**-7
    ema = ExponentialMovingAverage(model, momentum=1e-3, update_buffers=update_buffers)
    for name, t in ema.module.state_dict().items():
        expected = torch.int64 if name.endswith("num_batches_tracked") else torch.float32
        assert t.dtype == expected, name
    ref = Reference(param_names(model), lambda t: 1e-3, interval=1, compensate=True, update_buffers=update_buffers)

    first: dict[str, Tensor] = {}
    bf16_avg: dict[str, Tensor] = {}
    for step in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.empty_like(p).uniform_(-0.2, 0.2)).clamp_(1.0, 1.9)
            model.train()
            model(torch.randn(4, 3, 6, 6, dtype=torch.bfloat16))
        ema.update_parameters(model)
        ref.update(snapshot(model))
        # fp32 average of the bf16 values, exactly as the float64 reference fed the same values
        assert_matches(ema, ref, 1e-6)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if step == 0:
                    first[name] = p.detach().clone()
                    bf16_avg[name] = p.detach().clone()
                else:
                    bf16_avg[name].lerp_(p, 1e-3)

    for name, p in ema.module.named_parameters():
        # a bf16 average at momentum 1e-3 never leaves its first value ...
        assert torch.equal(bf16_avg[name], first[name]), name
        # ... the fp32 one does, by about 1e-3 of the distance travelled
        moved = (p.double() - first[name].double()).abs()
        assert moved.max() > 3e-4, name
    assert torch.equal(ema.module.bn.num_batches_tracked, model.bn.num_batches_tracked)
    if not update_buffers:  # the model's buffers, widened exactly
        assert torch.equal(ema.module.bn.running_mean, model.bn.running_mean.float())


@pytest.mark.parametrize("update_buffers", [False, True], ids=["copy_buffers", "avg_buffers"])
@pytest.mark.parametrize("interval", [1, 3])
def test_float64_average_option(interval, update_buffers, make_model, train_step, snapshot):
    model = make_model(seed=5)
    ema = MomentumAnnealingEMA(
        model, momentum=0.1, gamma=2, interval=interval, update_buffers=update_buffers, dtype=torch.float64
    )
    for name, t in ema.module.state_dict().items():
        assert t.dtype == (torch.int64 if name.endswith("num_batches_tracked") else torch.float64), name
    assert model.conv.weight.dtype == torch.float32  # the model is untouched
    ref = make_reference("annealing", model, interval=interval, compensate=True, update_buffers=update_buffers)
    for _ in range(N_CALLS):
        train_step(model)
        ema.update_parameters(model)
        ref.update(snapshot(model))
        assert_matches(ema, ref, FP64_ATOL)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device_option(device, make_model, train_step, snapshot):
    model = make_model(seed=6)
    ema = ExponentialMovingAverage(model, momentum=0.2, device=device, interval=3, update_buffers=True)
    assert all(t.device == torch.device("cpu") for t in ema.module.state_dict().values())
    ref = make_reference("ema", model, interval=3, compensate=True, update_buffers=True)
    for _ in range(10):
        train_step(model)
        ema.update_parameters(model)
        ref.update(snapshot(model))
        assert_matches(ema, ref, FP32_ATOL)


# --------------------------------------------------------------------------------------------
# average_ with an explicit weight


@pytest.mark.parametrize("update_buffers", [False, True], ids=["copy_buffers", "avg_buffers"])
@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["fp32", "fp64"])
def test_average_with_float_and_tensor_weight(dtype, update_buffers, make_model, train_step, snapshot):
    model = make_model(seed=7)
    by_float = ExponentialMovingAverage(model, momentum=0.01, dtype=dtype, update_buffers=update_buffers)
    by_tensor = ExponentialMovingAverage(model, momentum=0.01, dtype=dtype, update_buffers=update_buffers)
    train_step(model)
    by_float.update_parameters(model)
    by_tensor.update_parameters(model)
    ref = Reference(param_names(model), None, interval=1, compensate=False, update_buffers=update_buffers)
    ref.update(snapshot(model))
    atol = FP64_ATOL if dtype == torch.float64 else FP32_ATOL
    w = 0.375
    for _ in range(3):
        train_step(model)
        by_float.average_(model, w)
        by_tensor.average_(model, torch.tensor(w, dtype=dtype or torch.float32))
        snap = snapshot(model)
        for name in ref.state:
            if ref.averaged(name):
                ref.state[name] = ref.state[name] + w * (snap[name] - ref.state[name])
            else:
                ref.state[name] = snap[name].clone()
        assert_matches(by_float, ref, atol)
        assert_matches(by_tensor, ref, atol)
        for (name, a), b in zip(
            by_float.module.state_dict().items(), by_tensor.module.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=0.0, atol=atol / 10, msg=name)
    assert by_float.steps == by_tensor.steps == 1  # average_ does not count


# --------------------------------------------------------------------------------------------
# The mmengine way: a subclass that overrides only avg_func


class HarmonicAverage(BaseAveragedModel):
    """A user rule written mmengine's way: weight 1 / (steps + 1) per tensor."""

    def avg_func(self, averaged_param: Tensor, source_param: Tensor, steps: int) -> None:
        self.calls.append((steps, tuple(averaged_param.shape), averaged_param.dtype))
        averaged_param.lerp_(source_param, 1.0 / (steps + 1))


@pytest.mark.parametrize("update_buffers", [False, True], ids=["copy_buffers", "avg_buffers"])
@pytest.mark.parametrize("interval", [1, 3])
def test_user_avg_func_subclass(interval, update_buffers, make_model, train_step, snapshot):
    model = make_model(seed=8)
    avg = HarmonicAverage(model, interval=interval, update_buffers=update_buffers)
    avg.calls = []
    ref = Reference(
        param_names(model), lambda t: 1.0 / (t + 1), interval=interval, compensate=False, update_buffers=update_buffers
    )
    averaged_shapes = sorted(
        tuple(t.shape)
        for name, t in model.state_dict().items()
        if name in param_names(model) or (update_buffers and t.is_floating_point())
    )
    for _ in range(N_CALLS):
        steps = avg.steps
        train_step(model)
        avg.calls.clear()
        avg.update_parameters(model)
        ref.update(snapshot(model))
        assert_matches(avg, ref, FP32_ATOL)
        if steps > 0 and steps % interval == 0:
            # once per averaged tensor, with steps a plain int
            assert sorted(shape for _, shape, _ in avg.calls) == averaged_shapes
            assert all(type(s) is int and s == steps for s, _, _ in avg.calls)
            assert all(dt == torch.float32 for _, _, dt in avg.calls)
        else:
            assert avg.calls == []
    assert "avg_func" in repr(avg)


class DoubledEMA(ExponentialMovingAverage):
    """An mmengine-style override on a built-in class: its avg_func replaces the fused rule."""

    def avg_func(self, averaged_param: Tensor, source_param: Tensor, steps: int) -> None:
        averaged_param.lerp_(source_param, 2 * self.momentum)


class QuarterAverage(BaseAveragedModel):
    """The Schedule way: override make_schedule only."""

    def make_schedule(self) -> polyak.schedules.Schedule:
        return polyak.schedules.ConstantMomentum(0.25)


@pytest.mark.parametrize("interval", [1, 3])
def test_subclass_rules(interval, make_model, train_step, snapshot):
    model = make_model(seed=12)
    doubled = DoubledEMA(model, momentum=0.1, interval=interval)
    quarter = QuarterAverage(model, interval=interval)
    names = param_names(model)
    ref_doubled = Reference(names, lambda t: 0.2, interval=interval, compensate=False, update_buffers=False)
    ref_quarter = Reference(names, lambda t: 0.25, interval=interval, compensate=True, update_buffers=False)
    for _ in range(N_CALLS):
        train_step(model)
        doubled.update_parameters(model)
        quarter.update_parameters(model)
        snap = snapshot(model)
        ref_doubled.update(snap)
        ref_quarter.update(snap)
        assert_matches(doubled, ref_doubled, FP32_ATOL)
        assert_matches(quarter, ref_quarter, FP32_ATOL)


def test_base_class_without_a_rule_raises_type_error(make_model):
    with pytest.raises(TypeError, match="avg_func"):
        BaseAveragedModel(make_model())


# --------------------------------------------------------------------------------------------
# RampUpEMA specifics


@pytest.mark.parametrize("compensate", [True, False], ids=["comp", "nocomp"])
@pytest.mark.parametrize("interval", [1, 3])
def test_rampup_ema_start_iter(interval, compensate, make_model, train_step, snapshot):
    start_iter = 3
    model = make_model(seed=9)
    ema = RampUpEMA(
        model,
        interval=interval,
        ema_kimg=0.02,
        ema_rampup=0.5,
        batch_size=4,
        start_iter=start_iter,
        compensate_interval=compensate,
    )
    ref = make_reference("rampup", model, interval=interval, compensate=compensate, update_buffers=False)
    ref.start_iter = start_iter
    for call in range(1, N_CALLS + 1):
        train_step(model)
        ema.update_parameters(model)
        ref.update(snapshot(model))
        assert ema.steps == max(0, call - start_iter)
        assert_matches(ema, ref, FP32_ATOL)
        if call <= start_iter:
            for (name, a), b in zip(ema.module.state_dict().items(), model.state_dict().values(), strict=True):
                assert torch.equal(a, b), name


def _rampup_beta(steps: int, kimg: float = 10, rampup: float | None = 0.05, b: int = 4, eps: float = 1e-8) -> float:
    nimg = kimg * 1000.0
    if rampup is not None:
        nimg = min(nimg, (steps + 1) * b * rampup)
    return 0.5 ** (b / max(nimg, eps))


@pytest.mark.parametrize("steps", [0, 1, 7, 100, 49_999, 50_000, 10**6])
def test_rampup_static_method_defaults(steps):
    # the static method's batch_size defaults to 4 (mmagic), unlike the class's 32
    assert math.isclose(RampUpEMA.rampup(steps), _rampup_beta(steps, b=4), rel_tol=1e-12)
    assert math.isclose(RampUpEMA.rampup(torch.tensor(steps)), _rampup_beta(steps, b=4), rel_tol=1e-12)


@pytest.mark.parametrize(
    ("kimg", "rampup", "b", "eps"),
    [(10, 0.05, 32, 1e-8), (0.5, None, 8, 1e-8), (1, 0.2, 1, 1e-3), (0, 0.05, 4, 1e-2)],
)
@pytest.mark.parametrize("steps", [0, 3, 250, 10**5])
def test_rampup_static_method_values(steps, kimg, rampup, b, eps):
    got = RampUpEMA.rampup(steps, ema_kimg=kimg, ema_rampup=rampup, batch_size=b, eps=eps)
    assert math.isclose(got, _rampup_beta(steps, kimg, rampup, b, eps), rel_tol=1e-12, abs_tol=1e-300)


# --------------------------------------------------------------------------------------------
# momentum_at


@pytest.mark.parametrize("compensate", [True, False], ids=["comp", "nocomp"])
@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_momentum_at(case, interval, compensate, make_model):
    model = make_model()
    avg = CASES[case][0](model, interval=interval, compensate_interval=compensate)
    ref = make_reference(case, model, interval=interval, compensate=compensate, update_buffers=False)
    for s in range(interval, 40 * interval, interval):
        expected = 1.0 / (s // interval + 1) if case == "swa" else ref.weight(s)
        assert math.isclose(avg.momentum_at(s), expected, rel_tol=1e-12, abs_tol=1e-15), s


def test_momentum_annealing_ema_momentum_at_defaults(make_model):
    ema = MomentumAnnealingEMA(make_model())  # momentum 2e-4, gamma 100
    assert ema.momentum_at(100) == 0.5
    assert math.isclose(ema.momentum_at(1000), 100 / 1100, rel_tol=1e-15)
    assert ema.momentum_at(10**7) == 0.0002


def test_cosine_ema_momentum_at_ends(make_model):
    ema = CosineEMA(make_model(), momentum=0.004, end_momentum=0.0, max_steps=100)
    assert math.isclose(ema.momentum_at(1), 0.002 + 0.002 * math.cos(math.pi / 100), rel_tol=1e-12)
    assert math.isclose(ema.momentum_at(50), 0.002, rel_tol=1e-12)
    assert ema.momentum_at(100) == 0.0
    assert ema.momentum_at(1000) == 0.0


def test_changing_momentum_takes_effect(make_model):
    ema = ExponentialMovingAverage(make_model(), momentum=0.1)
    ema.momentum = 0.3
    assert ema.momentum_at(5) == 0.3


@pytest.mark.parametrize("interval", [1, 3])
def test_cosine_ema_without_max_steps(interval, make_model, train_step, snapshot):
    model = make_model(seed=10)
    ema = CosineEMA(model, momentum=0.3, end_momentum=0.02, interval=interval)
    with pytest.raises(ValueError, match="max_steps"):
        ema.momentum_at(interval)
    for _ in range(interval):  # the copy at steps 0 and the copy-only calls need no schedule
        train_step(model)
        ema.update_parameters(model)
    assert ema.steps == interval
    before = snapshot(ema.module)
    train_step(model)
    with pytest.raises(ValueError, match="max_steps"):
        ema.update_parameters(model)
    # nothing changed: neither the counter nor any tensor (buffers included)
    assert ema.steps == interval
    after = snapshot(ema.module)
    for name in before:
        assert torch.equal(before[name], after[name]), name

    ema.max_steps = 12
    ema.update_parameters(model)
    assert ema.steps == interval + 1
    snap = snapshot(model)
    m = _cosine_m(0.3, 0.02, 12)
    keep = 1.0
    for j in range(1, interval + 1):
        keep *= 1.0 - m(j)
    w = 1.0 - keep
    names = param_names(model)
    got = snapshot(ema.module)
    for name in before:
        if name in names:
            torch.testing.assert_close(got[name], (1 - w) * before[name] + w * snap[name], rtol=0.0, atol=FP32_ATOL)
        else:
            assert torch.equal(got[name], snap[name]), name


# --------------------------------------------------------------------------------------------
# Warnings and argument checking


MOMENTUM_CLASSES = [ExponentialMovingAverage, MomentumAnnealingEMA, CosineEMA]


@pytest.mark.parametrize("cls", MOMENTUM_CLASSES)
def test_large_momentum_warns(cls, make_model):
    model = make_model()
    with pytest.warns(UserWarning, match="momentum"):
        cls(model, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(model, momentum=0.5)
        cls(model, momentum=0.004)


@pytest.mark.parametrize("cls", MOMENTUM_CLASSES)
def test_large_momentum_warning_points_at_the_caller(cls, make_model):
    """The warning names the line that built the average (not a line inside polyak), so that
    the default filter shows it for each such line of the user's code."""
    model = make_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cls(model, momentum=0.9)
    relevant = [w for w in caught if "momentum" in str(w.message)]
    assert len(relevant) == 1
    assert relevant[0].filename == __file__


@pytest.mark.parametrize("momentum", [-1, -1e-12, 1.0000001, 1.5, math.nan, math.inf, True, False, "0.1", None])
@pytest.mark.parametrize("cls", MOMENTUM_CLASSES)
def test_bad_momentum(cls, momentum, make_model):
    with pytest.raises(ValueError, match=r"^momentum "):
        cls(make_model(), momentum=momentum)


@pytest.mark.parametrize("cls", MOMENTUM_CLASSES)
def test_momentum_is_in_the_closed_unit_interval(cls, make_model, train_step):
    """The one rule (docs/averaging.md): momentum 0 freezes the average after its first copy,
    momentum 1 copies the model at every update (with a warning: almost surely a decay)."""
    model = make_model()
    frozen = cls(model, momentum=0, **({"max_steps": 10} if cls is CosineEMA else {}))
    frozen.update_parameters(model)
    first = {k: v.clone() for k, v in frozen.module.state_dict().items() if v.is_floating_point()}
    with pytest.warns(UserWarning, match="decay"):
        copying = cls(model, momentum=1, **({"max_steps": 10, "end_momentum": 1.0} if cls is CosineEMA else {}))
    copying.update_parameters(model)
    for _ in range(3):
        train_step(model)
        frozen.update_parameters(model)
        copying.update_parameters(model)
    params = dict(model.named_parameters())
    for name, p in frozen.module.named_parameters():
        if cls is not MomentumAnnealingEMA:  # its momentum is max(0, gamma/(gamma+t)): it moves
            assert torch.equal(p, first[name]), name
        assert torch.equal(dict(copying.module.named_parameters())[name], params[name]), name


ALL_CLASSES = {
    "ema": lambda model, **kw: ExponentialMovingAverage(model, **kw),
    "annealing": lambda model, **kw: MomentumAnnealingEMA(model, **kw),
    "swa": lambda model, **kw: StochasticWeightAverage(model, **kw),
    "rampup": lambda model, **kw: RampUpEMA(model, **kw),
    "cosine": lambda model, **kw: CosineEMA(model, max_steps=10, **kw),
    "user": lambda model, **kw: HarmonicAverage(model, **kw),
}


@pytest.mark.parametrize("interval", [0, -1, 1.5, 3.0, True, "2", None])
@pytest.mark.parametrize("cls", list(ALL_CLASSES))
def test_bad_interval(cls, interval, make_model):
    with pytest.raises(ValueError, match=r"^interval "):
        ALL_CLASSES[cls](make_model(), interval=interval)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, "float32"])
@pytest.mark.parametrize("cls", list(ALL_CLASSES))
def test_bad_dtype(cls, dtype, make_model):
    with pytest.raises(ValueError, match=r"^dtype "):
        ALL_CLASSES[cls](make_model(), dtype=dtype)


@pytest.mark.parametrize("gamma", [0, -1, math.nan, True, "100"])
def test_bad_gamma(gamma, make_model):
    with pytest.raises(ValueError, match=r"^gamma "):
        MomentumAnnealingEMA(make_model(), gamma=gamma)


def test_infinite_gamma_is_rejected_at_construction(make_model):
    """polyak's own MomentumAnnealing schedule rejects gamma=inf; the class must say so when
    it is built, not at its first averaging update in the middle of training."""
    with pytest.raises(ValueError, match=r"^gamma "):
        MomentumAnnealingEMA(make_model(), gamma=math.inf)


@pytest.mark.parametrize("start_iter", [-1, 1.5, True])
def test_bad_start_iter(start_iter, make_model):
    with pytest.raises(ValueError, match=r"^start_iter "):
        RampUpEMA(make_model(), start_iter=start_iter)


@pytest.mark.parametrize(
    ("name", "value"),
    [("ema_kimg", -1), ("ema_rampup", 0.0), ("batch_size", 0), ("batch_size", 2.5), ("eps", 0.0)],
)
def test_bad_rampup_arguments(name, value, make_model):
    with pytest.raises(ValueError, match=f"^{name} "):
        RampUpEMA(make_model(), **{name: value})


@pytest.mark.parametrize(("name", "value"), [("end_momentum", 2), ("end_momentum", -0.1), ("max_steps", 0)])
def test_bad_cosine_arguments(name, value, make_model):
    with pytest.raises(ValueError, match=f"^{name} "):
        CosineEMA(make_model(), **{name: value})


# --------------------------------------------------------------------------------------------
# Against mmengine's real classes (uncompensated, as mmengine)


MM_CASES = {
    "ema": (
        lambda model, **kw: ExponentialMovingAverage(model, momentum=0.2, **kw),
        lambda model, **kw: mm.ExponentialMovingAverage(model, momentum=0.2, **kw),
    ),
    "annealing": (
        lambda model, **kw: MomentumAnnealingEMA(model, momentum=0.1, gamma=2, **kw),
        lambda model, **kw: mm.MomentumAnnealingEMA(model, momentum=0.1, gamma=2, **kw),
    ),
    "swa": (
        lambda model, **kw: StochasticWeightAverage(model, **kw),
        lambda model, **kw: mm.StochasticWeightAverage(model, **kw),
    ),
}


@pytest.mark.parametrize("update_buffers", [False, True], ids=["copy_buffers", "avg_buffers"])
@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("case", list(MM_CASES))
def test_equals_mmengine(case, interval, update_buffers, make_model, train_step):
    model = make_model(seed=11)
    ours = MM_CASES[case][0](model, interval=interval, update_buffers=update_buffers, compensate_interval=False)
    theirs = MM_CASES[case][1](model, interval=interval, update_buffers=update_buffers)
    for _ in range(N_CALLS):
        train_step(model)
        ours.update_parameters(model)
        theirs.update_parameters(model)
        assert ours.steps == int(theirs.steps)
        mine, ref = ours.module.state_dict(), theirs.module.state_dict()
        assert set(mine) == set(ref)
        for name, t in ref.items():
            if t.is_floating_point():
                torch.testing.assert_close(mine[name], t, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
            elif not update_buffers:
                assert torch.equal(mine[name], t), name
    # mmengine leaves num_batches_tracked at its first value when update_buffers=True;
    # polyak copies it on every call.
    assert torch.equal(ours.module.bn.num_batches_tracked, model.bn.num_batches_tracked)


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    momentum=st.floats(min_value=1e-4, max_value=0.5),
    interval=st.integers(min_value=1, max_value=5),
    compensate=st.booleans(),
    update_buffers=st.booleans(),
    n_calls=st.integers(min_value=1, max_value=16),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_ema_random_configurations(
    momentum, interval, compensate, update_buffers, n_calls, seed, make_model, train_step, snapshot
):
    model = make_model(seed=seed)
    ema = ExponentialMovingAverage(
        model, momentum=momentum, interval=interval, update_buffers=update_buffers, compensate_interval=compensate
    )
    ref = Reference(
        param_names(model), lambda t: momentum, interval=interval, compensate=compensate, update_buffers=update_buffers
    )
    for _ in range(n_calls):
        train_step(model)
        ema.update_parameters(model)
        ref.update(snapshot(model))
    assert ema.steps == n_calls
    assert_matches(ema, ref, FP32_ATOL)


def test_public_names():
    for name in (
        "BaseAveragedModel",
        "ExponentialMovingAverage",
        "MomentumAnnealingEMA",
        "StochasticWeightAverage",
        "RampUpEMA",
        "CosineEMA",
    ):
        assert getattr(polyak, name) is globals()[name]


# --------------------------------------------------------------------------------------------
# An average is never the model it averages


def test_an_average_given_to_itself_or_another_is_refused(make_model, train_step):
    """``update_parameters(ema)`` used to be accepted and count a step (names match once the
    ``module.`` prefix is stripped); the same for ``swapped``, ``copy_to``, ``average_``, the
    ``sync_*`` methods and an AverageGroup. Nothing changes."""
    model = make_model()
    ema = ExponentialMovingAverage(model, momentum=0.1)
    other = ExponentialMovingAverage(model, momentum=0.2)
    ema.update_parameters(model)
    train_step(model)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    for wrong, whose in (
        (ema, "this average"),
        (ema.module, "this average"),
        (other, "another"),
        (other.module, "another"),
    ):
        for call, what in (
            (lambda m: ema.update_parameters(m), "update_parameters"),
            (lambda m: ema.copy_to(m), "copy_to"),
            (lambda m: ema.average_(m, 0.5), "average_"),
            (lambda m: ema.sync_parameters(m), "sync_parameters"),
            (lambda m: ema.sync_buffers(m), "sync_buffers"),
            (lambda m: ema.swapped(m).__enter__(), "swapped"),
            (lambda m: polyak.AverageGroup([ema, other]).update_parameters(m), "update_parameters"),
        ):
            with pytest.raises(ValueError, match=rf"^{what}\(\) was given {whose}"):
                call(wrong)
    assert ema.steps == 1 and not ema.is_swapped
    for k, v in ema.state_dict().items():
        assert torch.equal(v, before[k]), k
    ema.update_parameters(model)  # the live model still works, and counts
    assert ema.steps == 2
