"""``AverageGroup`` and ``engine.average_many_``: several averages of one model updated by one
call must be exactly the averages updated one by one.

The reference for a group is each average built the same way and updated alone with its own
``update_parameters``; the reference for ``average_many_`` is a float64 per-tensor
``avg + w (theta - avg)`` and each engine's own ``average_``. The fused path does the same
element-wise ``lerp`` in the same dtype as the one-by-one path, so the comparison with the
one-by-one averages is bitwise everywhere; only the float64 formula is compared with a
tolerance (float32 rounding).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import polyak.engine as engine
from polyak import (
    AveragedModel,
    AverageGroup,
    ExponentialMovingAverage,
    StochasticWeightAverage,
    flatten_parameters,
)
from polyak.engine import AveragingEngine, average_many_
from polyak.schedules import Warmup

# -- a small model with buffers -----------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.bn = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


@torch.no_grad()
def train_step(model: nn.Module, gen: torch.Generator) -> None:
    """Perturb every parameter and run a train-mode forward (BN statistics and the int64
    ``num_batches_tracked`` change)."""
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen).to(p.dtype), alpha=0.05)
    model.train()
    dtype = next(model.parameters()).dtype
    model(torch.randn(6, 8, generator=gen).to(dtype))


# Each factory builds one average of the model; the group and the one-by-one references use
# the same factories.
FACTORIES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "ema-interval-1": lambda m: ExponentialMovingAverage(m, momentum=0.05),
    "ema-interval-3": lambda m: ExponentialMovingAverage(m, momentum=0.05, interval=3),
    "warmup": lambda m: AveragedModel(m, schedule=Warmup(0.99, power=0.75)),
    "swa": lambda m: StochasticWeightAverage(m, interval=2),
    "ema-buffers": lambda m: ExponentialMovingAverage(m, momentum=0.1, update_buffers=True),
    "ema-float64": lambda m: ExponentialMovingAverage(m, momentum=0.05, dtype=torch.float64),
}

MIXES = {
    # all float32 and the same layout: the fused path (one read of each chunk for all)
    "float32-fused": (torch.float32, ["ema-interval-1", "ema-interval-3", "warmup", "swa", "ema-buffers"]),
    # a float64 average among them: layouts differ, one pass each
    "float32-with-float64": (torch.float32, ["ema-interval-1", "ema-interval-3", "warmup", "swa", "ema-float64"]),
    # a bf16 model: float32 averages (staged through a scratch once for all), and a float64 one
    "bf16-fused": (torch.bfloat16, ["ema-interval-1", "ema-interval-3", "warmup", "swa"]),
    "bf16-with-float64": (torch.bfloat16, ["ema-interval-1", "ema-interval-3", "swa", "ema-float64"]),
}


def states(averages: dict[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    return {n: {k: v.clone() for k, v in a.state_dict().items()} for n, a in averages.items()}


def assert_states_equal(a: dict[str, dict[str, Tensor]], b: dict[str, dict[str, Tensor]]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            assert a[name][k].dtype == b[name][k].dtype, (name, k)
            assert torch.equal(a[name][k], b[name][k]), f"{name}: {k} differs"


@pytest.mark.parametrize("mix", list(MIXES))
def test_group_equals_each_average_updated_alone(mix: str) -> None:
    dtype, names = MIXES[mix]
    model = make_model(dtype)
    grouped = {n: FACTORIES[n](model) for n in names}
    alone = {n: FACTORIES[n](model) for n in names}
    group = AverageGroup(grouped)
    assert len(group) == len(names) and group[names[0]] is grouped[names[0]]
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        train_step(model, gen)
        group.update_parameters(model)
        for a in alone.values():
            a.update_parameters(model)
        for n in names:
            assert grouped[n].steps == alone[n].steps
    assert_states_equal(states(grouped), states(alone))
    # and the averages really moved (not a trivially equal copy of the model)
    for n in names:
        ref = {k: v.to(torch.float64) for k, v in model.state_dict().items() if v.is_floating_point()}
        got = grouped[n].module.state_dict()
        assert any(not torch.equal(got[k].to(torch.float64), ref[k]) for k in ref), n


def test_group_of_a_sequence_and_of_a_flattened_model() -> None:
    model = make_model()
    flatten_parameters(model)
    grouped = [FACTORIES[n](model) for n in ("ema-interval-1", "ema-interval-3", "warmup")]
    alone = [FACTORIES[n](model) for n in ("ema-interval-1", "ema-interval-3", "warmup")]
    group = AverageGroup(grouped)
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        train_step(model, gen)
        group.update_parameters(model)
        for a in alone:
            a.update_parameters(model)
    assert_states_equal(states(dict(enumerate(grouped))), states(dict(enumerate(alone))))


def _wider(dtype: torch.dtype) -> nn.Module:
    return Net(width=17).to(dtype)


def _without_bn(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.fc1 = nn.Linear(8, 16)
    m.fc2 = nn.Linear(16, 4)
    return m.to(dtype)


@pytest.mark.parametrize("mix", ["float32-fused", "float32-with-float64", "bf16-fused"])
@pytest.mark.parametrize("bad", [_wider, _without_bn])
@pytest.mark.parametrize("prior", [1, 4, 6])
def test_failed_group_update_changes_none(mix: str, bad: Callable[[torch.dtype], nn.Module], prior: int) -> None:
    """The failing call would be, after 1 update: fused averaging for the interval-1 averages
    while the interval-3 EMA and the interval-2 SWA only copy buffers; after 4: the interval-3
    EMA alone between averaging calls; after 6: every average averaging."""
    dtype, names = MIXES[mix]
    model = make_model(dtype)
    averages = {n: FACTORIES[n](model) for n in names}
    group = AverageGroup(averages)
    gen = torch.Generator().manual_seed(3)
    for _ in range(prior):
        train_step(model, gen)
        group.update_parameters(model)
    before = states(averages)
    steps = {n: a.steps for n, a in averages.items()}
    with pytest.raises(ValueError, match=r"does not match|shape"):
        group.update_parameters(bad(dtype))
    assert_states_equal(states(averages), before)
    assert {n: a.steps for n, a in averages.items()} == steps
    # the group still works afterwards
    train_step(model, gen)
    group.update_parameters(model)
    assert all(a.steps == steps[n] + 1 for n, a in averages.items())


def test_group_update_while_one_is_swapped_changes_none() -> None:
    model = make_model()
    averages = {n: FACTORIES[n](model) for n in ("ema-interval-1", "ema-interval-3", "swa")}
    group = AverageGroup(averages)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        train_step(model, gen)
        group.update_parameters(model)
    before = states(averages)
    with averages["swa"].swapped(model), pytest.raises(RuntimeError, match="swapped"):
        group.update_parameters(model)
    assert_states_equal(states(averages), before)


def test_group_arguments() -> None:
    with pytest.raises(ValueError):
        AverageGroup([])
    with pytest.raises(ValueError):
        AverageGroup([nn.Linear(2, 2)])  # type: ignore[list-item]


# -- engine.average_many_ ---------------------------------------------------------------------------


class Ragged(nn.Module):
    """Small tensors (1 to 50 elements) among large ones (600 to 5535), plus buffers."""

    def __init__(self) -> None:
        super().__init__()
        shapes = [(3,), (10,), (5000,), (7, 7), (1,), (123, 45), (16,), (600,), (50,), (2, 2)]
        for i, shape in enumerate(shapes):
            setattr(self, f"p{i}", nn.Parameter(torch.randn(shape)))
        self.register_buffer("stat", torch.randn(300))
        self.register_buffer("count", torch.tensor(7, dtype=torch.long))


def ragged(seed: int, dtype: torch.dtype = torch.float32, flat: bool = False) -> Ragged:
    torch.manual_seed(seed)
    m = Ragged().to(dtype)
    if flat:
        flatten_parameters(m)
    return m


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks far smaller than the tensors: the shared read is cut into many chunks, the
    staging scratch holds 100 elements, and tensors of up to 16 elements are gathered."""
    monkeypatch.setattr(engine, "SHARED_READ_CHUNK", 64)
    monkeypatch.setattr(engine, "STAGING_CHUNK", 100)
    monkeypatch.setattr(engine, "GATHER_MAX_NUMEL", 16)
    monkeypatch.setattr(engine, "GATHER_MIN_RUN", 2)


def _f64(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to(torch.float64) if v.is_floating_point() else v.clone() for k, v in m.state_dict().items()}


CASES = {
    # source dtype, target dtypes, source flattened, targets flattened, update_buffers, the path
    "fp32-direct": (torch.float32, [torch.float32] * 3, False, False, False, "direct"),
    "fp32-gathered": (torch.float32, [torch.float32] * 3, False, True, True, "gathered"),
    "fp32-coalesced": (torch.float32, [torch.float32] * 3, True, True, False, "coalesced"),
    "bf16-staged": (torch.bfloat16, [torch.float32] * 3, False, False, True, "staged"),
    "bf16-gathered": (torch.bfloat16, [torch.float32] * 3, False, True, False, "gathered"),
    "bf16-coalesced": (torch.bfloat16, [torch.float32] * 3, True, True, True, "coalesced"),
    "mixed-layouts": (torch.float32, [torch.float32, torch.float64, torch.float32], False, True, False, "separate"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tensor_weights", [False, True])
def test_average_many_small_and_large_tensors(small_chunks: None, case: str, tensor_weights: bool) -> None:
    src_dtype, dtypes, flat_src, flat_dst, update_buffers, path = CASES[case]
    source = ragged(0, src_dtype, flat_src)
    many = [ragged(10 + i, d, flat_dst) for i, d in enumerate(dtypes)]
    alone = [copy.deepcopy(t) for t in many]
    if flat_dst:
        for t in alone:
            flatten_parameters(t)
    eng_many = [AveragingEngine(t, update_buffers=update_buffers) for t in many]
    eng_alone = [AveragingEngine(t, update_buffers=update_buffers) for t in alone]
    weights = [0.3, 0.05, 0.9]
    if tensor_weights:
        weights = [torch.tensor(w, dtype=d) for w, d in zip(weights, dtypes, strict=True)]
    for call in range(3):
        with torch.no_grad():
            for p in source.parameters():
                p.add_(torch.randn_like(p, dtype=torch.float32).to(src_dtype))
            source.stat.mul_(1.5)
            source.count.add_(1)
        theta = _f64(source)
        expected = []
        for t, w in zip(many, weights, strict=True):
            avg = _f64(t)
            copied = {"count"} if update_buffers else {"count", "stat"}
            expected.append({k: theta[k] if k in copied else v + float(w) * (theta[k] - v) for k, v in avg.items()})
        average_many_(eng_many, source, weights)
        for e, w in zip(eng_alone, weights, strict=True):
            e.average_(source, w)
        for i, (t, ref) in enumerate(zip(many, expected, strict=True)):
            got = t.state_dict()
            assert torch.equal(got["count"], source.count)  # integers copied exactly
            for k, v in ref.items():
                if k == "count":
                    continue
                tol = 1e-6 if got[k].dtype == torch.float32 else 1e-13
                torch.testing.assert_close(got[k].to(torch.float64), v, rtol=tol, atol=tol, msg=f"{case} #{i} {k}")
            for k, v in alone[i].state_dict().items():
                assert torch.equal(got[k], v), f"{case} #{i} {k}: average_many_ differs from average_ (call {call})"

    # the small chunk sizes (see the fixture) really cut the work: look at the cached plans
    (plan,) = [e.bind(source).plan("avg") for e in eng_many][:1]
    shared = eng_many[0].bind(source).shared  # average_many_'s plans, when the layouts agree
    chunks = sum(len(sp.chunks) for update in shared.values() for sp in update.plans)
    staged = sum(len(g.staged) for g in plan)
    gathered = sum(len(g.gathered) for g in plan)
    if path == "separate":
        assert not shared
    elif path == "gathered":
        assert gathered >= 1
    elif path == "staged":
        assert staged > 1 and gathered == 0
    elif path == "direct":
        assert chunks > 1 and staged == gathered == 0
    else:  # coalesced: one flat view per side, cut into chunks (direct) or staged pieces
        assert gathered == 0 and (chunks > 1 or staged > 1)
        assert sum(len(g.dst) for g in plan) <= 1


def test_average_many_mismatch_changes_nothing(small_chunks: None) -> None:
    source = ragged(0)
    targets = [ragged(1), ragged(2)]
    engines = [AveragingEngine(t) for t in targets]
    before = [_f64(t) for t in targets]
    bad = ragged(3)
    bad.p2 = nn.Parameter(torch.randn(5001))
    with pytest.raises(ValueError, match="p2"):
        average_many_(engines, bad, [0.5, 0.5])
    for t, b in zip(targets, before, strict=True):
        assert all(torch.equal(_f64(t)[k], b[k]) for k in b)
    with pytest.raises(ValueError):
        average_many_(engines, source, [0.5])
