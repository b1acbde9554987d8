"""State of an averaged model: the OpenMMLab layout, interoperability with the real mmengine
classes, atomic loads, bitwise resume, nesting in a parent module, deepcopy and pickle.

Expected values come from the real ``mmengine.model`` classes, from hand-written float64
references, or from an uninterrupted run that a resumed run must equal bitwise.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from polyak import (
    CosineEMA,
    ExponentialMovingAverage,
    MomentumAnnealingEMA,
    RampUpEMA,
    StochasticWeightAverage,
)

mm = pytest.importorskip("mmengine.model")

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
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def module_state(avg: nn.Module) -> dict[str, Tensor]:
    """The averaged model's tensors, keyed as in the plain model."""
    return {k: v.detach().clone() for k, v in avg.module.state_dict().items()}


def roundtrip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --------------------------------------------------------------------------------------------
# layout


@pytest.mark.parametrize("update_buffers", [False, True])
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (ExponentialMovingAverage, "ExponentialMovingAverage"),
        (MomentumAnnealingEMA, "MomentumAnnealingEMA"),
        (StochasticWeightAverage, "StochasticWeightAverage"),
    ],
    ids=["ema", "annealing", "swa"],
)
def test_state_dict_layout_matches_mmengine(ours, theirs: str, update_buffers: bool) -> None:
    model = make_net(0)
    kwargs = {} if ours is StochasticWeightAverage else {"momentum": 0.01}
    a = ours(model, update_buffers=update_buffers, **kwargs)
    b = getattr(mm, theirs)(model, update_buffers=update_buffers, **kwargs)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert set(sd_a) == set(sd_b)
    assert set(sd_a) == {"steps"} | {"module." + k for k in model.state_dict()}
    steps = sd_a["steps"]
    assert isinstance(steps, Tensor)
    assert steps.dtype == torch.int64 and steps.device.type == "cpu" and steps.dim() == 0
    assert steps.item() == 0
    for k, v in model.state_dict().items():
        assert torch.equal(sd_a["module." + k], v), k
        assert sd_a["module." + k].dtype == sd_b["module." + k].dtype, k
    a.update_parameters(model)
    a.update_parameters(model)
    steps = a.state_dict()["steps"]
    assert steps.dtype == torch.int64 and steps.device.type == "cpu" and steps.dim() == 0
    assert steps.item() == 2


# --------------------------------------------------------------------------------------------
# interoperability with the real mmengine classes


INTEROP = [
    ("ema", ExponentialMovingAverage, "ExponentialMovingAverage", {"momentum": 0.25}),
    ("annealing", MomentumAnnealingEMA, "MomentumAnnealingEMA", {"momentum": 0.01, "gamma": 3}),
    ("swa", StochasticWeightAverage, "StochasticWeightAverage", {}),
    ("swa-interval2", StochasticWeightAverage, "StochasticWeightAverage", {"interval": 2}),
]


@pytest.mark.parametrize(("ours", "theirs", "kwargs"), [x[1:] for x in INTEROP], ids=[x[0] for x in INTEROP])
@pytest.mark.parametrize("direction", ["mmengine-to-polyak", "polyak-to-mmengine"])
def test_state_dict_moves_between_mmengine_and_polyak(ours, theirs: str, kwargs: dict, direction: str) -> None:
    src = make_net(0)
    mm_cls = getattr(mm, theirs)
    if direction == "mmengine-to-polyak":
        writer = mm_cls(make_net(1), **kwargs)
        reader = ours(make_net(2), **kwargs)
    else:
        writer = ours(make_net(1), **kwargs)
        reader = mm_cls(make_net(2), **kwargs)
    for i in range(4):
        set_values(src, i + 1)
        writer.update_parameters(src)
    sd = roundtrip(writer.state_dict())
    result = reader.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert int(reader.steps) == int(writer.steps) == 4
    assert_same_state(module_state(reader), module_state(writer))
    # Both continue the same way: the steps counter (which the annealed momentum and the SWA
    # count depend on) came across. Different kernels (mmengine's add_ against lerp_) differ
    # by float32 rounding only.
    for i in range(4, 8):
        set_values(src, i + 1)
        writer.update_parameters(src)
        reader.update_parameters(src)
    assert int(reader.steps) == int(writer.steps) == 8
    a, b = module_state(reader), module_state(writer)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_mmengine_averaged_model_inside_parent_loads_into_polyak_parent() -> None:
    class Holder(nn.Module):
        def __init__(self, ema: nn.Module) -> None:
            super().__init__()
            self.generator_ema = ema

    src = make_net(0)
    theirs = Holder(mm.ExponentialMovingAverage(make_net(1), momentum=0.25))
    for i in range(3):
        set_values(src, i + 1)
        theirs.generator_ema.update_parameters(src)
    ours = Holder(ExponentialMovingAverage(make_net(2), momentum=0.25))
    ours.load_state_dict(roundtrip(theirs.state_dict()))
    assert ours.generator_ema.steps == 3
    assert_same_state(module_state(ours.generator_ema), module_state(theirs.generator_ema))


# --------------------------------------------------------------------------------------------
# legacy and partial state dicts


def test_keys_without_module_prefix_load() -> None:
    """OpenMMLab 1.0 kept the EMA weights as a plain module: no ``module.`` prefix."""
    donor = make_net(5)
    sd = dict(donor.state_dict())
    sd["steps"] = torch.tensor(7)
    ema = ExponentialMovingAverage(make_net(0), momentum=0.25)
    ema.load_state_dict(sd)
    assert ema.steps == 7
    assert_same_state(module_state(ema), {k: v.clone() for k, v in donor.state_dict().items()})


def test_missing_steps_loads_with_warning_and_steps_zero() -> None:
    src = make_net(0)
    ema = ExponentialMovingAverage(src, momentum=0.25)
    for i in range(3):
        set_values(src, i + 1)
        ema.update_parameters(src)
    donor = make_net(5)
    sd = {"module." + k: v for k, v in donor.state_dict().items()}
    with pytest.warns(UserWarning, match="steps"):
        ema.load_state_dict(sd)
    assert ema.steps == 0
    assert_same_state(module_state(ema), state_copy(donor))
    # steps == 0: the next update re-initialises the average from the model
    set_values(src, 10)
    ema.update_parameters(src)
    assert_same_state(module_state(ema), state_copy(src))
    assert ema.steps == 1


def test_legacy_keys_without_steps_load_with_warning() -> None:
    donor = make_net(5)
    ema = ExponentialMovingAverage(make_net(0), momentum=0.25)
    with pytest.warns(UserWarning, match="steps"):
        ema.load_state_dict(dict(donor.state_dict()))
    assert ema.steps == 0
    assert_same_state(module_state(ema), state_copy(donor))


def test_complete_state_loads_without_warning() -> None:
    src = make_net(0)
    ema = ExponentialMovingAverage(src, momentum=0.25)
    ema.update_parameters(src)
    other = ExponentialMovingAverage(make_net(1), momentum=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(ema.state_dict())
    assert other.steps == 1


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_load_keeps_the_averages_dtype_and_device(file_dtype: torch.dtype) -> None:
    model = make_net(0, torch.bfloat16)
    ema = ExponentialMovingAverage(model, momentum=0.25)  # fp32 average of a bf16 model
    assert ema.module.body.weight.dtype == torch.float32
    weight_obj = ema.module.body.weight
    donor = make_net(5, torch.float64)
    set_values(donor, 5)
    sd = {"module." + k: (v.to(file_dtype) if v.is_floating_point() else v) for k, v in donor.state_dict().items()}
    sd["steps"] = torch.tensor(4)
    ema.load_state_dict(sd)
    for k, v in ema.module.state_dict().items():
        expected = sd["module." + k]
        if expected.is_floating_point():
            assert v.dtype == torch.float32, k
            assert torch.equal(v, expected.to(torch.float32)), k
        else:
            assert v.dtype == expected.dtype and torch.equal(v, expected), k
        assert v.device.type == "cpu", k
    assert ema.module.body.weight is weight_obj  # loaded in place, not replaced
    # and it keeps averaging from the loaded values: avg + m * (x - avg), by hand in float64
    loaded = {k: v.to(torch.float64) for k, v in module_state(ema).items() if v.is_floating_point()}
    set_values(model, 9)
    x = {k: v.to(torch.float64) for k, v in model.state_dict().items() if v.is_floating_point()}
    ema.update_parameters(model)
    for name, _ in model.named_parameters():
        expected = loaded[name] + 0.25 * (x[name] - loaded[name])
        torch.testing.assert_close(ema.module.get_parameter(name).double(), expected, atol=1e-6, rtol=0)
    assert ema.steps == 5


# --------------------------------------------------------------------------------------------
# failed loads change nothing


def _good_state() -> dict[str, object]:
    """A valid state dict with other values everywhere (and steps 99)."""
    src = make_net(5)
    other = ExponentialMovingAverage(make_net(6), momentum=0.25)
    set_values(src, 42)
    other.update_parameters(src)
    sd: dict[str, object] = dict(other.state_dict())
    sd["steps"] = torch.tensor(99)
    return sd


def _wrong_shape(sd: dict) -> None:
    sd["module.head.weight"] = torch.zeros(3, 4)


def _missing_key(sd: dict) -> None:
    del sd["module.head.bias"]


def _float_into_int_buffer(sd: dict) -> None:
    sd["module.bn.num_batches_tracked"] = torch.tensor(3.5)


def _non_tensor_value(sd: dict) -> None:
    sd["module.head.bias"] = [0.0, 0.0]


def _float_steps(sd: dict) -> None:
    sd["steps"] = torch.tensor(3.5)


def _vector_steps(sd: dict) -> None:
    sd["steps"] = torch.tensor([3, 4])


def _unexpected_key(sd: dict) -> None:
    sd["module.extra.weight"] = torch.zeros(2)


BAD_LOADS = [
    (_wrong_shape, True),
    (_wrong_shape, False),
    (_missing_key, True),
    (_float_into_int_buffer, True),
    (_float_into_int_buffer, False),
    (_non_tensor_value, True),
    (_float_steps, True),
    (_vector_steps, True),
    (_unexpected_key, True),
]


@pytest.mark.parametrize(
    ("corrupt", "strict"), BAD_LOADS, ids=[f"{c.__name__.strip('_')}-strict={s}" for c, s in BAD_LOADS]
)
def test_failed_load_raises_and_changes_nothing(corrupt: Callable[[dict], None], strict: bool) -> None:
    src = make_net(0)
    ema = ExponentialMovingAverage(src, momentum=0.25)
    for i in range(3):
        set_values(src, i + 1)
        ema.update_parameters(src)
    before = state_copy(ema)
    sd = _good_state()
    corrupt(sd)
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        ema.load_state_dict(sd, strict=strict)
    assert ema.steps == 3
    assert_same_state(before, state_copy(ema))
    # and the average still works
    set_values(src, 4)
    ema.update_parameters(src)
    assert ema.steps == 4


# --------------------------------------------------------------------------------------------
# resume


RESUMABLE: list[tuple[str, Callable[[nn.Module], nn.Module], torch.dtype]] = [
    ("ema-interval3", lambda m: ExponentialMovingAverage(m, momentum=0.125, interval=3), torch.float32),
    (
        "ema-interval3-buffers",
        lambda m: ExponentialMovingAverage(m, momentum=0.125, interval=3, update_buffers=True),
        torch.float32,
    ),
    ("annealing", lambda m: MomentumAnnealingEMA(m, momentum=0.01, gamma=4), torch.float32),
    ("annealing-interval2", lambda m: MomentumAnnealingEMA(m, momentum=0.01, gamma=4, interval=2), torch.float32),
    ("swa", lambda m: StochasticWeightAverage(m), torch.float32),
    ("swa-interval2", lambda m: StochasticWeightAverage(m, interval=2), torch.float32),
    (
        "rampup-start2",
        lambda m: RampUpEMA(m, start_iter=2, ema_kimg=0.01, ema_rampup=0.5, batch_size=4),
        torch.float32,
    ),
    ("rampup", lambda m: RampUpEMA(m, ema_kimg=0.01, ema_rampup=0.5, batch_size=4), torch.float32),
    ("cosine", lambda m: CosineEMA(m, momentum=0.2, end_momentum=0.01, max_steps=6), torch.float32),
    ("ema-bf16-source", lambda m: ExponentialMovingAverage(m, momentum=0.125), torch.bfloat16),
]
TOTAL = 8


@pytest.mark.parametrize("n_before", [1, 2, 4])
@pytest.mark.parametrize(("factory", "dtype"), [x[1:] for x in RESUMABLE], ids=[x[0] for x in RESUMABLE])
def test_resume_is_bitwise_equal_to_uninterrupted(factory, dtype: torch.dtype, n_before: int) -> None:
    # uninterrupted
    src = make_net(0, dtype)
    whole = factory(make_net(0, dtype))
    for i in range(TOTAL):
        set_values(src, 100 + i)
        whole.update_parameters(src)

    # N updates, save through torch.save/torch.load(weights_only=True), then a fresh average
    # built from a fresh model, a fresh source model, and M more updates
    src = make_net(0, dtype)
    first = factory(make_net(0, dtype))
    for i in range(n_before):
        set_values(src, 100 + i)
        first.update_parameters(src)
    saved = roundtrip(first.state_dict())
    del first

    src = make_net(11, dtype)
    resumed = factory(make_net(12, dtype))
    resumed.load_state_dict(saved)
    for i in range(n_before, TOTAL):
        set_values(src, 100 + i)
        resumed.update_parameters(src)

    assert resumed.steps == whole.steps
    assert_same_state(state_copy(resumed), state_copy(whole))


def test_rampup_resume_inside_copy_phase_keeps_copying() -> None:
    """RampUpEMA(start_iter=2): after one call (inside the copy phase) and a resume, the next
    call still only copies, and averaging starts at the call after."""
    src = make_net(0)
    ema = RampUpEMA(make_net(0), start_iter=2, ema_kimg=0.01, ema_rampup=0.5, batch_size=4)
    set_values(src, 1)
    ema.update_parameters(src)
    saved = roundtrip(ema.state_dict())
    resumed = RampUpEMA(make_net(3), start_iter=2, ema_kimg=0.01, ema_rampup=0.5, batch_size=4)
    resumed.load_state_dict(saved)
    set_values(src, 2)
    resumed.update_parameters(src)  # second call of the copy phase
    assert resumed.steps == 0
    assert_same_state(module_state(resumed), state_copy(src))


# --------------------------------------------------------------------------------------------
# serialisation


def test_torch_save_load_weights_only_round_trip() -> None:
    src = make_net(0)
    ema = MomentumAnnealingEMA(src, momentum=0.01, gamma=4, update_buffers=True)
    for i in range(5):
        set_values(src, i + 1)
        ema.update_parameters(src)
    sd = ema.state_dict()
    loaded = roundtrip(sd)
    assert list(loaded) == list(sd)
    for k in sd:
        assert loaded[k].dtype == sd[k].dtype and loaded[k].shape == sd[k].shape
        assert torch.equal(loaded[k], sd[k])
    fresh = MomentumAnnealingEMA(make_net(3), momentum=0.01, gamma=4, update_buffers=True)
    fresh.load_state_dict(loaded)
    assert fresh.steps == 5
    assert_same_state(state_copy(fresh), state_copy(ema))


# --------------------------------------------------------------------------------------------
# inside a parent module (mmagic keeps ``generator_ema`` inside the GAN)


class GAN(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.generator = make_net(seed)
        self.generator_ema = ExponentialMovingAverage(self.generator, momentum=0.25)
        self.discriminator = nn.Linear(2, 1)


def test_parent_state_dict_round_trips_steps() -> None:
    gan = GAN(0)
    for i in range(3):
        set_values(gan.generator, i + 1)
        gan.generator_ema.update_parameters(gan.generator)
    sd = gan.state_dict()
    assert "generator_ema.steps" in sd
    steps = sd["generator_ema.steps"]
    assert steps.dtype == torch.int64 and steps.dim() == 0 and steps.item() == 3
    expected_ema_keys = {"generator_ema.module." + k for k in gan.generator.state_dict()}
    assert expected_ema_keys <= set(sd)

    fresh = GAN(1)
    result = fresh.load_state_dict(roundtrip(sd))
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.generator_ema.steps == 3
    assert_same_state(state_copy(fresh), state_copy(gan))

    # and both continue identically
    for i in range(3, 6):
        for g in (gan, fresh):
            set_values(g.generator, i + 1)
            g.generator_ema.update_parameters(g.generator)
    assert fresh.generator_ema.steps == gan.generator_ema.steps == 6
    assert_same_state(state_copy(fresh), state_copy(gan))


@pytest.mark.parametrize(
    "spoil",
    ["bad shape", "not a tensor", "float steps", "missing key", "unexpected key"],
)
def test_a_bad_state_through_the_parent_changes_nothing_in_the_average(spoil: str) -> None:
    """Loaded as a submodule (``_load_from_state_dict``), the average is checked as
    ``load_state_dict`` checks it: a bad key or value raises and the average, its counters
    included, stays bit-identical."""
    gan = GAN(0)
    for i in range(3):
        set_values(gan.generator, i + 1)
        gan.generator_ema.update_parameters(gan.generator)
    good = GAN(1)
    for i in range(5):
        set_values(good.generator, 10 * i + 1)
        good.generator_ema.update_parameters(good.generator)
    sd = dict(good.state_dict())
    key = next(k for k in sd if k.startswith("generator_ema.module.") and sd[k].is_floating_point())
    if spoil == "bad shape":
        sd[key] = torch.zeros(*sd[key].shape, 2)
    elif spoil == "not a tensor":
        sd[key] = [1.0]
    elif spoil == "float steps":
        sd["generator_ema.steps"] = torch.tensor(2.5)
    elif spoil == "missing key":
        del sd[key]
    else:
        sd["generator_ema.module.extra"] = torch.zeros(1)
    before = state_copy(gan.generator_ema)
    with pytest.raises(RuntimeError):
        gan.load_state_dict(sd)
    assert gan.generator_ema.steps == 3
    assert_same_state(state_copy(gan.generator_ema), before)


def test_parent_loads_legacy_ema_keys() -> None:
    """OpenMMLab 1.0 checkpoints: ``generator_ema.<name>`` without ``module.``."""
    donor = make_net(7)
    sd = {"generator." + k: v for k, v in make_net(8).state_dict().items()}
    sd.update({"generator_ema." + k: v for k, v in donor.state_dict().items()})
    sd["generator_ema.steps"] = torch.tensor(12)
    sd.update({"discriminator." + k: v for k, v in nn.Linear(2, 1).state_dict().items()})
    keys = list(sd)
    gan = GAN(0)
    result = gan.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert gan.generator_ema.steps == 12
    assert_same_state(module_state(gan.generator_ema), state_copy(donor))
    assert list(sd) == keys  # the caller's dict is not rewritten


def test_parent_load_without_steps_warns_and_resets_steps() -> None:
    """Loading an average without ``steps`` through its parent behaves as loading it
    directly: a warning, and ``steps`` 0 (the next update re-initialises from the model)."""
    gan = GAN(0)
    for i in range(3):
        set_values(gan.generator, i + 1)
        gan.generator_ema.update_parameters(gan.generator)
    donor = make_net(7)
    sd = {k: v for k, v in gan.state_dict().items() if not k.startswith("generator_ema.")}
    sd.update({"generator_ema." + k: v for k, v in donor.state_dict().items()})  # 1.0 layout, no steps
    with pytest.warns(UserWarning, match="steps"):
        gan.load_state_dict(sd)
    assert gan.generator_ema.steps == 0
    assert_same_state(module_state(gan.generator_ema), state_copy(donor))


# --------------------------------------------------------------------------------------------
# copies


def _deepcopy(obj):
    return copy.deepcopy(obj)


def _pickle(obj):
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("clone", [_deepcopy, _pickle], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_copy_is_independent_and_keeps_averaging(clone, src_dtype: torch.dtype) -> None:
    src = make_net(0, src_dtype)
    ema = ExponentialMovingAverage(src, momentum=0.25, update_buffers=True)
    names = [n for n, t in src.state_dict().items() if t.is_floating_point()]

    def snap() -> dict[str, Tensor]:
        sd = src.state_dict()
        return {n: sd[n].to(torch.float64).clone() for n in names}

    snaps = []
    for i in range(2):
        set_values(src, i + 1)
        snaps.append(snap())
        ema.update_parameters(src)
    twin = clone(ema)
    assert twin is not ema and twin.module is not ema.module
    assert twin.steps == 2
    assert_same_state(state_copy(twin), state_copy(ema))
    for a, b in zip(twin.module.parameters(), ema.module.parameters(), strict=True):
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    original = state_copy(ema)

    # updating the copy leaves the original alone, and the copy's numbers are right
    for i in range(2, 5):
        set_values(src, i + 1)
        snaps.append(snap())
        twin.update_parameters(src)
    assert ema.steps == 2
    assert_same_state(original, state_copy(ema))
    ref = {k: v.clone() for k, v in snaps[0].items()}
    for s in snaps[1:]:
        ref = {k: ref[k] + 0.25 * (s[k] - ref[k]) for k in ref}
    twin_sd = twin.module.state_dict()
    for k in names:
        torch.testing.assert_close(twin_sd[k].double(), ref[k], atol=2e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert twin.steps == 5

    # and updating the original leaves the copy alone
    twin_state = state_copy(twin)
    set_values(src, 50)
    ema.update_parameters(src)
    assert_same_state(twin_state, state_copy(twin))
