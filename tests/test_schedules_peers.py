"""polyak's schedules against the peers' own numbers.

Where a peer is installed (ema-pytorch, diffusers, torch-ema, mmengine) the expected value is
what the peer itself computes, driven through its public API or its step counter. Where it is
not (timm, mmdet, mmagic, mmpretrain, mmcv 1.x, EDM2) the peer's formula is transcribed by
hand from the peer's source, named by version, file and lines, and clearly labelled as such. Every
test states the step mapping between the peer's counter and polyak's ``steps`` (the number of
earlier counted updates, so the first averaging update sees ``steps == 0`` and copies).

No expected value is computed by polyak itself.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import polyak
from polyak.schedules import (
    ConstantMomentum,
    CosineMomentum,
    EqualAverage,
    ExpMomentum,
    MMCVWarmup,
    MomentumAnnealing,
    NumUpdatesWarmup,
    PowerFunction,
    RampUpMomentum,
    Schedule,
    StartAt,
    Warmup,
    gamma_to_sigma_rel,
    interval_momentum,
    resolve_decay,
    schedule_from_dict,
    sigma_rel_to_gamma,
)

SETTINGS = settings(deadline=None, max_examples=50)

# Steps at which the schedules are compared with the peers: the copy, the first warm-up
# steps, around update_after_step, and far into the run.
STEPS = [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 31, 99, 100, 101, 1_000, 31_623, 10**5, 10**6, 10**8]

WARMUP_CASES = [
    # decay, inv_gamma, power, min_decay, update_after_step
    (0.9999, 1.0, 2 / 3, 0.0, 0),
    (0.999, 1.0, 0.75, 0.0, 0),
    (0.999, 2.0, 0.75, 0.1, 5),
    (0.99, 10.0, 1.0, 0.0, 100),
]


def _linear(seed: int, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 3).to(dtype)


@torch.no_grad()
def _perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype), alpha=0.1)


# --------------------------------------------------------------------------------------------
# Warmup vs ema-pytorch, diffusers and timm


@pytest.mark.parametrize(("decay", "inv_gamma", "power", "min_decay", "after"), WARMUP_CASES)
def test_warmup_matches_ema_pytorch_get_current_decay(
    decay: float, inv_gamma: float, power: float, min_decay: float, after: int
) -> None:
    ema_pytorch = pytest.importorskip("ema_pytorch")
    ema = ema_pytorch.EMA(
        _linear(0),
        beta=decay,
        update_after_step=after,
        update_every=1,
        inv_gamma=inv_gamma,
        power=power,
        min_value=min_decay,
    )
    sched = Warmup(decay, inv_gamma=inv_gamma, power=power, min_decay=min_decay, update_after_step=after)
    # Step mapping: ema-pytorch's update() reads step = self.step (its number of earlier calls,
    # polyak's `steps` t), increments self.step, and only then calls get_current_decay(),
    # which reads the incremented counter t + 1. So get_current_decay() with self.step = t + 1
    # is the decay ema-pytorch applies at polyak's steps t.
    for t in STEPS:
        ema.step.fill_(t + 1)
        peer = ema.get_current_decay()
        ours = sched.decay(t)
        if peer == 0.0:
            assert ours == 0.0, t
        else:
            # ema-pytorch evaluates the power in float32 (a tensor), polyak in float64.
            assert math.isclose(ours, peer, rel_tol=2e-6, abs_tol=0.0), (t, ours, peer)


def test_warmup_averaged_model_follows_a_driven_ema_pytorch_ema() -> None:
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = _linear(1)  # no buffers: ema-pytorch always lerps floating buffers
    ema = ema_pytorch.EMA(model, beta=0.99, update_after_step=3, update_every=1, power=0.75)
    avg = polyak.AveragedModel(model, schedule=Warmup(0.99, power=0.75, update_after_step=3))
    for i in range(15):
        _perturb(model, i)
        ema.update()
        avg.update_parameters(model)
        for name, p in ema.ema_model.named_parameters():
            q = dict(avg.module.named_parameters())[name]
            # ema-pytorch's decay is a float32 number: agreement to float32 precision.
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=f"update {i}, {name}")


@pytest.mark.parametrize(("decay", "inv_gamma", "power", "min_decay", "after"), WARMUP_CASES)
def test_warmup_matches_diffusers_get_decay(
    decay: float, inv_gamma: float, power: float, min_decay: float, after: int
) -> None:
    training_utils = pytest.importorskip("diffusers.training_utils")
    ema = training_utils.EMAModel(
        [nn.Parameter(torch.zeros(2))],
        decay=decay,
        min_decay=min_decay,
        update_after_step=after,
        use_ema_warmup=True,
        inv_gamma=inv_gamma,
        power=power,
    )
    sched = Warmup(decay, inv_gamma=inv_gamma, power=power, min_decay=min_decay, update_after_step=after)
    # Step mapping: diffusers' step() increments optimization_step before get_decay(), so its
    # n-th call (1-based) uses get_decay(n); its first call gets 0 (a copy). polyak's steps t
    # (0-based, the first update copies) is diffusers' optimization_step t + 1.
    for t in STEPS:
        assert sched.decay(t) == ema.get_decay(t + 1), t


@SETTINGS
@given(
    t=st.integers(min_value=0, max_value=10**9),
    decay=st.floats(min_value=0.5, max_value=0.99999),
    inv_gamma=st.floats(min_value=0.1, max_value=100.0),
    power=st.floats(min_value=0.1, max_value=2.0),
    after=st.integers(min_value=0, max_value=1000),
)
def test_warmup_matches_diffusers_get_decay_anywhere(
    t: int, decay: float, inv_gamma: float, power: float, after: int
) -> None:
    training_utils = pytest.importorskip("diffusers.training_utils")
    ema = training_utils.EMAModel(
        [nn.Parameter(torch.zeros(1))],
        decay=decay,
        update_after_step=after,
        use_ema_warmup=True,
        inv_gamma=inv_gamma,
        power=power,
    )
    sched = Warmup(decay, inv_gamma=inv_gamma, power=power, update_after_step=after)
    assert sched.decay(t) == ema.get_decay(t + 1)  # optimization_step = t + 1 (see above)


def timm_model_ema_v3_get_decay(
    step: int | None,
    *,
    decay: float,
    min_decay: float = 0.0,
    update_after_step: int = 0,
    use_warmup: bool = False,
    warmup_gamma: float = 1.0,
    warmup_power: float = 2 / 3,
) -> float:
    """HAND TRANSCRIPTION of timm 1.0.31 ``ModelEmaV3.get_decay`` (timm/utils/model_ema.py:251-268).
    timm is not installed, so this is the formula, not timm's code."""
    if step is None:
        return decay
    step = max(0, step - update_after_step - 1)
    if step <= 0:
        return 0.0
    if use_warmup:
        value = 1 - (1 + step / warmup_gamma) ** -warmup_power
        return max(min(value, decay), min_decay)
    return decay


@pytest.mark.parametrize(("decay", "inv_gamma", "power", "min_decay", "after"), WARMUP_CASES)
@pytest.mark.parametrize("use_warmup", [True, False])
def test_warmup_matches_timm_model_ema_v3_formula(
    decay: float, inv_gamma: float, power: float, min_decay: float, after: int, use_warmup: bool
) -> None:
    sched = Warmup(
        decay, inv_gamma=inv_gamma, power=power, min_decay=min_decay, update_after_step=after, warmup=use_warmup
    )
    # Step mapping: timm's train.py calls ema.update(model, step=num_updates) after the
    # optimizer step, num_updates counting that step, so timm's step is polyak's steps + 1.
    for t in STEPS:
        expected = timm_model_ema_v3_get_decay(
            t + 1,
            decay=decay,
            min_decay=min_decay,
            update_after_step=after,
            use_warmup=use_warmup,
            warmup_gamma=inv_gamma,
            warmup_power=power,
        )
        assert math.isclose(sched.decay(t), expected, rel_tol=1e-15, abs_tol=0.0), (t, use_warmup)


@pytest.mark.parametrize("after", [0, 5])
def test_warmup_false_gives_the_constant_decay(after: int) -> None:
    sched = Warmup(0.999, warmup=False, update_after_step=after)
    for t in range(after + 1):
        assert sched.decay(t) == 0.0  # the update at or before update_after_step copies
        assert sched.momentum(t) == 1.0
    for t in [after + 1, after + 2, after + 10, 10**6, 10**9]:
        assert sched.decay(t) == 0.999
        assert sched.momentum(t) == 1.0 - 0.999


def test_warmup_false_differs_from_diffusers_which_falls_back_to_num_updates() -> None:
    training_utils = pytest.importorskip("diffusers.training_utils")
    ema = training_utils.EMAModel([nn.Parameter(torch.zeros(1))], decay=0.999, use_ema_warmup=False)
    # diffusers' use_ema_warmup=False is not "no warm-up": it uses (1 + s) / (10 + s) ...
    assert ema.get_decay(2) == pytest.approx(2 / 11, rel=1e-15)
    # ... which polyak spells NumUpdatesWarmup, at the same step mapping as Warmup
    # (optimization_step = steps + 1). At steps 0 polyak copies without asking the schedule.
    nu = NumUpdatesWarmup(0.999)
    for t in STEPS[1:]:
        assert nu.decay(t) == ema.get_decay(t + 1), t
    # while Warmup(warmup=False) is the constant.
    assert Warmup(0.999, warmup=False).decay(1) == 0.999


# --------------------------------------------------------------------------------------------
# NumUpdatesWarmup vs torch_ema


def _torch_ema_weight(ema: object, param: nn.Parameter) -> float:
    """The weight (1 - decay) torch_ema applies at its next update(), read exactly: with a
    float64 shadow of 0 and a parameter of 1, ``s - (1 - d) * (s - p)`` is exactly ``1 - d``."""
    with torch.no_grad():
        ema.shadow_params[0].zero_()  # type: ignore[attr-defined]
        param.fill_(1.0)
    ema.update()  # type: ignore[attr-defined]
    return float(ema.shadow_params[0].item())  # type: ignore[attr-defined]


@pytest.mark.parametrize("decay", [0.999, 0.9, 0.5])
def test_num_updates_warmup_matches_torch_ema_decay(decay: float) -> None:
    torch_ema = pytest.importorskip("torch_ema")
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    ema = torch_ema.ExponentialMovingAverage([p], decay=decay, use_num_updates=True)
    sched = NumUpdatesWarmup(decay)
    # Step mapping: torch_ema increments num_updates before using it, so its n-th update()
    # (1-based) uses n; ParameterAverage's construction copy is polyak's steps 0, and its n-th
    # update() is made at steps == n.
    for n in range(1, 60):
        assert _torch_ema_weight(ema, p) == sched.momentum(n), n
    for n in [1_000, 8_990, 8_991, 10**6]:
        ema.num_updates = n - 1
        assert _torch_ema_weight(ema, p) == sched.momentum(n), n


@pytest.mark.parametrize("use_num_updates", [True, False])
def test_num_updates_warmup_parameter_average_matches_driven_torch_ema(use_num_updates: bool) -> None:
    torch_ema = pytest.importorskip("torch_ema")
    torch.manual_seed(3)
    params = [nn.Parameter(torch.randn(5, 4, dtype=torch.float64)), nn.Parameter(torch.randn(7, dtype=torch.float64))]
    ema = torch_ema.ExponentialMovingAverage(params, decay=0.95, use_num_updates=use_num_updates)
    ours = (
        polyak.ParameterAverage(params, schedule=NumUpdatesWarmup(0.95))
        if use_num_updates
        else polyak.ParameterAverage(params, decay=0.95)
    )
    g = torch.Generator().manual_seed(0)
    for i in range(40):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        ema.update()
        ours.update()
        for a, b in zip(ours.shadow, ema.shadow_params, strict=True):
            torch.testing.assert_close(a, b, rtol=0.0, atol=1e-12, msg=f"update {i}")


# --------------------------------------------------------------------------------------------
# OpenMMLab schedules


def _mmengine_momentum(ema: nn.Module, t: int) -> float:
    """The momentum mmengine's avg_func applies at steps t, read exactly: lerp(0, 1, m) is m
    (for m < 0.5 it is 0 + m * 1; for m >= 0.5 it is 1 - (1 - m), exact by Sterbenz)."""
    ema.steps.fill_(t)  # type: ignore[operator]
    averaged = torch.zeros(1, dtype=torch.float64)
    ema.avg_func(averaged, torch.ones(1, dtype=torch.float64), t)  # type: ignore[operator]
    return float(averaged.item())


@pytest.mark.parametrize(("momentum", "gamma"), [(0.0002, 100), (0.01, 10), (0.001, 1000)])
def test_momentum_annealing_matches_mmengine(momentum: float, gamma: int) -> None:
    mm_model = pytest.importorskip("mmengine.model")
    ema = mm_model.MomentumAnnealingEMA(_linear(0, torch.float64), momentum=momentum, gamma=gamma)
    sched = MomentumAnnealing(momentum, gamma=gamma)
    # Step mapping: mmengine's avg_func reads self.steps, the number of earlier
    # update_parameters calls: polyak's steps, unshifted.
    for t in STEPS[1:]:
        assert _mmengine_momentum(ema, t) == sched.momentum(t), t


def test_momentum_annealing_averaged_model_follows_a_driven_mmengine_ema() -> None:
    mm_model = pytest.importorskip("mmengine.model")
    model = _linear(2, torch.float64)
    theirs = mm_model.MomentumAnnealingEMA(model, momentum=0.01, gamma=10)
    ours = polyak.AveragedModel(model, schedule=MomentumAnnealing(0.01, gamma=10))
    for i in range(25):
        _perturb(model, i)
        theirs.update_parameters(model)
        ours.update_parameters(model)
    assert int(theirs.steps) == ours.steps == 25
    for name, p in theirs.module.named_parameters():
        torch.testing.assert_close(dict(ours.module.named_parameters())[name], p, rtol=0.0, atol=1e-13)


def mmdet_exp_momentum(steps: int, momentum: float, gamma: float) -> float:
    """HAND TRANSCRIPTION of mmdet ``ExpMomentumEMA.avg_func``'s momentum (open-mmlab/mmdetection
    at 38922f6, mmdet/models/layers/ema.py; mmdet is not installed)."""
    return (1 - momentum) * math.exp(-float(1 + steps) / gamma) + momentum


@SETTINGS
@given(
    t=st.integers(min_value=0, max_value=10**7),
    m=st.floats(min_value=1e-6, max_value=0.5),
    gamma=st.floats(min_value=1.0, max_value=1e5),
)
def test_exp_momentum_matches_mmdet_formula(t: int, m: float, gamma: float) -> None:
    # Step mapping: mmdet's avg_func gets mmengine's steps: polyak's steps, unshifted.
    assert ExpMomentum(m, gamma=gamma).momentum(t) == mmdet_exp_momentum(t, m, gamma)


def test_exp_momentum_defaults_match_mmdet_formula() -> None:
    s = ExpMomentum()
    for t in STEPS:
        assert s.momentum(t) == mmdet_exp_momentum(t, 0.0002, 2000)


def mmcv_ema_hook_momentum(curr_step: int, momentum: float, warm_up: int, interval: int = 1) -> float:
    """HAND TRANSCRIPTION of mmcv 1.x ``EMAHook`` (open-mmlab/mmcv at 1d8f928, branch 1.x,
    mmcv/runner/hooks/ema.py:40, 66-67):
    ``self.momentum = momentum ** interval`` then ``min(self.momentum, (1 + t) / (warm_up + t))``."""
    return min(momentum**interval, (1 + curr_step) / (warm_up + curr_step))


@SETTINGS
@given(
    t=st.integers(min_value=0, max_value=10**7),
    m=st.floats(min_value=1e-6, max_value=0.99),
    warm_up=st.integers(min_value=1, max_value=10_000),
)
def test_mmcv_warmup_matches_mmcv_formula_at_interval_1(t: int, m: float, warm_up: int) -> None:
    # Step mapping: mmcv uses runner.iter, the 0-based iteration: polyak's steps.
    assert MMCVWarmup(m, warm_up=warm_up).momentum(t) == mmcv_ema_hook_momentum(t, m, warm_up)


def test_mmcv_warmup_with_defaults_never_binds_and_interval_is_compensated_not_powered() -> None:
    s = MMCVWarmup()  # (2e-4, 100): (1 + t) / (100 + t) >= 0.01 > 2e-4 (mmcv issue #901)
    assert all(s.momentum(t) == 0.0002 for t in STEPS)
    # mmcv's momentum ** interval (B1) would make the update weight 4e-8 at interval 2;
    # polyak's interval compensation gives 1 - (1 - m) ** 2.
    assert mmcv_ema_hook_momentum(10, 0.0002, 100, interval=2) == pytest.approx(4e-8)
    assert interval_momentum(s, 10, 2) == pytest.approx(1 - (1 - 0.0002) ** 2, rel=1e-12)


def mmagic_rampup_momentum(steps: int, ema_kimg: float, ema_rampup: float | None, batch_size: int, eps: float) -> float:
    """HAND TRANSCRIPTION of mmagic ``RampUpEMA.rampup`` and its momentum (open-mmlab/mmagic at 0a560bb,
    mmagic/models/base_models/average_model.py:221-225, 239). mmagic is not installed."""
    cur_nimg = (steps + 1) * batch_size
    ema_nimg = ema_kimg * 1000
    if ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
    ema_beta = 0.5 ** (batch_size / max(ema_nimg, eps))
    return 1 - ema_beta


@SETTINGS
@given(
    t=st.integers(min_value=0, max_value=10**7),
    kimg=st.floats(min_value=0.001, max_value=1000.0),
    rampup=st.one_of(st.none(), st.floats(min_value=0.001, max_value=1.0)),
    batch=st.integers(min_value=1, max_value=4096),
)
def test_rampup_momentum_matches_mmagic_formula(t: int, kimg: float, rampup: float | None, batch: int) -> None:
    # Step mapping: mmagic's rampup gets mmengine's steps: polyak's steps, unshifted.
    s = RampUpMomentum(ema_kimg=kimg, ema_rampup=rampup, batch_size=batch)
    assert s.momentum(t) == mmagic_rampup_momentum(t, kimg, rampup, batch, 1e-8)


def test_rampup_momentum_defaults_match_mmagic_formula() -> None:
    s = RampUpMomentum()
    for t in STEPS:
        assert s.momentum(t) == mmagic_rampup_momentum(t, 10, 0.05, 32, 1e-8)
    # the ramp ends at 200k images: 6250 batches of 32, then beta = 0.5 ** (32 / 10000)
    assert s.decay(6249) == pytest.approx(0.5 ** (32 / 10_000), rel=1e-15)


def mmpretrain_cosine_momentum_code(steps: int, momentum: float, end_momentum: float, max_iters: int) -> float:
    """HAND TRANSCRIPTION of mmpretrain ``CosineEMA.avg_func``'s CODE (open-mmlab/mmpretrain at ee7f2e8,
    mmpretrain/models/utils/ema.py:82-86). Its docstring (ema.py:28) has the sign of the second term flipped."""
    cosine_factor = (1 + math.cos(math.pi * steps / max_iters)) / 2
    return end_momentum - (end_momentum - momentum) * cosine_factor


@SETTINGS
@given(
    data=st.data(),
    start=st.floats(min_value=0.0, max_value=1.0),
    end=st.floats(min_value=0.0, max_value=1.0),
    total=st.integers(min_value=1, max_value=10**6),
)
def test_cosine_momentum_matches_mmpretrain_code(data: st.DataObject, start: float, end: float, total: int) -> None:
    t = data.draw(st.integers(min_value=0, max_value=total))
    # Step mapping: mmpretrain's avg_func gets mmengine's steps: polyak's steps, unshifted.
    expected = mmpretrain_cosine_momentum_code(t, start, end, total)
    assert math.isclose(CosineMomentum(start, end, max_steps=total).momentum(t), expected, rel_tol=1e-15, abs_tol=1e-17)


def test_cosine_momentum_follows_code_not_docstring_and_holds_after_max_steps() -> None:
    s = CosineMomentum(0.004, 0.0, max_steps=100)
    assert s.momentum(0) == mmpretrain_cosine_momentum_code(0, 0.004, 0.0, 100) == 0.004
    docstring_form = 0.0 + (0.0 - 0.004) * (math.cos(0.0) + 1) / 2  # the typo: -0.004 at k = 0
    assert s.momentum(0) != docstring_form
    # mmpretrain never goes past max_iters inside a Runner; polyak holds the end momentum.
    assert s.momentum(150) == s.momentum(10**6) == 0.0


# --------------------------------------------------------------------------------------------
# PowerFunction vs EDM2 and ema-pytorch


def edm2_exp_to_std(gamma: float) -> float:
    """HAND TRANSCRIPTION of EDM2 ``phema.exp_to_std`` (NVlabs/edm2 at 4bf8162, training/phema.py:19-33)."""
    return math.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3))


def edm2_std_to_exp(std: float) -> float:
    """HAND TRANSCRIPTION of EDM2 ``phema.std_to_exp``: the largest real root of the cubic, by
    ``np.roots`` as EDM2 does."""
    t = float(std) ** -2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def test_sigma_rel_to_gamma_edm2_default_numbers() -> None:
    # EDM2's defaults stds = [0.050, 0.100] give gamma = 16.97 and 6.94 (training/phema.py).
    assert round(sigma_rel_to_gamma(0.05), 2) == 16.97
    assert round(sigma_rel_to_gamma(0.10), 2) == 6.94
    assert round(PowerFunction(sigma_rel=0.05).gamma, 2) == 16.97
    assert round(PowerFunction(sigma_rel=0.10).gamma, 2) == 6.94


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.10, 0.15, 0.2, 0.25, 0.28])
def test_sigma_rel_to_gamma_matches_edm2_roots(sigma_rel: float) -> None:
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert math.isclose(gamma, edm2_std_to_exp(sigma_rel), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(edm2_exp_to_std(gamma), sigma_rel, rel_tol=1e-12)


@pytest.mark.parametrize("gamma", [-0.3, 0.0, 1.0, 6.94, 16.97, 100.0])
def test_gamma_to_sigma_rel_matches_edm2(gamma: float) -> None:
    assert math.isclose(gamma_to_sigma_rel(gamma), edm2_exp_to_std(gamma), rel_tol=1e-15)
    assert math.isclose(PowerFunction(gamma).sigma_rel, edm2_exp_to_std(gamma), rel_tol=1e-15)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.10, 0.2, 0.28])
def test_sigma_rel_to_gamma_matches_ema_pytorch(sigma_rel: float) -> None:
    post_hoc_ema = pytest.importorskip("ema_pytorch.post_hoc_ema")
    assert math.isclose(sigma_rel_to_gamma(sigma_rel), post_hoc_ema.sigma_rel_to_gamma(sigma_rel), rel_tol=1e-9)


@pytest.mark.parametrize("gamma", [6.94, 16.97])
def test_power_function_decay_matches_ema_pytorch_karras_beta(gamma: float) -> None:
    post_hoc_ema = pytest.importorskip("ema_pytorch.post_hoc_ema")
    karras = post_hoc_ema.KarrasEMA(_linear(0), gamma=gamma, update_every=1)
    sched = PowerFunction(gamma)
    # Step mapping: KarrasEMA.beta is (1 - 1 / (step + 1)) ** (1 + gamma) of its counter
    # `step`, which is PowerFunction.decay(step). (Its update() increments the counter
    # before reading beta, so at its call with t earlier calls it uses decay(t + 1).)
    for t in STEPS:
        karras.step.fill_(t)
        assert math.isclose(sched.decay(t), karras.beta, rel_tol=1e-12, abs_tol=0.0), t


@SETTINGS
@given(
    gamma=st.floats(min_value=-0.9, max_value=50.0),
    k=st.integers(min_value=1, max_value=64),
    extra=st.integers(min_value=0, max_value=10**6),
)
def test_power_function_compensated_update_is_edm2_t_delta(gamma: float, k: int, extra: int) -> None:
    t = k + extra  # an update whose window lies after step 0
    # HAND TRANSCRIPTION of EDM2 PowerFunctionEMA (phema.py:68-70): beta = (1 - t_delta /
    # t_next) ** (gamma + 1), with one image per step: t_next = t + 1 (steps done after the
    # update made at polyak's steps t) and t_delta = k (the steps this update stands for).
    edm2_beta = (1 - k / (t + 1)) ** (gamma + 1)
    sched = PowerFunction(gamma)
    # (1 - momentum loses the relative precision of a decay near 0: hence the absolute floor)
    assert math.isclose(1 - sched.update_momentum(t, k), edm2_beta, rel_tol=1e-9, abs_tol=1e-15)
    assert math.isclose(1 - interval_momentum(sched, t, k), edm2_beta, rel_tol=1e-9, abs_tol=1e-15)


def test_power_function_first_update_copies_as_edm2() -> None:
    s = PowerFunction(sigma_rel=0.05)
    assert s.decay(0) == 0.0  # EDM2: t_delta == t_next at the first update, beta = 0
    assert s.update_momentum(3, 4) == 1.0  # a window reaching back to step 0 copies


@pytest.mark.parametrize(("t", "k"), [(0, 2), (1, 3), (0, 3), (2, 3)])
def test_power_function_window_reaching_back_to_step_0_copies(t: int, k: int) -> None:
    # The window of the update at steps t < k holds step 0, whose decay is 0 (EDM2's first
    # update copies), so the product of the decays is 0 and the update copies. The steps
    # before 0 in the window do not exist; they must not raise (ZeroDivisionError at -1).
    assert PowerFunction(6.94).update_momentum(t, k) == 1.0
    assert interval_momentum(PowerFunction(6.94), t, k) == 1.0


def test_power_function_driven_average_matches_edm2_reference() -> None:
    gamma, k = 6.94, 3
    model = _linear(4, torch.float64)
    avg = polyak.AveragedModel(model, schedule=PowerFunction(gamma), interval=k)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in range(40):
        _perturb(model, t)
        avg.update_parameters(model)
        if t % k == 0:  # polyak averages at steps 0, k, 2k, ...; steps 0 copies
            beta = 0.0 if t == 0 else (1 - k / (t + 1)) ** (gamma + 1)  # EDM2 t_delta form, by hand
            for n, p in model.named_parameters():
                ref[n] = beta * ref[n] + (1 - beta) * p.detach()
    for n, p in avg.module.named_parameters():
        torch.testing.assert_close(p, ref[n], rtol=0.0, atol=1e-13)


# --------------------------------------------------------------------------------------------
# StartAt


def test_start_at_copies_before_start_and_counts_the_inner_schedule_from_start() -> None:
    s = StartAt(Warmup(0.999), start=10)
    for t in range(10):
        assert s.momentum(t) == 1.0
    # inner step = t - start; Warmup.decay(u) = 1 - (1 + u) ** (-2/3), copying at u = 0
    assert s.momentum(10) == 1.0
    for t in [11, 15, 100, 10_000]:
        u = t - 10
        assert math.isclose(s.decay(t), 1 - (1 + u) ** (-2 / 3), rel_tol=1e-15)
    e = StartAt(EqualAverage(), start=100)
    assert [e(t) for t in (99, 100, 101, 102, 103)] == [1.0, 1.0, 0.5, 1 / 3, 0.25]


def test_start_at_window_reaching_back_before_start_copies() -> None:
    s = StartAt(ConstantMomentum(0.1), start=5)
    # interval 3: the update at steps 6 stands for steps 4, 5, 6; step 4 is before start
    assert s.update_momentum(6, 3) == 1.0
    assert s.update_momentum(4, 3) == 1.0
    # at steps 7 the window 5, 6, 7 lies after start: 1 - 0.9 ** 3
    assert math.isclose(s.update_momentum(7, 3), 1 - 0.9**3, rel_tol=1e-14)
    assert math.isclose(interval_momentum(s, 7, 3), 1 - 0.9**3, rel_tol=1e-14)
    # uncompensated: only the step itself is looked at
    assert s.update_momentum(6, 3, compensate=False) == 0.1
    assert s.update_momentum(4, 3, compensate=False) == 1.0


def test_start_at_in_an_averaged_model_copies_then_averages_from_start() -> None:
    model = _linear(5, torch.float64)
    avg = polyak.AveragedModel(model, schedule=StartAt(EqualAverage(), start=4))
    snapshots = []
    for t in range(9):
        _perturb(model, t)
        avg.update_parameters(model)
        if t >= 4:
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    # the equal average of the snapshots from steps 4 to 8
    for n, p in avg.module.named_parameters():
        expected = sum(s[n] for s in snapshots) / len(snapshots)
        torch.testing.assert_close(p, expected, rtol=0.0, atol=1e-14)


def test_start_at_epoch_and_fraction() -> None:
    assert StartAt(EqualAverage(), start_epoch=3, steps_per_epoch=10).start == 30
    assert StartAt(EqualAverage(), start_epoch=0, steps_per_epoch=10).start == 0
    assert StartAt(EqualAverage(), start_fraction=0.75, total_steps=100).start == 75
    assert StartAt(EqualAverage(), start_fraction=0.333, total_steps=10).start == 4  # ceil(3.33)
    assert StartAt(EqualAverage(), start_fraction=1.0, total_steps=7).start == 7
    s = StartAt(ConstantMomentum(0.25), start_epoch=2, steps_per_epoch=5)
    assert s(9) == 1.0 and s(10) == 0.25


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({}, "start"),
        ({"start": 1, "start_epoch": 1, "steps_per_epoch": 2}, "start"),
        ({"start_epoch": 2}, "steps_per_epoch"),
        ({"start_fraction": 0.5}, "total_steps"),
        ({"start_fraction": 1.5, "total_steps": 10}, "start_fraction"),
        ({"start_fraction": 0.5, "total_steps": 0}, "total_steps"),
        ({"start_epoch": -1, "steps_per_epoch": 2}, "start_epoch"),
        ({"start_epoch": 1, "steps_per_epoch": 0}, "steps_per_epoch"),
        ({"start": -1}, "start"),
        ({"start": 2.5}, "start"),
    ],
)
def test_start_at_rejects_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        StartAt(EqualAverage(), **kwargs)


def test_start_at_rejects_a_non_schedule() -> None:
    with pytest.raises(ValueError, match="schedule"):
        StartAt(lambda t: 0.1, start=3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Half-lives


@pytest.mark.parametrize("h", [1, 10, 100])
def test_half_life_in_updates_halves_a_value_after_h_updates(h: int) -> None:
    # Simulation through a real average: the initial copy holds 1, then h updates see 0.
    w = nn.Parameter(torch.ones(1, dtype=torch.float64))
    avg = polyak.ParameterAverage([w], schedule=ConstantMomentum(half_life=h))
    with torch.no_grad():
        w.zero_()
    for _ in range(h):
        avg.update()
    assert math.isclose(avg.shadow[0].item(), 0.5, rel_tol=1e-12)
    assert math.isclose(resolve_decay(half_life=h) ** h, 0.5, rel_tol=1e-13)


@pytest.mark.parametrize(("samples", "batch"), [(320, 32), (4096, 256), (50, 50)])
def test_half_life_in_samples_halves_a_value_after_that_many_samples(samples: int, batch: int) -> None:
    w = nn.Parameter(torch.ones(1, dtype=torch.float64))
    sched = ConstantMomentum(half_life=samples, half_life_unit="samples", batch_size=batch)
    avg = polyak.ParameterAverage([w], schedule=sched)
    with torch.no_grad():
        w.zero_()
    for _ in range(samples // batch):  # each update stands for one batch
        avg.update()
    assert math.isclose(avg.shadow[0].item(), 0.5, rel_tol=1e-12)


def test_half_life_equivalents() -> None:
    assert math.isclose(resolve_decay(half_life=math.log(2) / -math.log(0.999)), 0.999, rel_tol=1e-15)
    assert math.isclose(Warmup(half_life=693.147).max_decay, 0.5 ** (1 / 693.147), rel_tol=1e-15)
    assert math.isclose(
        NumUpdatesWarmup(half_life=32_000, half_life_unit="samples", batch_size=32).max_decay,
        0.5 ** (32 / 32_000),
        rel_tol=1e-15,
    )
    assert resolve_decay(default=0.9) == 0.9
    assert resolve_decay(momentum=0.25) == 0.75
    assert resolve_decay(decay=0.3) == 0.3


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"decay": 0.9, "half_life": 10}, "half_life"),
        ({"momentum": 0.1, "decay": 0.9}, "decay"),
        ({"half_life": 10, "half_life_unit": "epochs"}, "half_life_unit"),
        ({"half_life": 10, "half_life_unit": "samples"}, "batch_size"),
        ({"half_life": 10, "half_life_unit": "samples", "batch_size": 0}, "batch_size"),
        ({"half_life": 0}, "half_life"),
        ({"half_life": -5}, "half_life"),
        ({"half_life": math.inf}, "half_life"),
        ({"decay": 1.0000001}, "decay"),
        ({"decay": -0.1}, "decay"),
        ({"momentum": -1e-9}, "momentum"),
        ({"momentum": 1.5}, "momentum"),
        ({}, "decay"),
    ],
)
def test_resolve_decay_rejects_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        resolve_decay(**kwargs)


# --------------------------------------------------------------------------------------------
# Serialisation


ALL_SCHEDULES: list[Schedule] = [
    ConstantMomentum(0.001),
    ConstantMomentum(half_life=100),
    MomentumAnnealing(0.0002, gamma=100),
    EqualAverage(),
    RampUpMomentum(ema_kimg=5, ema_rampup=None, batch_size=8),
    RampUpMomentum(),
    CosineMomentum(0.004, 0.001, max_steps=1000),
    Warmup(0.999, power=0.75, min_decay=0.1, update_after_step=10, inv_gamma=2.0),
    Warmup(0.99, warmup=False),
    NumUpdatesWarmup(0.999),
    ExpMomentum(0.0002, gamma=2000),
    MMCVWarmup(0.0002, warm_up=100),
    PowerFunction(sigma_rel=0.05),
    PowerFunction(gamma=6.94),
    StartAt(Warmup(0.999), start=100),
    StartAt(StartAt(ConstantMomentum(0.1), start=3), start=5),
]


@pytest.mark.parametrize("sched", ALL_SCHEDULES, ids=repr)
def test_schedule_from_dict_round_trips(sched: Schedule) -> None:
    data = sched.to_dict()
    assert data["type"] == type(sched).__name__
    back = schedule_from_dict(data)
    assert type(back) is type(sched)
    assert back == sched
    assert back.to_dict() == data
    for t in STEPS:
        assert back.momentum(t) == sched.momentum(t)
        for k in (1, 3):
            if t >= k:  # an averaged model's updates at interval k are made at steps k, 2k, ...
                assert back.update_momentum(t, k) == sched.update_momentum(t, k)


@pytest.mark.parametrize("sched", ALL_SCHEDULES, ids=repr)
def test_schedule_to_dict_loads_with_weights_only(sched: Schedule) -> None:
    buf = io.BytesIO()
    torch.save({"schedule": sched.to_dict()}, buf)
    buf.seek(0)
    data = torch.load(buf, weights_only=True)["schedule"]
    assert schedule_from_dict(data) == sched


@pytest.mark.parametrize(
    "data",
    [
        {"type": "Nope", "args": {}},
        {"type": "ExponentialMovingAverage", "args": {}},  # a model class, not a schedule
        {"type": "StartAt", "args": {"schedule": {"type": "Bogus"}, "start": 1}},
        {"args": {}},
        "ConstantMomentum",
        None,
    ],
)
def test_schedule_from_dict_rejects_unknown_or_malformed(data: object) -> None:
    with pytest.raises(ValueError):
        schedule_from_dict(data)  # type: ignore[arg-type]


def test_schedule_from_dict_passes_bad_arguments_to_validation() -> None:
    with pytest.raises(ValueError, match="momentum"):
        schedule_from_dict({"type": "ConstantMomentum", "args": {"momentum": 2.0}})


# --------------------------------------------------------------------------------------------
# Validation: ValueError naming the argument


# momentum and decay are in the closed interval [0, 1] (docs/averaging.md, "Momentum and decay")
not_a_unit_momentum = st.one_of(
    st.floats(max_value=0.0, exclude_max=True),
    st.floats(min_value=1.0, exclude_min=True),
    st.just(math.nan),
)


@SETTINGS
@given(m=not_a_unit_momentum)
def test_momenta_outside_0_1_are_rejected_naming_momentum(m: float) -> None:
    for make in (
        lambda: ConstantMomentum(m),
        lambda: MomentumAnnealing(m),
        lambda: ExpMomentum(m),
        lambda: MMCVWarmup(m),
    ):
        with pytest.raises(ValueError, match="momentum"):
            make()


@SETTINGS
@given(
    d=st.one_of(
        st.floats(max_value=0.0, exclude_max=True), st.floats(min_value=1.0, exclude_min=True), st.just(math.nan)
    )
)
def test_decays_outside_0_1_are_rejected_naming_decay(d: float) -> None:
    for make in (lambda: Warmup(d), lambda: NumUpdatesWarmup(d), lambda: ConstantMomentum(decay=d)):
        with pytest.raises(ValueError, match="decay"):
            make()


@SETTINGS
@given(x=st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf)))
def test_non_positive_scales_are_rejected_naming_them(x: float) -> None:
    cases = [
        (lambda: MomentumAnnealing(gamma=x), "gamma"),
        (lambda: ExpMomentum(gamma=x), "gamma"),
        (lambda: Warmup(0.999, inv_gamma=x), "inv_gamma"),
        (lambda: Warmup(0.999, power=x), "power"),
        (lambda: RampUpMomentum(ema_rampup=x), "ema_rampup"),
        (lambda: RampUpMomentum(eps=x), "eps"),
        (lambda: ConstantMomentum(half_life=x), "half_life"),
    ]
    for make, name in cases:
        with pytest.raises(ValueError, match=name):
            make()


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: Warmup(0.9, min_decay=0.95), "min_decay"),
        (lambda: Warmup(0.9, min_decay=-0.1), "min_decay"),
        (lambda: Warmup(0.9, update_after_step=-1), "update_after_step"),
        (lambda: Warmup(0.9, update_after_step=1.5), "update_after_step"),
        (lambda: Warmup(0.9, half_life=10), "half_life"),
        (lambda: CosineMomentum(1.5), "momentum"),
        (lambda: CosineMomentum(0.1, -0.1), "end_momentum"),
        (lambda: CosineMomentum(0.1, 0.0, max_steps=0), "max_steps"),
        (lambda: CosineMomentum(0.1, 0.0, max_steps=True), "max_steps"),
        (lambda: MMCVWarmup(0.1, warm_up=0), "warm_up"),
        (lambda: RampUpMomentum(ema_kimg=-1), "ema_kimg"),
        (lambda: RampUpMomentum(batch_size=0), "batch_size"),
        (lambda: PowerFunction(), "gamma"),
        (lambda: PowerFunction(1.0, sigma_rel=0.1), "sigma_rel"),
        (lambda: PowerFunction(-1.0), "gamma"),
        (lambda: PowerFunction(math.nan), "gamma"),
        (lambda: PowerFunction(sigma_rel=0.0), "sigma_rel"),
        (lambda: PowerFunction(sigma_rel=0.5), "sigma_rel"),
        (lambda: sigma_rel_to_gamma(-0.1), "sigma_rel"),
        (lambda: gamma_to_sigma_rel(-2.0), "gamma"),
        (lambda: ConstantMomentum(True), "momentum"),
        (lambda: MomentumAnnealing("0.1"), "momentum"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(make: object, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make()  # type: ignore[operator]
