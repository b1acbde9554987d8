"""polyak's checkpoint format (docs/checkpoint-format.md): ``polyak.checkpoint.pack`` / ``unpack``.

Expected values are the averages' own tensors and counters before saving (a round trip must
give them back bit for bit), values stated by the format document, and a run that never
stopped (a resume must continue it bit for bit).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import polyak
from polyak import checkpoint as ck
from polyak.schedules import Warmup

F32 = torch.float32


class Net(nn.Module):
    """A frozen base, a BatchNorm and a trainable adapter: parameters, frozen parameters,
    floating buffers and an int64 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.down = nn.Linear(6, 2, bias=False)
        self.up = nn.Linear(2, 6, bias=False)
        self.base.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.base(x)) + self.up(self.down(x))


def make_net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


@torch.no_grad()
def train(model: Net, i: int) -> None:
    g = torch.Generator().manual_seed(700 + i)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
    for b in model.buffers():  # what a train-mode forward does to the BN statistics, without one
        if b.is_floating_point():
            b.add_(torch.rand(b.shape, generator=g, dtype=torch.float64).to(b.dtype), alpha=0.1)
        else:
            b.add_(1)


AVERAGES: dict[str, Callable[[nn.Module], polyak.BaseAveragedModel]] = {
    "ema": lambda m: polyak.ExponentialMovingAverage(m, momentum=0.1),
    "warmup": lambda m: polyak.AveragedModel(m, schedule=Warmup(0.99, power=0.75), interval=2),
    "rampup": lambda m: polyak.RampUpEMA(m, batch_size=4, ema_kimg=0.1, start_iter=3),
    "lora": lambda m: polyak.AveragedModel(m, schedule=Warmup(0.9), trainable_only=True),
}


def build(model: nn.Module, names: list[str]) -> dict[str, polyak.BaseAveragedModel]:
    return {n: AVERAGES[n](model) for n in names}


def run(model: Net, averages: dict[str, polyak.BaseAveragedModel], start: int, stop: int) -> None:
    for i in range(start, stop):
        train(model, i)
        for a in averages.values():
            a.update_parameters(model)


def save_load(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def full_state(avg: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in avg.state_dict().items()}


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def plain_average(avg: polyak.BaseAveragedModel) -> dict[str, Tensor]:
    """The averaged model's own tensors, by the model's names (no prefix, no counters)."""
    return {k: v.detach().clone() for k, v in avg.module.state_dict().items()}


# --------------------------------------------------------------------------------------------
# layout


def test_pack_layout_with_several_averages() -> None:
    model = make_net(0)
    averages = build(model, ["ema", "warmup", "rampup", "lora"])
    run(model, averages, 0, 7)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    state = ck.pack({"state_dict": model.state_dict(), "optimizer": {"lr": 0.1}}, averages)
    assert state["optimizer"] == {"lr": 0.1}
    meta = state["polyak"]
    assert meta["format_version"] == 1 == ck.FORMAT_VERSION
    assert meta["weights_key"] == "state_dict"
    assert meta["live_key"] == "live_state_dict"
    assert meta["live_prefix"] == ""
    assert meta["primary"] == "ema"
    assert list(meta["averages"]) == ["ema", "warmup", "rampup", "lora"]
    # the live weights under live_key, as the model gave them
    assert_same(state["live_state_dict"], live)
    # state_dict: the primary's averaged weights merged into the live state
    ema_avg = plain_average(averages["ema"])
    assert_same(state["state_dict"], ema_avg)
    # records
    recs = meta["averages"]
    assert recs["ema"] == {
        "class": "ExponentialMovingAverage",
        "schedule": {"type": "ConstantMomentum", "args": {"momentum": 0.1}},
        "counters": {"steps": 7},
        "steps": 7,
        "interval": 1,
        "compensate_interval": True,
        "update_buffers": False,
        "dtype": "float32",
        "health": None,  # no report read yet
        "weights": None,  # the primary's weights are under weights_key
    }
    w = recs["warmup"]
    assert w["class"] == "AveragedModel"
    assert w["schedule"]["type"] == "Warmup"
    assert w["schedule"]["args"]["decay"] == 0.99 and w["schedule"]["args"]["power"] == 0.75
    # 7 calls at interval 2: snapshots at steps 0, 2, 4, 6
    assert w["counters"] == {"n_averaged": 4, "steps": 7} and w["steps"] == 7 and w["interval"] == 2
    assert_same(w["weights"], plain_average(averages["warmup"]))
    r = recs["rampup"]
    assert r["class"] == "RampUpEMA" and r["schedule"]["type"] == "RampUpMomentum"
    # 7 calls with start_iter=3: 3 copies that do not count, then steps 0..3
    assert r["counters"] == {"steps": 4, "start_calls": 3} and r["steps"] == 4
    lo = recs["lora"]
    assert lo["counters"] == {"n_averaged": 7}
    # the frozen base is shared with the model, never saved
    assert set(lo["weights"]) == set(live) - {"base.weight", "base.bias"}
    for rec in recs.values():
        assert rec["dtype"] == "float32" and rec["compensate_interval"] is True
        assert rec["update_buffers"] is False


def test_record_dtype_is_the_averages_own_dtype_for_a_shared_bf16_base() -> None:
    # A LoRA fine-tune of a bf16 model: the adapter's average is fp32 (polyak's default for
    # low-precision models), the frozen base is the model's own bf16 tensor, shared and never
    # saved. docs/checkpoint-format.md: "dtype" is that "of the average's floating tensors";
    # the shared base is not one of them (it is not even in the record's weights).
    model = make_net(30).to(torch.bfloat16)
    lora = polyak.AveragedModel(model, trainable_only=True)
    assert {t.dtype for t in lora.averaged_state_dict().values() if t.is_floating_point()} == {F32}
    assert ck.record(lora)["dtype"] == "float32"


@pytest.mark.parametrize("primary", ["ema", "lora"])
def test_state_dict_deploys_the_primary_average(primary: str) -> None:
    model = make_net(1)
    averages = build(model, ["ema", "lora"])
    run(model, averages, 0, 5)
    state = save_load(ck.pack({"state_dict": model.state_dict()}, averages, primary=primary))
    bare = make_net(2)
    bare.load_state_dict(state["state_dict"])  # strict: a complete state dict
    assert_same({k: v.clone() for k, v in bare.state_dict().items()}, plain_average(averages[primary]))


def test_live_key_and_prefix_mmengine_flavour() -> None:
    model = make_net(3)
    averages = build(model, ["ema"])
    run(model, averages, 0, 3)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    state = ck.pack({"state_dict": model.state_dict()}, averages, live_key="ema_state_dict", live_prefix="module.")
    assert set(state["ema_state_dict"]) == {"module." + k for k in live}
    meta = state["polyak"]
    assert (meta["live_key"], meta["live_prefix"]) == ("ema_state_dict", "module.")
    fresh = build(make_net(4), ["ema"])
    got, missing = ck.unpack(save_load(state), fresh)
    assert missing == []
    assert_same(got, live)
    assert_same(full_state(fresh["ema"]), full_state(averages["ema"]))


def test_wrapped_live_keys_keep_their_prefix() -> None:
    model = make_net(5)
    averages = build(model, ["ema"])
    run(model, averages, 0, 3)
    wrapped_live = nn.DataParallel(model).state_dict()  # "module."-prefixed keys
    state = ck.pack({"state_dict": wrapped_live}, averages)
    assert set(state["state_dict"]) == set(wrapped_live)
    for k, v in plain_average(averages["ema"]).items():
        assert torch.equal(state["state_dict"]["module." + k], v), k
    fresh = build(make_net(6), ["ema"])
    ck.unpack(save_load(state), fresh)
    assert_same(full_state(fresh["ema"]), full_state(averages["ema"]))


def test_weights_only_load_and_has_averages() -> None:
    model = make_net(7)
    averages = build(model, ["ema", "warmup", "rampup", "lora"])
    run(model, averages, 0, 4)
    state = ck.pack({"state_dict": model.state_dict()}, averages)
    loaded = save_load(state)  # raises if anything but tensors, numbers, strings... were saved
    assert ck.has_averages(loaded)
    assert not ck.has_averages({"state_dict": model.state_dict()})


# --------------------------------------------------------------------------------------------
# round trip and resume


@pytest.mark.parametrize(
    "names", [["ema"], ["warmup"], ["rampup"], ["lora"], ["ema", "warmup", "rampup", "lora"], ["lora", "ema"]]
)
def test_round_trip_restores_every_average(names: list[str]) -> None:
    model = make_net(8)
    averages = build(model, names)
    run(model, averages, 0, 6)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    state = save_load(ck.pack({"state_dict": model.state_dict()}, averages))
    other = make_net(9)
    fresh = build(other, names)
    got, missing = ck.unpack(state, fresh)
    assert missing == []
    assert_same(got, live)
    for n in names:
        assert_same(full_state(fresh[n]), full_state(averages[n]))
        assert fresh[n].steps == averages[n].steps


@pytest.mark.parametrize("names", [["ema", "warmup", "rampup", "lora"], ["lora", "rampup"]])
@pytest.mark.parametrize("stop_at", [2, 5])
def test_resume_equals_never_stopping(names: list[str], stop_at: int) -> None:
    # the run that never stops
    model = make_net(10)
    averages = build(model, names)
    run(model, averages, 0, 9)

    # the run that stops at stop_at, saves, and resumes in a fresh process-like setting
    first = make_net(10)
    first_avgs = build(first, names)
    run(first, first_avgs, 0, stop_at)
    state = save_load(ck.pack({"state_dict": first.state_dict()}, first_avgs))
    del first, first_avgs
    resumed = make_net(11)  # a different initialisation: everything must come from the file
    resumed_avgs = build(resumed, names)
    live, missing = ck.unpack(state, resumed_avgs)
    assert missing == []
    resumed.load_state_dict(live)
    run(resumed, resumed_avgs, stop_at, 9)

    assert_same(dict(resumed.state_dict()), dict(model.state_dict()))
    for n in names:
        assert_same(full_state(resumed_avgs[n]), full_state(averages[n]))
        assert resumed_avgs[n].steps == averages[n].steps
    assert resumed_avgs[names[0]].module.state_dict().keys() == averages[names[0]].module.state_dict().keys()


# --------------------------------------------------------------------------------------------
# refusals and reports


def _packed(names: list[str]) -> tuple[dict, dict[str, polyak.BaseAveragedModel]]:
    model = make_net(12)
    averages = build(model, names)
    run(model, averages, 0, 4)
    return save_load(ck.pack({"state_dict": model.state_dict()}, averages)), averages


@pytest.mark.parametrize("version", [2, 99, "1", None])
def test_unknown_format_version_is_refused(version: object) -> None:
    state, _ = _packed(["ema"])
    state["polyak"]["format_version"] = version
    fresh = build(make_net(13), ["ema"])
    before = full_state(fresh["ema"])
    with pytest.raises(ValueError, match="format_version"):
        ck.unpack(state, fresh)
    assert_same(full_state(fresh["ema"]), before)


def test_no_polyak_block_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="polyak"):
        ck.unpack({"state_dict": make_net(0).state_dict()}, build(make_net(0), ["ema"]))


def test_class_mismatch_raises_and_changes_nothing() -> None:
    state, _ = _packed(["ema", "warmup"])
    model = make_net(14)
    wrong = {"ema": polyak.MomentumAnnealingEMA(model, momentum=0.1), "warmup": AVERAGES["warmup"](model)}
    before = {n: full_state(a) for n, a in wrong.items()}
    with pytest.raises(ValueError, match="ExponentialMovingAverage"):
        ck.unpack(state, wrong)
    for n, a in wrong.items():
        assert_same(full_state(a), before[n])


@pytest.mark.parametrize("broken", ["warmup", "ema"])
def test_a_failed_unpack_changes_none_of_the_averages(broken: str) -> None:
    state, _ = _packed(["ema", "warmup", "rampup"])
    if broken == "ema":  # the primary: its weights are under weights_key
        state["state_dict"]["down.weight"] = torch.zeros(3, 6)
    else:  # a secondary: its weights are in its record
        state["polyak"]["averages"][broken]["weights"]["down.weight"] = torch.zeros(3, 6)
    model = make_net(15)
    fresh = build(model, ["ema", "warmup", "rampup"])
    run(model, fresh, 100, 102)  # some state of their own, to see that it survives
    before = {n: full_state(a) for n, a in fresh.items()}
    steps = {n: a.steps for n, a in fresh.items()}
    with pytest.raises(RuntimeError, match="shape"):
        ck.unpack(state, fresh)
    for n, a in fresh.items():
        assert_same(full_state(a), before[n])
        assert a.steps == steps[n]


def test_missing_averages_are_reported_and_left_alone() -> None:
    state, saved = _packed(["ema"])
    model = make_net(16)
    fresh = build(model, ["ema", "warmup", "lora"])
    before = {n: full_state(fresh[n]) for n in ("warmup", "lora")}
    live, missing = ck.unpack(state, fresh)
    assert sorted(missing) == ["lora", "warmup"]
    assert_same(full_state(fresh["ema"]), full_state(saved["ema"]))
    for n in ("warmup", "lora"):
        assert_same(full_state(fresh[n]), before[n])
    assert set(live) == set(model.state_dict())


def test_a_schedule_change_warns_and_the_current_arguments_win() -> None:
    state, saved = _packed(["warmup"])
    model = make_net(17)
    changed = {"warmup": polyak.AveragedModel(model, schedule=Warmup(0.999, power=0.75), interval=2)}
    with pytest.warns(UserWarning, match="warmup"):
        ck.unpack(state, changed)
    assert changed["warmup"].schedule == Warmup(0.999, power=0.75)
    assert_same(full_state(changed["warmup"]), full_state(saved["warmup"]))
    # the same schedule: no warning
    same = {"warmup": AVERAGES["warmup"](make_net(18))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.unpack(state, same)


def test_pack_arguments_are_checked() -> None:
    model = make_net(19)
    averages = build(model, ["ema"])
    with pytest.raises(ValueError, match="at least one"):
        ck.pack({"state_dict": model.state_dict()}, {})
    with pytest.raises(ValueError, match="primary"):
        ck.pack({"state_dict": model.state_dict()}, averages, primary="nope")
    with pytest.raises(KeyError, match="state_dict"):
        ck.pack({}, averages)
    # live= instead of the weights key
    state = ck.pack({}, averages, live=model.state_dict())
    assert set(state["live_state_dict"]) == set(model.state_dict())


def test_unpack_without_live_weights_restores_the_averages_and_returns_none() -> None:
    """A checkpoint converted from a library that saves only the average has no live weights."""
    state, saved = _packed(["ema"])
    del state["live_state_dict"]
    fresh = build(make_net(20), ["ema"])
    live, missing = ck.unpack(state, fresh)
    assert live is None and missing == []
    assert fresh["ema"].steps == saved["ema"].steps
    for k, v in saved["ema"].state_dict().items():
        assert torch.equal(fresh["ema"].state_dict()[k], v), k


def test_averaged_weights_is_the_plain_average() -> None:
    model = make_net(21)
    averages = build(model, ["lora", "warmup"])
    run(model, averages, 0, 3)
    lora = averages["lora"].averaged_state_dict()
    assert set(lora) == {k for k in model.state_dict() if not k.startswith("base.")}
    assert_same({k: v.clone() for k, v in lora.items()}, {k: plain_average(averages["lora"])[k] for k in lora})
    warm = averages["warmup"].averaged_state_dict()
    assert_same({k: v.clone() for k, v in warm.items()}, plain_average(averages["warmup"]))
