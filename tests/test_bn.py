"""``update_bn``: BatchNorm statistics re-estimated over a loader, against statistics
computed by hand in float64.

With ``momentum=None`` torch's BatchNorm keeps a cumulative (equal-weight) average over the
batches seen since the reset: ``running_mean`` is the mean of the batch means and
``running_var`` the mean of the *unbiased* batch variances, whatever the batch sizes.
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from polyak import ExponentialMovingAverage, update_bn

N_SAMPLES = 10
BATCH = 4  # batches of 4, 4 and 2: unequal sizes, equal weights


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            [
                ("body", nn.Linear(3, 4)),
                ("bn", nn.BatchNorm1d(4, momentum=0.3)),
                ("act", nn.ReLU()),
                ("head", nn.Linear(4, 2)),
            ]
        )
    )


class DictNet(nn.Module):
    """Takes its input by keyword, as ``model(**batch)`` calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net(0)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DictDataset(Dataset):
    def __init__(self, x: Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i]}


Pair = namedtuple("Pair", ["inputs", "targets"])


def data(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, 3, generator=g) * 2 + 1
    y = torch.randn(N_SAMPLES, 2, generator=g)
    return x, y


def chunks(x: Tensor) -> list[Tensor]:
    return list(x.split(BATCH))


@torch.no_grad()
def garbage_stats(bn: nn.modules.batchnorm._BatchNorm) -> None:
    bn.running_mean.fill_(7.0)
    bn.running_var.fill_(9.0)
    bn.num_batches_tracked.fill_(1234)


def expected_stats(linear: nn.Linear, batches: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Mean of the batch means and mean of the unbiased batch variances of ``linear``'s
    output, by hand in float64."""
    w = linear.weight.detach().double()
    b = linear.bias.detach().double()
    means, variances = [], []
    for x in batches:
        h = x.double() @ w.T + b
        n = h.shape[0]
        mean = h.sum(0) / n
        means.append(mean)
        variances.append(((h - mean) ** 2).sum(0) / (n - 1))
    return sum(means) / len(means), sum(variances) / len(variances)


def assert_stats(bn: nn.modules.batchnorm._BatchNorm, linear: nn.Linear, batches: list[Tensor]) -> None:
    mean, var = expected_stats(linear, batches)
    # float32 forward against a float64 reference, values O(1-10)
    torch.testing.assert_close(bn.running_mean.double(), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), var, atol=1e-5, rtol=1e-5)
    assert bn.num_batches_tracked.item() == len(batches)


def stats_copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------
# batch kinds


def loader_of_tensors(x: Tensor, y: Tensor):
    return DataLoader(x, batch_size=BATCH)


def loader_of_tuples(x: Tensor, y: Tensor):
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def list_of_tuples(x: Tensor, y: Tensor):
    return [(a, b) for a, b in zip(x.split(BATCH), y.split(BATCH), strict=True)]


def list_of_namedtuples(x: Tensor, y: Tensor):
    return [Pair(a, b) for a, b in zip(x.split(BATCH), y.split(BATCH), strict=True)]


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")], ids=["no-device", "cpu-str", "cpu-device"])
@pytest.mark.parametrize(
    "make_loader",
    [loader_of_tensors, loader_of_tuples, list_of_tuples, list_of_namedtuples],
    ids=lambda f: f.__name__,
)
@pytest.mark.parametrize("was_training", [False, True])
def test_update_bn_matches_hand_statistics(make_loader, device, was_training: bool) -> None:
    model = make_net(0)
    garbage_stats(model.bn)
    model.train(was_training)
    x, y = data()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    update_bn(make_loader(x, y), model, device=device)
    assert_stats(model.bn, model.body, chunks(x))
    assert model.bn.momentum == 0.3
    assert model.training is was_training
    assert all(m.training is was_training for m in model.modules())
    for n, p in model.named_parameters():  # parameters untouched
        assert torch.equal(p, params[n]), n


@pytest.mark.parametrize("device", [None, "cpu"])
def test_update_bn_dict_batches(device) -> None:
    model = DictNet()
    garbage_stats(model.net.bn)
    model.eval()
    x, _ = data(1)
    loader = DataLoader(DictDataset(x), batch_size=BATCH)
    update_bn(loader, model, device=device)
    assert_stats(model.net.bn, model.net.body, chunks(x))
    assert model.net.bn.momentum == 0.3
    assert not model.training


def test_update_bn_call_fn() -> None:
    model = make_net(0)
    garbage_stats(model.bn)
    x, y = data(2)
    # batches the default cannot read: the input is the second element
    loader = [{"target": b, "image": a} for a, b in zip(x.split(BATCH), y.split(BATCH), strict=True)]
    calls = []

    def call_fn(m: nn.Module, batch: dict) -> Tensor:
        calls.append(batch)
        return m(batch["image"])

    update_bn(loader, model, call_fn=call_fn)
    assert len(calls) == len(loader)
    assert_stats(model.bn, model.body, chunks(x))


def test_update_bn_call_fn_with_tuples_in_other_order() -> None:
    model = make_net(0)
    x, y = data(3)
    loader = DataLoader(TensorDataset(y, x), batch_size=BATCH)  # (target, input)
    update_bn(loader, model, device="cpu", call_fn=lambda m, b: m(b[1]))
    assert_stats(model.bn, model.body, chunks(x))


def test_update_bn_batchnorm2d() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3, momentum=None), nn.Conv2d(3, 2, 1))
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(n, 3, 2, 3, generator=g) * 3 - 1 for n in (2, 3, 1)]
    update_bn(batches, model)
    # per channel over (N, H, W); unbiased variance over the N*H*W values
    means, variances = [], []
    for xb in batches:
        v = xb.double().transpose(0, 1).reshape(3, -1)
        m = v.mean(1)
        means.append(m)
        variances.append(((v - m[:, None]) ** 2).sum(1) / (v.shape[1] - 1))
    bn = model[0]
    torch.testing.assert_close(bn.running_mean.double(), sum(means) / 3, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), sum(variances) / 3, atol=1e-5, rtol=1e-5)
    assert bn.num_batches_tracked.item() == 3
    assert bn.momentum is None


def test_update_bn_on_averaged_model() -> None:
    """The averaged model's forward runs the average, so its BN statistics are re-estimated."""
    source = make_net(0)
    ema = ExponentialMovingAverage(source, momentum=0.25)
    ema.update_parameters(source)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    ema.update_parameters(source)
    source_state = stats_copy(source)
    x, _ = data(5)
    update_bn(DataLoader(x, batch_size=BATCH), ema)
    assert_stats(ema.module.bn, ema.module.body, chunks(x))
    assert_same(source_state, stats_copy(source))


# --------------------------------------------------------------------------------------------
# modes, momentum, no-ops and failures


def test_update_bn_restores_each_modules_mode() -> None:
    """A model in train mode with a frozen (eval-mode) BatchNorm keeps that BatchNorm in eval
    mode afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    model.train()
    model[1].eval()
    modes = [m.training for m in model.modules()]
    x, _ = data(6)
    update_bn(DataLoader(x, batch_size=BATCH), model)
    assert [m.training for m in model.modules()] == modes


def test_update_bn_restores_momentum_none_and_values() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None), nn.Linear(4, 4), nn.BatchNorm1d(4))
    update_bn(DataLoader(data(7)[0], batch_size=BATCH), model)
    assert model[1].momentum is None
    assert model[3].momentum == 0.1


def test_update_bn_without_batchnorm_is_a_no_op() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.BatchNorm1d(4, track_running_stats=False))
    model.eval()
    before = stats_copy(model)
    calls = []
    update_bn(DataLoader(data()[0], batch_size=BATCH), model, call_fn=lambda m, b: calls.append(b) or m(b))
    assert calls == []
    assert not model.training
    assert_same(before, stats_copy(model))


class Broken(Exception):
    pass


def failing_loader(x: Tensor):
    yield x[:BATCH]
    yield x[BATCH : 2 * BATCH]
    raise Broken("the loader broke")


@pytest.mark.parametrize("was_training", [False, True])
def test_failing_batch_leaves_statistics_and_momentum_unchanged(was_training: bool) -> None:
    model = make_net(0)
    garbage_stats(model.bn)
    model.train(was_training)
    before = stats_copy(model)
    with pytest.raises(Broken):
        update_bn(failing_loader(data()[0]), model)
    assert_same(before, stats_copy(model))
    assert model.bn.momentum == 0.3
    assert model.training is was_training


def test_failing_forward_leaves_statistics_unchanged() -> None:
    model = make_net(0)
    garbage_stats(model.bn)
    before = stats_copy(model)
    good = torch.randn(4, 3)
    bad = torch.randn(4, 5)  # wrong width: the Linear raises
    with pytest.raises(RuntimeError):
        update_bn([good, bad], model)
    assert_same(before, stats_copy(model))
    assert model.bn.momentum == 0.3


@pytest.mark.parametrize("batch", [42, "images", None, (), []], ids=["int", "str", "none", "empty-tuple", "empty-list"])
def test_unsupported_batch_type_raises_type_error_naming_call_fn(batch) -> None:
    model = make_net(0)
    garbage_stats(model.bn)
    before = stats_copy(model)
    with pytest.raises(TypeError, match="call_fn"):
        update_bn([batch], model)
    assert_same(before, stats_copy(model))
    assert model.bn.momentum == 0.3


def test_update_bn_on_compiled_model() -> None:
    model = make_net(0)
    compiled = torch.compile(model, backend="eager")
    x, _ = data(8)
    model.eval()
    compiled(x[:BATCH])  # compiled once in eval mode with momentum 0.3
    garbage_stats(model.bn)
    update_bn(DataLoader(x, batch_size=BATCH), compiled)
    assert_stats(model.bn, model.body, chunks(x))
    assert model.bn.momentum == 0.3
    assert not model.training
