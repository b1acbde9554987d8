"""Choosing the CPU plan by measurement (polyak.tuning): the tuner's policy with scripted
timings, and, through the engine, that every candidate plan writes the same bits as the fixed
plan and as a float64 reference, whatever it chooses."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import polyak
import polyak.tuning as tuning
from polyak.tuning import Candidate, PlanTuner


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Scripted timings: each candidate takes ``costs[name]`` seconds."""
    costs: dict[str, float] = {}

    def timed(candidate: Candidate, weight: object) -> float:
        candidate.run(weight)
        return costs[candidate.name]

    monkeypatch.setattr(tuning, "_timed", timed)
    return costs


def recording(names: list[str]) -> tuple[list[Candidate], list[str]]:
    calls: list[str] = []
    return [Candidate(n, lambda w, n=n: calls.append(n)) for n in names], calls


def test_explores_each_candidate_then_keeps_the_fastest(clock: dict[str, float]) -> None:
    candidates, calls = recording(["a", "b", "c"])
    clock.update(a=3.0, b=1.0, c=2.0)
    tuner = PlanTuner(candidates)
    for _ in range(3 * tuning.EXPLORE_ROUNDS + 5):
        tuner.run(0.5)
    assert calls[: 3 * tuning.EXPLORE_ROUNDS] == ["a", "b", "c"] * tuning.EXPLORE_ROUNDS
    assert calls[3 * tuning.EXPLORE_ROUNDS :] == ["b"] * 5
    assert tuner.chosen == "b" and tuner.timings == {"a": 3.0, "b": 1.0, "c": 2.0} and not tuner.exploring


def test_explores_again_when_updates_turn_slow(clock: dict[str, float]) -> None:
    candidates, _ = recording(["a", "b"])
    clock.update(a=2.0, b=1.0)
    tuner = PlanTuner(candidates)
    for _ in range(2 * tuning.EXPLORE_ROUNDS + 3):
        tuner.run(0.5)
    assert tuner.chosen == "b" and tuner.explorations == 1
    clock.update(b=3.0)  # slower between training steps (cold caches): its usual time, learnt
    for _ in range(tuning.SLOWER_WINDOW):
        tuner.run(0.5)
    clock.update(b=4.0)  # slower, but within SLOWER_BY of the usual: nothing happens
    for _ in range(2 * tuning.SLOWER_WINDOW):
        tuner.run(0.5)
    assert tuner.explorations == 1
    clock.update(b=5.0)  # another process took the core: b is now the slow one
    for _ in range(tuning.SLOWER_WINDOW):
        tuner.run(0.5)
    assert tuner.exploring and tuner.explorations == 2
    clock.update(b=6.0)
    for _ in range(2 * tuning.EXPLORE_ROUNDS):
        tuner.run(0.5)
    assert tuner.chosen == "a" and not tuner.exploring


def test_explores_again_after_recheck_every_updates(clock: dict[str, float], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuning, "RECHECK_EVERY", 10)
    candidates, _ = recording(["a", "b"])
    clock.update(a=2.0, b=1.0)
    tuner = PlanTuner(candidates)
    for _ in range(2 * tuning.EXPLORE_ROUNDS + 9):
        tuner.run(0.5)
    assert tuner.explorations == 1
    tuner.run(0.5)
    assert tuner.explorations == 2 and tuner.exploring


def test_looks_once_more_when_the_chosen_plan_runs_slower_than_another_explored(clock: dict[str, float]) -> None:
    """The chosen plan's usual time, once known, is more than SLOWER_BY times what another
    candidate took in the exploration (the scheduler moved a thread just after it): one more
    exploration, which sees the change and switches."""
    candidates, _ = recording(["a", "b"])
    clock.update(a=1.0, b=2.0)
    tuner = PlanTuner(candidates)
    for _ in range(2 * tuning.EXPLORE_ROUNDS):
        tuner.run(0.5)
    assert tuner.chosen == "a" and tuner.explorations == 1
    clock.update(a=3.5)  # > SLOWER_BY x b's 2.0
    for _ in range(tuning.SLOWER_WINDOW):
        tuner.run(0.5)
    assert tuner.exploring and tuner.explorations == 2
    for _ in range(2 * tuning.EXPLORE_ROUNDS):
        tuner.run(0.5)
    assert tuner.chosen == "b" and not tuner.exploring


def test_the_second_look_is_not_repeated_when_every_exploration_looks_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine where a explores at 1.0 and then always runs at 4.0 (b explores at 2.0): one
    second look, then a is kept until the next exploration for another reason; no loop."""
    phase = {"now": "explore"}

    def timed(candidate: Candidate, weight: object) -> float:
        candidate.run(weight)
        if candidate.name == "b":
            return 2.0
        return 1.0 if phase["now"] == "explore" else 4.0

    monkeypatch.setattr(tuning, "_timed", timed)
    choose, explore = PlanTuner._choose, PlanTuner._explore

    def choose_then_exploit(self: PlanTuner) -> None:
        choose(self)
        phase["now"] = "exploit"

    def explore_marked(self: PlanTuner, **kwargs: bool) -> None:
        explore(self, **kwargs)
        phase["now"] = "explore"

    monkeypatch.setattr(PlanTuner, "_choose", choose_then_exploit)
    monkeypatch.setattr(PlanTuner, "_explore", explore_marked)
    candidates, calls = recording(["a", "b"])
    tuner = PlanTuner(candidates)
    for _ in range(2 * tuning.EXPLORE_ROUNDS + 5 * tuning.SLOWER_WINDOW):
        tuner.run(0.5)
    assert tuner.explorations == 2 and tuner.chosen == "a" and not tuner.exploring
    assert calls[-3 * tuning.SLOWER_WINDOW :] == ["a"] * (3 * tuning.SLOWER_WINDOW)


def test_a_candidate_runs_with_its_thread_count_which_is_restored_even_on_error() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []

    def run(weight: object) -> None:
        seen.append(torch.get_num_threads())
        if weight == "boom":
            raise RuntimeError("boom")

    tuner = PlanTuner([Candidate("one thread", run, 1)])
    tuner.run(0.5)
    assert seen == [1] and torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"):
        tuner.run("boom")
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="at least one candidate"):
        PlanTuner([])


# -- through the engine ---------------------------------------------------------------------


def uniform() -> nn.Module:
    m = nn.Module()
    m.params = nn.ParameterList([nn.Parameter(torch.randn(20, 25)) for _ in range(60)])
    return m


def layers() -> nn.Module:
    return nn.Sequential(*[nn.Linear(20, 20) for _ in range(40)], nn.BatchNorm1d(20))


def models(make_model) -> Iterator[tuple[str, nn.Module]]:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    yield "uniform", uniform()
    yield "layers", layers()
    yield "convnet", make_model()


def step(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
        for b in model.buffers():
            if b.is_floating_point():
                b.mul_(0.9).add_(torch.randn(b.shape, generator=g), alpha=0.1)
            else:
                b.add_(1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("interval", [1, 3])
def test_every_candidate_writes_the_same_bits_as_the_fixed_plan(make_model, threads: int, interval: int) -> None:
    """Each update of the tuned average runs whichever candidate the tuner picks (all of them
    during exploration, forced one by one here too); the fixed plan's average and a float64
    reference follow the same model."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, model in models(make_model):
            tuned = polyak.ExponentialMovingAverage(model, momentum=0.1, interval=interval, update_buffers=True)
            fixed = copy.deepcopy(tuned)
            fixed.engine.tune = False
            names = {k for k, _ in model.named_parameters()} | {
                k for k, b in model.named_buffers() if b.is_floating_point()
            }
            ref = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
            for s in range(40):
                step(model, s)
                tuned.update_parameters(model)
                fixed.update_parameters(model)
                live = {k: v.detach().double() for k, v in model.state_dict().items()}
                counted = s + 1  # the construction-time copy is not an update: the first update copies
                if counted == 1:
                    ref = {k: v.clone() for k, v in live.items()}
                elif (counted - 1) % interval == 0:
                    m = polyak.schedules.interval_momentum(
                        polyak.schedules.ConstantMomentum(0.1), counted - 1, interval
                    )
                    ref = {k: (1 - m) * ref[k] + m * live[k] if k in names else live[k] for k in live}
                else:
                    ref = {k: ref[k] if k in names else live[k] for k in live}
                got, want = tuned.module.state_dict(), fixed.module.state_dict()
                for k in want:
                    assert torch.equal(got[k], want[k]), f"{name} {k} step {s}"
            for k, v in tuned.module.state_dict().items():
                torch.testing.assert_close(v.double(), ref[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
            tuner = tuned.engine.bind(model).tuner
            if name in ("uniform", "layers"):  # small tensors to group: three ways, each at 1 or 2 threads
                assert tuner is not None and len(tuner.candidates) == 3 * threads
                assert not tuner.exploring and tuner.chosen in {c.name for c in tuner.candidates}
            for c in tuner.candidates if tuner else []:  # forced, one by one, against the fixed plan
                before = {k: v.clone() for k, v in tuned.module.state_dict().items()}
                c.run(0.25)
                fixed.engine.lerp_(fixed.engine.bind(model), 0.25, None)
                for k, v in tuned.module.state_dict().items():
                    assert torch.equal(v, fixed.module.state_dict()[k]), f"{name} {c.name} {k}"
                assert any(not torch.equal(v, before[k]) for k, v in tuned.module.state_dict().items())
    finally:
        torch.set_num_threads(old)


def test_a_new_thread_count_makes_a_new_tuner_and_tune_false_makes_none() -> None:
    torch.manual_seed(0)
    model = uniform()
    ema = polyak.ExponentialMovingAverage(model)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ema.update_parameters(model)
        ema.update_parameters(model)
        first = ema.engine.bind(model).tuner
        assert first is not None and len(first.candidates) == 6
        torch.set_num_threads(1)
        ema.update_parameters(model)
        second = ema.engine.bind(model).tuner
        assert second is not first and len(second.candidates) == 3
    finally:
        torch.set_num_threads(old)
    other = polyak.ExponentialMovingAverage(model)
    other.engine.tune = False
    other.update_parameters(model)
    other.update_parameters(model)
    assert other.engine.bind(model).tuner is None


def test_the_average_is_laid_out_small_tensors_first_and_buffers_flat(make_model) -> None:
    """The average's own layout: one buffer per dtype for parameters and one for buffers, the
    tensors of at most GATHER_MAX_NUMEL elements first; BatchNorm statistics are then copied by
    one cat per chunk."""
    model = nn.Sequential(nn.Linear(100, 100), nn.BatchNorm1d(100), nn.Linear(100, 100), nn.BatchNorm1d(100))
    ema = polyak.ExponentialMovingAverage(model)
    params = list(ema.module.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1
    offsets = {n: p.storage_offset() for n, p in ema.module.named_parameters()}
    small = [n for n, p in ema.module.named_parameters() if p.numel() <= polyak.engine.GATHER_MAX_NUMEL]
    large = [n for n, p in ema.module.named_parameters() if p.numel() > polyak.engine.GATHER_MAX_NUMEL]
    assert max(offsets[n] for n in small) < min(offsets[n] for n in large)
    floats = [b for b in ema.module.buffers() if b.is_floating_point()]
    assert len({b.untyped_storage().data_ptr() for b in floats}) == 1
    ema.update_parameters(model)
    (copy_group,) = [g for g in ema.engine.bind(model).plan("copy") if g.dst or g.copied][:1]
    assert copy_group.copied and not copy_group.dst  # one cat, no per-tensor copy
    step(model, 0)
    ema.update_parameters(model)
    for k, v in model.state_dict().items():
        if not v.is_floating_point() or "running" in k:
            assert torch.equal(ema.module.state_dict()[k], v), k


def test_flatten_parameters_lines_up_with_the_average_in_either_order() -> None:
    """The model flattened before or after the average is built: one lerp per group either
    way, since both lay tensors out by the same rule."""
    for flatten_first in (True, False):
        torch.manual_seed(0)
        model = layers()
        if flatten_first:
            polyak.flatten_parameters(model)
        ema = polyak.ExponentialMovingAverage(model)
        if not flatten_first:
            polyak.flatten_parameters(model)
        ema.update_parameters(model)
        ema.update_parameters(model)
        (group,) = ema.engine.bind(model).plan("avg")
        assert len(group.dst) == 1 and not group.gathered, flatten_first


def test_averages_of_one_model_in_different_layouts_never_pair_the_wrong_source() -> None:
    """Two averages whose tensors lie in different orders (one converted and back, which
    unflattens it) and whose shapes coincide: updated together they must still each read their
    own tensors' sources."""
    torch.manual_seed(0)
    model = uniform()
    a = polyak.ExponentialMovingAverage(model, momentum=0.5)
    b = polyak.ExponentialMovingAverage(model, momentum=0.5)
    b.double().float()  # separate tensors now, in allocation order
    ref = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    group = polyak.AverageGroup([a, b])
    group.update_parameters(model)
    for s in range(3):
        step(model, s)
        group.update_parameters(model)
        ref = {k: 0.5 * ref[k] + 0.5 * v.detach().double() for k, v in model.state_dict().items()}
    for avg in (a, b):
        for k, v in avg.module.state_dict().items():
            torch.testing.assert_close(v.double(), ref[k], rtol=1e-6, atol=1e-6, msg=k)


def test_an_average_group_chooses_its_thread_count_and_writes_the_same_bits() -> None:
    """AverageGroup's shared plan (one read of the source for every average) runs with torch's
    threads or one, chosen by timing as for one average: both candidates write what separate
    fixed-plan updates write, and ``tune = False`` on the engines makes no tuner."""
    torch.manual_seed(0)
    model = layers()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        grouped = [polyak.ExponentialMovingAverage(model, momentum=m) for m in (0.1, 0.01)]
        separate = copy.deepcopy(grouped)
        for e in separate:
            e.engine.tune = False
        group = polyak.AverageGroup(grouped)
        for s in range(12):
            step(model, s)
            group.update_parameters(model)
            for e in separate:
                e.update_parameters(model)
            for g, e in zip(grouped, separate, strict=True):
                for k, v in e.module.state_dict().items():
                    assert torch.equal(g.module.state_dict()[k], v), f"step {s} {k}"
        (update,) = grouped[0].engine.bind(model).shared.values()
        assert update.tuner is not None and [c.threads for c in update.tuner.candidates] == [None, 1]
        assert not update.tuner.exploring
        for c in update.tuner.candidates:  # forced, one by one
            c.run([0.25, 0.5])
            for e, w in zip(separate, (0.25, 0.5), strict=True):
                e.engine.lerp_(e.engine.bind(model), w, None)
            for g, e in zip(grouped, separate, strict=True):
                for k, v in e.module.state_dict().items():
                    assert torch.equal(g.module.state_dict()[k], v), f"{c.name} {k}"
        fixed = [polyak.ExponentialMovingAverage(model) for _ in range(2)]
        for e in fixed:
            e.engine.tune = False
        polyak.AverageGroup(fixed).update_parameters(model)
        polyak.AverageGroup(fixed).update_parameters(model)
        shared = list(fixed[0].engine.bind(model).shared.values())
        assert shared and all(u.tuner is None for u in shared)
    finally:
        torch.set_num_threads(old)
