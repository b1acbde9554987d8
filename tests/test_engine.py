"""The averaging engine: name matching, wrappers, binding, dtypes, staging, flattening.

Every expected value is computed here by hand (float64 loops over the steps) or by comparing
two polyak runs that must agree bitwise (a wrapped source against the plain one); nothing is
read back from the code under test to build an expectation.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn

import polyak
import polyak.engine as engine_mod
from polyak import ExponentialMovingAverage, flatten_parameters
from polyak.engine import AveragingEngine
from polyak.tensors import canonical_name, named_state, unwrap_model

# --------------------------------------------------------------------------------------------
# helpers


def make_net(seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 4, head: str = "head") -> nn.Module:
    """Linear + BatchNorm1d + ReLU + Linear with named children (``body``, ``bn``, ``head``)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        OrderedDict(
            [
                ("body", nn.Linear(3, hidden)),
                ("bn", nn.BatchNorm1d(hidden)),
                ("act", nn.ReLU()),
                (head, nn.Linear(hidden, 2)),
            ]
        )
    )
    return net.to(dtype)


@torch.no_grad()
def set_values(model: nn.Module, seed: int) -> None:
    """Give every tensor of ``model`` new values drawn in float64 (then cast to its dtype).

    Parameters get N(0, 1), floating buffers U(0.5, 1.5) (a valid running_var), integer
    buffers ``seed * 1000 + 7``.
    """
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    for b in model.buffers():
        if b.is_floating_point():
            b.copy_(torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5)
        else:
            b.fill_(seed * 1000 + 7)


def plain(model: nn.Module) -> nn.Module:
    return model


def compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model, backend="eager")


def data_parallel(model: nn.Module) -> nn.Module:
    return nn.DataParallel(model)


def checkpoint_wrapped(model: nn.Module) -> nn.Module:
    """A new container over ``model``'s own children with every Linear wrapped by activation
    checkpointing (names gain ``_checkpoint_wrapped_module``; the tensors are shared)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    return nn.Sequential(
        OrderedDict(
            (name, checkpoint_wrapper(child) if isinstance(child, nn.Linear) else child)
            for name, child in model.named_children()
        )
    )


def averaged_names(model: nn.Module, update_buffers: bool) -> list[str]:
    """Names (as in a plain model's state_dict) of the tensors an average moves."""
    names = [n for n, p in model.named_parameters() if p.is_floating_point()]
    if update_buffers:
        names += [n for n, b in model.named_buffers() if b.is_floating_point()]
    return names


def f64(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """The named tensors of ``model`` as float64 (exact for every float dtype)."""
    sd = model.state_dict()
    return {n: sd[n].detach().to(torch.float64).clone() for n in names}


def ref_ema(snapshots: list[dict[str, Tensor]], momentum: float) -> dict[str, Tensor]:
    """EMA of a list of snapshots by hand in float64: the first is copied, then
    ``avg = avg + m * (x - avg)`` for each later one."""
    avg = {k: v.clone() for k, v in snapshots[0].items()}
    for snap in snapshots[1:]:
        for k in avg:
            avg[k] = avg[k] + momentum * (snap[k] - avg[k])
    return avg


def state_copy(avg: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in avg.state_dict().items()}


def assert_same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def assert_matches_ref(avg_module: nn.Module, ref: dict[str, Tensor], atol: float, rtol: float = 0.0) -> None:
    sd = avg_module.state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(sd[k].to(torch.float64), v, atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------------------------
# canonical names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("weight", "weight"),
        ("layer1.weight", "layer1.weight"),
        # DistributedDataParallel / DataParallel, also nested
        ("module.layer1.weight", "layer1.weight"),
        ("module.module.layer1.weight", "layer1.weight"),
        # torch.compile: _orig_mod anywhere
        ("_orig_mod.layer1.weight", "layer1.weight"),
        ("block._orig_mod.conv.weight", "block.conv.weight"),
        ("module._orig_mod.layer1.weight", "layer1.weight"),
        ("_orig_mod.module.layer1.weight", "layer1.weight"),
        # FSDP1
        ("_fsdp_wrapped_module.layer1.weight", "layer1.weight"),
        ("_fsdp_wrapped_module.layer1._fsdp_wrapped_module.weight", "layer1.weight"),
        # activation checkpointing
        ("layer1._checkpoint_wrapped_module.weight", "layer1.weight"),
        ("_checkpoint_wrapped_module.layer1.bn.running_mean", "layer1.bn.running_mean"),
        # all of them at once (the docstring's example)
        ("module._orig_mod.layer1._checkpoint_wrapped_module.weight", "layer1.weight"),
        (
            "module._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module._orig_mod.attn.qkv.bias",
            "blocks.0.attn.qkv.bias",
        ),
    ],
)
def test_canonical_name_strips_wrapper_prefixes(name: str, expected: str) -> None:
    assert canonical_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "encoder.module.weight",  # a user submodule called "module", not in leading position
        "blocks.module.0.bias",
        "module",  # a lone name is never emptied
        "my_orig_mod.weight",  # only whole components are wrapper names
        "layer._orig_mod_x.weight",
    ],
)
def test_canonical_name_keeps_user_components(name: str) -> None:
    assert canonical_name(name) == name


@pytest.mark.parametrize("wrap", [compiled, data_parallel, checkpoint_wrapped], ids=lambda f: f.__name__)
def test_named_state_of_real_wrappers_matches_plain_model(wrap) -> None:
    model = make_net(0)
    expected = [n for n, _ in itertools.chain(model.named_parameters(), model.named_buffers())]
    wrapped = wrap(model)
    raw = [n for n, _ in itertools.chain(wrapped.named_parameters(), wrapped.named_buffers())]
    assert sorted(raw) != sorted(expected)  # the wrapper really renames
    state = named_state(wrapped)
    assert sorted(state) == sorted(expected)
    for name, entry in state.items():
        own = model.get_buffer(name) if entry.is_buffer else model.get_parameter(name)
        assert entry.tensor is own


def test_unwrap_model_peels_compile_and_data_parallel() -> None:
    model = make_net(0)
    assert unwrap_model(model) is model
    assert unwrap_model(compiled(model)) is model
    assert unwrap_model(data_parallel(model)) is model
    assert unwrap_model(compiled(data_parallel(model))) is model
    assert unwrap_model(data_parallel(compiled(model))) is model


# --------------------------------------------------------------------------------------------
# wrapped sources and wrapped constructors


@pytest.mark.parametrize("wrap", [compiled, data_parallel, checkpoint_wrapped], ids=lambda f: f.__name__)
@pytest.mark.parametrize("update_buffers", [False, True])
def test_wrapped_source_gives_same_numbers_as_plain(wrap, update_buffers: bool) -> None:
    src = make_net(0)
    ema_plain = ExponentialMovingAverage(src, momentum=0.25, update_buffers=update_buffers)
    ema_wrapped = ExponentialMovingAverage(src, momentum=0.25, update_buffers=update_buffers)
    src_wrapped = wrap(src)  # shares src's tensors
    names = averaged_names(make_net(0), update_buffers)
    snaps = []
    for step in range(5):
        set_values(src, step + 1)
        snaps.append(f64(src, names))
        ema_plain.update_parameters(src)
        ema_wrapped.update_parameters(src_wrapped)
        assert_same_state(state_copy(ema_plain), state_copy(ema_wrapped))
    # and both are right, not merely equal to each other
    assert_matches_ref(ema_wrapped.module, ref_ema(snaps, 0.25), atol=1e-6)
    # the integer buffer was copied from the source
    assert ema_wrapped.module.bn.num_batches_tracked.item() == 5 * 1000 + 7


@pytest.mark.parametrize("wrap", [compiled, data_parallel], ids=lambda f: f.__name__)
def test_average_built_from_wrapper_has_plain_keys(wrap) -> None:
    model = make_net(0)
    expected = ["steps"] + ["module." + k for k in model.state_dict()]
    ema = ExponentialMovingAverage(wrap(model), momentum=0.25)
    keys = list(ema.state_dict())
    assert sorted(keys) == sorted(expected)
    assert not any(part in k for k in keys for part in ("_orig_mod", "module.module", "_fsdp", "_checkpoint"))
    assert type(ema.module) is nn.Sequential  # the plain model, not the wrapper
    # and it averages a plain source and a wrapped source alike
    names = averaged_names(model, False)
    set_values(model, 3)
    snaps = [f64(model, names)]
    ema.update_parameters(model)
    set_values(model, 4)
    snaps.append(f64(model, names))
    ema.update_parameters(wrap(model))
    assert_matches_ref(ema.module, ref_ema(snaps, 0.25), atol=1e-6)


# --------------------------------------------------------------------------------------------
# mismatches fail before anything is written


def _renamed() -> nn.Module:
    return make_net(1, head="out")


def _reshaped() -> nn.Module:
    return make_net(1, hidden=5)


@pytest.mark.parametrize("prior_updates", [0, 1, 2], ids=["copy-call", "off-interval-call", "averaging-call"])
@pytest.mark.parametrize(
    ("bad_source", "fragments"),
    [
        (_renamed, ["'head.weight'", "'out.weight'"]),
        (_reshaped, ["'body.weight'", "(5, 3)", "(4, 3)"]),
    ],
    ids=["renamed", "reshaped"],
)
def test_mismatched_source_raises_and_changes_nothing(prior_updates: int, bad_source, fragments) -> None:
    src = make_net(0)
    ema = ExponentialMovingAverage(src, momentum=0.25, interval=2)
    for i in range(prior_updates):
        set_values(src, i + 1)
        ema.update_parameters(src)
    before = state_copy(ema)
    steps = ema.steps
    bad = bad_source()
    set_values(bad, 99)
    with pytest.raises(ValueError) as info:
        ema.update_parameters(bad)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert ema.steps == steps
    assert_same_state(before, state_copy(ema))
    # the average still works with the right source afterwards
    set_values(src, 50)
    ema.update_parameters(src)
    assert ema.steps == steps + 1


@pytest.mark.parametrize("what", ["sync_parameters", "sync_buffers", "copy_to", "average_"])
def test_mismatched_source_raises_in_every_entry_point(what: str) -> None:
    src = make_net(0)
    ema = ExponentialMovingAverage(src, momentum=0.25)
    ema.update_parameters(src)
    before = state_copy(ema)
    bad = _reshaped()
    bad_before = state_copy(bad)
    with pytest.raises(ValueError, match=r"body\.weight"):
        if what == "average_":
            ema.average_(bad, 0.5)
        else:
            getattr(ema, what)(bad)
    assert_same_state(before, state_copy(ema))
    assert_same_state(bad_before, state_copy(bad))


def test_integer_source_for_averaged_tensor_raises() -> None:
    class P(nn.Module):
        def __init__(self, dtype: torch.dtype) -> None:
            super().__init__()
            self.register_buffer("x", torch.zeros(3, dtype=dtype))
            self.w = nn.Parameter(torch.zeros(2))

    ema = ExponentialMovingAverage(P(torch.float32), momentum=0.25, update_buffers=True)
    ema.update_parameters(P(torch.float32))
    before = state_copy(ema)
    with pytest.raises(ValueError, match="'x'"):
        ema.update_parameters(P(torch.int64))
    assert_same_state(before, state_copy(ema))


@pytest.mark.parametrize("factory", [nn.ReLU, nn.Sequential, nn.Identity], ids=lambda f: f.__name__)
def test_nothing_to_average_raises(factory) -> None:
    with pytest.raises(ValueError, match="nothing to average"):
        ExponentialMovingAverage(factory(), momentum=0.25)
    with pytest.raises(ValueError, match="nothing to average"):
        AveragingEngine(factory()).average_(factory(), 0.5)


def test_non_module_source_raises_type_error() -> None:
    ema = ExponentialMovingAverage(make_net(0), momentum=0.25)
    with pytest.raises(TypeError):
        ema.update_parameters(make_net(0).state_dict())  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the binding follows conversions


@pytest.mark.parametrize("update_buffers", [False, True])
def test_binding_follows_source_dtype_conversions(update_buffers: bool) -> None:
    src = make_net(0)
    ema = ExponentialMovingAverage(src, momentum=0.25, update_buffers=update_buffers)
    names = averaged_names(src, update_buffers)
    snaps: list[dict[str, Tensor]] = []

    def step(seed: int) -> None:
        set_values(src, seed)
        snaps.append(f64(src, names))
        ema.update_parameters(src)
        assert ema.module.body.weight.dtype == torch.float32  # the average keeps its dtype
        # fp32 arithmetic against a float64 reference: a few ulps of O(1) values per step
        assert_matches_ref(ema.module, ref_ema(snaps, 0.25), atol=2e-6)
        # what is not averaged is a copy of the source, cast to the average's dtype
        if not update_buffers:
            assert torch.equal(ema.module.bn.running_mean, src.bn.running_mean.float())
            assert torch.equal(ema.module.bn.running_var, src.bn.running_var.float())
        assert ema.module.bn.num_batches_tracked.dtype == torch.int64
        assert ema.module.bn.num_batches_tracked.item() == seed * 1000 + 7

    step(1)
    step(2)
    src.to(torch.float64)
    step(3)
    step(4)
    src.half()
    step(5)
    src.float()
    step(6)
    src.to(torch.bfloat16)
    step(7)
    src.to(torch.float32)
    step(8)


def test_binding_follows_source_parameter_replacement() -> None:
    src = make_net(0)
    ema = ExponentialMovingAverage(src, momentum=0.25)
    names = averaged_names(src, False)
    set_values(src, 1)
    snaps = [f64(src, names)]
    ema.update_parameters(src)
    # replace a parameter's data and a buffer object outright
    src.body.weight.data = torch.randn(4, 3)
    src.bn.running_mean = torch.full((4,), 3.0)
    snaps.append(f64(src, names))
    ema.update_parameters(src)
    assert_matches_ref(ema.module, ref_ema(snaps, 0.25), atol=1e-6)
    assert torch.equal(ema.module.bn.running_mean, torch.full((4,), 3.0))


@pytest.mark.parametrize("how", ["data", "parameter"])
@pytest.mark.parametrize("which", ["body.bias", "bn.bias"])
def test_binding_follows_replacement_of_a_non_first_parameter(how: str, which: str) -> None:
    """Replacing one parameter that is not its module's first (``p.data = p.data.double()``,
    as recipes that keep biases or norm weights in higher precision do, or assigning a new
    Parameter) must rebind: the average of that tensor has to keep moving."""
    src = make_net(0)
    ema = ExponentialMovingAverage(src, momentum=0.25)
    names = averaged_names(src, False)
    set_values(src, 1)
    snaps = [f64(src, names)]
    ema.update_parameters(src)
    module_name, attr = which.rsplit(".", 1)
    owner = src.get_submodule(module_name)
    if how == "data":
        getattr(owner, attr).data = getattr(owner, attr).data.double()
    else:
        setattr(owner, attr, nn.Parameter(getattr(owner, attr).detach().double()))
    for seed in (2, 3):
        set_values(src, seed)
        snaps.append(f64(src, names))
        ema.update_parameters(src)
        assert_matches_ref(ema.module, ref_ema(snaps, 0.25), atol=2e-6)


def test_binding_follows_conversion_of_the_averaged_model() -> None:
    src = make_net(0)
    ema = ExponentialMovingAverage(src, momentum=0.25)
    names = averaged_names(src, False)
    snaps: list[dict[str, Tensor]] = []

    def step(seed: int, dtype: torch.dtype) -> None:
        set_values(src, seed)
        snaps.append(f64(src, names))
        ema.update_parameters(src)
        assert ema.module.body.weight.dtype == dtype
        assert_matches_ref(ema.module, ref_ema(snaps, 0.25), atol=2e-6)

    step(1, torch.float32)
    step(2, torch.float32)
    ema.to(torch.float64)
    step(3, torch.float64)
    step(4, torch.float64)
    ema.float()
    step(5, torch.float32)
    ema.to("cpu")
    step(6, torch.float32)
    ema.double()
    step(7, torch.float64)


def test_binding_follows_conversion_of_the_inner_module() -> None:
    """``ema.module`` is the plain averaged model; converting it directly (``ema.module.double()``)
    must not leave the engine writing into the tensors it replaced."""
    src = make_net(0)
    ema = ExponentialMovingAverage(src, momentum=0.25)
    names = averaged_names(src, False)
    snaps: list[dict[str, Tensor]] = []
    for seed in (1, 2):
        set_values(src, seed)
        snaps.append(f64(src, names))
        ema.update_parameters(src)
    ema.module.double()
    set_values(src, 3)
    snaps.append(f64(src, names))
    ema.update_parameters(src)
    assert ema.module.body.weight.dtype == torch.float64
    assert_matches_ref(ema.module, ref_ema(snaps, 0.25), atol=2e-6)


# --------------------------------------------------------------------------------------------
# buffers


@pytest.mark.parametrize("update_buffers", [False, True])
@pytest.mark.parametrize("interval", [1, 2])
def test_num_batches_tracked_is_copied_exactly(update_buffers: bool, interval: int) -> None:
    src = make_net(0)
    ema = ExponentialMovingAverage(src, momentum=0.25, interval=interval, update_buffers=update_buffers)
    names = averaged_names(src, update_buffers)
    snaps = []
    # values no float can hold exactly: averaging through a float would change them
    counts = [2**53 + 1, 2**60 + 3, 123_456_789_012_345_679, 7, 2**62 + 1]
    for i, count in enumerate(counts):
        set_values(src, i + 1)
        src.bn.num_batches_tracked.fill_(count)
        ema.update_parameters(src)
        assert ema.module.bn.num_batches_tracked.dtype == torch.int64
        assert ema.module.bn.num_batches_tracked.item() == count
        if i % interval == 0:
            snaps.append(f64(src, names))
    if interval == 1:
        assert_matches_ref(ema.module, ref_ema(snaps, 0.25), atol=1e-6)


class WithNonPersistent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.ones(2), persistent=False)
        self.register_buffer("table", torch.arange(4), persistent=False)
        self.register_buffer("stat", torch.zeros(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) * self.scale + self.stat


@pytest.mark.parametrize("update_buffers", [False, True])
def test_non_persistent_buffers_are_copied_and_not_saved(update_buffers: bool) -> None:
    src = WithNonPersistent()
    ema = ExponentialMovingAverage(src, momentum=0.25, update_buffers=update_buffers)
    keys = set(ema.state_dict())
    assert keys == {"steps", "module.lin.weight", "module.lin.bias", "module.stat"}
    ema.update_parameters(src)
    stat_snaps = [src.stat.double().clone()]
    for i in range(3):
        with torch.no_grad():
            src.scale.copy_(torch.tensor([2.0 + i, -1.0 - i]))
            src.table.copy_(torch.tensor([5, 6, 7, 8 + i]))
            src.stat.copy_(torch.tensor([1.0 + i, 3.0 * i]))
        stat_snaps.append(src.stat.double().clone())
        ema.update_parameters(src)
        # never averaged, always the source's current value
        assert torch.equal(ema.module.scale, src.scale)
        assert torch.equal(ema.module.table, src.table)
    if update_buffers:  # the persistent floating buffer is averaged
        expected = stat_snaps[0]
        for s in stat_snaps[1:]:
            expected = expected + 0.25 * (s - expected)
        torch.testing.assert_close(ema.module.stat.double(), expected, atol=1e-6, rtol=0)
    else:
        assert torch.equal(ema.module.stat, src.stat)
    assert set(ema.state_dict()) == keys


# --------------------------------------------------------------------------------------------
# flatten_parameters


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


def test_flatten_parameters_keeps_values_identity_and_flags() -> None:
    model = mlp(0)
    model[2].bias.requires_grad_(False)
    params = list(model.parameters())
    values = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    out = flatten_parameters(model)
    assert out is model
    after = list(model.parameters())
    assert len(after) == len(params)
    assert all(a is b for a, b in zip(after, params, strict=True))
    assert [p.requires_grad for p in after] == flags
    assert all(isinstance(p, nn.Parameter) and p.is_leaf for p in after)
    for p, v in zip(after, values, strict=True):
        assert p.dtype == v.dtype and p.shape == v.shape
        assert torch.equal(p, v)
    # one buffer: every parameter lives in the same storage, one after the other
    storages = {p.untyped_storage().data_ptr() for p in after}
    assert len(storages) == 1
    offsets = [p.storage_offset() for p in after]
    sizes = [p.numel() for p in after]
    assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]


def test_flatten_parameters_keeps_training_behaviour() -> None:
    flat = mlp(0)
    ref = copy.deepcopy(flat)
    flatten_parameters(flat)
    opt_flat = torch.optim.SGD(flat.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(8, 3, generator=g)
        y = torch.randn(8, 2, generator=g)
        for model, opt in ((flat, opt_flat), (ref, opt_ref)):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
    for a, b in zip(flat.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a.grad, b.grad)
    # the parameters still share the flat buffer after the optimizer steps
    assert len({p.untyped_storage().data_ptr() for p in flat.parameters()}) == 1


@pytest.mark.parametrize("flatten_average", [False, True])
@pytest.mark.parametrize("interval", [1, 3])
def test_average_of_flattened_model_equals_unflattened(flatten_average: bool, interval: int) -> None:
    flat = mlp(0)
    ref = copy.deepcopy(flat)
    flatten_parameters(flat)
    ema_flat = ExponentialMovingAverage(flat, momentum=0.125, interval=interval)
    if flatten_average:
        flatten_parameters(ema_flat.module)  # before the first update: both sides laid out
    ema_ref = ExponentialMovingAverage(ref, momentum=0.125, interval=interval)
    names = [n for n, _ in ref.named_parameters()]
    snaps = []
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (flat, ref)]
    g = torch.Generator().manual_seed(1)
    for step in range(7):
        x = torch.randn(4, 3, generator=g)
        for model, opt in zip((flat, ref), opts, strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        ema_flat.update_parameters(flat)
        ema_ref.update_parameters(ref)
        if step % interval == 0:
            snaps.append(f64(ref, names))
        assert_same_state(state_copy(ema_flat), state_copy(ema_ref))
    if interval == 1:
        assert_matches_ref(ema_flat.module, ref_ema(snaps, 0.125), atol=1e-6)


def test_flatten_parameters_groups_by_dtype() -> None:
    model = mlp(0)
    model[4].to(torch.float64)
    flatten_parameters(model)
    by_dtype: dict[torch.dtype, set[int]] = {}
    for p in model.parameters():
        by_dtype.setdefault(p.dtype, set()).add(p.untyped_storage().data_ptr())
    assert {k: len(v) for k, v in by_dtype.items()} == {torch.float32: 1, torch.float64: 1}


# --------------------------------------------------------------------------------------------
# staging: an average whose dtype differs from the model's


@pytest.fixture(
    params=[(None, None), (5, None), (None, 0), (5, 0), (7, 16)],
    ids=["defaults", "chunk-5", "no-gather", "chunk-5-no-gather", "chunk-7-gather-16"],
)
def engine_limits(request, monkeypatch) -> None:
    """Run with the engine's default plan limits and with tiny ones, so that a tiny model
    goes through every planning path (many staging chunks per tensor, gathering off, and a
    mix of gathered and staged tensors). The limits are module attributes of the engine."""
    chunk, gather = request.param
    for attr, value in (("STAGING_CHUNK", chunk), ("GATHER_MAX_NUMEL", gather)):
        if value is None:
            continue
        if not hasattr(engine_mod, attr):
            pytest.skip(f"polyak.engine has no {attr} any more")
        monkeypatch.setattr(engine_mod, attr, value)
    if gather is not None:
        monkeypatch.setattr(engine_mod, "GATHER_MIN_RUN", 2)  # gather this small model's short runs too


def wide_net(seed: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).to(dtype)


@pytest.mark.usefixtures("engine_limits")
@pytest.mark.parametrize("update_buffers", [False, True])
def test_fp32_average_of_bf16_model_matches_float64_reference(update_buffers: bool) -> None:
    src = wide_net(0, torch.bfloat16)
    momentum = 0.01  # a bf16 average would not move at all at this momentum
    ema = ExponentialMovingAverage(src, momentum=momentum, update_buffers=update_buffers)
    assert ema.module[0].weight.dtype == torch.float32
    names = averaged_names(src, update_buffers)
    snaps = []
    for step in range(12):
        set_values(src, step + 1)
        snaps.append(f64(src, names))  # bf16 values, exact in float64
        ema.update_parameters(src)
    ref = ref_ema(snaps, momentum)
    # Tolerance: fp32 rounding of O(1) values over 12 steps (about 12 * 6e-8); bf16 resolution
    # near 1 is 4e-3, so an average kept in (or rounded through) bf16 would fail by far.
    assert_matches_ref(ema.module, ref, atol=2e-6)
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float32, k
    if not update_buffers:
        assert torch.equal(ema.module[1].running_mean, src[1].running_mean.float())


@pytest.mark.usefixtures("engine_limits")
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float64_average_matches_float64_reference(src_dtype: torch.dtype) -> None:
    src = wide_net(0, src_dtype)
    ema = ExponentialMovingAverage(src, momentum=0.3, dtype=torch.float64, update_buffers=True)
    assert ema.module[0].weight.dtype == torch.float64
    assert ema.module[1].num_batches_tracked.dtype == torch.int64
    names = averaged_names(src, True)
    snaps = []
    for step in range(10):
        set_values(src, step + 1)
        snaps.append(f64(src, names))
        ema.update_parameters(src)
    # Both sides compute in float64 from the same (exactly widened) inputs; the only freedom
    # is lerp's formula, a couple of float64 ulps.
    assert_matches_ref(ema.module, ref_ema(snaps, 0.3), atol=1e-12, rtol=1e-12)
    assert ema.module[1].num_batches_tracked.item() == 10 * 1000 + 7


@pytest.mark.usefixtures("engine_limits")
def test_staging_with_non_contiguous_parameters() -> None:
    src = wide_net(0, torch.bfloat16)
    with torch.no_grad():  # a transposed (non-contiguous) weight on both sides
        src[0].weight = nn.Parameter(torch.randn(16, 8, dtype=torch.bfloat16).t())
    assert not src[0].weight.is_contiguous()
    ema = ExponentialMovingAverage(src, momentum=0.25)
    names = averaged_names(src, False)
    snaps = []
    for step in range(4):
        set_values(src, step + 1)
        snaps.append(f64(src, names))
        ema.update_parameters(src)
    assert_matches_ref(ema.module, ref_ema(snaps, 0.25), atol=1e-6)


# --------------------------------------------------------------------------------------------
# float and tensor weights


@pytest.mark.usefixtures("engine_limits")
@pytest.mark.parametrize(
    ("src_dtype", "avg_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float32),
        (torch.float32, torch.float64),
        (torch.float64, torch.float64),
    ],
)
def test_float_and_tensor_weight_give_identical_results(src_dtype: torch.dtype, avg_dtype: torch.dtype) -> None:
    src = make_net(0, src_dtype)
    a = ExponentialMovingAverage(src, momentum=0.25, dtype=avg_dtype, update_buffers=True)
    b = ExponentialMovingAverage(src, momentum=0.25, dtype=avg_dtype, update_buffers=True)
    names = averaged_names(src, True)
    snaps = [f64(src, names)]
    weights = [0.3, 0.7, 1e-3, 0.5, 1 / 3]
    for i, w in enumerate(weights):
        set_values(src, i + 1)
        snaps.append(f64(src, names))
        a.average_(src, w)
        b.average_(src, torch.tensor(w, dtype=avg_dtype))  # 0-d, on the average's device
        assert_same_state(state_copy(a), state_copy(b))
    assert a.steps == 0 and b.steps == 0  # average_ does not count
    # hand reference with the same weights
    ref = dict(snaps[0])
    for w, snap in zip(weights, snaps[1:], strict=True):
        ref = {k: ref[k] + w * (snap[k] - ref[k]) for k in ref}
    assert_matches_ref(a.module, ref, atol=2e-6)


def test_engine_direct_float_and_tensor_weight() -> None:
    target_a = make_net(0)
    target_b = copy.deepcopy(target_a)
    src = make_net(1)
    eng_a = AveragingEngine(target_a)
    eng_b = AveragingEngine(target_b)
    names = averaged_names(src, False)
    expected = f64(target_a, names)
    for i, w in enumerate([0.1, 0.9, 0.25]):
        set_values(src, i + 10)
        snap = f64(src, names)
        eng_a.average_(src, w)
        eng_b.average_(src, torch.tensor(w))
        expected = {k: expected[k] + w * (snap[k] - expected[k]) for k in expected}
        assert_same_state(state_copy(target_a), state_copy(target_b))
    assert_matches_ref(target_a, expected, atol=1e-6)
    # buffers are copies of the source, integers included
    assert torch.equal(target_a.bn.running_var, src.bn.running_var)
    assert target_a.bn.num_batches_tracked.item() == src.bn.num_batches_tracked.item()


def test_public_names_reexported() -> None:
    """flatten_parameters is typed in training scripts; the engine's internals stay in their
    modules, reached as attributes (issue 9: a small top level)."""
    assert polyak.flatten_parameters is flatten_parameters
    assert polyak.tensors.canonical_name is canonical_name
    assert polyak.engine.AveragingEngine is AveragingEngine
    assert not {"canonical_name", "unwrap_model", "AveragingEngine"} & set(polyak.__all__)


# --------------------------------------------------------------------------------------------
# tied weights


class Tied(nn.Module):
    """An embedding and an output layer sharing one weight (as language models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.mid = nn.Linear(3, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight


@pytest.mark.parametrize("wrap", [plain, compiled, data_parallel], ids=lambda f: f.__name__)
def test_tied_weights_are_averaged_once_and_stay_tied(wrap) -> None:
    torch.manual_seed(0)
    src = Tied()
    ema = ExponentialMovingAverage(wrap(src), momentum=0.25)
    assert ema.module.out.weight is ema.module.embed.weight
    snaps = []
    for seed in range(1, 5):
        set_values(src, seed)
        snaps.append({"embed.weight": src.embed.weight.detach().double().clone()})
        ema.update_parameters(wrap(src))
    assert ema.module.out.weight is ema.module.embed.weight
    assert_matches_ref(ema.module, ref_ema(snaps, 0.25), atol=1e-6)
