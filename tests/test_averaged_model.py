"""``polyak.AveragedModel`` as a drop-in for ``torch.optim.swa_utils.AveragedModel``, and what
it adds (any schedule, a choice of what is averaged).

Expected values come from torch's own ``AveragedModel`` driven side by side on the same model,
or from a float64 reference written here from the formulas; never from polyak.

Tolerances: float64 models against torch or the reference: ``atol=1e-12`` (torch computes
``a + (c - a) / (n + 1)`` or ``lerp``; polyak always ``lerp``: they differ by a few ulps);
an fp32 model against the float64 reference: ``atol=2e-6`` (values are O(1)). Copied tensors
must be equal exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.optim import swa_utils

import polyak
from polyak.schedules import ConstantMomentum, EqualAverage, Warmup

F64 = torch.float64
ATOL64 = 1e-12
ATOL32 = 2e-6


# --------------------------------------------------------------------------------------------
# helpers


class Net(nn.Module):
    """Conv2d + BatchNorm2d + Linear: parameters, floating BN statistics and the int64
    ``num_batches_tracked``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class Lora(nn.Module):
    """A frozen base Linear with a trainable low-rank adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(8, 8)
        self.down = nn.Linear(8, 2, bias=False)
        self.up = nn.Linear(2, 8, bias=False)
        self.base.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.up(self.down(x))


def make_net(seed: int = 0, dtype: torch.dtype = F64) -> Net:
    torch.manual_seed(seed)
    net = Net().to(dtype)
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net


def make_lora(seed: int = 0) -> Lora:
    torch.manual_seed(seed)
    return Lora().to(F64)


@torch.no_grad()
def step(model: nn.Module, i: int) -> None:
    """A deterministic stand-in for one training step: perturb every parameter (frozen ones
    too, so that sharing, copying and averaging of them can be told apart), then move the BN
    statistics and ``num_batches_tracked`` as a train-mode forward would."""
    g = torch.Generator().manual_seed(1000 + i)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype), alpha=0.1)
    for b in model.buffers():  # what a train-mode forward does to the BN statistics, without one
        if b.is_floating_point():
            b.add_(torch.rand(b.shape, generator=g, dtype=torch.float64).to(b.dtype), alpha=0.1)
        else:
            b.add_(1)


def snap(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict, floating tensors widened to float64, integers kept."""
    return {
        k: (v.detach().to(F64) if v.is_floating_point() else v.detach()).clone() for k, v in model.state_dict().items()
    }


def module_state(avg: nn.Module) -> dict[str, Tensor]:
    """``module.*`` entries of an averaged model's state dict, without the prefix (cloned: the
    state dict shares storage with the average, which ``swapped()`` exchanges in place)."""
    return {k[len("module.") :]: v.clone() for k, v in avg.state_dict().items() if k.startswith("module.")}


def assert_state_close(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float, what: str = "") -> None:
    assert set(actual) == set(expected), what
    for k, e in expected.items():
        a = actual[k]
        if e.is_floating_point():
            torch.testing.assert_close(a.to(F64), e.to(F64), rtol=0.0, atol=atol, msg=f"{what} {k}")
        else:
            assert torch.equal(a, e), f"{what} {k}: {a} != {e}"


# --------------------------------------------------------------------------------------------
# torch's interface and numbers


def custom_avg_fn(averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
    """A user rule of torch's avg_fn form that depends on num_averaged."""
    return averaged + (current - averaged) * (0.5 / (num_averaged + 1))


def custom_multi_avg_fn(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
    """A user rule of torch's multi_avg_fn form (integer groups copied, as torch's own do not)."""
    if averaged[0].is_floating_point():
        torch._foreach_lerp_(averaged, current, 1.0 / (float(num_averaged) + 2.0))
    else:
        torch._foreach_copy_(averaged, current)


RULES: dict[str, Callable[[], dict]] = {
    "swa-default": dict,
    "ema-multi": lambda: {"multi_avg_fn": swa_utils.get_ema_multi_avg_fn(0.9)},
    "ema-avg": lambda: {"avg_fn": swa_utils.get_ema_avg_fn(0.8)},
    "swa-multi": lambda: {"multi_avg_fn": swa_utils.get_swa_multi_avg_fn()},
    "swa-avg": lambda: {"avg_fn": swa_utils.get_swa_avg_fn()},
    "custom-avg": lambda: {"avg_fn": custom_avg_fn},
    "custom-multi": lambda: {"multi_avg_fn": custom_multi_avg_fn},
}


@pytest.mark.parametrize("use_buffers", [False, True])
def test_state_dict_keys_and_counter_are_torchs(use_buffers: bool) -> None:
    model = make_net()
    theirs = swa_utils.AveragedModel(model, use_buffers=use_buffers)
    ours = polyak.AveragedModel(model, use_buffers=use_buffers)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert "n_averaged" in ours.state_dict()
    for avg in (theirs, ours):
        avg.update_parameters(model)
        avg.update_parameters(model)
    n_t, n_o = theirs.state_dict()["n_averaged"], ours.state_dict()["n_averaged"]
    assert n_o.dtype == n_t.dtype == torch.long and n_o.shape == n_t.shape == ()
    assert int(n_o) == int(n_t) == 2 and int(ours.n_averaged) == 2


@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("rule", list(RULES))
def test_same_numbers_as_torch(rule: str, use_buffers: bool) -> None:
    model = make_net(1)
    if use_buffers and rule == "swa-multi":
        # torch's get_swa_multi_avg_fn raises on the int64 num_batches_tracked group
        # ("Integer division with addcdiv is no longer supported"): compare without it.
        model.bn.num_batches_tracked = None
    theirs = swa_utils.AveragedModel(model, use_buffers=use_buffers, **RULES[rule]())
    ours = polyak.AveragedModel(model, use_buffers=use_buffers, **RULES[rule]())
    # torch's get_swa_multi_avg_fn computes its weight 1/(n+1) from the int64 n_averaged as a
    # float32 tensor (error ~3e-9 on a float64 model); polyak's EqualAverage is exact.
    atol = 1e-8 if rule == "swa-multi" else ATOL64
    for i in range(6):
        step(model, i)
        theirs.update_parameters(model)
        ours.update_parameters(model)
        t_state, o_state = module_state(theirs), module_state(ours)
        assert set(t_state) == set(o_state)
        for k, v in t_state.items():
            if v.is_floating_point():
                torch.testing.assert_close(o_state[k], v, rtol=0.0, atol=atol, msg=f"{rule} call {i} {k}")
        assert int(ours.n_averaged) == int(theirs.n_averaged) == i + 1
    if model.bn.num_batches_tracked is not None:
        # polyak copies integer buffers exactly. torch, with use_buffers=True, averages them
        # and truncates (SWA gives 1 against the model's 6; EMA freezes): a deliberate difference.
        assert torch.equal(ours.module.bn.num_batches_tracked, model.bn.num_batches_tracked)
        if not use_buffers:
            assert torch.equal(theirs.module.bn.num_batches_tracked, model.bn.num_batches_tracked)


def test_custom_avg_fn_is_called_as_torch_calls_it() -> None:
    model = make_net(2)
    calls: list[tuple[torch.dtype, int]] = []

    def avg_fn(averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        assert isinstance(num_averaged, Tensor) and num_averaged.dtype == torch.long
        assert not averaged.requires_grad
        calls.append((averaged.dtype, int(num_averaged)))
        return averaged + (current - averaged) / (num_averaged + 1)

    ours = polyak.AveragedModel(model, avg_fn=avg_fn)
    for i in range(3):
        step(model, i)
        ours.update_parameters(model)
    n_params = len(list(model.parameters()))
    # the first update copies; then one call per parameter (buffers are copied) with the
    # number of snapshots already averaged
    assert [n for _, n in calls] == [1] * n_params + [2] * n_params
    assert all(d == F64 for d, _ in calls)


@pytest.mark.parametrize("use_buffers", [False, True])
def test_torch_state_dict_loads_into_polyak_and_back(use_buffers: bool) -> None:
    model = make_net(3)
    theirs = swa_utils.AveragedModel(model, use_buffers=use_buffers)
    for i in range(5):
        step(model, i)
        theirs.update_parameters(model)
    # torch -> polyak (built from a different model, so a load that did nothing would show)
    ours = polyak.AveragedModel(make_net(4), use_buffers=use_buffers)
    ours.load_state_dict(theirs.state_dict())
    assert int(ours.n_averaged) == 5
    t_state = module_state(theirs)
    for k, v in module_state(ours).items():
        if k != "bn.num_batches_tracked":  # torch truncated it (use_buffers=True); both hold torch's
            assert torch.equal(v, t_state[k]), k
    # polyak -> torch
    back = swa_utils.AveragedModel(make_net(5), use_buffers=use_buffers)
    back.load_state_dict(ours.state_dict())
    assert int(back.n_averaged) == 5
    for k, v in module_state(back).items():
        assert torch.equal(v, module_state(ours)[k]), k
    # all three continue identically
    for i in range(5, 9):
        step(model, i)
        for avg in (theirs, ours, back):
            avg.update_parameters(model)
    for k, v in module_state(theirs).items():
        if v.is_floating_point():
            torch.testing.assert_close(module_state(ours)[k], v, rtol=0.0, atol=ATOL64)
            torch.testing.assert_close(module_state(back)[k], v, rtol=0.0, atol=0.0)
    assert int(ours.n_averaged) == int(theirs.n_averaged) == 9


def test_rejects_two_rules_and_non_callables() -> None:
    model = make_net()
    with pytest.raises(ValueError, match="avg_fn"):
        polyak.AveragedModel(model, avg_fn=custom_avg_fn, multi_avg_fn=custom_multi_avg_fn)
    with pytest.raises(ValueError, match="schedule"):
        polyak.AveragedModel(model, avg_fn=custom_avg_fn, schedule=EqualAverage())
    with pytest.raises(ValueError, match="schedule"):
        polyak.AveragedModel(model, schedule=lambda t: 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="avg_fn"):
        polyak.AveragedModel(model, avg_fn=3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# schedule= against a float64 reference


def warmup_decay_by_hand(j: int) -> float:
    """Warmup(0.95, power=0.75): 0 at j <= 0 (copy), then min(0.95, 1 - (1 + j) ** -0.75)."""
    return 0.0 if j <= 0 else min(0.95, 1.0 - (1.0 + j) ** -0.75)


def reference(
    snapshots: list[dict[str, Tensor]],
    averaged: Callable[[str], bool],
    decay: Callable[[int], float],
    interval: int,
    compensate: bool = True,
) -> dict[str, Tensor]:
    """Float64: the call with steps 0 copies; a call with steps % k == 0 averages with
    m = 1 - prod_{j=s-k+1..s} decay(j) (compensated) or 1 - decay(s); other calls and the
    non-averaged tensors copy."""
    state: dict[str, Tensor] = {}
    for s, snapshot in enumerate(snapshots):
        for name, x in snapshot.items():
            if s == 0 or not averaged(name):
                state[name] = x.clone()
            elif s % interval == 0:
                keep = math.prod(decay(j) for j in range(s - interval + 1, s + 1)) if compensate else decay(s)
                state[name] = keep * state[name] + (1.0 - keep) * x
    return state


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("compensate", [True, False])
def test_schedule_path_matches_float64_reference(dtype: torch.dtype, interval: int, compensate: bool) -> None:
    model = make_net(6, dtype)
    avg = polyak.AveragedModel(
        model, schedule=Warmup(0.95, power=0.75), interval=interval, compensate_interval=compensate
    )
    params = {n for n, _ in model.named_parameters()}
    snapshots = []
    for i in range(13):
        step(model, i)
        snapshots.append(snap(model))
        avg.update_parameters(model)
        expected = reference(snapshots, params.__contains__, warmup_decay_by_hand, interval, compensate)
        assert_state_close(module_state(avg), expected, ATOL64 if dtype == F64 else ATOL32, f"call {i}")
    assert avg.steps == 13


def test_constant_momentum_with_buffers_matches_float64_reference() -> None:
    model = make_net(7)
    avg = polyak.AveragedModel(model, schedule=ConstantMomentum(decay=0.8), use_buffers=True, interval=2)
    snapshots = []
    for i in range(9):
        step(model, i)
        snapshots.append(snap(model))
        avg.update_parameters(model)
    # use_buffers: the floating BN statistics are averaged too; num_batches_tracked copied
    expected = reference(snapshots, lambda n: n != "bn.num_batches_tracked", lambda j: 0.8, 2)
    assert_state_close(module_state(avg), expected, ATOL64)


# --------------------------------------------------------------------------------------------
# n_averaged with interval > 1


def test_n_averaged_counts_the_snapshots_with_an_interval() -> None:
    model = make_net(8)
    seen: list[int] = []

    def avg_fn(averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        seen.append(int(num_averaged))
        return averaged + (current - averaged) / (num_averaged + 1)

    swa = polyak.AveragedModel(model, interval=3)
    user = polyak.AveragedModel(model, interval=3, avg_fn=avg_fn)
    snapshots = []
    for c in range(1, 11):
        step(model, c)
        if (c - 1) % 3 == 0:
            snapshots.append(snap(model))
        swa.update_parameters(model)
        user.update_parameters(model)
        # the snapshots are the calls with steps 0, 3, 6, 9: after c calls there are
        # (c - 1) // 3 + 1 of them
        assert int(swa.n_averaged) == int(user.n_averaged) == (c - 1) // 3 + 1
    # the avg_fn was called at steps 3, 6 and 9 with 1, 2, 3 snapshots already averaged
    assert sorted(set(seen)) == [1, 2, 3]
    # and the average is the equal average of the four snapshots (closed form)
    for name, p in swa.module.named_parameters():
        expected = sum(s[name] for s in snapshots) / len(snapshots)
        torch.testing.assert_close(p, expected, rtol=0.0, atol=ATOL64)
        torch.testing.assert_close(dict(user.module.named_parameters())[name], expected, rtol=0.0, atol=ATOL64)
    # with interval != 1 the state also holds steps, so a resume is exact
    sd = swa.state_dict()
    assert int(sd["n_averaged"]) == 4 and int(sd["steps"]) == 10
    again = polyak.AveragedModel(make_net(9), interval=3)
    again.load_state_dict(sd)
    assert again.steps == 10 and int(again.n_averaged) == 4


# --------------------------------------------------------------------------------------------
# What is averaged


def _kinds_after_updates(avg: polyak.AveragedModel, model: nn.Module) -> tuple[dict, list]:
    snapshots = []
    for i in range(5):
        step(model, i)
        snapshots.append(snap(model))
        avg.update_parameters(model)
    return module_state(avg), snapshots


@pytest.mark.parametrize(
    ("kwargs", "averaged"),
    [
        ({"include": "head.*"}, {"head.weight", "head.bias"}),
        ({"include": ["conv.*", "head.weight"]}, {"conv.weight", "conv.bias", "head.weight"}),
        ({"exclude": "*.bias"}, {"conv.weight", "bn.weight", "head.weight"}),
        ({"include": "*.weight", "exclude": "bn.*"}, {"conv.weight", "head.weight"}),
        ({"filter": lambda mod, name: isinstance(mod, nn.Conv2d)}, {"conv.weight", "conv.bias"}),
        ({"filter": lambda mod, name: name.endswith("weight")}, {"conv.weight", "bn.weight", "head.weight"}),
        (
            {"filter": lambda mod, name: not isinstance(mod, nn.BatchNorm2d), "use_buffers": True},
            {"conv.weight", "conv.bias", "head.weight", "head.bias"},
        ),
        (
            {"include": "bn.*", "use_buffers": True},
            {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"},
        ),
    ],
)
def test_selection_averages_exactly_the_chosen_tensors(kwargs: dict, averaged: set[str]) -> None:
    model = make_net(10)
    avg = polyak.AveragedModel(model, schedule=ConstantMomentum(0.3), **kwargs)
    state, snapshots = _kinds_after_updates(avg, model)
    expected = reference(snapshots, averaged.__contains__, lambda j: 0.7, 1)
    assert_state_close(state, expected, ATOL64)
    last = snapshots[-1]
    for name in set(last) - averaged:  # the others are exact copies of the model
        assert torch.equal(state[name].to(last[name].dtype), last[name]), name


def test_filter_gets_the_owning_module_and_the_unwrapped_name() -> None:
    model = make_net(11)
    seen: set[tuple[str, str]] = set()

    def keep(mod: nn.Module, name: str) -> bool:
        seen.add((type(mod).__name__, name))
        return True

    polyak.AveragedModel(nn.DataParallel(model), filter=keep, use_buffers=True)
    assert seen == {
        ("Conv2d", "conv.weight"),
        ("Conv2d", "conv.bias"),
        ("BatchNorm2d", "bn.weight"),
        ("BatchNorm2d", "bn.bias"),
        ("BatchNorm2d", "bn.running_mean"),
        ("BatchNorm2d", "bn.running_var"),
        ("Linear", "head.weight"),
        ("Linear", "head.bias"),
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"include": "nothing.*"},
        {"exclude": "*"},
        {"include": "head.*", "exclude": "head.*"},
        {"filter": lambda mod, name: False},
        {"include": "bn.running_*"},  # buffers are not averaged without use_buffers
    ],
)
def test_a_selection_that_matches_nothing_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="nothing to average"):
        polyak.AveragedModel(make_net(), **kwargs)


def test_trainable_only_on_a_fully_frozen_model_raises() -> None:
    model = make_lora()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to average"):
        polyak.AveragedModel(model, trainable_only=True)


def test_trainable_only_holds_the_adapter_and_shares_the_frozen_base() -> None:
    model = make_lora()
    avg = polyak.AveragedModel(model, schedule=ConstantMomentum(0.25), trainable_only=True)
    # memory: the frozen tensors are the model's own objects, not copies
    assert avg.module.base.weight is model.base.weight
    assert avg.module.base.bias is model.base.bias
    assert avg.module.base.weight.data_ptr() == model.base.weight.data_ptr()
    assert avg.module.down.weight is not model.down.weight
    assert avg.module.down.weight.data_ptr() != model.down.weight.data_ptr()
    # and absent from the state dict
    assert set(avg.state_dict()) == {"n_averaged", "module.down.weight", "module.up.weight"}
    snapshots = []
    for i in range(6):
        step(model, i)  # moves the frozen base too: the shared base follows, never averaged
        snapshots.append(snap(model))
        avg.update_parameters(model)
    expected = reference(snapshots, lambda n: n in ("down.weight", "up.weight"), lambda j: 0.75, 1)
    assert_state_close(module_state(avg), {k: expected[k] for k in ("down.weight", "up.weight")}, ATOL64)
    assert torch.equal(avg.module.base.weight, model.base.weight)
    # the state dict round-trips into a fresh average of another model (the base is not read)
    other = make_lora(1)
    fresh = polyak.AveragedModel(other, schedule=ConstantMomentum(0.25), trainable_only=True)
    fresh.load_state_dict(avg.state_dict())
    assert torch.equal(fresh.module.down.weight, avg.module.down.weight)
    assert fresh.module.base.weight is other.base.weight
    # a state dict that still carries the base (e.g. a full one) is accepted: the base is ignored
    full = dict(avg.state_dict())
    full["module.base.weight"] = torch.zeros(8, 8, dtype=F64)
    fresh.load_state_dict(full)
    assert not torch.equal(other.base.weight, torch.zeros(8, 8, dtype=F64))


def test_converting_the_average_leaves_the_models_shared_frozen_tensors_alone() -> None:
    # The frozen base is shared with the model, not owned by the average: casting or moving
    # the average (ema.double(), ema.to("cpu") to offload, ema.half()) must not cast or move
    # the live model's weights.
    model = Lora()  # float32
    avg = polyak.AveragedModel(model, trainable_only=True)
    avg.double()
    assert avg.module.down.weight.dtype == F64  # the average's own tensors follow
    assert model.down.weight.dtype == torch.float32
    assert model.base.weight.dtype == torch.float32, "avg.double() cast the model's frozen base"
    assert model.base.bias.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "how"),
    [
        ({"frozen": "copy"}, "copy"),
        ({"trainable_only": True, "frozen": "copy"}, "copy"),
        ({"frozen": "skip"}, "skip"),
        ({"frozen": "average"}, "average"),
        ({}, "average"),
    ],
)
def test_frozen_parameters(kwargs: dict, how: str) -> None:
    model = make_lora()
    avg = polyak.AveragedModel(model, schedule=ConstantMomentum(0.25), **kwargs)
    frozen = {"base.weight", "base.bias"}
    snapshots = []
    for i in range(5):
        step(model, i)
        snapshots.append(snap(model))
        avg.update_parameters(model)
    state = module_state(avg)
    if how == "skip":
        assert not frozen & set(state)
        assert avg.module.base.weight is model.base.weight
        averaged = {"down.weight", "up.weight"}
    else:
        assert frozen <= set(state)
        assert avg.module.base.weight is not model.base.weight
        averaged = {"down.weight", "up.weight"} | (frozen if how == "average" else set())
    expected = reference(snapshots, averaged.__contains__, lambda j: 0.75, 1)
    assert_state_close(state, {k: expected[k] for k in state}, ATOL64)
    if how == "copy":
        for name in frozen:
            assert torch.equal(state[name], snapshots[-1][name])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"frozen": "bogus"}, "frozen"), ({"trainable_only": True, "frozen": "average"}, "trainable_only")],
)
def test_bad_frozen_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        polyak.AveragedModel(make_lora(), **kwargs)


# --------------------------------------------------------------------------------------------
# Using a filtered average


def test_swapped_and_copy_to_with_a_filtered_average() -> None:
    model = make_net(12)
    avg = polyak.AveragedModel(model, schedule=ConstantMomentum(0.5), include="head.*")
    for i in range(4):
        step(model, i)
        avg.update_parameters(model)
    step(model, 99)  # the live model moves on after the last update
    live = snap(model)
    average = module_state(avg)
    with avg.swapped(model) as swapped:
        assert swapped is model
        inside = snap(model)
    for k, v in inside.items():
        if k.startswith("head."):
            assert torch.equal(v, average[k]), k  # the average is swapped in
        else:
            assert torch.equal(v, live[k]), k  # what is not averaged stays live
    assert_state_close(snap(model), live, 0.0, "restored")
    assert_state_close(module_state(avg), {k: v.clone() for k, v in average.items()}, 0.0, "average kept")

    # restored on an exception too
    with pytest.raises(KeyError), avg.swapped(model):
        raise KeyError("boom")
    assert_state_close(snap(model), live, 0.0, "restored after an exception")

    # copy_to writes the average's tensors into the model
    avg.copy_to(model)
    assert_state_close(snap(model), {k: v.to(F64) if v.is_floating_point() else v for k, v in average.items()}, 0.0)


def test_swapped_and_copy_to_with_trainable_only() -> None:
    model = make_lora()
    avg = polyak.AveragedModel(model, schedule=ConstantMomentum(0.5), trainable_only=True)
    for i in range(3):
        step(model, i)
        avg.update_parameters(model)
    step(model, 50)
    live = snap(model)
    average = module_state(avg)
    with avg.swapped(model):
        assert torch.equal(model.down.weight, average["down.weight"])
        assert torch.equal(model.up.weight, average["up.weight"])
        assert torch.equal(model.base.weight, live["base.weight"])  # shared, untouched
    assert_state_close(snap(model), live, 0.0)
    avg.copy_to(model)
    assert torch.equal(model.down.weight, average["down.weight"])
    assert torch.equal(model.base.weight, live["base.weight"])


def test_swapped_rejects_updates_inside_and_before_the_first_update() -> None:
    model = make_net(13)
    avg = polyak.AveragedModel(model)
    with pytest.raises(RuntimeError):
        with avg.swapped(model):
            pass
    avg.update_parameters(model)
    with avg.swapped(model), pytest.raises(RuntimeError):
        avg.update_parameters(model)
