"""What the peers do, shown by running them: the evidence behind every claim about another
library in README.md and docs/ (collected on docs/peers.md).

Each test drives an installed peer (torch.optim.swa_utils, mmengine-lite, ema-pytorch,
diffusers, torch-ema, Lightning) through its public API on a tiny CPU model and checks one
behaviour. Its docstring names the peer's code: package version, file (relative to
site-packages) and lines. polyak's own side of each comparison is tested elsewhere (named on
docs/peers.md); a few tests show it here too, in one line, for contrast.

Peers that are not installed (timm, mmcv 1.x, mmagic, mmpretrain, mmdet, EDM2) are not tested
here: their formulas are transcribed by hand, and labelled so, in tests/test_schedules_peers.py
and tests/test_posthoc.py.

Host reads: on the CPU a tensor read back to Python (``.item()``, ``bool(t)``, ``float(t)``)
dispatches ``aten._local_scalar_dense``; the tests count those dispatches. That a read of a
GPU tensor waits for the device is how CUDA works, not something measured here.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from torch.optim import swa_utils
from torch.utils._python_dispatch import TorchDispatchMode

import polyak

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*litlogger.*"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*have no `val_dataloader`.*"),
]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# helpers


class OpLog(TorchDispatchMode):
    """Records the name of every ATen operator dispatched inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def count(self, name: str) -> int:
        return sum(op == name for op in self.ops)


HOST_READ = "aten._local_scalar_dense.default"


def bn_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Linear, BatchNorm1d, Linear: parameters, floating BN statistics and the int64
    ``num_batches_tracked``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(dtype)


@torch.no_grad()
def train_like(model: nn.Module, seed: int) -> None:
    """Move every parameter and run one training-mode forward (BN statistics and
    ``num_batches_tracked`` advance by one)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g).to(p.dtype), alpha=0.1)
    model.train()
    dtype = next(model.parameters()).dtype
    model(torch.randn(5, 3, generator=g).to(dtype))


@torch.no_grad()
def train_like_plain(model: nn.Module, seed: int) -> None:
    """Move every parameter (no forward)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def nbt(model: nn.Module) -> int:
    return int(next(b for n, b in model.named_buffers() if n.endswith("num_batches_tracked")))


def first_weight(model: nn.Module) -> Tensor:
    return next(model.parameters()).detach().clone()


# --------------------------------------------------------------------------------------------
# torch.optim.swa_utils (torch 2.13.0)


@pytest.mark.parametrize("rule", ["swa", "ema"])
def test_torch_use_buffers_averages_and_truncates_num_batches_tracked(rule: str) -> None:
    """torch 2.13.0, torch/optim/swa_utils.py:296-307 (``use_buffers=True`` chains the buffers
    into the averaged tensors), 341-348 (SWA on the CPU: ``get_swa_avg_fn`` per tensor, l.160),
    79-80 (``get_ema_multi_avg_fn``'s non-float branch): the int64 ``num_batches_tracked`` is
    averaged as a number and ``copy_`` truncates it back to an integer."""
    model = bn_net()
    kwargs = {} if rule == "swa" else {"multi_avg_fn": swa_utils.get_ema_multi_avg_fn(0.9)}
    avg = swa_utils.AveragedModel(model, use_buffers=True, **kwargs)
    steps = 5 if rule == "swa" else 10
    expected = 0.0
    for i in range(steps):
        train_like(model, i)
        avg.update_parameters(model)
        live = nbt(model)
        # the rule applied to the integer, truncated toward zero
        if i == 0:
            expected = live
        elif rule == "swa":
            expected = math.trunc(expected + (live - expected) / (i + 1))
        else:
            expected = math.trunc(expected * 0.9 + live * 0.1)
    assert nbt(model) == steps
    assert nbt(avg.module) == expected == 1  # while the model counted 5 or 10 batches
    # polyak: integer buffers are copied (tests/test_engine.py::test_num_batches_tracked_is_copied_exactly)
    ours = polyak.AveragedModel(model, use_buffers=True)
    train_like(model, 99)
    ours.update_parameters(model)
    ours.update_parameters(model)
    assert nbt(ours.module) == nbt(model) == steps + 1


def test_torch_pairs_by_position_and_accepts_a_model_with_fewer_tensors() -> None:
    """torch 2.13.0, torch/optim/swa_utils.py:311: ``zip(self_param, model_param, strict=False)``
    pairs the average's and the model's parameters by position and stops at the shorter list; a
    model with fewer parameters is accepted and the rest of the average is left as it was."""
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    avg = swa_utils.AveragedModel(big, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.5))
    small = nn.Sequential(nn.Linear(2, 2))  # another model: only the first layer's shapes match
    before = [p.detach().clone() for p in avg.module.parameters()]
    avg.update_parameters(small)  # no error
    after = list(avg.module.parameters())
    assert torch.equal(after[0], small[0].weight) and torch.equal(after[1], small[0].bias)
    assert torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])
    # polyak raises and changes nothing (tests/test_engine.py::test_mismatched_source_raises_and_changes_nothing)
    ours = polyak.AveragedModel(big)
    with pytest.raises(ValueError, match=r"1\.weight"):
        ours.update_parameters(small)


def test_torch_fp32_average_of_a_bf16_model_raises_on_the_ema_path() -> None:
    """torch 2.13.0, torch/optim/swa_utils.py:77: ``get_ema_multi_avg_fn`` updates with
    ``torch._foreach_lerp_``, which needs one dtype: an average made fp32 (``.float()``: the
    class has no dtype argument, l.266-274) of a bf16 model raises at its first averaging update."""
    model = bn_net(dtype=torch.bfloat16)
    avg = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.999)).float()
    avg.update_parameters(model)  # the first update copies
    with pytest.raises(RuntimeError, match="expected dtype float for `end` but got dtype c10::BFloat16"):
        avg.update_parameters(model)
    assert "dtype" not in inspect.signature(swa_utils.AveragedModel).parameters


@pytest.mark.parametrize("peer", ["torch", "torch avg_fn", "mmengine", "ema-pytorch", "diffusers"])
def test_a_bf16_average_at_decay_0_999_never_moves(peer: str) -> None:
    """torch 2.13.0, torch/optim/swa_utils.py:77 (``_foreach_lerp_``) and 147-148 (``avg_fn``, the
    path Lightning's ``EMAWeightAveraging`` takes: ``E::test_lightning_ema_interval_buffers_and_end_of_fit``);
    mmengine-lite 0.10.7, mmengine/model/averaged_model.py:208 (``lerp_``); ema-pytorch 0.8.3,
    ema_pytorch/ema_pytorch.py:339-350 (``lerp_``, decay held at 0.999 by ``min_value``);
    diffusers 0.42.1, diffusers/training_utils.py:811 (decay held at 0.999 by ``min_decay``): a
    bf16 average that starts at 1.0 and follows a model one bf16 ulp away (1 + 2**-7) for 2,000
    updates at decay 0.999 stays at exactly 1.0, and nothing warns: each step, 0.001 of the gap,
    is below half an ulp and rounds away. The exact average is 1 + 2**-7 * (1 - 0.999**2000) =
    1.006756. polyak warns about the same average at its first update."""
    model = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    read: Callable[[], float]
    if peer == "torch":
        avg: object = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.999))
        read = lambda: avg.module.weight.item()  # noqa: E731
    elif peer == "torch avg_fn":
        avg = swa_utils.AveragedModel(model, avg_fn=swa_utils.get_ema_avg_fn(0.999), use_buffers=True)
        read = lambda: avg.module.weight.item()  # noqa: E731
    elif peer == "mmengine":
        mmengine_model = pytest.importorskip("mmengine.model")
        avg = mmengine_model.ExponentialMovingAverage(model, momentum=0.001)
        read = lambda: avg.module.weight.item()  # noqa: E731
    elif peer == "ema-pytorch":
        avg = _ema_pytorch_mod().EMA(model, beta=0.999, min_value=0.999, update_after_step=0, update_every=1)
        read = lambda: avg.ema_model.weight.item()  # noqa: E731
    else:
        avg = _ema_model_cls()(model.parameters(), decay=0.999, min_decay=0.999)
        read = lambda: avg.shadow_params[0].item()  # noqa: E731

    def update() -> None:
        if peer == "ema-pytorch":
            avg.update()  # type: ignore[attr-defined]
        elif peer == "diffusers":
            avg.step(model.parameters())  # type: ignore[attr-defined]
        else:
            avg.update_parameters(model)  # type: ignore[attr-defined]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        update()  # the copy (diffusers: its first step copies too)
        with torch.no_grad():
            model.weight.fill_(1.0 + 2**-7)
        for _ in range(2000):
            update()
    assert read() == 1.0
    assert [str(w.message) for w in caught] == []
    exact = 1 + 2**-7 * (1 - 0.999**2000)
    assert exact == pytest.approx(1.006756, abs=1e-6)
    # polyak keeps an fp32 average of the bf16 model
    # (tests/test_models.py::test_bf16_model_gets_an_fp32_average_that_moves)
    ours = polyak.AveragedModel(model, schedule=polyak.schedules.ConstantMomentum(decay=0.999))
    with torch.no_grad():
        model.weight.fill_(1.0)
    ours.update_parameters(model)
    with torch.no_grad():
        model.weight.fill_(1.0 + 2**-7)
    for _ in range(2000):
        ours.update_parameters(model)
    assert ours.module.weight.dtype == torch.float32
    assert ours.module.weight.item() == pytest.approx(exact, rel=1e-5)  # fp32 rounding over 2,000 updates
    # and, asked for a bf16 average, warns at the first update that would be lost
    # (tests/test_health.py::test_a_bf16_average_with_round_to_nearest_stalls_and_is_named)
    half = polyak.ExponentialMovingAverage(model, momentum=0.001, dtype=torch.bfloat16)
    half.update_parameters(model)
    with pytest.warns(UserWarning, match="the average stalls"):
        half.update_parameters(model)


def test_torch_avg_fn_path_allocates_per_tensor_and_multi_avg_fn_is_foreach() -> None:
    """torch 2.13.0, torch/optim/swa_utils.py:349-359: with ``avg_fn`` (what Lightning's
    ``EMAWeightAveraging`` passes: get_ema_avg_fn, l.147-148) each tensor is updated by
    ``decay * ema + (1 - decay) * current``, two multiplications and an addition that each
    allocate a tensor, then ``copy_``; with ``multi_avg_fn=get_ema_multi_avg_fn`` one
    ``_foreach_lerp_`` per (device, dtype) group (l.77, 320-332)."""
    model = bn_net()
    per_tensor = swa_utils.AveragedModel(model, avg_fn=swa_utils.get_ema_avg_fn(0.9))
    fused = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9))
    n = len(list(model.parameters()))
    for avg in (per_tensor, fused):
        avg.update_parameters(model)
    with OpLog() as log:
        per_tensor.update_parameters(model)
    assert log.count("aten.mul.Tensor") == 2 * n and log.count("aten.add.Tensor") == n
    with OpLog() as log:
        fused.update_parameters(model)
    assert log.count("aten._foreach_lerp_.Scalar") == 1 and log.count("aten.mul.Tensor") == 0


def test_torch_swa_multi_avg_fn_weight_is_rounded_to_float32() -> None:
    """torch 2.13.0, torch/optim/swa_utils.py:98-102: ``get_swa_multi_avg_fn`` computes the weight
    ``1 / (num_averaged + 1)`` from the int64 tensor ``n_averaged``, which gives a float32 tensor:
    the SWA of a float64 model is off the exact mean by about 2e-9 after six snapshots. polyak's
    ``EqualAverage`` computes the weight in float64 on the host (tests/test_averaged_model.py::
    test_same_numbers_as_torch)."""
    model = nn.Linear(1, 1, bias=False).double()
    avg = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_swa_multi_avg_fn())
    ours = polyak.AveragedModel(model)
    values = [0.1, 0.7, 0.3, 0.9, 0.5, 0.2]
    for x in values:
        with torch.no_grad():
            model.weight.fill_(x)
        avg.update_parameters(model)
        ours.update_parameters(model)
    exact = sum(values) / len(values)
    assert 1e-10 < abs(avg.module.weight.item() - exact) < 1e-8
    assert ours.module.weight.item() == pytest.approx(exact, rel=0, abs=1e-15)


def test_options_the_peers_do_not_have() -> None:
    """The signatures and methods: torch 2.13.0 ``AveragedModel`` (torch/optim/swa_utils.py:
    165-368) has no interval, dtype or selection argument and no method that puts the average
    into a model; mmengine-lite 0.10.7's averaged models (mmengine/model/averaged_model.py:56-60)
    no dtype or selection argument; ema-pytorch 0.8.3 ``EMA`` copies the average into the model
    (``copy_params_from_ema_to_model``, ema_pytorch/ema_pytorch.py:253-260) with nothing to put
    the live weights back; diffusers 0.42.1 ``EMAModel`` (diffusers/training_utils.py:629-642) no
    interval; Lightning 2.6.6's callbacks (lightning/pytorch/callbacks/weight_averaging.py:90-95,
    369-378) no dtype."""

    def names(f: Callable[..., object]) -> set[str]:
        return set(inspect.signature(f).parameters)

    torch_args = names(swa_utils.AveragedModel.__init__)
    assert not torch_args & {"interval", "dtype", "include", "exclude", "filter"}
    assert not [m for m in ("swapped", "swap", "copy_to", "store", "restore") if hasattr(swa_utils.AveragedModel, m)]
    ema_pytorch = pytest.importorskip("ema_pytorch")
    assert hasattr(ema_pytorch.EMA, "copy_params_from_ema_to_model")
    assert not [m for m in ("store", "restore", "swapped", "average_parameters") if hasattr(ema_pytorch.EMA, m)]
    mm = pytest.importorskip("mmengine.model")
    assert not names(mm.BaseAveragedModel.__init__) & {"dtype", "include", "exclude", "filter"}
    ema_model = pytest.importorskip("diffusers.training_utils").EMAModel
    assert not names(ema_model.__init__) & {"interval", "update_every"}
    from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging

    assert "dtype" not in names(WeightAveraging.__init__) | names(EMAWeightAveraging.__init__)


# --------------------------------------------------------------------------------------------
# host reads of a step counter, per update


def _torch_ema(model: nn.Module) -> Callable[[], None]:
    avg = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9))
    return lambda: avg.update_parameters(model)


def _mmengine(cls_name: str) -> Callable[[nn.Module], Callable[[], None]]:
    def make(model: nn.Module) -> Callable[[], None]:
        mmengine_model = pytest.importorskip("mmengine.model")
        avg = getattr(mmengine_model, cls_name)(model)
        return lambda: avg.update_parameters(model)

    return make


def _ema_pytorch(model: nn.Module) -> Callable[[], None]:
    ema_pytorch = pytest.importorskip("ema_pytorch")
    ema = ema_pytorch.EMA(model, update_after_step=0, update_every=1)
    return ema.update


def _diffusers(model: nn.Module) -> Callable[[], None]:
    training_utils = pytest.importorskip("diffusers.training_utils")
    ema = training_utils.EMAModel(model.parameters())
    return lambda: ema.step(model.parameters())


def _torch_ema_lib(model: nn.Module) -> Callable[[], None]:
    torch_ema = pytest.importorskip("torch_ema")
    ema = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.9)
    return ema.update


def _polyak(model: nn.Module) -> Callable[[], None]:
    avg = polyak.ExponentialMovingAverage(model, momentum=0.1)
    return lambda: avg.update_parameters(model)


def _torch_swa_multi(model: nn.Module) -> Callable[[], None]:
    avg = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_swa_multi_avg_fn())
    return lambda: avg.update_parameters(model)


# (make, expected host reads per averaging update of bn_net, which has 6 parameter tensors)
HOST_READS = {
    # swa_utils.py:310 bool(n_averaged == 0), l.318 n_averaged > 0
    "torch AveragedModel, get_ema_multi_avg_fn": (_torch_ema, 2),
    # ... and l.98-102: the 0-d tensor 1 / (n_averaged + 1) passed where a Scalar is expected
    "torch AveragedModel, get_swa_multi_avg_fn": (_torch_swa_multi, 3),
    # averaged_model.py:102 steps == 0, l.105 steps % interval == 0
    "mmengine ExponentialMovingAverage": (_mmengine("ExponentialMovingAverage"), 2),
    # ... and l.262 self.steps.item() once per averaged tensor
    "mmengine MomentumAnnealingEMA": (_mmengine("MomentumAnnealingEMA"), 2 + 6),
    # ema_pytorch.py:280 step.item(), l.283 initted.item(), l.274 and l.277 in get_current_decay
    "ema-pytorch EMA": (_ema_pytorch, 4),
    "diffusers EMAModel": (_diffusers, 0),
    "torch-ema ExponentialMovingAverage": (_torch_ema_lib, 0),
    "polyak ExponentialMovingAverage": (_polyak, 0),
}


@pytest.mark.parametrize("name", list(HOST_READS))
def test_host_reads_of_the_step_counter_per_update(name: str) -> None:
    """The counter reads per averaging update, counted on the CPU (lines in the table above:
    torch 2.13.0 torch/optim/swa_utils.py, mmengine-lite 0.10.7 mmengine/model/averaged_model.py,
    ema-pytorch 0.8.3 ema_pytorch/ema_pytorch.py). diffusers 0.42.1 and torch-ema 0.3 keep the
    step count in a Python ``int`` (diffusers/training_utils.py:706, 774; torch_ema/ema.py:50,
    109). Where the counter is a tensor on a GPU, each read waits for the device: that part is
    read from the code, not measured here."""
    make, expected = HOST_READS[name]
    model = bn_net()
    update = make(model)
    for _ in range(3):  # past the first copy and any initialisation
        train_like(model, 0)
        update()
    with OpLog() as log:
        update()
    assert log.count(HOST_READ) == expected


# --------------------------------------------------------------------------------------------
# mmengine (mmengine-lite 0.10.7)


def _mm():  # type: ignore[no-untyped-def]
    return pytest.importorskip("mmengine.model")


def test_mmengine_interval_uses_the_per_step_momentum_once_per_interval() -> None:
    """mmengine-lite 0.10.7, mmengine/model/averaged_model.py:102-111 and 208: with
    ``interval=k`` the average is updated at ``steps % k == 0`` with ``lerp_(x, momentum)``, the
    momentum of one step: not compensated for the k - 1 steps skipped, so the horizon in steps
    grows k-fold. polyak's ``compensate_interval=False`` gives the same numbers; its default uses
    ``1 - (1 - m)**k`` (tests/test_models.py::test_compensated_interval_keeps_the_horizon_in_steps)."""
    mm = _mm()
    m, k = 0.1, 2
    model = nn.Linear(2, 2).double()
    avg = mm.ExponentialMovingAverage(model, momentum=m, interval=k)
    same = polyak.ExponentialMovingAverage(model, momentum=m, interval=k, compensate_interval=False)
    compensated = polyak.ExponentialMovingAverage(model, momentum=m, interval=k)
    ref = None
    for s in range(7):
        train_like_plain(model, s)
        for a in (avg, same, compensated):
            a.update_parameters(model)
        w = model.weight.detach().clone()
        if s == 0:
            ref = w
        elif s % k == 0:
            ref = (1 - m) * ref + m * w
    assert ref is not None
    torch.testing.assert_close(avg.module.weight, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(same.module.weight, avg.module.weight, rtol=0, atol=1e-12)
    assert not torch.allclose(compensated.module.weight, avg.module.weight, rtol=0, atol=1e-3)


def test_mmengine_update_buffers_freezes_integer_buffers() -> None:
    """mmengine-lite 0.10.7, mmengine/model/averaged_model.py:102-111: with ``update_buffers=True``
    the state dict's tensors are copied at ``steps == 0`` and afterwards only floating ones are
    averaged (l.107); the int64 ``num_batches_tracked`` keeps the value of the first update."""
    mm = _mm()
    model = bn_net()
    avg = mm.ExponentialMovingAverage(model, momentum=0.1, update_buffers=True)
    for i in range(5):
        train_like(model, i)
        avg.update_parameters(model)
    assert nbt(model) == 5 and nbt(avg.module) == 1


def test_mmengine_fp32_average_of_a_bf16_model_raises() -> None:
    """mmengine-lite 0.10.7, mmengine/model/averaged_model.py:208: ``lerp_`` needs one dtype, so
    an average made fp32 (``.float()``: the classes have no dtype argument, l.56-60, 178-183)
    of a bf16 model raises at its first averaging update."""
    mm = _mm()
    model = bn_net(dtype=torch.bfloat16)
    avg = mm.ExponentialMovingAverage(model).float()
    avg.update_parameters(model)  # steps == 0: copy_ casts
    with pytest.raises(RuntimeError, match="expected dtype float for `end` but got dtype c10::BFloat16"):
        avg.update_parameters(model)


def test_mmengine_matches_parameters_by_name_and_buffers_by_position() -> None:
    """mmengine-lite 0.10.7, mmengine/model/averaged_model.py:99-111: parameters are looked up
    by name in the source (a missing name is a ``KeyError`` after the earlier names were already
    written), and l.115: ``zip(self.module.buffers(), model.buffers())`` copies buffers by
    position, silently stopping at the shorter list."""
    mm = _mm()
    torch.manual_seed(0)
    avg = mm.ExponentialMovingAverage(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    source = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(KeyError, match=r"1\.weight"):
        avg.update_parameters(source)
    assert torch.equal(avg.module[0].weight, source[0].weight)  # written before the error

    two = mm.ExponentialMovingAverage(nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2)))
    one = nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 2))  # same parameter names, fewer buffers
    one[1].weight.data = torch.ones(2)
    one[1].bias.data = torch.zeros(2)
    with torch.no_grad():
        one[0].running_mean.fill_(7.0)
    two.steps.fill_(1)  # past the copy: only the buffers are written
    two.update_parameters(one)
    assert two.module[0].running_mean.tolist() == [7.0, 7.0]
    assert two.module[1].running_mean.tolist() == [0.0, 0.0]  # no error, left as it was


def test_mmengine_update_buffers_writes_into_stale_tensors_after_a_conversion() -> None:
    """mmengine-lite 0.10.7, mmengine/model/averaged_model.py:69-70: with ``update_buffers=True``
    the tensors to update are taken once, as ``module.state_dict()`` (detached tensors). A
    conversion that replaces the storage (``.double()`` here; ``.cuda()`` and ``.half()`` alike)
    leaves them pointing at the old storage, so later updates never reach the module."""
    mm = _mm()
    model = nn.Linear(2, 2)
    avg = mm.ExponentialMovingAverage(model, momentum=0.5, update_buffers=True).double()
    before = avg.module.weight.detach().clone()
    for s in range(3):
        train_like_plain(model, s)
        avg.update_parameters(model)  # no error: the float32 tensors it writes are the old ones
    assert torch.equal(avg.module.weight, before)
    assert not torch.allclose(model.weight.double(), before)
    # without update_buffers the cache holds the Parameters themselves, which .double() keeps
    ok = mm.ExponentialMovingAverage(model, momentum=0.5).double()
    source = copy.deepcopy(model).double()
    ok.update_parameters(source)  # the copy
    assert torch.equal(ok.module.weight, source.weight)


def test_mmengine_asserts_the_momentum_range_and_logs_large_values() -> None:
    """mmengine-lite 0.10.7, mmengine/model/averaged_model.py:185-194: ``assert 0 < momentum < 1``
    (an ``AssertionError``, skipped under ``python -O``) and, above 0.5, a message through
    mmengine's ``print_log``: no Python warning."""
    mm = _mm()
    averaged_model = pytest.importorskip("mmengine.model.averaged_model")
    for bad in (0.0, 1.0):
        with pytest.raises(AssertionError):
            mm.ExponentialMovingAverage(nn.Linear(2, 2), momentum=bad)
    logged: list[str] = []
    original = averaged_model.print_log
    averaged_model.print_log = lambda msg, *a, **k: logged.append(msg)
    try:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mm.ExponentialMovingAverage(nn.Linear(2, 2), momentum=0.9)
    finally:
        averaged_model.print_log = original
    assert len(logged) == 1 and "momentum" in logged[0]
    assert caught == []


def _hook_and_runner(model: nn.Module, **kwargs: object):  # type: ignore[no-untyped-def]
    hooks = pytest.importorskip("mmengine.hooks")
    hook = hooks.EMAHook(**kwargs)
    runner = SimpleNamespace(model=model, iter=0, epoch=0, max_iters=100, max_epochs=1)
    hook.before_run(runner)
    return hook, runner


def test_mmengine_ema_hook_updates_after_every_iteration() -> None:
    """mmengine-lite 0.10.7, mmengine/hooks/ema_hook.py:94-114: ``after_train_iter`` updates the
    average after every training iteration; it does not look at the optimizer, so iterations
    that only accumulate gradients, and steps a GradScaler skipped, are updates too. The runner
    given here has no ``message_hub``: the hook logs nothing (no momentum in the logs)."""
    model = nn.Linear(2, 2)
    hook, runner = _hook_and_runner(model, momentum=0.5)
    weight = model.weight.detach().clone()
    for i in range(3):  # the weights do not change: as in accumulation iterations
        runner.iter = i
        hook.after_train_iter(runner, i)
    assert int(hook.ema_model.steps) == 3
    assert torch.equal(model.weight, weight)


def test_mmengine_ema_hook_validation_swaps_in_the_before_run_copy_before_any_update() -> None:
    """mmengine-lite 0.10.7, mmengine/hooks/ema_hook.py:64-75 (the average is built in
    ``before_run``) and 116-123, 199-213 (``before_val_epoch`` swaps unconditionally, by
    position, through a ``clone`` per tensor): validated before the first update, the model holds
    the weights it had at ``before_run``."""
    model = nn.Linear(2, 2)
    at_before_run = first_weight(model)
    hook, runner = _hook_and_runner(model, momentum=0.5)
    train_like_plain(model, 0)
    live = first_weight(model)
    with OpLog() as log:
        hook.before_val_epoch(runner)
    assert torch.equal(model.weight, at_before_run)
    assert log.count("aten.clone.default") == len(list(model.parameters()))
    hook.after_val_epoch(runner)
    assert torch.equal(model.weight, live)


def test_mmengine_ema_hook_before_run_builds_a_new_average() -> None:
    """mmengine-lite 0.10.7, mmengine/hooks/ema_hook.py:64-75: ``before_run`` builds a new
    average from the live model. ``Runner.test()`` calls ``before_run`` (mmengine/runner/runner.py:
    1804-1818), so a test after training on the same runner swaps in a copy of the live weights,
    not the average."""
    model = nn.Linear(2, 2)
    hook, runner = _hook_and_runner(model, momentum=0.5)
    for i in range(3):
        train_like_plain(model, i)
        hook.after_train_iter(runner, i)
    trained_average = first_weight(hook.ema_model.module)
    hook.before_run(runner)  # what Runner.test() calls first
    hook.before_test_epoch(runner)
    assert int(hook.ema_model.steps) == 0
    assert not torch.equal(model.weight, trained_average)
    hook.after_test_epoch(runner)


# --------------------------------------------------------------------------------------------
# ema-pytorch (0.8.3)


def _ema_pytorch_mod():  # type: ignore[no-untyped-def]
    return pytest.importorskip("ema_pytorch")


def test_ema_pytorch_update_every_uses_the_per_step_decay_once_per_interval() -> None:
    """ema-pytorch 0.8.3, ema_pytorch/ema_pytorch.py:279-298: ``update_every`` (default 10, l.82)
    skips calls, and each update lerps with ``1 - get_current_decay()``, the per-step decay of
    l.270-277, whatever ``update_every`` is: not compensated."""
    ema_pytorch = _ema_pytorch_mod()
    assert inspect.signature(ema_pytorch.EMA.__init__).parameters["update_every"].default == 10
    beta, k = 0.9, 2
    model = nn.Linear(2, 2).double()
    # inv_gamma tiny: the warm-up is over after one step, the decay is beta from then on
    ema = ema_pytorch.EMA(model, beta=beta, update_after_step=0, update_every=k, inv_gamma=1e-12)
    ref = None
    for s in range(7):
        train_like_plain(model, s)
        ema.update()
        w = model.weight.detach().clone()
        if s == 0:
            ref = w
        elif s % k == 0:
            ref = beta * ref + (1 - beta) * w
    assert ref is not None
    # ema-pytorch computes the decay in float32 (a tensor): agreement to float32 precision
    torch.testing.assert_close(ema.ema_model.weight, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("wrap", ["DataParallel", "compile"])
def test_ema_pytorch_updates_nothing_when_the_online_model_has_a_prefix(wrap: str) -> None:
    """ema-pytorch 0.8.3, ema_pytorch/ema_pytorch.py:202-203, 232-242, 324, 339: the tensors
    taken from the online model are those whose names appear in the EMA copy. With an EMA copy
    passed as ``ema_model`` and an online model whose names carry ``module.`` (DataParallel,
    DDP) or ``_orig_mod.`` (torch.compile), no name matches: every call, the first copy
    included, changes nothing, and nothing is reported."""
    ema_pytorch = _ema_pytorch_mod()
    model = nn.Linear(2, 2)
    online = nn.DataParallel(model) if wrap == "DataParallel" else torch.compile(model)
    assert next(n for n, _ in online.named_parameters()).startswith(
        "module." if wrap == "DataParallel" else "_orig_mod."
    )
    ema_copy = copy.deepcopy(model)
    with torch.no_grad():
        ema_copy.weight.fill_(10.0)
    ema = ema_pytorch.EMA(online, ema_model=ema_copy, beta=0.5, update_after_step=0, update_every=1)
    for s in range(5):
        train_like_plain(model, s)
        ema.update()
    assert torch.equal(ema.ema_model.weight, torch.full((2, 2), 10.0))
    # polyak strips the prefixes (tests/test_engine.py::test_wrapped_source_gives_same_numbers_as_plain)
    ours = polyak.AveragedModel(model)
    ours.update_parameters(online)
    assert torch.equal(ours.module.weight, model.weight)


def test_ema_pytorch_lerps_floating_buffers_and_never_touches_integer_ones() -> None:
    """ema-pytorch 0.8.3, ema_pytorch/ema_pytorch.py:202-203: only floating and complex
    parameters and buffers are tracked, and l.339-350 lerps every tracked buffer (BatchNorm's
    running statistics); the int64 ``num_batches_tracked`` of the EMA copy keeps its value from
    the deep copy."""
    ema_pytorch = _ema_pytorch_mod()
    model = bn_net()
    ema = ema_pytorch.EMA(model, beta=0.5, update_after_step=0, update_every=1, inv_gamma=1e-12)
    for i in range(4):
        train_like(model, i)
        ema.update()
    assert nbt(model) == 4 and nbt(ema.ema_model) == 0
    running, averaged = model[1].running_mean, ema.ema_model[1].running_mean
    assert not torch.allclose(running, averaged)


def test_ema_pytorch_fp32_copy_of_a_bf16_model_needs_coerce_dtype_which_casts_per_tensor() -> None:
    """ema-pytorch 0.8.3, ema_pytorch/ema_pytorch.py:40-47: ``inplace_lerp`` runs ``lerp_`` on the
    source as it is, which fails for an fp32 EMA copy of a bf16 model; with ``coerce_dtype=True``
    (l.44-45, ``maybe_coerce_dtype`` l.25-29) each source tensor is first converted, a new
    tensor per tensor per update."""
    ema_pytorch = _ema_pytorch_mod()
    model = nn.Linear(2, 2).to(torch.bfloat16)
    for coerce in (False, True):
        ema = ema_pytorch.EMA(
            model,
            ema_model=copy.deepcopy(model).float(),
            beta=0.5,
            update_after_step=0,
            update_every=1,
            coerce_dtype=coerce,
        )
        ema.update()  # the copy: copy_ converts
        if not coerce:
            with pytest.raises(RuntimeError, match="expected dtype float for `end`"):
                ema.update()
        else:
            with OpLog() as log:
                ema.update()
            assert log.count("aten._to_copy.default") == 2  # weight and bias
            assert ema.ema_model.weight.dtype == torch.float32


def test_ema_pytorch_chooses_tensors_by_name() -> None:
    """ema-pytorch 0.8.3, ema_pytorch/ema_pytorch.py:324-350: names in
    ``param_or_buffer_names_no_ema`` are copied, names in ``ignore_names`` (or starting with
    ``ignore_startswith_names``) are left alone, the rest are lerped."""
    ema_pytorch = _ema_pytorch_mod()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    ema = ema_pytorch.EMA(
        model,
        beta=0.5,
        update_after_step=0,
        update_every=1,
        inv_gamma=1e-12,
        param_or_buffer_names_no_ema={"0.weight"},
        ignore_names={"1.weight"},
    )
    ema.update()  # the copy
    start = {n: p.detach().clone() for n, p in ema.ema_model.named_parameters()}
    train_like_plain(model, 0)
    ema.update()
    e = dict(ema.ema_model.named_parameters())
    assert torch.equal(e["0.weight"], model[0].weight)  # copied
    assert torch.equal(e["1.weight"], start["1.weight"])  # left alone
    torch.testing.assert_close(e["2.weight"], 0.5 * start["2.weight"] + 0.5 * model[2].weight)  # lerped


def test_ema_pytorch_state_dict_holds_the_online_model() -> None:
    """ema-pytorch 0.8.3, ema_pytorch/ema_pytorch.py:89, 106-111: with the default
    ``include_online_model=True`` the online model is a submodule, so the EMA's ``state_dict``
    holds the live weights (``online_model.*``) beside ``ema_model.*``."""
    ema_pytorch = _ema_pytorch_mod()
    keys = set(ema_pytorch.EMA(nn.Linear(2, 2)).state_dict())
    assert {"online_model.weight", "ema_model.weight", "step", "initted"} <= keys


def test_ema_pytorch_karras_ema_ignores_update_every() -> None:
    """ema-pytorch 0.8.3, ema_pytorch/post_hoc_ema.py:136-138 and 177-188: ``KarrasEMA`` updates
    every ``update_every`` calls (default 100, l.59) with ``beta = (1 - 1/(step + 1))**(1 + gamma)``,
    the per-step decay, with no term for the steps skipped (EDM2's ``t_delta``). At sigma_rel 0.05
    over 1e5 steps, 26.2 % of the weight stays on the step-0 weights, and a ramp theta_s = s
    averages to 15,224 where the power function gives 94,729 (and polyak at interval 100, which
    reads theta only at multiples of 100, 94,684: tests/test_posthoc.py::
    test_interval_leaves_no_weight_on_the_start)."""
    ema_pytorch = _ema_pytorch_mod()
    post_hoc_ema = pytest.importorskip("ema_pytorch.post_hoc_ema")
    assert inspect.signature(post_hoc_ema.KarrasEMA).parameters["update_every"].default == 100
    model = nn.Linear(2, 1, bias=False).double()
    ema = ema_pytorch.KarrasEMA(model, sigma_rel=0.05)  # update_every=100
    steps = torch.arange(100_000, dtype=torch.float64)
    rows = torch.stack([(steps == 0).double(), steps], dim=1)  # a one-hot at step 0, and the ramp
    weight = model.weight
    with torch.no_grad():
        for s in range(100_000):
            weight.copy_(rows[s])
            ema.update()
    on_step_0, ramp = ema.ema_model.weight[0].tolist()
    assert on_step_0 == pytest.approx(0.2617, abs=5e-4)
    assert ramp == pytest.approx(15_224, abs=1)
    # the power function's average of the ramp: sum_s s * ((s+1)**(g+1) - s**(g+1)) / T**(g+1)
    g = ema.gamma
    t = torch.arange(100_000, dtype=torch.float64)
    w = ((t + 1) ** (g + 1) - t ** (g + 1)) / 100_000 ** (g + 1)
    assert float((w * t).sum()) == pytest.approx(94_729, abs=1)


def test_ema_pytorch_post_hoc_synthesis(tmp_path: Path) -> None:
    """ema-pytorch 0.8.3, ema_pytorch/post_hoc_ema.py:
    * l.384-392: ``synthesize_ema_model(step=...)`` reads every ``*.pt`` file in the folder,
      snapshots taken after ``step`` included: a NaN in a later snapshot makes the result NaN;
    * l.404-405, 416-430: the solved coefficients are used as they are, not normalised: on a
      model that never changes (every snapshot holds 1.0) the synthesis is their sum, 1.0102;
    * l.354-357: ``checkpoint()`` casts every state entry to ``checkpoint_dtype`` (float16 by
      default, l.289), the step counter included: step 70,000 is saved as ``inf``.
    polyak: tests/test_posthoc.py::test_snapshots_after_the_target_are_ignored,
    ::test_coefficients_sum_to_one, ::test_snapshot_metadata_is_exact_beyond_float16_steps."""
    post_hoc_ema = pytest.importorskip("ema_pytorch.post_hoc_ema")
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    folder = tmp_path / "snapshots"
    ph = post_hoc_ema.PostHocEMA(
        model, sigma_rels=(0.05, 0.28), update_every=1, checkpoint_every_num_steps=10, checkpoint_folder=str(folder)
    )
    for _ in range(40):
        ph.update()
    assert sorted(p.name for p in folder.iterdir()) == [f"{i}.{s}.pt" for i in (0, 1) for s in (10, 20, 30, 40)]
    saved = torch.load(folder / "0.10.pt", weights_only=True)
    assert saved["step"].dtype == torch.float16 and saved["initted"].dtype == torch.float16

    synthesized = ph.synthesize_ema_model(sigma_rel=0.15, step=20).ema_model.weight.item()
    assert synthesized == pytest.approx(1.0102, abs=1e-4)  # not 1.0

    later = torch.load(folder / "0.40.pt", weights_only=True)
    later["ema_model.weight"] = torch.full_like(later["ema_model.weight"], float("nan"))
    torch.save(later, folder / "0.40.pt")
    assert math.isnan(ph.synthesize_ema_model(sigma_rel=0.15, step=20).ema_model.weight.item())

    ph.ema_models[0].step.fill_(70_000)
    ph.checkpoint()
    assert torch.load(folder / "0.70000.pt", weights_only=True)["step"].item() == math.inf


def test_ema_pytorch_post_hoc_updates_each_profile_in_its_own_pass(tmp_path: Path) -> None:
    """ema-pytorch 0.8.3, ema_pytorch/post_hoc_ema.py:307 (one ``KarrasEMA`` per profile) and
    337-339 (``update`` calls each in turn), 230-241 (each lerps every tensor): one update of N
    profiles is N passes over the model, one ``lerp_`` per tensor per profile. polyak's
    ``PostHocEMA`` updates all profiles in one pass (``AverageGroup``)."""
    post_hoc_ema = pytest.importorskip("ema_pytorch.post_hoc_ema")
    model = nn.Linear(2, 2)
    ph = post_hoc_ema.PostHocEMA(
        model,
        sigma_rels=(0.05, 0.1, 0.28),
        update_every=1,
        checkpoint_every_num_steps="manual",
        checkpoint_folder=str(tmp_path),
    )
    ph.update()
    with OpLog() as log:
        ph.update()
    assert log.count("aten.lerp_.Scalar") == 3 * 2  # 3 profiles x (weight, bias)


# --------------------------------------------------------------------------------------------
# diffusers (0.42.1), EMAModel


def _ema_model_cls():  # type: ignore[no-untyped-def]
    return pytest.importorskip("diffusers.training_utils").EMAModel


@pytest.mark.parametrize("foreach", [False, True])
def test_diffusers_pairs_by_position_and_accepts_fewer_parameters(foreach: bool) -> None:
    """diffusers 0.42.1, diffusers/training_utils.py:788-813: ``step(parameters)`` zips the shadow
    list with the parameters it is given, by position, with no check of their number: a shorter
    list is accepted and the other shadows are left as they were. The state holds the shadows as
    a list, without names (l.857-874)."""
    ema_model = _ema_model_cls()
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    ema = ema_model(big.parameters(), decay=0.5, foreach=foreach)
    before = [s.clone() for s in ema.shadow_params]
    small = nn.Sequential(nn.Linear(2, 2))
    ema.step(small.parameters())  # no error
    ema.step(small.parameters())
    assert not torch.equal(ema.shadow_params[0], before[0])
    assert torch.equal(ema.shadow_params[2], before[2]) and torch.equal(ema.shadow_params[3], before[3])
    state = ema.state_dict()
    assert isinstance(state["shadow_params"], list) and len(state["shadow_params"]) == 4


def test_diffusers_copies_frozen_parameters_and_takes_no_buffers() -> None:
    """diffusers 0.42.1, diffusers/training_utils.py:805-813: a parameter with
    ``requires_grad=False`` is copied, a trainable one averaged; the class takes parameters
    (l.629-631, 690-691), so buffers such as ``num_batches_tracked`` are not tracked."""
    ema_model = _ema_model_cls()
    model = bn_net()
    model[0].requires_grad_(False)
    ema = ema_model(model.parameters(), decay=0.9)
    assert len(ema.shadow_params) == len(list(model.parameters()))
    for i in range(3):
        train_like(model, i)
        ema.step(model.parameters())
    assert torch.equal(ema.shadow_params[0], model[0].weight)  # frozen: copied
    assert not torch.equal(ema.shadow_params[4], model[2].weight)  # trainable: averaged


def test_diffusers_fp32_shadow_of_a_bf16_model_moves() -> None:
    """diffusers 0.42.1, diffusers/training_utils.py:811 (``s_param.sub_(one_minus_decay *
    (s_param - param))``: mixed dtypes promote) and 842-855 (``to(dtype=...)``): fp32 shadows of
    a bf16 model work, and move where a bf16 average would not."""
    ema_model = _ema_model_cls()
    model = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ema_model(model.parameters(), decay=0.999)
    ema.to(dtype=torch.float32)
    with torch.no_grad():
        model.weight.fill_(1.0 + 2**-7)
    for _ in range(100):
        ema.step(model.parameters())
    assert ema.shadow_params[0].dtype == torch.float32
    assert ema.shadow_params[0].item() > 1.0


def test_diffusers_store_and_restore_without_a_context_manager() -> None:
    """diffusers 0.42.1, diffusers/training_utils.py:815-832 (``copy_to``), 876-908 (``store``
    clones the parameters to the CPU, ``restore`` copies them back): evaluating with the average
    is ``store``, ``copy_to``, ``restore``, three calls; the class has no context manager."""
    ema_model = _ema_model_cls()
    model = nn.Linear(2, 2)
    ema = ema_model(model.parameters(), decay=0.5)
    train_like_plain(model, 0)
    ema.step(model.parameters())
    ema.step(model.parameters())
    live = first_weight(model)
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    assert torch.equal(model.weight, ema.shadow_params[0])
    ema.restore(model.parameters())
    assert torch.equal(model.weight, live)
    assert not hasattr(ema_model, "average_parameters") and not hasattr(ema_model, "__enter__")


# --------------------------------------------------------------------------------------------
# torch-ema (0.3)


def _torch_ema_mod():  # type: ignore[no-untyped-def]
    return pytest.importorskip("torch_ema")


def test_torch_ema_load_state_dict_casts_the_shadows_back_to_the_parameters() -> None:
    """torch-ema 0.3, torch_ema/ema.py:281-296: ``load_state_dict`` converts every shadow to its
    parameter's dtype and device, so an fp32 average of a bf16 model is bf16 after a resume."""
    torch_ema = _torch_ema_mod()
    model = nn.Linear(2, 2).to(torch.bfloat16)
    ema = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.999)
    ema.to(dtype=torch.float32)
    state = ema.state_dict()
    assert state["shadow_params"][0].dtype == torch.float32
    resumed = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.999)
    resumed.load_state_dict(state)
    assert resumed.shadow_params[0].dtype == torch.bfloat16


def test_torch_ema_update_allocates_a_temporary_per_tensor_and_saves_a_list() -> None:
    """torch-ema 0.3, torch_ema/ema.py:115-120: the update computes ``tmp = s_param - param``,
    a new tensor per parameter, then ``tmp.mul_`` and ``s_param.sub_``; the state holds the
    shadows as a list by position (l.236-246)."""
    torch_ema = _torch_ema_mod()
    model = bn_net()
    ema = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.9)
    with OpLog() as log:
        ema.update()
    n = len(list(model.parameters()))
    assert log.count("aten.sub.Tensor") == n and log.count("aten.sub_.Tensor") == n
    assert isinstance(ema.state_dict()["shadow_params"], list)


def test_torch_ema_accepts_decay_one_which_keeps_the_copy() -> None:
    """torch-ema 0.3, torch_ema/ema.py:47-48: ``decay`` may be anything in [0, 1]; at 1 with
    ``use_num_updates=False`` the shadows keep the copy made at construction."""
    torch_ema = _torch_ema_mod()
    w = nn.Parameter(torch.zeros(3))
    ema = torch_ema.ExponentialMovingAverage([w], decay=1.0, use_num_updates=False)
    for _ in range(3):
        with torch.no_grad():
            w.add_(1.0)
        ema.update()
    assert ema.shadow_params[0].tolist() == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------
# Lightning (2.6.6): WeightAveraging, EMAWeightAveraging


def _lightning():  # type: ignore[no-untyped-def]
    return pytest.importorskip("lightning.pytorch")


def _lightning_module(nan_at: tuple[int, ...] = (), fail_validation: bool = False):  # type: ignore[no-untyped-def]
    pl = _lightning()

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
            self.batches = 0
            self.seen_in_validation: list[Tensor] = []

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: list[Tensor], i: int) -> Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self(x).float(), y)
            if self.batches in nan_at:
                loss = loss * float("nan")
            self.batches += 1
            return loss

        def validation_step(self, batch: list[Tensor], i: int) -> None:
            self.seen_in_validation.append(self.net[0].weight.detach().clone())
            if fail_validation:
                raise RuntimeError("validation failed")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.05)

    return Net()


def _loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)


def _fit(module, callback, tmp_path: Path, val: bool = False, **kwargs: object):  # type: ignore[no-untyped-def]
    pl = _lightning()

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.live: list[dict[str, Tensor]] = []

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # type: ignore[no-untyped-def]
            self.live.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    recorder = Recorder()
    options: dict[str, object] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    trainer = pl.Trainer(callbacks=[callback, recorder], **options)
    if val:
        trainer.fit(module, _loader(), _loader())
    else:
        trainer.fit(module, _loader())
    return trainer, recorder.live


def test_lightning_ema_interval_buffers_and_end_of_fit(tmp_path: Path) -> None:
    """Lightning 2.6.6, lightning/pytorch/callbacks/weight_averaging.py:
    * l.366-384: ``EMAWeightAveraging`` passes ``avg_fn=get_ema_avg_fn(decay)`` (torch's
      per-tensor path) and ``use_buffers=True`` by default (l.93), so torch averages the int64
      ``num_batches_tracked`` and truncates it (torch/optim/swa_utils.py:148, 356-358);
    * l.400-405 with l.179-183: ``update_every_n_steps=n`` updates at every n-th optimizer step
      with the same per-step decay: not compensated;
    * l.201-213, 352-363: at the end of fit the average is copied into the model, by position."""
    pl = _lightning()
    from lightning.pytorch.callbacks import EMAWeightAveraging

    callback = EMAWeightAveraging(decay=0.9, update_every_n_steps=2)
    assert "avg_fn" in callback._kwargs and "multi_avg_fn" not in callback._kwargs
    module = _lightning_module()
    trainer, live = _fit(module, callback, tmp_path)
    assert isinstance(module, pl.LightningModule) and trainer.global_step == len(live) == 8
    average = callback._average_model
    assert int(average.n_averaged) == 4  # after optimizer steps 1, 3, 5, 7
    ref = live[0]["net.0.weight"].double()
    for i in (2, 4, 6):
        ref = 0.9 * ref + 0.1 * live[i]["net.0.weight"].double()
    torch.testing.assert_close(average.module.net[0].weight.double(), ref, rtol=1e-6, atol=1e-6)
    assert live[-1]["net.1.num_batches_tracked"].item() == 8
    assert nbt(average.module) == 1  # 1, then trunc(0.9 * 1 + 0.1 * 3), ...
    # the model now holds the average, not its last live weights
    assert torch.equal(module.net[0].weight, average.module.net[0].weight)
    assert not torch.equal(module.net[0].weight, live[-1]["net.0.weight"])


def test_lightning_validation_swaps_without_a_finally_and_before_the_first_update(tmp_path: Path) -> None:
    """Lightning 2.6.6, lightning/pytorch/callbacks/weight_averaging.py:215-241: validation swaps
    the average in at ``on_validation_epoch_start`` and back at ``on_validation_epoch_end``,
    whenever an average exists, with no ``try``/``finally``, and through ``_swap_models``
    (l.337-350), which zips parameters and buffers by position.
    * Before the first update (here ``update_starting_at_step`` is never reached) the average is
      the copy made in ``setup`` (l.133-159), and validation runs on it: Lightning issue #21724,
      https://github.com/Lightning-AI/pytorch-lightning/issues/21724.
    * When validation raises, the swap is not undone: the model is left holding the average and
      the live weights are left in the callback.
    polyak: tests/integrations/test_lightning.py::test_validation_never_runs_on_an_average_not_updated_yet,
    ::test_an_exception_in_validation_puts_the_live_weights_back."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    callback = EMAWeightAveraging(decay=0.9, update_starting_at_step=1000)
    module = _lightning_module(fail_validation=True)
    initial = first_weight(module)
    with pytest.raises(RuntimeError, match="validation failed"):
        _fit(module, callback, tmp_path, val=True, limit_val_batches=1)
    average = callback._average_model
    assert int(average.n_averaged) == 0
    assert torch.equal(module.seen_in_validation[0], initial)  # validated the construction-time copy
    assert torch.equal(module.net[0].weight, initial)  # and left in the model
    assert not torch.equal(average.module.net[0].weight, initial)  # the live weights, in the callback


def test_lightning_counts_a_step_the_grad_scaler_skipped(tmp_path: Path) -> None:
    """Lightning 2.6.6, lightning/pytorch/callbacks/weight_averaging.py:177-183: an update happens
    when ``trainer.global_step`` has advanced, and Lightning advances it also for an optimizer
    step that a GradScaler skipped (an inf/NaN gradient), so the average is updated with weights
    that did not change. polyak: tests/integrations/test_lightning.py::
    test_a_step_skipped_by_the_grad_scaler_is_not_an_update."""
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from lightning.pytorch.plugins.precision import MixedPrecision

    callback = EMAWeightAveraging(decay=0.9)
    module = _lightning_module(nan_at=(2,))
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)
    trainer, _ = _fit(module, callback, tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    adam_steps = int(next(iter(trainer.optimizers[0].state.values()))["step"])
    assert scaler.get_scale() == 0.5  # the scaler skipped one step
    assert trainer.global_step == 8 and adam_steps == 7
    assert int(callback._average_model.n_averaged) == 8


def test_lightning_update_starting_at_epoch_does_not_delay_step_updates() -> None:
    """Lightning 2.6.6, lightning/pytorch/callbacks/weight_averaging.py:390-415:
    ``update_starting_at_epoch`` only adds an update at the end of each epoch from that one on;
    the per-step updates are not delayed."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    callback = EMAWeightAveraging(update_starting_at_epoch=3)
    assert callback.should_update(step_idx=0)
    assert not callback.should_update(epoch_idx=2)
    assert callback.should_update(epoch_idx=3)


def test_lightning_callback_state_and_what_it_overrides() -> None:
    """Lightning 2.6.6, lightning/pytorch/callbacks/weight_averaging.py:243-265: the callback's
    state is ``{"latest_update_step"}`` (the epoch of the last update, l.113, is not saved);
    l.90-95: no dtype argument (the average is a deep copy in the model's dtype); only the
    validation hooks swap (l.215-241): test and predict run on whatever the model holds."""
    pl = _lightning()
    from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging

    callback = EMAWeightAveraging()
    assert callback.state_dict() == {"latest_update_step": 0}
    assert "dtype" not in inspect.signature(EMAWeightAveraging).parameters
    assert WeightAveraging.on_test_epoch_start is pl.Callback.on_test_epoch_start
    assert WeightAveraging.on_predict_epoch_start is pl.Callback.on_predict_epoch_start
    assert WeightAveraging.on_validation_epoch_start is not pl.Callback.on_validation_epoch_start


def test_lightning_swaps_by_position() -> None:
    """Lightning 2.6.6, lightning/pytorch/callbacks/weight_averaging.py:337-350: ``_swap_models``
    zips the average's and the module's parameters and buffers by position: a module whose
    tensors have other names (and one tensor fewer) is swapped without a word."""
    from lightning.pytorch.callbacks import WeightAveraging

    torch.manual_seed(0)
    callback = WeightAveraging()
    callback._average_model = swa_utils.AveragedModel(nn.Linear(2, 2))

    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.full((2, 2), 5.0))  # no bias

    other = Other()
    average_weight = callback._average_model.module.weight.detach().clone()
    callback._swap_models(other)  # type: ignore[arg-type]
    assert torch.equal(other.kernel, average_weight)
    assert torch.equal(callback._average_model.module.weight, torch.full((2, 2), 5.0))


def test_lightning_checkpoint_without_averaging_state_starts_the_average_as_not_updated() -> None:
    """Lightning 2.6.6, lightning/pytorch/callbacks/weight_averaging.py:330-335: resuming from a
    checkpoint written without the callback loads its ``state_dict`` into the average but leaves
    ``n_averaged`` at 0, so the next update copies the model again."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    callback = EMAWeightAveraging(decay=0.9)
    module = _lightning_module()
    callback.setup(None, module, "fit")  # type: ignore[arg-type]
    state = {k: torch.full_like(v, 3) if v.is_floating_point() else v for k, v in module.state_dict().items()}
    with pytest.warns(UserWarning, match="not created with WeightAveraging"):
        callback.on_load_checkpoint(None, module, {"state_dict": state})  # type: ignore[arg-type]
    average = callback._average_model
    assert int(average.n_averaged) == 0
    assert torch.equal(average.module.net[0].weight, torch.full_like(average.module.net[0].weight, 3))
