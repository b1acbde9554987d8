"""The model an average is bound to, and values that cannot be right: every change to the model's
tensors after the average was built is seen and named, and impossible counts, weights and dtypes
are refused; in each case nothing of the average changes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import polyak


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def state(avg: polyak.BaseAveragedModel) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in avg.state_dict().items()}


def assert_unchanged(avg: polyak.BaseAveragedModel, before: dict[str, Tensor]) -> None:
    after = avg.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)


@pytest.fixture
def bound() -> tuple[nn.Sequential, polyak.ExponentialMovingAverage]:
    model = make_model()
    ema = polyak.ExponentialMovingAverage(model, momentum=0.1)
    ema.update_parameters(model)
    perturb(model)
    ema.update_parameters(model)
    return model, ema


# -- the model changed after the average was built -------------------------------------------


def test_an_added_parameter_is_named(bound: tuple[nn.Sequential, polyak.ExponentialMovingAverage]) -> None:
    model, ema = bound
    before = state(ema)
    model[0].register_parameter("extra", nn.Parameter(torch.zeros(2)))
    with pytest.raises(ValueError, match=r"changed since the average last read it.*not in the average: '0\.extra'"):
        ema.update_parameters(model)
    assert_unchanged(ema, before)


def test_a_deleted_parameter_is_named_not_a_bare_key_error(
    bound: tuple[nn.Sequential, polyak.ExponentialMovingAverage],
) -> None:
    model, ema = bound
    before = state(ema)
    del model[2].bias
    with pytest.raises(ValueError, match=r"missing from the source: '2\.bias'"):
        ema.update_parameters(model)
    assert_unchanged(ema, before)


def test_an_added_buffer_is_named(bound: tuple[nn.Sequential, polyak.ExponentialMovingAverage]) -> None:
    model, ema = bound
    before = state(ema)
    model[2].register_buffer("scale", torch.ones(1))
    with pytest.raises(ValueError, match=r"not in the average: '2\.scale'"):
        ema.update_parameters(model)
    assert_unchanged(ema, before)


def test_a_replaced_submodule_is_read_anew(bound: tuple[nn.Sequential, polyak.ExponentialMovingAverage]) -> None:
    """A submodule swapped for another of the same shape: the average reads the new one's
    tensors, not the old ones it had resolved (which no longer belong to the model)."""
    model, ema = bound
    new = nn.Linear(4, 2)
    with torch.no_grad():
        new.weight.fill_(3.0)
        new.bias.fill_(-1.0)
    model[2] = new
    before = ema.module[2].weight.detach().double().clone()
    ema.update_parameters(model)
    expected = 0.9 * before + 0.1 * 3.0
    torch.testing.assert_close(ema.module[2].weight.double(), expected, rtol=0, atol=1e-6)


def test_a_submodule_replaced_behind_the_hooks_is_seen_within_structure_every_updates(
    bound: tuple[nn.Sequential, polyak.ExponentialMovingAverage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write straight into ``_modules`` registers nothing (no hook sees it): the structure is
    re-read every STRUCTURE_EVERY updates anyway, and from then on the new submodule is read."""
    import polyak.engine as engine

    monkeypatch.setattr(engine, "STRUCTURE_EVERY", 3)
    model, ema = bound
    for _ in range(3):  # start a fresh count
        ema.update_parameters(model)
    new = nn.Linear(4, 2)
    with torch.no_grad():
        new.weight.fill_(3.0)
        new.bias.fill_(-1.0)
    model._modules["2"] = new  # no registration hook runs
    read_new = []
    for _ in range(5):
        before = ema.module[2].weight.detach().double().clone()
        ema.update_parameters(model)
        step = ema.module[2].weight.detach().double() - 0.9 * before  # 0.1 x what was read
        read_new.append(bool(torch.allclose(step, torch.full_like(step, 0.3), atol=1e-6)))
    first = read_new.index(True)  # raises if the new submodule was never read
    assert first < 3 and all(read_new[first:]), read_new


def test_a_registration_anywhere_makes_the_next_update_read_the_structure(
    bound: tuple[nn.Sequential, polyak.ExponentialMovingAverage],
) -> None:
    """Hooks count registrations in the whole process: one in an unrelated module costs one
    structure read, and the average goes on as before."""
    import polyak.engine as engine

    model, ema = bound
    fp = ema.engine.bind(model).source_print
    nn.Linear(2, 2)  # registers two parameters elsewhere
    assert fp.registrations != engine._REGISTRATIONS[0]
    ema.update_parameters(model)
    assert ema.engine.bind(model).source_print is fp and fp.registrations == engine._REGISTRATIONS[0]


def test_a_complex_tensor_into_a_real_average_is_refused(
    bound: tuple[nn.Sequential, polyak.ExponentialMovingAverage],
) -> None:
    model, ema = bound
    before = state(ema)
    model[0].weight.data = torch.complex(model[0].weight.data, torch.ones_like(model[0].weight.data))
    with pytest.raises(
        ValueError, match=r"'0\.weight' is torch\.complex64 in the source but torch\.float32.*imaginary"
    ):
        ema.update_parameters(model)
    assert_unchanged(ema, before)


def test_a_complex_tensor_in_a_state_dict_for_a_real_average_is_refused(
    bound: tuple[nn.Sequential, polyak.ExponentialMovingAverage],
) -> None:
    _, ema = bound
    before = state(ema)
    sd = state(ema)
    sd["module.0.weight"] = torch.complex(sd["module.0.weight"], sd["module.0.weight"])
    with pytest.raises(RuntimeError, match=r"'module\.0\.weight' is torch\.complex64 in the file but torch\.float32"):
        ema.load_state_dict(sd)
    assert_unchanged(ema, before)


# -- counts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [torch.tensor(-5), torch.tensor(2.0), torch.tensor(True), torch.tensor([1, 2])])
def test_impossible_steps_in_a_state_dict_change_nothing(
    bound: tuple[nn.Sequential, polyak.ExponentialMovingAverage], steps: Tensor
) -> None:
    """steps=-5 used to load; five updates later the average re-copied the model and was lost."""
    _, ema = bound
    before = state(ema)
    sd = state(ema)
    sd["steps"] = steps
    with pytest.raises(RuntimeError, match=r"'steps' must be a single non-negative integer"):
        ema.load_state_dict(sd)
    assert_unchanged(ema, before)
    assert ema.steps == 2


@pytest.mark.parametrize("value", [2.7, 3.0, -1, True, "3", None, torch.tensor(2.5)])
def test_steps_takes_only_non_negative_integers(
    bound: tuple[nn.Sequential, polyak.ExponentialMovingAverage], value: object
) -> None:
    _, ema = bound
    with pytest.raises(ValueError, match=r"^steps must be a non-negative integer"):
        ema.steps = value  # type: ignore[assignment]
    assert ema.steps == 2
    ema.steps = torch.tensor(7)
    assert ema.steps == 7 and type(ema.steps) is int


def test_a_negative_n_averaged_is_refused() -> None:
    model = make_model()
    avg = polyak.AveragedModel(model)
    avg.update_parameters(model)
    before = state(avg)
    sd = state(avg)
    sd["n_averaged"] = torch.tensor(-1)
    with pytest.raises(RuntimeError, match="'n_averaged' must be a single non-negative integer"):
        avg.load_state_dict(sd)
    assert_unchanged(avg, before)


# -- weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf, 1.5, -0.1, True, "0.5"])
def test_impossible_host_weights_are_refused(
    bound: tuple[nn.Sequential, polyak.ExponentialMovingAverage], weight: object
) -> None:
    model, ema = bound
    before = state(ema)
    with pytest.raises(ValueError, match=r"^weight must be"):
        ema.average_(model, weight)  # type: ignore[arg-type]
    assert_unchanged(ema, before)


def test_a_tensor_weight_is_read_by_the_kernel(bound: tuple[nn.Sequential, polyak.ExponentialMovingAverage]) -> None:
    model, ema = bound
    expected = {
        k: 0.75 * v.double() + 0.25 * dict(model.named_parameters())[k].double()
        for k, v in ema.module.named_parameters()
    }
    ema.average_(model, torch.tensor(0.25))
    for k, v in ema.module.named_parameters():
        torch.testing.assert_close(v.double(), expected[k], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="0-d floating tensor"):
        ema.average_(model, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="0-d floating tensor"):
        ema.average_(model, torch.tensor(1))
