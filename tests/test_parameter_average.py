"""``polyak.ParameterAverage`` against torch_ema and diffusers, driven side by side, and against
a float64 reference written here.

Counting: ParameterAverage copies the tensors at construction (polyak's ``steps == 0``) and its
n-th ``update()`` is made at ``steps == n``. torch_ema increments ``num_updates`` before use, so
its n-th update uses n: the two agree with no shift. diffusers' ``EMAModel`` copies at
construction *without counting it* and its first ``step()`` copies again (``get_decay(1) == 0``),
so its (n+1)-th step uses the decay of polyak's n-th update: diffusers trails by one step.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import polyak
from polyak.schedules import ConstantMomentum, NumUpdatesWarmup, Warmup

F64 = torch.float64


def make_params(seed: int, dtype: torch.dtype = F64) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    return [
        nn.Parameter(torch.rand(6, 5, dtype=F64).to(dtype) - 0.5),
        nn.Parameter(torch.rand(7, dtype=F64).to(dtype) - 0.5),
        nn.Parameter(torch.rand(3, 2, 2, dtype=F64).to(dtype) - 0.5),
    ]


@torch.no_grad()
def perturb(params: list[Tensor], i: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(100 + i)
    for p in params:
        if p.is_floating_point():
            p.add_(torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype), alpha=scale)
        else:
            p.add_(torch.randint(0, 5, p.shape, generator=g, dtype=p.dtype))


def values(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


# --------------------------------------------------------------------------------------------
# torch_ema


@pytest.mark.parametrize("use_num_updates", [False, True])
@pytest.mark.parametrize(("dtype", "atol"), [(F64, 1e-15), (torch.float32, 1e-7)])
def test_matches_torch_ema(use_num_updates: bool, dtype: torch.dtype, atol: float) -> None:
    torch_ema = pytest.importorskip("torch_ema")
    params = make_params(0, dtype)
    theirs = torch_ema.ExponentialMovingAverage(params, decay=0.9, use_num_updates=use_num_updates)
    ours = (
        polyak.ParameterAverage(params, schedule=NumUpdatesWarmup(0.9))
        if use_num_updates
        else polyak.ParameterAverage(params, decay=0.9)
    )
    for i in range(30):
        perturb(params, i)
        theirs.update()
        ours.update()
        assert ours.steps == i + 2  # the construction copy counts
        for a, b in zip(ours.shadow, theirs.shadow_params, strict=True):
            assert a.dtype == b.dtype == dtype
            # the same arithmetic up to rounding: torch_ema s - (1-d)(s-p), polyak lerp
            torch.testing.assert_close(a, b, rtol=0.0, atol=atol, msg=f"update {i}")
    # copy_to agrees as well
    mine, yours = make_params(1, dtype), make_params(2, dtype)
    ours.copy_to(mine)
    theirs.copy_to(yours)
    for a, b in zip(mine, yours, strict=True):
        torch.testing.assert_close(a, b, rtol=0.0, atol=atol)


def test_matches_torch_ema_decay_sequence_exactly() -> None:
    torch_ema = pytest.importorskip("torch_ema")
    # With float64 scalars held at shadow 0 and parameter 1 before each update, both
    # libraries' shadow after the update is exactly their weight 1 - decay.
    p = nn.Parameter(torch.zeros(1, dtype=F64))
    theirs = torch_ema.ExponentialMovingAverage([p], decay=0.99, use_num_updates=True)
    ours = polyak.ParameterAverage([p], schedule=NumUpdatesWarmup(0.99))
    for n in range(1, 200):
        with torch.no_grad():
            theirs.shadow_params[0].zero_()
            ours.shadow[0].zero_()
            p.fill_(1.0)
        theirs.update()
        ours.update()
        assert ours.shadow[0].item() == theirs.shadow_params[0].item(), n


# --------------------------------------------------------------------------------------------
# diffusers


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("warmup", [True, False])
def test_matches_diffusers_ema_model_one_step_behind(warmup: bool, foreach: bool) -> None:
    training_utils = pytest.importorskip("diffusers.training_utils")
    params = make_params(3)
    theirs = training_utils.EMAModel(params, decay=0.95, use_ema_warmup=warmup, power=0.75, foreach=foreach)
    # diffusers' first step() copies (get_decay(1) == 0): that is polyak's construction copy.
    theirs.step(params)
    assert theirs.cur_decay_value == 0.0
    sched = Warmup(0.95, power=0.75) if warmup else NumUpdatesWarmup(0.95)
    ours = polyak.ParameterAverage(params, schedule=sched)
    for i in range(25):
        perturb(params, i)
        theirs.step(params)
        ours.update()
        # the same decay: diffusers' optimization_step = polyak's steps at the update + 1
        assert ours.average.current_momentum == 1 - theirs.cur_decay_value, i
        for a, b in zip(ours.shadow, theirs.shadow_params, strict=True):
            torch.testing.assert_close(a, b, rtol=0.0, atol=1e-15, msg=f"step {i}")


def test_diffusers_in_lock_step_uses_the_decay_of_one_step_earlier() -> None:
    training_utils = pytest.importorskip("diffusers.training_utils")
    params = make_params(4)
    theirs = training_utils.EMAModel(params, decay=0.999, use_ema_warmup=True)
    ours = polyak.ParameterAverage(params, schedule=Warmup(0.999))
    for n in range(1, 20):
        perturb(params, n)
        theirs.step(params)
        ours.update()
        # polyak's n-th update uses get_decay(n + 1); diffusers' n-th step uses get_decay(n)
        assert theirs.cur_decay_value == theirs.get_decay(n)
        assert ours.average.current_momentum == 1 - theirs.get_decay(n + 1)
    # so diffusers forgets the construction-time values at its first step, polyak does not
    assert not torch.allclose(ours.shadow[0], theirs.shadow_params[0], rtol=0.0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# float64 reference


@pytest.mark.parametrize(("interval", "compensate"), [(1, True), (2, True), (3, False)])
def test_matches_float64_reference_with_integer_tensors(interval: int, compensate: bool) -> None:
    params: list[Tensor] = [*make_params(5), torch.arange(4, dtype=torch.int64)]
    ours = polyak.ParameterAverage(params, decay=0.9, interval=interval, compensate_interval=compensate)
    ref = values(params)
    for n in range(1, 12):
        perturb(params, n)
        ours.update()
        if n % interval == 0:  # update n is made at steps n; it averages when n % k == 0
            keep = 0.9**interval if compensate else 0.9
            ref[:3] = [keep * r + (1 - keep) * p.detach() for r, p in zip(ref[:3], params[:3], strict=True)]
        ref[3] = params[3].clone()  # integer tensors are copied at every update
        for a, r in zip(ours.shadow, ref, strict=True):
            if r.is_floating_point():
                torch.testing.assert_close(a, r, rtol=0.0, atol=1e-13, msg=f"update {n}")
            else:
                assert torch.equal(a, r), n


def test_plain_tensors_are_averaged_too() -> None:
    x = torch.zeros(3, dtype=F64)
    avg = polyak.ParameterAverage([x], decay=0.75)
    x.fill_(1.0)
    avg.update()
    assert avg.shadow[0].tolist() == [0.25, 0.25, 0.25]
    assert avg.shadow[0] is not x


def test_bf16_parameters_get_an_fp32_shadow_that_moves() -> None:
    p = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    avg = polyak.ParameterAverage([p], decay=0.999)
    assert avg.shadow[0].dtype == torch.float32
    nxt = 1.0 + 2.0**-7  # the next bfloat16 after 1
    with torch.no_grad():
        p.fill_(nxt)
    expected = 1.0
    for _ in range(10):
        avg.update()
        expected = 0.999 * expected + 0.001 * nxt
    # a bf16 shadow would stay at 1.0 (the step 0.001 * 2**-7 is far below half an ulp)
    assert avg.shadow[0].dtype == torch.float32
    torch.testing.assert_close(avg.shadow[0].to(F64), torch.full((4,), expected, dtype=F64), rtol=0.0, atol=1e-6)
    assert (avg.shadow[0] > 1.0).all()
    # copy_to casts back to the parameter's dtype
    avg.copy_to()
    assert p.dtype == torch.bfloat16
    assert torch.equal(p.detach(), torch.full((4,), expected, dtype=F64).to(torch.bfloat16))


def test_dtype_option() -> None:
    params = make_params(6, torch.float32)
    avg = polyak.ParameterAverage(params, decay=0.9, dtype=F64)
    assert all(s.dtype == F64 for s in avg.shadow)
    for s, p in zip(avg.shadow, params, strict=True):
        assert torch.equal(s, p.detach().to(F64))


# --------------------------------------------------------------------------------------------
# store / restore / copy_to / average_parameters


def test_store_restore_copy_to() -> None:
    params = make_params(7)
    avg = polyak.ParameterAverage(params, decay=0.5)
    for i in range(3):
        perturb(params, i)
        avg.update()
    live = values(params)
    shadow = values(avg.shadow)
    avg.store()
    avg.copy_to()
    for p, s in zip(params, shadow, strict=True):
        assert torch.equal(p.detach(), s)
    avg.restore()
    for p, v in zip(params, live, strict=True):
        assert torch.equal(p.detach(), v)
    # the average is untouched by all this
    for s, v in zip(avg.shadow, shadow, strict=True):
        assert torch.equal(s, v)
    with pytest.raises(RuntimeError, match="store"):
        avg.restore()  # a second restore without a store


def test_store_and_restore_explicit_parameters() -> None:
    params = make_params(8)
    avg = polyak.ParameterAverage(params, decay=0.5)
    other = make_params(9)
    before = values(other)
    avg.store(other)
    avg.copy_to(other)  # another set of tensors of the same shapes
    for o, s in zip(other, avg.shadow, strict=True):
        assert torch.equal(o.detach(), s)
    with pytest.raises(ValueError):
        avg.restore(other[:2])
    avg.restore(other)
    for o, b in zip(other, before, strict=True):
        assert torch.equal(o.detach(), b)


def test_average_parameters_context_restores_also_on_error() -> None:
    params = make_params(10)
    avg = polyak.ParameterAverage(params, decay=0.5)
    for i in range(3):
        perturb(params, i)
        avg.update()
    perturb(params, 99)
    live = values(params)
    shadow = values(avg.shadow)
    with avg.average_parameters():
        for p, s in zip(params, shadow, strict=True):
            assert torch.equal(p.detach(), s)
    for p, v in zip(params, live, strict=True):
        assert torch.equal(p.detach(), v)
    with pytest.raises(ZeroDivisionError), avg.average_parameters():
        assert torch.equal(params[0].detach(), shadow[0])
        _ = 1 / 0
    for p, v in zip(params, live, strict=True):
        assert torch.equal(p.detach(), v)
    for s, v in zip(avg.shadow, shadow, strict=True):
        assert torch.equal(s, v)
    # updates work again after the block
    avg.update()


# --------------------------------------------------------------------------------------------
# state


@pytest.mark.parametrize("interval", [1, 3])
def test_state_dict_round_trip_then_continue_bitwise(interval: int) -> None:
    params = make_params(11)
    avg = polyak.ParameterAverage(params, schedule=NumUpdatesWarmup(0.99), interval=interval)
    for i in range(7):
        perturb(params, i)
        avg.update()
    sd = avg.state_dict()
    assert all(isinstance(v, Tensor) for v in sd.values())
    other = make_params(12)
    resumed = polyak.ParameterAverage(other, schedule=NumUpdatesWarmup(0.99), interval=interval)
    resumed.load_state_dict(sd)
    assert resumed.steps == avg.steps == 8
    for a, b in zip(resumed.shadow, avg.shadow, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        for o, p in zip(other, params, strict=True):
            o.copy_(p)
    for i in range(7, 14):
        perturb(params, i)
        perturb(other, i)
        avg.update()
        resumed.update()
    for a, b in zip(resumed.shadow, avg.shadow, strict=True):
        assert torch.equal(a, b)


def test_load_state_dict_with_a_wrong_shape_changes_nothing() -> None:
    params = make_params(13)
    avg = polyak.ParameterAverage(params, decay=0.9)
    avg.update()
    before = values(avg.shadow)
    steps = avg.steps
    sd = {k: v.clone() for k, v in avg.state_dict().items()}
    sd["module.0"] = torch.zeros(5, 6, dtype=F64)  # transposed
    sd["module.1"] = torch.full((7,), 42.0, dtype=F64)
    with pytest.raises(RuntimeError, match="shape"):
        avg.load_state_dict(sd)
    assert avg.steps == steps
    for a, b in zip(avg.shadow, before, strict=True):
        assert torch.equal(a, b)


def test_arguments_are_checked() -> None:
    params = make_params(14)
    with pytest.raises(ValueError, match="decay"):
        polyak.ParameterAverage(params)
    with pytest.raises(ValueError, match="decay"):
        polyak.ParameterAverage(params, decay=0.9, schedule=ConstantMomentum(0.1))
    with pytest.raises(ValueError, match="decay"):
        polyak.ParameterAverage(params, decay=1.5)
    with pytest.raises(TypeError):
        polyak.ParameterAverage([params[0], 3.0], decay=0.9)  # type: ignore[list-item]


def test_step_is_update_and_current_decay_is_logged() -> None:
    params = make_params(15)
    avg = polyak.ParameterAverage(params, decay=0.75)
    perturb(params, 0)
    avg.step()  # diffusers' name
    assert avg.steps == 2
    assert avg.current_decay == pytest.approx(0.75, abs=1e-15)
