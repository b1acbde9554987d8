"""The GPU path (polyak.gpu): side stream, pinned double-buffered offload, capturable update.

On a machine without CUDA each option is tested for its CPU behaviour: the side stream is
accepted and the update runs inline, bit for bit the default one; the offload plan runs its
double-buffer chunk logic through ordinary host buffers, checked against a float64 reference
written here; the capturable update runs its device-side weight and counter on the CPU, checked
against ``update_parameters`` and a float64 reference, with no host read. The tests that need a
CUDA device (the stream overlap itself, pinned transfers, a CUDA graph capture) are skipped
without one.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import polyak
from polyak import engine as engine_module
from polyak.gpu import CapturableUpdate, OffloadGroup, update_momentum_on_device, wait_for_averages
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
    interval_momentum,
)

pytestmark = pytest.mark.timeout(60)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HOST_READS = ("aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.item.default")


class OpLog(TorchDispatchMode):
    """Records the name of every ATen operator dispatched inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def host_reads(self) -> int:
        return sum(op in HOST_READS for op in self.ops)


def bn_net(seed: int = 0, device: str = "cpu") -> nn.Module:
    """Linear, BatchNorm1d, Linear: parameters, floating BN statistics, int64 ``num_batches_tracked``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(device)


@torch.no_grad()
def train_like(model: nn.Module, seed: int) -> None:
    """Move every parameter and run one training-mode forward (BN statistics advance)."""
    g = torch.Generator().manual_seed(seed)
    first = next(model.parameters())
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype), alpha=0.3)
    model.train()
    model(torch.randn(6, 5, generator=g).to(device=first.device, dtype=first.dtype))


def assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------------------------
# Side stream


def global_step_hooks() -> int:
    from torch.optim import optimizer

    return len(optimizer._global_optimizer_pre_hooks)


@pytest.mark.parametrize("interval", [1, 3])
def test_side_stream_on_cpu_runs_inline_bit_for_bit(interval: int) -> None:
    """On a CPU model the option is accepted, makes no stream and installs no hook, and every
    update (the copy, holds, averages, average_ with a float and a tensor weight) gives the
    same bits as the default."""
    hooks = global_step_hooks()
    model = bn_net()
    plain = polyak.ExponentialMovingAverage(model, momentum=0.1, interval=interval)
    side = polyak.ExponentialMovingAverage(model, momentum=0.1, interval=interval, side_stream=True)
    assert side.side_stream and not plain.side_stream
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(8):
        train_like(model, i)
        opt.step()  # the global pre-hook, if any, must not matter on the CPU
        plain.update_parameters(model)
        side.update_parameters(model)
        assert_same(plain, side)
    for w in (0.25, torch.tensor(0.125)):
        plain.average_(model, w)
        side.average_(model, w)
        assert_same(plain, side)
    side.wait()
    wait_for_averages()
    assert global_step_hooks() == hooks
    x = torch.randn(4, 5)
    plain.eval(), side.eval()
    assert torch.equal(plain(x), side(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda m: polyak.ExponentialMovingAverage(m, side_stream=True),
        lambda m: polyak.MomentumAnnealingEMA(m, side_stream=True),
        lambda m: polyak.StochasticWeightAverage(m, side_stream=True),
        lambda m: polyak.RampUpEMA(m, side_stream=True),
        lambda m: polyak.CosineEMA(m, max_steps=10, side_stream=True),
        lambda m: polyak.ExpMomentumEMA(m, side_stream=True),
        lambda m: polyak.AveragedModel(m, side_stream=True),
    ],
    ids=["ema", "annealing", "swa", "rampup", "cosine", "exp", "averaged_model"],
)
def test_every_preset_passes_side_stream_through(make) -> None:  # type: ignore[no-untyped-def]
    model = bn_net()
    average = make(model)
    assert average.side_stream
    reference = make(model)
    for i in range(3):
        train_like(model, i)
        average.update_parameters(model)
        reference.update_parameters(model)
    assert_same(average, reference)


def test_side_stream_refuses_averaged_buffers() -> None:
    """The next forward writes BatchNorm statistics in place: averaging them on a side stream
    would race with it. Without floating buffers ``update_buffers`` changes nothing and is
    accepted."""
    with pytest.raises(ValueError, match="update_buffers=True"):
        polyak.ExponentialMovingAverage(bn_net(), update_buffers=True, side_stream=True)
    polyak.ExponentialMovingAverage(nn.Linear(3, 2), update_buffers=True, side_stream=True)


def test_side_stream_survives_copy_and_pickle_state() -> None:
    model = bn_net()
    ema = polyak.ExponentialMovingAverage(model, momentum=0.1, side_stream=True)
    ema.update_parameters(model)
    clone = copy.deepcopy(ema)
    assert clone.side_stream
    train_like(model, 1)
    ema.update_parameters(model)
    clone.update_parameters(model)
    assert_same(ema, clone)
    state = ema.__getstate__()
    assert state["_side"] is None
    state.pop("side_stream")  # an average pickled before the option existed
    old = polyak.ExponentialMovingAverage.__new__(polyak.ExponentialMovingAverage)
    old.__setstate__(state)
    assert old.side_stream is False
    old.update_parameters(model)


class FakeCuda:
    """Stands in for torch.cuda's stream API on the CPU and logs what the side stream asks of it."""

    def __init__(self) -> None:
        self.log: list[tuple[str, ...]] = []
        self.current = self.make_stream("current")

    def make_stream(self, name: str):  # type: ignore[no-untyped-def]
        log = self.log

        class Stream:
            def wait_stream(self, other) -> None:  # type: ignore[no-untyped-def]
                log.append(("wait_stream", name, other.name))

            def wait_event(self, event) -> None:  # type: ignore[no-untyped-def]
                log.append(("wait_event", name))

        stream = Stream()
        stream.name = name  # type: ignore[attr-defined]
        return stream

    def Stream(self, device=None):  # type: ignore[no-untyped-def]
        return self.make_stream("side")

    def Event(self):  # type: ignore[no-untyped-def]
        log = self.log

        class Event:
            def record(self, stream) -> None:  # type: ignore[no-untyped-def]
                log.append(("record", stream.name))

        return Event()

    def current_stream(self, device=None):  # type: ignore[no-untyped-def]
        return self.current

    def stream(self, stream):  # type: ignore[no-untyped-def]
        log = self.log

        class Context:
            def __enter__(self) -> None:
                log.append(("enter", stream.name))

            def __exit__(self, *exc: object) -> None:
                log.append(("exit", stream.name))

        return Context()


def test_side_stream_protocol_with_a_stand_in_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The order of the calls a side-stream update makes, on the CPU with torch.cuda's stream API
    replaced: the side stream waits for the current one, runs the update, records its event; the
    next optimizer step (a global pre-hook) and every read of the average make the current
    stream wait for that event once; the numbers are the default update's."""
    from polyak import gpu

    fake = FakeCuda()
    for name in ("Stream", "Event", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(gpu, "_hook", None)
    model = bn_net()
    plain = polyak.ExponentialMovingAverage(model, momentum=0.1)
    side = polyak.ExponentialMovingAverage(model, momentum=0.1, side_stream=True)
    side._side = gpu.SideStream(torch.device("cpu"))  # what side_stream_for makes on a CUDA device
    try:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for i in range(4):
            fake.log.clear()
            train_like(model, i)
            plain.update_parameters(model)
            side.update_parameters(model)
            assert fake.log == (
                []
                if i == 0
                else [("wait_stream", "side", "current"), ("enter", "side"), ("exit", "side"), ("record", "side")]
            )
            fake.log.clear()
            opt.step()  # the pre-hook
            opt.step()  # nothing pending any more
            assert fake.log == ([] if i == 0 else [("wait_event", "current")])
        assert_same(plain, side)
        train_like(model, 9)
        plain.update_parameters(model)
        side.update_parameters(model)
        fake.log.clear()
        side.eval()(torch.randn(2, 5))
        side.state_dict()
        assert fake.log == [("wait_event", "current")]
        fake.log.clear()
        side.average_(model, torch.tensor(0.5))
        plain.average_(model, torch.tensor(0.5))
        wait_for_averages()
        assert fake.log[-1] == ("wait_event", "current") and not gpu._PENDING
        assert_same(plain, side)
    finally:
        if gpu._hook is not None:
            gpu._hook.remove()


def test_side_stream_marks_every_tensor_of_the_plans() -> None:
    """What ``record_stream`` is called on (CUDA tensors only): the pairs and every scratch
    buffer of the engine's plans, found by walking them."""
    from polyak import gpu

    model = nn.Module()
    model.params = nn.ParameterList([nn.Parameter(torch.randn(30)) for _ in range(20)])
    model.half_ = nn.Parameter(torch.randn(40).to(torch.bfloat16))
    ema = polyak.ExponentialMovingAverage(model, momentum=0.1)
    ema.update_parameters(model)
    ema.update_parameters(model)
    binding = ema.engine.bind(model)
    found = {t.untyped_storage().data_ptr() for t in gpu._tensors_in([binding.dst, binding.src, binding.plans])}
    scratch = [t for g in binding.plan("avg") for entry in g.gathered + g.staged for t in entry[2:] if t is not None]
    scratch = [x for t in scratch for x in (t if isinstance(t, list) else [t])]
    assert scratch and all(t.untyped_storage().data_ptr() in found for t in scratch)
    assert all(t.untyped_storage().data_ptr() in found for t in binding.src + binding.dst)


@cuda
@pytest.mark.timeout(120)
def test_side_stream_on_cuda_matches_the_default_with_a_real_optimizer() -> None:
    """The update runs on the side stream while the next step's forward is enqueued; the
    optimizer's pre-hook and the reads wait for it; the numbers are the default's."""
    from polyak import gpu

    model = bn_net(device="cuda")
    plain = polyak.ExponentialMovingAverage(model, momentum=0.05, interval=2)
    side = polyak.ExponentialMovingAverage(model, momentum=0.05, interval=2, side_stream=True)
    assert side._side is not None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(12):
        x = torch.randn(64, 5, device="cuda")
        model.train()
        model(x).square().mean().backward()
        opt.step()  # waits (on the device) for the previous side update
        opt.zero_grad()
        side.update_parameters(model)
        assert side._side.pending
        plain.update_parameters(model)
    assert_same(plain, side)  # state_dict waits
    assert not gpu._PENDING
    assert gpu._hook is not None


# --------------------------------------------------------------------------------------------
# Offload: the double-buffered plan, through host buffers on the CPU


def flat_targets(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[Tensor]:
    """Targets laid out as the average's are: views of one contiguous buffer."""
    total = sum(math.prod(s) for s in shapes)
    flat = torch.randn(total, dtype=torch.float64).to(dtype)
    out, used = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[used : used + n].view(s))
        used += n
    return out


CASES = {
    "larger_than_a_chunk": ([(1000,), (257,), (3, 100)], 64),
    "many_small": ([(7,)] * 50 + [(3, 3)] * 10, 64),
    "odd_sizes": ([(13,), (127,), (1,), (64,), (65,), (63,), (0,), (5, 7)], 64),
    "one_chunk": ([(10,), (20,)], 1 << 20),
}


def offload_case(case: str, src_dtype: torch.dtype, dst_dtype: torch.dtype, strided: bool):
    shapes, chunk = CASES[case]
    torch.manual_seed(0)
    dst = flat_targets(shapes, dst_dtype)
    src = [torch.randn(s, dtype=torch.float64).to(src_dtype) for s in shapes]
    if strided:  # a transposed source and a strided target beside the flat ones
        src.append(torch.randn(9, 70, dtype=torch.float64).to(src_dtype).t())
        dst.append(torch.randn(70, 9, dtype=torch.float64).to(dst_dtype))
        src.append(torch.randn(6, 11, dtype=torch.float64).to(src_dtype))
        dst.append(torch.randn(11, 6, dtype=torch.float64).to(dst_dtype).t())
    return dst, src, chunk


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "src_dtype,dst_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float32)],
    ids=["fp32", "fp16_to_fp32", "bf16_to_fp32"],
)
@pytest.mark.parametrize("strided", [False, True], ids=["flat", "strided"])
def test_offload_plan_against_a_float64_reference(
    case: str, src_dtype: torch.dtype, dst_dtype: torch.dtype, strided: bool
) -> None:
    """Copy, then lerps by float and tensor weights with new source values each time, against
    the same steps in float64 (the source's values are exact in float64)."""
    dst, src, chunk = offload_case(case, src_dtype, dst_dtype, strided)
    group = OffloadGroup(dst, src, chunk=chunk)
    assert not group.pinned and group.stream is None
    if not strided:
        assert group.host[0].numel() <= chunk  # bounded staging, whatever the model's size
    if case != "one_chunk":
        assert len(group.chunks) > 2  # both buffers are reused
    group.copy_()
    for d, s in zip(dst, src, strict=True):
        assert torch.equal(d, s.to(dst_dtype))
    ref = [d.double() for d in dst]
    g = torch.Generator().manual_seed(1)
    for step, w in enumerate([0.1, 0.5, 0.9, 1e-3, torch.tensor(0.3), 0.0, 1.0]):
        for s in src:
            s.copy_(torch.randn(s.shape, generator=g, dtype=torch.float64).to(src_dtype))
        group.lerp_(w)
        wf = float(w)
        for r, s in zip(ref, src, strict=True):
            r.add_(wf * (s.double() - r))
        for d, r in zip(dst, ref, strict=True):
            torch.testing.assert_close(d.double(), r, rtol=0, atol=4e-6 * (step + 1), msg=f"step {step}")
    for d, s in zip(dst, src, strict=True):  # the weight-1 update left exactly the source
        assert torch.equal(d, s.to(dst_dtype))


def test_offload_plan_float_and_tensor_weights_agree_bit_for_bit() -> None:
    dst, src, chunk = offload_case("odd_sizes", torch.float32, torch.float32, strided=True)
    twin = [d.clone() for d in dst]
    a, b = OffloadGroup(dst, src, chunk=chunk), OffloadGroup(twin, src, chunk=chunk)
    for w in (0.1, 0.7, 0.0003):
        a.lerp_(w)
        b.lerp_(torch.tensor(w))
    for x, y in zip(dst, twin, strict=True):
        assert torch.equal(x, y)


def test_offload_plan_keeps_runs_adjacent_in_memory_as_one_view() -> None:
    """Flat targets and sources: each chunk folds its pieces with one view of the average."""
    dst, src, _ = offload_case("many_small", torch.float32, torch.float32, strided=False)
    group = OffloadGroup(dst, src, chunk=64)
    assert all(len(c.targets) == 1 for c in group.chunks)


def test_offload_plan_through_the_engines_multi_average_path() -> None:
    """average_many_ (AverageGroup) reads ``dst``/``src``/``staged``/``gathered`` of a group:
    the offload plan's ``staged`` view gives the same numbers through the engine's shared plan,
    for one average and for two aligned ones."""
    dst, src, chunk = offload_case("odd_sizes", torch.bfloat16, torch.float32, strided=True)
    other = [d.clone() for d in dst]
    ga, gb = OffloadGroup(dst, src, chunk=chunk), OffloadGroup(other, src, chunk=chunk)
    assert engine_module._aligned([ga, gb])
    ref_a, ref_b = [d.double() for d in dst], [d.double() for d in other]
    engine_module._shared_plan([ga]).lerp_([0.25])
    engine_module._shared_plan([ga, gb]).lerp_([0.5, torch.tensor(0.125)])
    for r, s in zip(ref_a, src, strict=True):
        r.add_(0.25 * (s.double() - r))
        r.add_(0.5 * (s.double() - r))
    for r, s in zip(ref_b, src, strict=True):
        r.add_(0.125 * (s.double() - r))
    for d, r in zip(dst + other, ref_a + ref_b, strict=True):
        torch.testing.assert_close(d.double(), r, rtol=0, atol=1e-6)


def test_offload_plan_of_integer_buffers_copies() -> None:
    dst = [torch.zeros(3, dtype=torch.int64), torch.zeros((), dtype=torch.int64)]
    src = [torch.arange(3), torch.tensor(7)]
    OffloadGroup(dst, src, chunk=2).copy_()
    assert dst[0].tolist() == [0, 1, 2] and int(dst[1]) == 7


@cuda
@pytest.mark.timeout(120)
def test_cpu_average_of_a_cuda_model_uses_the_pinned_offload() -> None:
    """``device="cpu"`` for a CUDA model: the engine plans an OffloadGroup with pinned buffers;
    the numbers match a float64 reference (a bf16 model into a float32 average)."""
    model = bn_net(device="cuda").to(torch.bfloat16)
    ema = polyak.ExponentialMovingAverage(model, momentum=0.25, device="cpu")
    ema.update_parameters(model)
    groups = ema.engine.bind(model).plan("avg")
    assert any(isinstance(g, OffloadGroup) and g.pinned and g.host[0].is_pinned() for g in groups)
    ref = {k: v.detach().double().cpu() for k, v in model.named_parameters()}
    for i in range(5):
        train_like(model, i)
        ema.update_parameters(model)
        for k, v in model.named_parameters():
            ref[k] += 0.25 * (v.detach().double().cpu() - ref[k])
    avg = dict(ema.module.named_parameters())
    for k, r in ref.items():
        torch.testing.assert_close(avg[k].double(), r, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Capturable update


SCHEDULES: list[Schedule] = [
    ConstantMomentum(0.01),
    ConstantMomentum(decay=0.999),
    MomentumAnnealing(0.0002, gamma=3),
    EqualAverage(),
    RampUpMomentum(ema_kimg=0.5, ema_rampup=0.05, batch_size=32),
    RampUpMomentum(ema_kimg=0.5, ema_rampup=None, batch_size=8),
    CosineMomentum(0.004, 0.0, max_steps=20),
    Warmup(0.999, update_after_step=3),
    Warmup(0.99, update_after_step=2, warmup=False),
    Warmup(0.999, power=3 / 4, min_decay=0.5, inv_gamma=2.0),
    NumUpdatesWarmup(0.999),
    ExpMomentum(0.0002, gamma=5),
    MMCVWarmup(0.5, warm_up=4),
    PowerFunction(sigma_rel=0.1),
    StartAt(EqualAverage(), start=5),
    StartAt(ConstantMomentum(0.1), start=4),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("compensate", [True, False])
def test_device_momentum_matches_the_host_formula(schedule: Schedule, interval: int, compensate: bool) -> None:
    for s in [*range(0, 31), 997, 10**6]:
        host = interval_momentum(schedule, s, interval, compensate=compensate)
        device = update_momentum_on_device(schedule, torch.tensor(s), interval, compensate=compensate)
        assert device.dtype == torch.float64 and device.dim() == 0
        assert math.isclose(float(device), host, rel_tol=1e-13, abs_tol=1e-300), (s, float(device), host)


def reference_run(model: nn.Module, interval: int, momentum: float, steps: int, seed0: int = 0):
    """The class formula in float64, written out: copy at s = 0, hold when s % k, else lerp by
    1 - (1 - m)^k; buffers copied every step."""
    avg: dict[str, Tensor] = {}
    for s in range(steps):
        train_like(model, seed0 + s)
        state = model.state_dict()
        if s == 0:
            avg = {k: v.double() if v.is_floating_point() else v.clone() for k, v in state.items()}
            continue
        params = dict(model.named_parameters())
        for k, v in state.items():
            if k not in params:
                avg[k] = v.double() if v.is_floating_point() else v.clone()
            elif s % interval == 0:
                w = 1 - (1 - momentum) ** interval
                avg[k] = avg[k] + w * (v.double() - avg[k])
        yield avg


@pytest.mark.parametrize("interval", [1, 3])
def test_capturable_update_matches_update_parameters_and_float64(interval: int) -> None:
    momentum, steps = 0.2, 10
    model = bn_net(3)
    twin = copy.deepcopy(model)
    ref_model = copy.deepcopy(model)
    shipped = polyak.ExponentialMovingAverage(model, momentum=momentum, interval=interval)
    captured = polyak.ExponentialMovingAverage(twin, momentum=momentum, interval=interval)
    update = CapturableUpdate(captured, twin)
    reference = reference_run(ref_model, interval, momentum, steps)
    for s in range(steps):
        train_like(model, s)
        train_like(twin, s)
        shipped.update_parameters(model)
        update.step()
        module = captured.module.state_dict()
        for k, v in shipped.module.state_dict().items():  # to float32 rounding of the weight
            torch.testing.assert_close(module[k], v, rtol=1e-6, atol=1e-7, msg=f"{k} at step {s}")
        ref = next(reference) if s else None
        if ref is not None:
            for k, v in ref.items():
                torch.testing.assert_close(module[k].to(v.dtype), v, rtol=0, atol=1e-5, msg=f"{k} at step {s}")
    assert captured.steps == 0  # until synced
    assert update.sync() == steps and captured.steps == steps
    assert int(captured.state_dict()["steps"]) == int(shipped.state_dict()["steps"])


def test_capturable_update_reads_nothing_back_to_the_host() -> None:
    model = bn_net()
    ema = polyak.ExponentialMovingAverage(model, momentum=0.1, interval=3)
    update = CapturableUpdate(ema, model)
    with OpLog() as log:
        for _ in range(7):  # the copy, holds and averages
            update.step()
            update.next_weight()
    assert log.host_reads() == 0, [op for op in log.ops if op in HOST_READS]
    assert any("lerp" in op for op in log.ops)
    with OpLog() as log:
        assert update.sync() == 7
    assert log.host_reads() == 1


@pytest.mark.parametrize(
    "schedule",
    [Warmup(0.99, update_after_step=1), EqualAverage(), StartAt(ConstantMomentum(0.3), start=2), PowerFunction(6.94)],
    ids=repr,
)
def test_capturable_update_with_any_device_schedule(schedule: Schedule) -> None:
    model = bn_net(5)
    twin = copy.deepcopy(model)
    shipped = polyak.AveragedModel(model, schedule=schedule, interval=2)
    captured = polyak.AveragedModel(twin, schedule=schedule, interval=2)
    update = CapturableUpdate(captured, twin)
    for s in range(9):
        train_like(model, s)
        train_like(twin, s)
        shipped.update_parameters(model)
        update.step()
    update.sync()
    sa, sb = captured.state_dict(), shipped.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-7, msg=k)


def test_capturable_update_continues_from_the_averages_steps() -> None:
    model = bn_net(7)
    twin = copy.deepcopy(model)
    shipped = polyak.ExponentialMovingAverage(model, momentum=0.3, interval=2)
    captured = polyak.ExponentialMovingAverage(twin, momentum=0.3, interval=2)
    for s in range(3):
        train_like(model, s)
        train_like(twin, s)
        shipped.update_parameters(model)
        captured.update_parameters(twin)
    update = CapturableUpdate(captured, twin)
    assert int(update.steps) == 3
    for s in range(3, 8):
        train_like(model, s)
        train_like(twin, s)
        shipped.update_parameters(model)
        update.step()
    assert update.sync() == 8
    for k, v in shipped.state_dict().items():
        torch.testing.assert_close(captured.state_dict()[k], v, rtol=1e-6, atol=1e-7)


class Custom(Schedule):
    """A schedule written only in Python."""

    def momentum(self, step: int) -> float:
        return 0.5


class Subclassed(ConstantMomentum):
    """A subclass may change the formula: not trusted."""


class PerTensor(polyak.BaseAveragedModel):
    def avg_func(self, averaged_param: Tensor, source_param: Tensor, steps: int) -> None:
        averaged_param.lerp_(source_param, 0.5)


def test_capturable_update_refuses_what_it_cannot_compute_on_the_device() -> None:
    model = bn_net()
    for schedule, name in ((Custom(), "Custom"), (Subclassed(0.1), "Subclassed")):
        with pytest.raises(ValueError, match=name):
            CapturableUpdate(polyak.AveragedModel(model, schedule=schedule), model)
    with pytest.raises(ValueError, match="stochastic"):
        CapturableUpdate(polyak.ExponentialMovingAverage(model, dtype=torch.bfloat16, rounding="stochastic"), model)
    with pytest.raises(ValueError, match="avg_func"):
        CapturableUpdate(PerTensor(model), model)
    with pytest.raises(ValueError, match="RampUpEMA"):
        CapturableUpdate(polyak.RampUpEMA(model), model)
    with pytest.raises(ValueError, match="max_steps"):
        CapturableUpdate(polyak.CosineEMA(model), model)
    with pytest.raises(ValueError, match="polyak averaged model"):
        CapturableUpdate(model, model)  # type: ignore[arg-type]
    ema = polyak.ExponentialMovingAverage(model)
    with pytest.raises(ValueError, match="not the model being trained"):
        CapturableUpdate(ema, ema)


def test_capturable_update_refuses_to_step_inside_swapped() -> None:
    model = bn_net()
    ema = polyak.ExponentialMovingAverage(model)
    update = CapturableUpdate(ema, model)
    update.step()
    update.sync()
    with ema.swapped(model), pytest.raises(RuntimeError, match="swapped"):
        update.step()


def test_gpu_module_is_reachable_from_the_package() -> None:
    assert polyak.gpu.CapturableUpdate is CapturableUpdate
    assert "gpu" in dir(polyak)


@cuda
@pytest.mark.timeout(120)
@pytest.mark.parametrize("interval", [1, 3])
def test_capturable_update_in_a_cuda_graph(interval: int) -> None:
    """Captured once (capture runs nothing), replayed after each change of the model: the
    average equals the float64 reference and ``update_parameters``'s."""
    momentum, steps = 0.2, 10
    model = bn_net(3, device="cuda")
    ref_model = copy.deepcopy(model)
    shipped_model = copy.deepcopy(model)
    shipped = polyak.ExponentialMovingAverage(shipped_model, momentum=momentum, interval=interval)
    captured = polyak.ExponentialMovingAverage(model, momentum=momentum, interval=interval)
    update = CapturableUpdate(captured, model)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        update.step()
    assert int(update.steps) == 0  # capturing ran nothing
    reference = reference_run(ref_model, interval, momentum, steps)
    for s in range(steps):
        train_like(model, s)
        train_like(shipped_model, s)
        graph.replay()
        shipped.update_parameters(shipped_model)
        ref = next(reference) if s else None
        torch.cuda.synchronize()
        module = captured.module.state_dict()
        for k, v in shipped.module.state_dict().items():
            torch.testing.assert_close(module[k], v, rtol=1e-6, atol=1e-7, msg=f"{k} at step {s}")
        if ref is not None:
            for k, v in ref.items():
                torch.testing.assert_close(module[k].to(v.dtype).cpu(), v.cpu(), rtol=0, atol=1e-5)
    assert update.sync() == steps
