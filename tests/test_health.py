"""Health reports (polyak.health): the numbers against a float64 reference written here, each
failure provoked and warned about once, a healthy run warned about never, and no host read
until the numbers are asked for."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

import polyak
from polyak.health import Health


def sgd_run(model: nn.Module, steps: int, seed: int = 0) -> Iterator[int]:
    """Real training: SGD on a fixed random regression task, yielding after each step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, 6, 6, generator=g)
    y = torch.randn(64, 3, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        i = torch.randint(0, 64, (16,), generator=g)
        loss = nn.functional.mse_loss(model(x[i].to(next(model.parameters()).dtype)).float(), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield step


@contextlib.contextmanager
def no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def reference(average: polyak.BaseAveragedModel, model: nn.Module) -> dict[str, float]:
    """distance and moved in float64, by the definitions in the Health docstring, over the
    parameters and, with ``update_buffers``, BatchNorm's floating statistics."""
    names = [k for k, _ in model.named_parameters()]
    if average.update_buffers:
        names += [k for k, b in model.named_buffers() if b.is_floating_point()]
    live = {k: v.detach() for k, v in model.state_dict().items() if k in names}
    avg = {k: v.detach() for k, v in average.module.state_dict().items() if k in names}
    w = average.current_momentum
    d2 = sum(float(((live[k].double() - avg[k].double()) ** 2).sum()) for k in live)
    l2 = sum(float((live[k].double() ** 2).sum()) for k in live)
    along = intended = 0.0
    for k in live:
        a = avg[k]
        step = w * (live[k].double() - a.double())
        made = (a.double() + step).to(a.dtype).double() - a.double()  # one rounding into a's dtype
        along += float((made * step).sum())
        intended += float((step * step).sum())
    return {"distance": math.sqrt(d2 / l2), "moved": along / intended if intended else 1.0}


AVERAGES: dict[str, Callable[[nn.Module], polyak.BaseAveragedModel]] = {
    "ema": lambda m: polyak.ExponentialMovingAverage(m, momentum=0.02),
    "ema_interval_3": lambda m: polyak.ExponentialMovingAverage(m, momentum=0.02, interval=3),
    "swa": lambda m: polyak.StochasticWeightAverage(m),
    "warmup": lambda m: polyak.AveragedModel(m, schedule=polyak.schedules.Warmup(0.999)),
    "bn_averaged": lambda m: polyak.ExponentialMovingAverage(m, momentum=0.02, update_buffers=True),
}


@pytest.mark.parametrize("kind", list(AVERAGES))
def test_a_healthy_run_reports_its_numbers_and_warns_about_nothing(kind: str, make_model) -> None:
    model = make_model()
    average = AVERAGES[kind](model)
    with no_warnings():
        for step in sgd_run(model, 120):
            average.update_parameters(model)
            if step % 10 == 9:
                v = average.health(model).values()
                assert v["problems"] == [] and v["stalled"] == [] and v["drifted"] == []
                ref = reference(average, model)
                assert v["distance"] == pytest.approx(ref["distance"], rel=1e-6)
                assert v["moved"] == 1.0  # float32: nothing to check, so 1 exactly
                assert 0 < v["distance"] < polyak.health.FAR
    assert v["steps"] == 120
    m = average.current_momentum
    assert v["horizon"] == pytest.approx(average.interval / m)
    if kind == "swa":
        assert v["horizon"] == pytest.approx(120)  # an equal average spans every step
    # TinyNet: conv, bn and head weights and biases; BN statistics averaged or copied
    buffers = 3 if kind != "bn_averaged" else 1  # num_batches_tracked is always copied
    assert (v["averaged"], v["copied"], v["skipped"]) == (6 + 3 - buffers, buffers, 0)
    scalars = average.health(model).scalars()
    assert scalars == {"distance": v["distance"], "moved": 1.0, "horizon": v["horizon"]}


def test_a_bf16_average_with_round_to_nearest_stalls_and_is_named(make_model) -> None:
    """Decay 0.9999 in bfloat16: the update itself warns (host arithmetic on the weight), and the
    report names the tensors an update cannot move and says how little it moves them."""
    model = make_model(dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match=r"update of weight 0\.0001 into a bfloat16 average .* stalls"):
        average = polyak.ExponentialMovingAverage(model, momentum=1e-4, dtype=torch.bfloat16)
        for _ in sgd_run(model, 30):
            average.update_parameters(model)
    report = average.health(model)
    with pytest.warns(UserWarning, match=r"less than half its intended change to \d+ averaged tensor\(s\) \('conv"):
        v = report.values()
    assert v["moved"] == pytest.approx(reference(average, model)["moved"], rel=1e-5, abs=1e-7)
    assert v["moved"] < 0.5
    assert "conv.weight" in v["stalled"] and "head.weight" in v["stalled"]
    with no_warnings():  # once per average
        average.update_parameters(model)
        average.health(model).values()


def test_stochastic_rounding_and_float32_are_not_reported_as_stalled(make_model) -> None:
    model = make_model(dtype=torch.bfloat16)
    with no_warnings():
        averages = [
            polyak.ExponentialMovingAverage(model, momentum=1e-4, dtype=torch.bfloat16, rounding="stochastic"),
            polyak.ExponentialMovingAverage(model, momentum=1e-4),  # float32, the default
        ]
        for _ in sgd_run(model, 30):
            for a in averages:
                a.update_parameters(model)
        for a in averages:
            v = a.health(model).values()
            assert v["moved"] == 1.0 and v["problems"] == []


def test_a_bf16_average_that_can_move_is_not_warned_about(make_model) -> None:
    """Momentum 0.1 in bfloat16: a change must exceed 0.039 of an element's value, which these
    updates do; no warning, and the measured share matches the reference."""
    model = make_model(dtype=torch.bfloat16)
    with no_warnings():
        average = polyak.ExponentialMovingAverage(model, momentum=0.1, dtype=torch.bfloat16)
        for _ in sgd_run(model, 5):
            average.update_parameters(model)
        v = average.health(model).values()
    assert v["moved"] == pytest.approx(reference(average, model)["moved"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("how", ["reset_parameters", "load_state_dict", "new_head"])
def test_weights_replaced_after_the_average_was_built(how: str, make_model) -> None:
    """The commonest silent bug: the average is built, then the model gets other weights (a
    checkpoint loaded into it alone, a new head); the average keeps averaging the old ones in."""
    model = make_model()
    average = polyak.ExponentialMovingAverage(model, momentum=1e-3)
    with no_warnings():
        for _ in sgd_run(model, 3):
            average.update_parameters(model)
        assert average.health(model).values()["problems"] == []
    if how == "reset_parameters":
        torch.manual_seed(5)
        model.conv.reset_parameters()
        model.head.reset_parameters()
    elif how == "load_state_dict":
        model.load_state_dict(make_model(seed=7).state_dict())
    else:
        model.head = nn.Linear(4, 3)
    for _ in sgd_run(model, 3):
        average.update_parameters(model)
    with pytest.warns(UserWarning, match=r"farther from the live weights than the live weights' own norm"):
        v = average.health(model).values()
    assert "head.weight" in v["drifted"]
    assert "head.bias" not in v["drifted"]  # one-dimensional tensors are not judged


def test_an_average_never_updated_is_reported(make_model) -> None:
    model = make_model()
    average = polyak.ExponentialMovingAverage(model)
    with pytest.warns(UserWarning, match="never updated"):
        v = average.health(model).values()
    assert v["steps"] == 0 and v["horizon"] is None


def test_a_swap_left_open_is_reported(make_model) -> None:
    model = make_model()
    average = polyak.ExponentialMovingAverage(model)
    average.update_parameters(model)
    stack = contextlib.ExitStack()
    stack.enter_context(average.swapped(model))
    try:
        with pytest.warns(UserWarning, match=r"swapped into the model: a swapped\(\) block was left open"):
            v = average.health(model).values()
        assert v["distance"] is None  # the model holds the average: nothing to compare
    finally:
        stack.close()
    with no_warnings():
        assert average.health(model).values()["problems"] == []


def test_nan_is_reported(make_model) -> None:
    model = make_model()
    average = polyak.ExponentialMovingAverage(model)
    average.update_parameters(model)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    average.update_parameters(model)
    with pytest.warns(UserWarning, match=r"NaN or inf \('head.weight'\)"):
        v = average.health(model).values()
    assert math.isnan(v["distance"]) and v["drifted"] == []


def test_warn_false_reports_without_warning_and_reports_can_be_printed(make_model) -> None:
    model = make_model()
    average = polyak.ExponentialMovingAverage(model)
    with no_warnings():
        report = average.health(model, warn=False)
        assert report.values()["problems"] == [
            "the average was never updated: call update_parameters(model) after each optimizer step"
        ]
    text = str(report)
    assert text.startswith("ExponentialMovingAverage health: steps=0") and "never updated" in text
    average.update_parameters(model)
    assert "no problems found" in str(average.health(model))


def test_the_report_does_not_read_the_device_until_asked(make_model, monkeypatch) -> None:
    """No .item(), .tolist(), bool() or float() of a tensor while the report is made: on a GPU
    each would be a host synchronisation."""
    model = make_model(dtype=torch.bfloat16)
    average = polyak.ExponentialMovingAverage(model, momentum=0.5, dtype=torch.bfloat16)
    for _ in sgd_run(model, 3):
        average.update_parameters(model)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a host read of a device value")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
            patch.setattr(Tensor, name, refuse)
        report = average.health(model)
    assert isinstance(report.distance, Tensor) and report.distance.dim() == 0
    assert report.values()["distance"] > 0


def test_the_update_path_reads_nothing_of_the_device(make_model, monkeypatch) -> None:
    """Watching for lost updates is host arithmetic on the weight: an update still never reads
    a tensor's value."""
    model = make_model(dtype=torch.bfloat16)
    average = polyak.ExponentialMovingAverage(model, momentum=0.5, dtype=torch.bfloat16)
    average.update_parameters(model)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a host read of a device value")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            patch.setattr(Tensor, name, refuse)
        average.update_parameters(model)
        average.update_parameters(model)


def test_parameter_average_and_posthoc_give_reports(make_model, tmp_path) -> None:
    model = make_model()
    pa = polyak.ParameterAverage(model.parameters(), decay=0.9)
    posthoc = polyak.PostHocEMA(model, sigma_rels=(0.05, 0.1))
    with no_warnings():
        for _ in sgd_run(model, 5):
            pa.update()
            posthoc.update_parameters(model)
        v = pa.health().values()
        assert v["averaged"] == 6 and v["problems"] == []
        assert posthoc.health(model, sigma_rel=0.1).values()["steps"] == 5
    assert isinstance(posthoc.health(model), Health)


def test_an_average_cannot_report_against_itself(make_model) -> None:
    model = make_model()
    average = polyak.ExponentialMovingAverage(model)
    with pytest.raises(ValueError, match=r"health\(\) was given this average"):
        average.health(average)


# -- stored in checkpoints, printed by inspect ------------------------------------------------


def test_the_latest_report_read_is_saved_in_checkpoints_and_printed_by_inspect(make_model, tmp_path, capsys) -> None:
    from polyak import checkpoint
    from polyak.cli import main

    model = make_model()
    average = polyak.ExponentialMovingAverage(model, momentum=0.02)
    assert average.last_health is None
    for _ in sgd_run(model, 12):
        average.update_parameters(model)
    report = average.health(model)
    assert average.last_health is None  # made, not read
    v = report.values()
    assert average.last_health == {k: v[k] for k in polyak.health.KEPT}
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint.pack({}, {"ema": average}, live=model.state_dict()), path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"health at step 12: distance {v['distance']:.6g}, moved 1, horizon 50" in out
    assert "tensors 6 averaged, 3 copied, 0 skipped; no problems" in out
    assert main(["inspect", str(path), "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)["averages"][0]["averages"]["ema"]["health"]
    assert stored["distance"] == pytest.approx(v["distance"]) and stored["problems"] == []
    # loading ignores it
    other = polyak.ExponentialMovingAverage(make_model(seed=3), momentum=0.02)
    checkpoint.unpack(torch.load(path, weights_only=True), {"ema": other})
    assert other.steps == 12 and other.last_health is None


def test_inspect_prints_stored_problems_and_ignores_a_malformed_report(make_model, tmp_path, capsys) -> None:
    from polyak import checkpoint
    from polyak.cli import main

    model = make_model()
    average = polyak.ExponentialMovingAverage(model)
    average.health(model, warn=False).values()  # never updated
    ck = checkpoint.pack({}, {"ema": average}, live=model.state_dict())
    path = tmp_path / "a.pt"
    torch.save(ck, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "health at step 0: distance 0, moved 1; tensors 6 averaged" in out
    assert "problem: the average was never updated" in out
    ck["polyak"]["averages"]["ema"]["health"] = {"distance": "\x1b[31mred", "problems": [1, "x" * 1000], "steps": -1}
    torch.save(ck, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "health: no numbers" in out
    assert "problem: " + "x" * 300 + "\n" in out


@pytest.mark.parametrize("frozen", ["skip", "copy"])
def test_the_counts_follow_what_each_tensor_is_after_the_average_is_converted(frozen: str, make_model) -> None:
    """Frozen conv weights skipped (shared) or copied: the report's counts are those of the
    average's state dict, counted here by hand, before and after ``.double()`` on the average."""
    model = make_model()
    for p in model.conv.parameters():
        p.requires_grad_(False)
    average = polyak.AveragedModel(model, frozen=frozen)
    average.update_parameters(model)
    names = list(average.module.state_dict())
    frozen_names = [n for n in names if n.startswith("conv.")]
    integer = [n for n in names if not average.module.state_dict()[n].is_floating_point()]
    buffers = {n for n, _ in average.module.named_buffers()}
    # float parameters that train are averaged; float BN statistics copied (update_buffers=False)
    expected_avg = len([n for n in names if n not in buffers and n not in frozen_names])
    expected_copy = len([n for n in buffers if n not in integer]) + len(integer)
    expected = {"skip": (expected_avg, expected_copy, len(frozen_names))}
    expected["copy"] = (expected_avg, expected_copy + len(frozen_names), 0)
    for _ in range(2):
        v = average.health(model, warn=False).values()
        assert (v["averaged"], v["copied"], v["skipped"]) == expected[frozen]
        average.module.double()
        average.update_parameters(model)
