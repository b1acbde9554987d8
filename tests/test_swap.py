"""Using the average: ``swapped`` (in place, restored afterwards), ``copy_to`` and the syncs."""

from __future__ import annotations

import signal
import time
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyak import ExponentialMovingAverage, StochasticWeightAverage

# --------------------------------------------------------------------------------------------
# helpers


def make_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        OrderedDict(
            [
                ("body", nn.Linear(3, 4)),
                ("bn", nn.BatchNorm1d(4)),
                ("act", nn.ReLU()),
                ("head", nn.Linear(4, 2)),
            ]
        )
    )
    return net.to(dtype)


@torch.no_grad()
def set_values(model: nn.Module, seed: int) -> None:
    """New values for every tensor, drawn in float64: parameters N(0, 1), floating buffers
    U(0.5, 1.5), integer buffers ``seed * 1000 + 7``."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    for b in model.buffers():
        if b.is_floating_point():
            b.copy_(torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5)
        else:
            b.fill_(seed * 1000 + 7)


def state_copy(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def trained_ema(model: nn.Module, steps: int = 4, **kwargs) -> ExponentialMovingAverage:
    """An EMA of ``model`` after ``steps`` updates with different values; ``model`` is left
    with yet other values (its live weights), different from the average."""
    kwargs.setdefault("momentum", 0.25)
    ema = ExponentialMovingAverage(model, **kwargs)
    for i in range(steps):
        set_values(model, i + 1)
        ema.update_parameters(model)
    set_values(model, 1000)
    return ema


def forward_by_hand(x: Tensor, weights: dict[str, Tensor]) -> Tensor:
    """``make_net``'s forward in eval mode, in float64, from a dict of tensors."""
    w = {k: v.detach().to(torch.float64) for k, v in weights.items()}
    h = F.linear(x.double(), w["body.weight"], w["body.bias"])
    h = (h - w["bn.running_mean"]) / torch.sqrt(w["bn.running_var"] + 1e-5) * w["bn.weight"] + w["bn.bias"]
    return F.linear(h.relu(), w["head.weight"], w["head.bias"])


# --------------------------------------------------------------------------------------------
# swapped


@pytest.mark.parametrize("update_buffers", [False, True])
def test_swapped_puts_the_average_in_and_restores_live_weights(update_buffers: bool) -> None:
    model = make_net(0)
    ema = trained_ema(model, update_buffers=update_buffers)
    live = state_copy(model)
    average = state_copy(ema)
    avg_params = {n: p.detach().clone() for n, p in ema.module.named_parameters()}
    param_objects = [id(p) for p in model.parameters()]
    with ema.swapped(model) as inside:
        assert inside is model
        for n, p in model.named_parameters():
            assert torch.equal(p, avg_params[n]), n
        if update_buffers:  # averaged buffers are swapped in too
            assert torch.equal(model.bn.running_mean, average["module.bn.running_mean"])
            assert torch.equal(model.bn.running_var, average["module.bn.running_var"])
    assert [id(p) for p in model.parameters()] == param_objects
    assert_same_state(live, state_copy(model))
    assert_same_state(average, state_copy(ema))


def test_swapped_forward_runs_the_average() -> None:
    model = make_net(0).eval()
    ema = trained_ema(model, update_buffers=True)
    x = torch.randn(5, 3)
    avg_weights = {k[len("module.") :]: v for k, v in state_copy(ema).items()}
    with ema.swapped(model):
        out = model(x)
    torch.testing.assert_close(out.double(), forward_by_hand(x, avg_weights), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x).double(), forward_by_hand(x, state_copy(model)), atol=1e-5, rtol=1e-5)


def test_swapped_restores_when_the_block_raises() -> None:
    model = make_net(0)
    ema = trained_ema(model)
    live = state_copy(model)
    average = state_copy(ema)
    with pytest.raises(KeyError), ema.swapped(model):
        raise KeyError("x")
    assert_same_state(live, state_copy(model))
    assert_same_state(average, state_copy(ema))
    # and the average is usable afterwards (not stuck in the swapped state)
    ema.state_dict()
    set_values(model, 7)
    ema.update_parameters(model)


def test_swapped_on_compiled_model_is_seen_by_the_compiled_forward() -> None:
    model = make_net(0).eval()
    compiled = torch.compile(model, backend="eager")
    ema = trained_ema(model, update_buffers=True)
    x = torch.randn(6, 3)
    live_out = compiled(x).detach().clone()  # compiled with the live weights
    torch.testing.assert_close(live_out.double(), forward_by_hand(x, state_copy(model)), atol=1e-5, rtol=1e-5)
    avg_weights = {k[len("module.") :]: v for k, v in state_copy(ema).items()}
    live = state_copy(model)
    with ema.swapped(compiled):
        out = compiled(x)
    torch.testing.assert_close(out.double(), forward_by_hand(x, avg_weights), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, live_out)
    assert_same_state(live, state_copy(model))
    assert torch.equal(compiled(x), live_out)


def test_swapped_bf16_model_with_fp32_average_restores_live_weights() -> None:
    model = make_net(0, torch.bfloat16)
    ema = trained_ema(model, momentum=0.1)
    assert ema.module.body.weight.dtype == torch.float32
    live = state_copy(model)
    avg_params = {n: p.detach().clone() for n, p in ema.module.named_parameters()}
    with ema.swapped(model):
        for n, p in model.named_parameters():
            assert p.dtype == torch.bfloat16
            assert torch.equal(p, avg_params[n].to(torch.bfloat16)), n
    assert_same_state(live, state_copy(model))


def test_swapped_bf16_model_keeps_the_fp32_average_bitwise() -> None:
    """The fp32 average must come out of the block as it went in: the swap must not round it
    through the model's bf16."""
    model = make_net(0, torch.bfloat16)
    ema = trained_ema(model, momentum=0.1)
    average = state_copy(ema)
    # the average really has more precision than bf16 (otherwise the test proves nothing)
    w = average["module.body.weight"]
    assert not torch.equal(w, w.to(torch.bfloat16).float())
    with ema.swapped(model):
        pass
    assert_same_state(average, state_copy(ema))


def test_swapped_float64_model_with_fp32_average() -> None:
    """An average that cannot hold the model's dtype exactly (fp32 average of an fp64 model)."""
    model = make_net(0, torch.float64)
    ema = trained_ema(model, dtype=torch.float32)
    live = state_copy(model)
    average = state_copy(ema)
    with ema.swapped(model):
        for n, p in model.named_parameters():
            assert torch.equal(p, ema.module.get_parameter(n).double()), n
    assert_same_state(live, state_copy(model))
    assert_same_state(average, state_copy(ema))


def _update(ema, model):
    ema.update_parameters(model)


def _state_dict(ema, model):
    ema.state_dict()


def _load_state_dict(ema, model):
    ema.load_state_dict({"module." + k: v for k, v in make_net(9).state_dict().items()} | {"steps": torch.tensor(1)})


@pytest.mark.parametrize("call", [_update, _state_dict, _load_state_dict], ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize(
    ("model_dtype", "avg_dtype"),
    [(torch.float32, None), (torch.bfloat16, None), (torch.float64, torch.float32)],
    ids=["fp32", "bf16-model-fp32-average", "fp64-model-fp32-average"],
)
def test_calls_inside_swapped_raise(call, model_dtype: torch.dtype, avg_dtype: torch.dtype | None) -> None:
    model = make_net(0, model_dtype)
    ema = trained_ema(model, dtype=avg_dtype)
    live = state_copy(model)
    steps = ema.steps
    with ema.swapped(model):
        with pytest.raises(RuntimeError):
            call(ema, model)
    assert ema.steps == steps
    assert_same_state(live, state_copy(model))
    # (that the average itself comes out unchanged is checked by the tests above, per dtype)
    call(ema, model)  # fine again after the block


def test_swapped_before_any_update_raises() -> None:
    model = make_net(0)
    ema = ExponentialMovingAverage(model, momentum=0.25)
    set_values(model, 3)
    live = state_copy(model)
    with pytest.raises(RuntimeError), ema.swapped(model):
        pytest.fail("the block must not run")  # pragma: no cover
    assert_same_state(live, state_copy(model))
    swa = StochasticWeightAverage(model)
    with pytest.raises(RuntimeError), swa.swapped(model):
        pytest.fail("the block must not run")  # pragma: no cover


def test_swapped_is_reusable() -> None:
    model = make_net(0)
    ema = trained_ema(model)
    live = state_copy(model)
    average = state_copy(ema)
    for _ in range(3):
        with ema.swapped(model):
            pass
    assert_same_state(live, state_copy(model))
    assert_same_state(average, state_copy(ema))


# --------------------------------------------------------------------------------------------
# copy_to and syncs


def test_copy_to_writes_the_average_permanently() -> None:
    model = make_net(0)
    ema = trained_ema(model, update_buffers=True)
    average = {k[len("module.") :]: v for k, v in state_copy(ema).items() if k != "steps"}
    ema.copy_to(model)
    assert_same_state(average, state_copy(model))
    # permanent: the model keeps it through later use, and the average is unchanged
    model.eval()
    model(torch.randn(2, 3))
    assert_same_state(average, state_copy(model))
    assert_same_state(average, state_copy(ema.module))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_copy_to_a_fresh_model(dtype: torch.dtype) -> None:
    model = make_net(0)
    ema = trained_ema(model)
    fresh = make_net(5, dtype)
    ema.copy_to(fresh)
    for k, v in state_copy(ema.module).items():
        got = fresh.state_dict()[k]
        assert got.dtype == (dtype if v.is_floating_point() else v.dtype), k
        assert torch.equal(got, v.to(got.dtype)), k


def test_copy_to_a_compiled_fresh_model() -> None:
    ema = trained_ema(make_net(0))
    fresh = make_net(5)
    ema.copy_to(torch.compile(fresh, backend="eager"))
    assert_same_state(state_copy(ema.module), state_copy(fresh))


def test_sync_parameters_copies_everything() -> None:
    model = make_net(0)
    ema = trained_ema(model, update_buffers=True)
    steps = ema.steps
    ema.sync_parameters(model)
    assert_same_state(state_copy(model), state_copy(ema.module))
    assert ema.steps == steps


@pytest.mark.parametrize("update_buffers", [False, True])
def test_sync_buffers_copies_buffers_only(update_buffers: bool) -> None:
    model = make_net(0)
    ema = trained_ema(model, update_buffers=update_buffers)
    params = {n: p.detach().clone() for n, p in ema.module.named_parameters()}
    steps = ema.steps
    ema.sync_buffers(model)
    for n, b in model.named_buffers():
        assert torch.equal(ema.module.get_buffer(n), b), n
    for n, p in ema.module.named_parameters():
        assert torch.equal(p, params[n]), n
    assert ema.steps == steps


# --------------------------------------------------------------------------------------------
# The exchange is never left halfway, and changes made inside the block are caught


def many_tensor_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(150)])


def test_ctrl_c_during_the_exchange_never_mixes_live_and_average() -> None:
    """SIGINT at random moments (``_thread.interrupt_main`` from a timer), 100 trials: whatever
    it interrupts, the live weights and the average each come out whole, and the average is
    never left marked as swapped in (it used to mix them in 79 of 100 trials)."""
    import _thread
    import random
    import threading

    model = many_tensor_model()
    ema = ExponentialMovingAverage(model, momentum=0.5)
    ema.update_parameters(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    average = {k: v.clone() for k, v in ema.module.state_dict().items()}
    rng = random.Random(0)
    interrupted = 0
    # interrupt_main does nothing while SIGINT is ignored or left to the OS: use Python's own handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for _ in range(100):
            timer = threading.Timer(rng.uniform(0.0, 0.004), _thread.interrupt_main)
            timer.start()
            try:
                with ema.swapped(model):
                    time.sleep(rng.uniform(0.0, 0.002))
                timer.join()  # a late interrupt lands here or at the next call, not in the next trial
                time.sleep(0.001)
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                timer.join()
            assert not ema.is_swapped
            for k, v in model.state_dict().items():
                assert torch.equal(v, live[k]), k
            for k, v in ema.module.state_dict().items():
                assert torch.equal(v, average[k]), k
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupted == 100  # every interrupt arrived, wherever it landed


def _bound_ema(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, ExponentialMovingAverage, dict, dict]:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).to(dtype)
    ema = ExponentialMovingAverage(model, momentum=0.5)
    ema.update_parameters(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    average = {k: v.clone() for k, v in ema.module.state_dict().items()}
    return model, ema, live, average


def test_tensors_replaced_inside_the_block_are_caught_and_both_restored() -> None:
    model, ema, live, average = _bound_ema()
    with pytest.raises(RuntimeError, match=r"replaced inside swapped\(\).*average is restored.*live weights are in"):
        with ema.swapped(model):
            model[0].weight.data = torch.zeros(4, 4)
    assert not ema.is_swapped
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, average[k]), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k  # the new tensor got the live weights


def test_half_inside_the_block_is_caught() -> None:
    model, ema, live, average = _bound_ema()
    with pytest.raises(RuntimeError, match=r"replaced inside swapped\(\)"):
        with ema.swapped(model):
            model.half()
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, average[k]), k
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float16 and torch.equal(v, live[k].half()), k


def test_an_in_place_write_inside_an_exchange_is_caught() -> None:
    """Same dtype: the average's values sat in the model and were overwritten; the model gets
    its live weights back, the average a copy of them, and the error says it is lost."""
    model, ema, live, _ = _bound_ema()
    other = {k: torch.full_like(v, 7.0) for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"written in place inside swapped\(\).*average was lost"):
        with ema.swapped(model):
            model.load_state_dict(other)
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, live[k]), k


def test_an_in_place_write_with_a_backup_keeps_the_average() -> None:
    """bf16 model, fp32 average: the live weights were backed up and the average never left
    its own tensors, so both come back intact."""
    model, ema, live, average = _bound_ema(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"written in place inside swapped\(\).*average is intact"):
        with ema.swapped(model):
            with torch.no_grad():
                model[1].bias.add_(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, average[k]), k


def test_reading_inside_the_block_is_fine() -> None:
    model, ema, live, _ = _bound_ema()
    with ema.swapped(model):
        model.eval()
        model(torch.randn(3, 4))
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
