"""A half-size average: bfloat16 with stochastic rounding, against a float64 reference written
here, beside round-to-nearest bfloat16 (which stalls) and float32."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import polyak
import polyak.engine as engine

UPDATES = 10_000


def trajectory_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Linear(32, 8)).to(torch.bfloat16)


def run(decay: float, updates: int = UPDATES) -> dict[str, float]:
    """A bf16 model whose weights drift slowly under noise; three averages of it and the exact
    float64 EMA of the same bf16 values. Returns each average's error relative to how far the
    reference moved."""
    model = trajectory_model()
    start = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    drift = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.02 for k, v in start.items()}
    m = 1 - decay
    averages = {
        "nearest": polyak.ExponentialMovingAverage(model, momentum=m, dtype=torch.bfloat16),
        "stochastic": polyak.ExponentialMovingAverage(model, momentum=m, dtype=torch.bfloat16, rounding="stochastic"),
        "fp32": polyak.ExponentialMovingAverage(model, momentum=m),
    }
    ref = {k: v.clone() for k, v in start.items()}
    for t in range(updates):
        with torch.no_grad():
            for k, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.05
                p.copy_((start[k] + drift[k] * (t / 1000) + noise).to(torch.bfloat16))
        live = {k: p.detach().double() for k, p in model.named_parameters()}
        for k in ref:  # the float64 EMA of the bf16 weights: a copy at the first update
            ref[k] = live[k].clone() if t == 0 else decay * ref[k] + m * live[k]
        for a in averages.values():
            a.update_parameters(model)
    moved = sum(float(((ref[k] - start[k]) ** 2).sum()) for k in ref) ** 0.5
    out = {}
    for name, a in averages.items():
        got = dict(a.module.named_parameters())
        err = sum(float(((got[k].double() - ref[k]) ** 2).sum()) for k in ref) ** 0.5
        out[name] = err / moved
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("decay", [0.999, 0.9999])
def test_stochastic_rounding_keeps_a_bf16_average_moving(decay: float) -> None:
    """10,000 updates: round-to-nearest bf16 stalls (its error is most of the distance the
    average should have moved), stochastic rounding follows the float64 reference within a few
    percent, float32 within rounding."""
    err = run(decay)
    assert err["nearest"] > 0.3, err
    assert err["stochastic"] < 0.1 and err["stochastic"] < err["nearest"] / 5, err
    assert err["fp32"] < 1e-3, err


def test_a_run_and_its_resume_round_alike() -> None:
    model = trajectory_model()
    make = lambda: polyak.ExponentialMovingAverage(  # noqa: E731
        model, momentum=0.01, dtype=torch.bfloat16, rounding="stochastic"
    )
    whole, first = make(), make()
    states = []
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype), alpha=0.01)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    for t, s in enumerate(states):
        model.load_state_dict(s)
        whole.update_parameters(model)
        if t < 10:
            first.update_parameters(model)
    saved = first.state_dict()
    resumed = make()
    resumed.load_state_dict(saved)
    for s in states[10:]:
        model.load_state_dict(s)
        resumed.update_parameters(model)
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_in_a_group_as_alone() -> None:
    """An AverageGroup updates a stochastic average exactly as alone (its steps seed it)."""
    model = trajectory_model()
    alone = polyak.ExponentialMovingAverage(model, momentum=0.02, dtype=torch.bfloat16, rounding="stochastic")
    grouped = polyak.ExponentialMovingAverage(model, momentum=0.02, dtype=torch.bfloat16, rounding="stochastic")
    group = polyak.AverageGroup([grouped, polyak.ExponentialMovingAverage(model, momentum=0.1)])
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        alone.update_parameters(model)
        group.update_parameters(model)
    for k, v in alone.state_dict().items():
        assert torch.equal(v, grouped.state_dict()[k]), k


def test_chunked_like_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors larger than a chunk, and runs of small ones, go through bounded scratch buffers
    (no model-sized temporary); the result still follows the exact average."""
    monkeypatch.setattr(engine, "ROUNDING_CHUNK", 100)
    monkeypatch.setattr(engine, "NOISE_TABLE", 200)
    model = trajectory_model()
    avg = polyak.ExponentialMovingAverage(model, momentum=0.25, dtype=torch.bfloat16, rounding="stochastic")
    ref = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    avg.update_parameters(model)
    for _ in range(200):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p, dtype=torch.float32).to(p.dtype), alpha=0.01)
        for k, p in model.named_parameters():
            ref[k] = 0.75 * ref[k] + 0.25 * p.detach().double()
        avg.update_parameters(model)
    groups = [g for g in avg.engine.bind(model).plan("avg")]
    assert all(b.numel() <= 100 for g in groups for b in g.dst)
    got = dict(avg.module.named_parameters())
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v, atol=0.05, rtol=0.02)


def test_the_arguments_are_checked() -> None:
    model = trajectory_model()
    with pytest.raises(ValueError, match=r"give dtype=torch\.bfloat16"):
        polyak.ExponentialMovingAverage(model, rounding="stochastic")
    with pytest.raises(ValueError, match=r"^rounding must be one of"):
        polyak.ExponentialMovingAverage(model, dtype=torch.bfloat16, rounding="up")


def _unbiased_sample(n: int = 200_000) -> Tensor:
    """Many updates each far below half a bf16 ulp: the mean of the rounded results equals the
    exact mean (unbiased), where round-to-nearest leaves every one where it was."""
    model = nn.Linear(n, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    avg = polyak.ExponentialMovingAverage(model, momentum=1e-3, dtype=torch.bfloat16, rounding="stochastic")
    avg.update_parameters(model)
    with torch.no_grad():
        model.weight.fill_(2.0)
    avg.update_parameters(model)
    return avg.module.weight.double()


def test_one_update_is_unbiased() -> None:
    w = _unbiased_sample()
    # exact: 1 + 1e-3 * (2 - 1) = 1.001; bf16 values near 1 are 1 and 1.0078125
    assert set(torch.unique(w).tolist()) == {1.0, 1.0078125}
    assert abs(float(w.mean()) - 1.001) < 2e-4
