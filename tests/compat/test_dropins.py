"""``polyak.compat.torch_ema.ExponentialMovingAverage`` and ``polyak.compat.diffusers.EMAModel``
driven side by side with the installed torch_ema and diffusers: the same numbers update after
update, state dicts that load both ways, the same attributes read and written, and bad input.

"The same numbers" means to the last bits: the peers compute ``s - (1 - d)(s - p)``, polyak one
fused ``lerp_`` (``s + w (p - s)`` with a fused multiply-add), so the two round differently in the
last place; the differences stay at a few units of rounding however many updates are made (the
average contracts them), and diffusers' own ``foreach`` and loop paths differ from each other as
much. The decays are computed by the same formula, and compared exactly.
"""

from __future__ import annotations

import copy
import gc
import io
import subprocess
import sys
import warnings
import weakref
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from polyak.compat.diffusers import EMAModel
from polyak.compat.torch_ema import ExponentialMovingAverage

F64 = torch.float64


def close(ours: list[Tensor], theirs: list[Tensor], what: str = "", units: int = 8, eps: float | None = None) -> None:
    """Equal to ``units`` units of rounding (``eps``, by default the dtype's), relative to the
    largest value."""
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, i)
        if not a.is_floating_point():
            assert torch.equal(a, b), (what, i)
            continue
        scale = max(1.0, b.abs().max().item())
        unit = torch.finfo(b.dtype).eps if eps is None else eps
        torch.testing.assert_close(a, b, rtol=0.0, atol=units * unit * scale, msg=f"{what} {i}")


def float_tensors(model: nn.Module) -> list[Tensor]:
    """The parameters and the floating buffers (BatchNorm statistics), as a list."""
    return [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]


def clones(tensors: list[Tensor]) -> list[Tensor]:
    return [t.detach().clone() for t in tensors]


def same_values(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def roundtrip(state: dict) -> dict:
    """Through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


class CountOps(TorchDispatchMode):
    """The aten operators run inside the block (top level only)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def torch_ema():  # type: ignore[no-untyped-def]
    return pytest.importorskip("torch_ema")


@pytest.fixture(scope="module")
def training_utils():  # type: ignore[no-untyped-def]
    return pytest.importorskip("diffusers.training_utils")


# ============================================================================================
# torch_ema


@pytest.mark.parametrize("use_num_updates", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_torch_ema_same_numbers_update_after_update(
    torch_ema, make_model: Callable, train_step: Callable, use_num_updates: bool, dtype: torch.dtype
) -> None:
    model = make_model(0, dtype)
    tensors = float_tensors(model)  # BatchNorm's running statistics too
    ours = ExponentialMovingAverage(tensors, decay=0.95, use_num_updates=use_num_updates)
    theirs = torch_ema.ExponentialMovingAverage(tensors, decay=0.95, use_num_updates=use_num_updates)
    close(ours.shadow_params, theirs.shadow_params, "construction", units=0)
    for i in range(40):
        train_step(model)
        explicit = i % 2 == 0
        ours.update(tensors if explicit else None)
        theirs.update(tensors if explicit else None)
        assert ours.num_updates == theirs.num_updates
        close(ours.shadow_params, theirs.shadow_params, f"update {i}")
    mine, yours = make_model(1, dtype), make_model(1, dtype)
    ours.copy_to(float_tensors(mine))
    theirs.copy_to(float_tensors(yours))
    close(float_tensors(mine), float_tensors(yours), "copy_to")


def test_torch_ema_update_from_other_parameters(torch_ema, make_model: Callable) -> None:
    model, other = make_model(0), make_model(1)
    ours = ExponentialMovingAverage(model.parameters(), decay=0.9)
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.9)
    for _ in range(3):
        ours.update(other.parameters())
        theirs.update(other.parameters())
    close(ours.shadow_params, theirs.shadow_params)
    with pytest.raises(ValueError, match="Number of parameters"):
        ours.update(list(other.parameters())[:-1])
    assert ours.num_updates == 3


def test_torch_ema_decay_zero_and_one(torch_ema) -> None:
    for decay in (0.0, 1.0):
        w = nn.Parameter(torch.zeros(3))
        ours = ExponentialMovingAverage([w], decay=decay, use_num_updates=False)
        theirs = torch_ema.ExponentialMovingAverage([w], decay=decay, use_num_updates=False)
        with torch.no_grad():
            w.fill_(1.0)
        ours.update()
        theirs.update()
        assert torch.equal(ours.shadow_params[0], theirs.shadow_params[0])
        assert ours.shadow_params[0].tolist() == [1.0 - decay] * 3


def test_torch_ema_update_is_fused() -> None:
    """One update runs the same few kernels for 16 tensors as for 80: no loop over the tensors."""
    counts = []
    for n in (8, 40):
        model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(n)))
        ema = ExponentialMovingAverage(model.parameters(), decay=0.9)
        ema.update()  # builds the plan
        with CountOps() as ops:
            ema.update()
        counts.append(len(ops.ops))
    assert counts[0] == counts[1] <= 3


def test_torch_ema_state_dicts_load_both_ways(torch_ema, make_model: Callable, train_step: Callable) -> None:
    model = make_model(0)
    params = list(model.parameters())
    ours = ExponentialMovingAverage(params, decay=0.9)
    theirs = torch_ema.ExponentialMovingAverage(params, decay=0.9)
    for _ in range(3):
        train_step(model)
        ours.update()
        theirs.update()
    ours.store()
    mine = ours.state_dict()
    assert set(mine) == set(theirs.state_dict()) == {"decay", "num_updates", "shadow_params", "collected_params"}
    assert mine["shadow_params"] is ours.shadow_params  # references, as torch_ema

    # theirs -> ours, through torch.save / torch.load(weights_only=True)
    loaded = ExponentialMovingAverage(params, decay=0.5, use_num_updates=False)
    loaded.load_state_dict(roundtrip(theirs.state_dict()))
    assert loaded.decay == 0.9 and loaded.num_updates == 3 and loaded.collected_params is None
    close(loaded.shadow_params, theirs.shadow_params, units=0)
    assert loaded.shadow_params[0] is not theirs.shadow_params[0]  # copies
    # ours -> theirs
    back = torch_ema.ExponentialMovingAverage(params, decay=0.5, use_num_updates=False)
    back.load_state_dict(roundtrip(mine))
    assert back.decay == 0.9 and back.num_updates == 3
    close(back.shadow_params, ours.shadow_params, units=0)
    close(back.collected_params, ours.collected_params, units=0)
    # and both go on with the same numbers
    for _ in range(3):
        train_step(model)
        loaded.update()
        theirs.update()
    close(loaded.shadow_params, theirs.shadow_params)


def test_torch_ema_store_restore_and_average_parameters(make_model: Callable, train_step: Callable) -> None:
    model = make_model(0)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.5)
    train_step(model)
    ema.update()
    live = clones(list(model.parameters()))
    with ema.average_parameters():
        assert same_values(list(model.parameters()), ema.shadow_params)
        assert same_values(ema.collected_params, live)
    assert same_values(list(model.parameters()), live)
    # the block raises: the live weights come back and the error goes through
    with pytest.raises(KeyError, match="boom"), ema.average_parameters():
        assert same_values(list(model.parameters()), ema.shadow_params)
        raise KeyError("boom")
    assert same_values(list(model.parameters()), live)
    # restore keeps what store kept (torch_ema), so it can restore twice
    ema.store()
    with torch.no_grad():
        next(model.parameters()).zero_()
    ema.restore()
    ema.restore()
    assert same_values(list(model.parameters()), live)
    with pytest.raises(RuntimeError, match="no `store\\(\\)`ed weights"):
        ExponentialMovingAverage(model.parameters(), decay=0.5).restore()


def test_torch_ema_store_then_state_dict_loads(torch_ema) -> None:
    """Deliberate difference: polyak's ``store()`` keeps detached copies; torch_ema's keep the
    autograd graph of ``param.clone()``, which its own ``load_state_dict`` cannot deep-copy."""
    w = nn.Parameter(torch.ones(3))
    ours = ExponentialMovingAverage([w], decay=0.9)
    theirs = torch_ema.ExponentialMovingAverage([w], decay=0.9)
    ours.store()
    theirs.store()
    ours.load_state_dict(ours.state_dict())
    assert not ours.collected_params[0].requires_grad
    with pytest.raises(RuntimeError, match="deepcopy"):
        theirs.load_state_dict(theirs.state_dict())


def test_torch_ema_attributes_are_read_and_written(torch_ema, make_model: Callable, train_step: Callable) -> None:
    model = make_model(0, F64)
    params = list(model.parameters())
    ours = ExponentialMovingAverage(params, decay=0.99)
    theirs = torch_ema.ExponentialMovingAverage(params, decay=0.99)

    def both(change: Callable[[object], None], eps: float | None = None) -> None:
        change(ours)
        change(theirs)
        train_step(model)
        ours.update()
        theirs.update()
        assert ours.num_updates == theirs.num_updates
        close(ours.shadow_params, theirs.shadow_params, eps=eps)

    both(lambda e: None)
    both(lambda e: setattr(e, "decay", 0.5))
    both(lambda e: setattr(e, "num_updates", 1000))
    both(lambda e: setattr(e, "num_updates", None))  # the warm-up off
    fresh = [p.detach().clone() for p in params]
    both(lambda e: setattr(e, "shadow_params", [t.clone() for t in fresh]))  # a new list
    both(lambda e: e.shadow_params.__setitem__(0, torch.zeros_like(params[0])))  # one element
    with torch.no_grad():
        for s in ours.shadow_params:
            s.mul_(0.5)  # in place, through the list
        for s in theirs.shadow_params:
            s.mul_(0.5)
    both(lambda e: None)
    model.to(torch.float32)  # the parameters get new data: the plan follows
    both(lambda e: e.to(dtype=torch.float32))
    assert all(s.dtype == torch.float32 for s in ours.shadow_params)
    # float64 shadows of float32 parameters (staged); the float32 steps' last bits carry over
    both(lambda e: e.to(device="cpu", dtype=F64), eps=torch.finfo(torch.float32).eps)
    assert all(s.dtype == F64 for s in ours.shadow_params)
    assert ours.to() is None  # as torch_ema


def test_torch_ema_integer_tensors_are_copied(torch_ema) -> None:
    """torch_ema raises on an integer tensor (an in-place multiply by a float); polyak copies it."""
    steps = torch.zeros(2, dtype=torch.int64)
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError):
        torch_ema.ExponentialMovingAverage([w, steps], decay=0.5, use_num_updates=False).update()
    ema = ExponentialMovingAverage([w, steps], decay=0.5, use_num_updates=False)
    with torch.no_grad():
        w.fill_(1.0)
    steps += 7
    ema.update()
    assert ema.shadow_params[0].tolist() == [0.5, 0.5]
    assert ema.shadow_params[1].tolist() == [7, 7] and ema.shadow_params[1].dtype == torch.int64


def test_torch_ema_low_precision_gets_a_float32_shadow(torch_ema) -> None:
    """Deliberate difference: a bfloat16 parameter gets a float32 shadow that moves where
    torch_ema's bfloat16 shadow stalls (at decay 0.999 a step is far below half a bf16 unit)."""
    w = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    ours = ExponentialMovingAverage([w], decay=0.999, use_num_updates=False)
    theirs = torch_ema.ExponentialMovingAverage([w], decay=0.999, use_num_updates=False)
    assert ours.shadow_params[0].dtype == torch.float32 and theirs.shadow_params[0].dtype == torch.bfloat16
    nxt = 1.0 + 2.0**-7  # the next bfloat16 after 1
    with torch.no_grad():
        w.fill_(nxt)
    expected = 1.0
    for _ in range(20):
        ours.update()
        theirs.update()
        expected = 0.999 * expected + 0.001 * nxt
    torch.testing.assert_close(ours.shadow_params[0].to(F64), torch.full((4,), expected, dtype=F64), rtol=0, atol=1e-6)
    assert (theirs.shadow_params[0] == 1.0).all()
    ours.copy_to()
    assert w.dtype == torch.bfloat16 and torch.equal(w.detach(), torch.full((4,), expected).to(torch.bfloat16))


def test_torch_ema_low_precision_shadow_on_request(torch_ema) -> None:
    """``to(dtype=torch.bfloat16)`` gives torch_ema's bfloat16 shadow: the same numbers to two units
    of bfloat16 rounding at the tensor's scale (polyak rounds once per update, torch_ema after each
    of its three operations), and no further from a float64 reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 5)).to(torch.bfloat16)
    ours = ExponentialMovingAverage(model.parameters(), decay=0.9, use_num_updates=False)
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.9, use_num_updates=False)
    ours.to(dtype=torch.bfloat16)
    ref = [p.detach().to(F64) for p in model.parameters()]
    eps = torch.finfo(torch.bfloat16).eps
    for _ in range(50):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
        ours.update()
        theirs.update()
        ref = [0.9 * r + 0.1 * p.detach().to(F64) for r, p in zip(ref, model.parameters(), strict=True)]
        for a, b, r in zip(ours.shadow_params, theirs.shadow_params, ref, strict=True):
            assert a.dtype == torch.bfloat16
            scale = r.abs().max().item()
            assert (a.to(F64) - b.to(F64)).abs().max().item() <= 2 * eps * scale
            assert (a.to(F64) - r).abs().max().item() <= max((b.to(F64) - r).abs().max().item(), eps * scale)


def test_torch_ema_load_keeps_dtype_and_device(torch_ema) -> None:
    """Deliberate difference: loading copies into the shadows' own dtype (float32 for a float16
    model); torch_ema casts to the parameter's (float16)."""
    w = nn.Parameter(torch.zeros(3, dtype=torch.float16))
    ours = ExponentialMovingAverage([w], decay=0.9)
    theirs = torch_ema.ExponentialMovingAverage([w], decay=0.9)
    third = torch.full((3,), 1 / 3, dtype=F64)
    state = {"decay": 0.9, "num_updates": 2, "shadow_params": [third], "collected_params": None}
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    assert ours.shadow_params[0].dtype == torch.float32 and theirs.shadow_params[0].dtype == torch.float16
    assert ours.shadow_params[0].tolist() == [torch.tensor(1 / 3, dtype=torch.float32).item()] * 3
    ours.to(dtype=F64)
    ours.load_state_dict(state)
    assert ours.shadow_params[0].dtype == F64 and ours.shadow_params[0][0].item() == 1 / 3


def test_torch_ema_failed_load_changes_nothing(torch_ema) -> None:
    w, v = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    ours = ExponentialMovingAverage([w, v], decay=0.9)
    good = roundtrip(ours.state_dict())
    before = (ours.decay, ours.num_updates, list(ours.shadow_params), clones(ours.shadow_params))
    changed = {**good, "decay": 0.1, "num_updates": 7}  # a good state, but for the key below
    bad_states = {
        "decay": {**changed, "decay": 1.5},
        "num_updates": {**changed, "num_updates": 2.0},
        "wrong number": {**changed, "shadow_params": good["shadow_params"][:1]},
        "shadow_params\\[1\\]": {**changed, "shadow_params": [good["shadow_params"][0], [1.0, 2.0]]},
        "collected_params": {**changed, "collected_params": [torch.ones(2)]},
        "missing": {k: v for k, v in changed.items() if k != "collected_params"},
    }
    for match, state in bad_states.items():
        with pytest.raises(ValueError, match=match):
            ours.load_state_dict(state)
        assert (ours.decay, ours.num_updates) == before[:2], match
        assert all(a is b for a, b in zip(ours.shadow_params, before[2], strict=True)), match
        assert same_values(ours.shadow_params, before[3]), match
    # torch_ema, by contrast, has set decay and num_updates before it finds the count wrong
    theirs = torch_ema.ExponentialMovingAverage([w, v], decay=0.9)
    with pytest.raises(ValueError):
        theirs.load_state_dict({**good, "decay": 0.1, "shadow_params": good["shadow_params"][:1]})
    assert theirs.decay == 0.1


def test_torch_ema_wrong_shapes_fail_at_use_and_change_nothing(torch_ema) -> None:
    """As torch_ema, a shadow of the wrong shape loads and fails at use; polyak's ``copy_to`` then
    writes no parameter (torch_ema's has written those before the bad one)."""
    w, v = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    for cls in (ExponentialMovingAverage, torch_ema.ExponentialMovingAverage):
        ema = cls([w, v], decay=0.9)
        state = copy.deepcopy(ema.state_dict())
        state["shadow_params"] = [torch.zeros(2), torch.zeros(4)]
        ema.load_state_dict(state)
        with pytest.raises(RuntimeError):
            ema.copy_to()
        assert w.tolist() == ([1.0, 1.0] if cls is ExponentialMovingAverage else [0.0, 0.0])
        with torch.no_grad():
            w.fill_(1.0)
    ours = ExponentialMovingAverage([w, v], decay=0.9)
    ours.load_state_dict({**ours.state_dict(), "shadow_params": [torch.zeros(2), torch.zeros(4)]})
    with pytest.raises(RuntimeError, match=r"shadow_params\[1\] has shape \(4,\)"):
        ours.update()
    assert ours.num_updates == 0 and ours.shadow_params[0].tolist() == [0.0, 0.0]


def test_torch_ema_bad_decay_assigned_fails_at_update() -> None:
    w = nn.Parameter(torch.ones(2))
    ema = ExponentialMovingAverage([w], decay=0.9)
    ema.decay = 1.5
    with pytest.raises(ValueError, match="decay"):
        ema.update()
    assert ema.num_updates == 0


def test_torch_ema_holds_its_parameters(torch_ema) -> None:
    """Deliberate difference: the fused plan holds the parameters, so they live as long as the
    average (torch_ema holds them weakly and raises once the model is gone)."""
    model = nn.Linear(2, 2)
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.9)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.9)
    ref = weakref.ref(model.weight)
    del model
    gc.collect()
    assert ref() is not None
    del ema
    gc.collect()
    assert ref() is None
    with pytest.raises(ValueError, match="no longer exists"):
        theirs.update()
    model = nn.Linear(2, 2)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.9)
    ref = weakref.ref(model.weight)
    del model
    ema.update()  # still works
    # a copy refers to the same parameters, as torch_ema's copies do
    twin = copy.deepcopy(ema)
    with torch.no_grad():
        ref().fill_(2.0)  # type: ignore[union-attr]
    twin.update()
    assert twin.shadow_params[0] is not ema.shadow_params[0]
    assert (twin.shadow_params[0] != ema.shadow_params[0]).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": 1.5}, "decay"),
        ({"decay": -0.1}, "decay"),
        ({"decay": float("nan")}, "decay"),
        ({"decay": True}, "decay"),
        ({"decay": "0.9"}, "decay"),
        ({"decay": 0.9, "use_num_updates": "yes"}, "use_num_updates"),
    ],
)
def test_torch_ema_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ExponentialMovingAverage([nn.Parameter(torch.ones(2))], **kwargs)


def test_torch_ema_bad_parameters() -> None:
    with pytest.raises(ValueError, match=r"parameters\[1\]"):
        ExponentialMovingAverage([torch.ones(2), 3.0], decay=0.9)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="iterable of tensors"):
        ExponentialMovingAverage(torch.ones(2), decay=0.9)  # type: ignore[arg-type]
    w = nn.Parameter(torch.ones(2))
    ema = ExponentialMovingAverage([w, w], decay=0.9)
    with pytest.raises(ValueError, match="same tensor"):
        ema.update()


# ============================================================================================
# diffusers


def diffusers_settings() -> list[dict]:
    return [
        {"decay": 0.99},
        {"decay": 0.999, "use_ema_warmup": True, "power": 0.75},
        {"decay": 0.9, "use_ema_warmup": True, "inv_gamma": 2, "update_after_step": 3, "min_decay": 0.2},
        {"decay": 0.95, "update_after_step": 2, "min_decay": 0.5},
    ]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("settings", diffusers_settings())
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_diffusers_same_numbers_step_after_step(
    training_utils, make_model: Callable, train_step: Callable, settings: dict, foreach: bool, dtype: torch.dtype
) -> None:
    model = make_model(0, dtype)
    tensors = [*model.parameters(), *model.buffers()]  # buffers (num_batches_tracked too) are copied
    ours = EMAModel(tensors, foreach=foreach, **settings)
    theirs = training_utils.EMAModel(tensors, foreach=foreach, **settings)
    for i in range(25):
        if i == 10:
            model.conv.weight.requires_grad_(False)  # copied from now on, in both
        if i == 15:
            model.conv.weight.requires_grad_(True)
        train_step(model)
        ours.step(tensors)
        theirs.step(tensors)
        assert (ours.optimization_step, ours.cur_decay_value) == (theirs.optimization_step, theirs.cur_decay_value)
        close(ours.shadow_params, theirs.shadow_params, f"step {i}")
    mine, yours = make_model(1, dtype), make_model(1, dtype)
    ours.copy_to([*mine.parameters(), *mine.buffers()])
    theirs.copy_to([*yours.parameters(), *yours.buffers()])
    close([*mine.parameters(), *mine.buffers()], [*yours.parameters(), *yours.buffers()], "copy_to")


def test_diffusers_own_paths_differ_in_the_last_bits(training_utils, make_model: Callable, train_step) -> None:
    """What "the same numbers" can mean: diffusers' ``foreach`` and loop paths differ from each
    other in the last bits too."""
    model = make_model(0)
    a = training_utils.EMAModel(model.parameters(), decay=0.9, foreach=True)
    b = training_utils.EMAModel(model.parameters(), decay=0.9, foreach=False)
    for _ in range(10):
        train_step(model)
        a.step(model.parameters())
        b.step(model.parameters())
    assert not same_values(a.shadow_params, b.shadow_params)
    close(a.shadow_params, b.shadow_params)


@pytest.mark.parametrize("settings", diffusers_settings())
def test_diffusers_get_decay_is_diffusers(training_utils, settings: dict) -> None:
    w = nn.Parameter(torch.ones(1))
    ours, theirs = EMAModel([w], **settings), training_utils.EMAModel([w], **settings)
    assert [ours.get_decay(t) for t in range(200)] == [theirs.get_decay(t) for t in range(200)]


def test_diffusers_update_is_fused() -> None:
    counts = []
    for n in (8, 40):
        model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(n)))
        ema = EMAModel(model.parameters(), decay=0.9)
        ema.step(model.parameters())
        with CountOps() as ops:
            ema.step(model.parameters())
        counts.append(len(ops.ops))
    assert counts[0] == counts[1] <= 3


def test_diffusers_state_dicts_load_both_ways(training_utils, make_model: Callable, train_step: Callable) -> None:
    model = make_model(0)
    settings = {"decay": 0.99, "use_ema_warmup": True, "power": 0.75, "update_after_step": 1, "min_decay": 0.1}
    ours, theirs = EMAModel(model.parameters(), **settings), training_utils.EMAModel(model.parameters(), **settings)
    for _ in range(4):
        train_step(model)
        ours.step(model.parameters())
        theirs.step(model.parameters())
    mine = ours.state_dict()
    assert list(mine) == list(theirs.state_dict())
    assert mine["shadow_params"] is ours.shadow_params
    loaded = EMAModel(model.parameters())
    loaded.load_state_dict(roundtrip(theirs.state_dict()))
    back = training_utils.EMAModel(model.parameters())
    back.load_state_dict(roundtrip(mine))
    for name in [k for k in mine if k != "shadow_params"]:
        assert getattr(loaded, name) == getattr(theirs, name) == getattr(back, name), name
    close(loaded.shadow_params, theirs.shadow_params, units=0)
    close(back.shadow_params, ours.shadow_params, units=0)
    for _ in range(4):
        train_step(model)
        loaded.step(model.parameters())
        theirs.step(model.parameters())
        assert loaded.cur_decay_value == theirs.cur_decay_value
    close(loaded.shadow_params, theirs.shadow_params)
    # a state without shadow_params (what from_pretrained reads from a config) sets the settings
    settings_only = EMAModel(model.parameters())
    settings_only.load_state_dict({"decay": 0.5})
    assert settings_only.decay == 0.5 and settings_only.optimization_step == 0


def tiny_unet(training_utils):  # type: ignore[no-untyped-def]
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(4, 8),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def test_diffusers_save_and_from_pretrained_both_ways(training_utils, tmp_path) -> None:  # type: ignore[no-untyped-def]
    unet = tiny_unet(training_utils)
    cls = type(unet)
    ours = EMAModel(unet.parameters(), decay=0.9, use_ema_warmup=True, model_cls=cls, model_config=unet.config)
    theirs = training_utils.EMAModel(
        unet.parameters(), decay=0.9, use_ema_warmup=True, model_cls=cls, model_config=unet.config
    )
    for _ in range(3):
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn_like(p), alpha=0.1)
        ours.step(unet.parameters())
        theirs.step(unet.parameters())
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    read_by_them = training_utils.EMAModel.from_pretrained(tmp_path / "ours", cls)
    read_by_us = EMAModel.from_pretrained(tmp_path / "theirs", cls, foreach=True)
    for read, wrote in ((read_by_them, ours), (read_by_us, theirs)):
        for name in ("decay", "optimization_step", "use_ema_warmup", "power", "inv_gamma", "min_decay"):
            assert getattr(read, name) == getattr(wrote, name), name
        close(read.shadow_params, wrote.shadow_params, units=0)
    assert read_by_us.foreach is True and read_by_us.model_cls is cls
    # the saved model is the average
    saved = cls.from_pretrained(tmp_path / "ours")
    close(list(saved.parameters()), ours.shadow_params, units=0)
    with pytest.raises(ValueError, match="model_cls"):
        EMAModel(unet.parameters()).save_pretrained(tmp_path / "none")


def test_diffusers_store_restore(make_model: Callable, train_step: Callable) -> None:
    model = make_model(0)
    ema = EMAModel(model.parameters(), decay=0.5)
    train_step(model)
    ema.step(model.parameters())
    train_step(model)
    live = clones(list(model.parameters()))
    ema.store(model.parameters())
    assert all(t.device.type == "cpu" for t in ema.temp_stored_params)
    ema.copy_to(model.parameters())
    assert same_values(list(model.parameters()), ema.shadow_params)
    ema.restore(model.parameters())
    assert same_values(list(model.parameters()), live)
    assert ema.temp_stored_params is None  # dropped, as diffusers
    with pytest.raises(RuntimeError, match="no `store\\(\\)`ed weights"):
        ema.restore(model.parameters())


def test_diffusers_attributes_are_read_and_written(training_utils, make_model: Callable, train_step) -> None:
    model = make_model(0, F64)
    ours, theirs = EMAModel(model.parameters(), decay=0.99), training_utils.EMAModel(model.parameters(), decay=0.99)

    def both(change: Callable[[object], None]) -> None:
        change(ours)
        change(theirs)
        train_step(model)
        ours.step(model.parameters())
        theirs.step(model.parameters())
        assert (ours.optimization_step, ours.cur_decay_value) == (theirs.optimization_step, theirs.cur_decay_value)
        close(ours.shadow_params, theirs.shadow_params)

    both(lambda e: None)
    both(lambda e: None)
    both(lambda e: setattr(e, "decay", 0.5))
    both(lambda e: setattr(e, "optimization_step", 500))
    both(lambda e: setattr(e, "use_ema_warmup", True))
    both(lambda e: setattr(e, "power", 0.5))
    both(lambda e: setattr(e, "update_after_step", 1000))  # copies again
    both(lambda e: setattr(e, "min_decay", 0.9))
    both(lambda e: setattr(e, "shadow_params", [p.detach().clone() for p in model.parameters()]))
    both(lambda e: e.shadow_params.__setitem__(1, torch.zeros_like(model.conv.bias)))
    both(lambda e: e.to(dtype=torch.float32, non_blocking=True))
    both(lambda e: setattr(e, "foreach", True))
    assert ours.to() is None


def test_diffusers_deprecated_arguments_as_diffusers(training_utils) -> None:
    model = nn.Linear(2, 2)
    made = []
    for cls in (EMAModel, training_utils.EMAModel):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ema = cls(model, max_value=0.5, min_value=0.1, device="cpu")
        assert {type(w.message) for w in caught} == {FutureWarning}
        assert len(caught) == 4  # module, max_value, min_value, device
        made.append(ema)
    for name in ("decay", "min_decay", "use_ema_warmup"):
        assert getattr(made[0], name) == getattr(made[1], name), name
    with pytest.warns(FutureWarning, match="nn.Module"):
        made[0].step(model)
    assert made[0].optimization_step == 1


def test_diffusers_unknown_keyword_is_an_error(training_utils) -> None:
    """Deliberate difference: diffusers ignores an unknown keyword (a misspelt ``use_ema_warmp``
    silently leaves the warm-up off); polyak raises."""
    w = nn.Parameter(torch.ones(2))
    training_utils.EMAModel([w], use_ema_warmp=True)
    with pytest.raises(TypeError, match="use_ema_warmp"):
        EMAModel([w], use_ema_warmp=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": 1.5}, "decay"),
        ({"decay": float("nan")}, "decay"),
        ({"min_decay": -0.5}, "min_decay"),
        ({"update_after_step": -1}, "update_after_step"),
        ({"update_after_step": 1.5}, "update_after_step"),
        ({"use_ema_warmup": "yes"}, "use_ema_warmup"),
        ({"inv_gamma": 0}, "inv_gamma"),
        ({"power": -1.0}, "power"),
        ({"foreach": 1}, "foreach"),
        ({"max_value": 2.0}, "decay"),
    ],
)
def test_diffusers_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        EMAModel([nn.Parameter(torch.ones(2))], **kwargs)


def test_diffusers_failed_load_changes_nothing() -> None:
    w, v = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    ema = EMAModel([w, v], decay=0.9)
    ema.step([w, v])
    good = roundtrip(ema.state_dict())
    before = (dict(ema.state_dict()), list(ema.shadow_params), clones(ema.shadow_params))
    for match, bad in {
        "decay": {"decay": 2.0},
        "min_decay": {"decay": 0.5, "min_decay": "0"},
        "optimization_step": {"decay": 0.5, "optimization_step": 1.0},
        "use_ema_warmup": {"decay": 0.5, "use_ema_warmup": 1},
        "power": {"decay": 0.5, "power": 0},
        "holds 1 shadow_params": {"decay": 0.5, "shadow_params": good["shadow_params"][:1]},
        "shape": {"decay": 0.5, "shadow_params": [torch.zeros(2), torch.zeros(4)]},
        "must be a tensor": {"decay": 0.5, "shadow_params": [torch.zeros(2), None]},
    }.items():
        with pytest.raises(ValueError, match=match):
            ema.load_state_dict({**good, **bad})
        assert {k: v for k, v in ema.state_dict().items() if k != "shadow_params"} == {
            k: v for k, v in before[0].items() if k != "shadow_params"
        }, match
        assert all(a is b for a, b in zip(ema.shadow_params, before[1], strict=True)), match
        assert same_values(ema.shadow_params, before[2]), match


def test_diffusers_failed_load_changes_some_settings_in_diffusers(training_utils) -> None:
    """What the difference above is about: diffusers sets the settings one by one and has set the
    earlier ones when a later one is found bad."""
    theirs = training_utils.EMAModel([nn.Parameter(torch.ones(2))], decay=0.9)
    with pytest.raises(ValueError, match="power"):
        theirs.load_state_dict({"decay": 0.5, "power": "2/3"})
    assert theirs.decay == 0.5


def test_diffusers_holds_the_parameters_of_its_last_step(make_model: Callable) -> None:
    """The fused plan holds the parameters of the latest ``step()`` (diffusers holds none), not
    those given at construction (``from_pretrained``'s temporary model is let go)."""
    model = make_model(0)
    ema = EMAModel(model.parameters())
    ref = weakref.ref(model.conv.weight)
    del model
    gc.collect()
    assert ref() is None
    model = make_model(0)
    ema.step(model.parameters())
    ref = weakref.ref(model.conv.weight)
    del model
    gc.collect()
    assert ref() is not None
    del ema
    gc.collect()
    assert ref() is None


def test_diffusers_load_keeps_dtype_and_device(training_utils) -> None:
    w = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    ours, theirs = EMAModel([w]), training_utils.EMAModel([w])
    state = {**theirs.state_dict(), "shadow_params": [torch.full((3,), 0.1, dtype=F64)]}
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    assert ours.shadow_params[0].dtype == torch.float32  # its own
    assert theirs.shadow_params[0].dtype == F64  # as loaded


def test_diffusers_failed_step_changes_nothing() -> None:
    """Deliberate difference: a step or copy_to with another number of parameters raises (diffusers
    zips the lists and ignores the extra ones)."""
    w, v = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    ema = EMAModel([w, v], decay=0.9)
    for bad in ([w], [w, v, v.detach()], [v, w]):
        with pytest.raises((ValueError, RuntimeError)):
            ema.step(bad)
        assert ema.optimization_step == 0 and ema.cur_decay_value is None
    with pytest.raises(ValueError, match="3 parameters but 2 shadow_params"):
        ema.copy_to([w, v, w])
    theirs = pytest.importorskip("diffusers.training_utils").EMAModel([w, v], decay=0.9)
    theirs.step([w])  # diffusers: no error, v is left out
    assert theirs.optimization_step == 1
    ema.decay = 2.0
    ema.optimization_step = 5
    with pytest.raises(ValueError, match="decay"):
        ema.step([w, v])
    assert ema.optimization_step == 5


def test_diffusers_low_precision_gets_a_float32_shadow(training_utils) -> None:
    w = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    ours = EMAModel([w], decay=0.999, min_decay=0.999)
    theirs = training_utils.EMAModel([w], decay=0.999, min_decay=0.999)
    ours.step([w])  # the first step copies
    theirs.step([w])
    with torch.no_grad():
        w.fill_(1.0 + 2.0**-7)
    for _ in range(20):
        ours.step([w])
        theirs.step([w])
    assert ours.shadow_params[0].dtype == torch.float32 and (ours.shadow_params[0] > 1.0).all()
    assert theirs.shadow_params[0].dtype == torch.bfloat16 and (theirs.shadow_params[0] == 1.0).all()
    ours.to(dtype=torch.bfloat16)  # diffusers' bfloat16 shadow on request
    assert ours.shadow_params[0].dtype == torch.bfloat16


def test_diffusers_pin_memory_as_diffusers(training_utils) -> None:
    w = nn.Parameter(torch.ones(2))
    outcomes = []
    for cls in (EMAModel, training_utils.EMAModel):
        ema = cls([w])
        try:
            ema.pin_memory()
        except RuntimeError as e:  # no accelerator to pin for
            outcomes.append(type(e))
        else:
            assert ema.shadow_params[0].is_pinned()
            outcomes.append(None)
    assert outcomes[0] == outcomes[1]


def test_diffusers_copies_of_the_average(make_model: Callable, train_step: Callable) -> None:
    model = make_model(0)
    ema = EMAModel(model.parameters(), decay=0.9)
    ema.step(model.parameters())
    for twin in (copy.deepcopy(ema), torch.load(io.BytesIO(_saved(ema)), weights_only=False)):
        train_step(model)
        twin.step(model.parameters())
        assert twin.optimization_step == 2 and twin.shadow_params[0] is not ema.shadow_params[0]
    assert ema.optimization_step == 1


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ============================================================================================
# without the peers


def test_work_without_torch_ema_or_diffusers_installed() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch_ema'] = None; sys.modules['diffusers'] = None\n"
        "import torch\n"
        "from polyak.compat.torch_ema import ExponentialMovingAverage\n"
        "from polyak.compat.diffusers import EMAModel\n"
        "m = torch.nn.Linear(2, 2)\n"
        "a = ExponentialMovingAverage(m.parameters(), decay=0.9); a.update(); a.copy_to()\n"
        "b = EMAModel(m.parameters()); b.step(m.parameters()); b.copy_to(m.parameters())\n"
        "assert not any(k.startswith(('torch_ema', 'diffusers')) and v for k, v in sys.modules.items())\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ============================================================================================
# the same interface


def _public(obj: object) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


@pytest.mark.parametrize("peer", ["torch_ema", "diffusers"])
def test_same_signatures_and_attributes(peer: str) -> None:
    """Every public method of the peer, with the same parameters (names, kinds, defaults), and
    every attribute an instance of the peer has."""
    import inspect

    if peer == "torch_ema":
        theirs_cls = pytest.importorskip("torch_ema").ExponentialMovingAverage
        ours_cls: type = ExponentialMovingAverage
        args: dict = {"decay": 0.9}
    else:
        theirs_cls = pytest.importorskip("diffusers.training_utils").EMAModel
        ours_cls, args = EMAModel, {}
    assert _public(theirs_cls) <= _public(ours_cls)
    for name in ["__init__", *sorted(_public(theirs_cls))]:
        mine, yours = inspect.signature(getattr(ours_cls, name)), inspect.signature(getattr(theirs_cls, name))
        assert [(p.name, p.kind, p.default) for p in mine.parameters.values()] == [
            (p.name, p.kind, p.default) for p in yours.parameters.values()
        ], name
    w = nn.Parameter(torch.ones(2))
    ours, theirs = ours_cls([w], **args), theirs_cls([w], **args)
    attributes = {n for n in vars(theirs) if not n.startswith("_")}
    assert attributes <= _public(ours)
    for name in attributes - {"shadow_params"}:
        assert getattr(ours, name) == getattr(theirs, name), name
