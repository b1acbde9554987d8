"""``polyak.soft_update`` / ``hard_update`` (target networks in RL) against a float64 reference.

The reference is ``target <- (1 - tau) * target + tau * online`` computed here in float64 from
snapshots of both networks; buffers are copied, or soft-updated when ``update_buffers=True``,
and integer buffers are always copied. Tolerances: fp32 networks ``atol=1e-6`` (values O(1));
float64 networks ``atol=1e-14``; copies exact.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from polyak import hard_update, soft_update

F64 = torch.float64


class QNet(nn.Module):
    """Linear + BatchNorm1d + Linear: parameters, floating BN buffers and an int64 counter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.bn(self.fc(x))))


def make(seed: int, dtype: torch.dtype = torch.float32) -> QNet:
    torch.manual_seed(seed)
    net = QNet().to(dtype)
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.num_batches_tracked.fill_(seed)
    return net


@torch.no_grad()
def train(net: QNet, i: int) -> None:
    g = torch.Generator().manual_seed(500 + i)
    for p in net.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype), alpha=0.1)
    for b in net.buffers():  # what a train-mode forward does to the BN statistics, without one
        if b.is_floating_point():
            b.add_(torch.rand(b.shape, generator=g, dtype=torch.float64).to(b.dtype), alpha=0.1)
        else:
            b.add_(1)


def snap(net: nn.Module) -> dict[str, Tensor]:
    return {
        k: (v.detach().to(F64) if v.is_floating_point() else v.detach()).clone() for k, v in net.state_dict().items()
    }


def expected_soft(target: dict[str, Tensor], online: dict[str, Tensor], tau: float, update_buffers: bool) -> dict:
    params = {"fc.weight", "fc.bias", "bn.weight", "bn.bias", "out.weight", "out.bias"}
    out = {}
    for k, t in target.items():
        o = online[k]
        if not t.is_floating_point():
            out[k] = o.clone()  # integer buffers: always copied
        elif k in params or update_buffers:
            out[k] = (1.0 - tau) * t + tau * o
        else:
            out[k] = o.clone()  # floating buffers: copied unless update_buffers
    return out


def assert_state(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float) -> None:
    assert set(actual) == set(expected)
    for k, e in expected.items():
        if e.is_floating_point():
            torch.testing.assert_close(actual[k], e, rtol=0.0, atol=atol, msg=k)
        else:
            assert torch.equal(actual[k], e), k


WRAPS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "plain": lambda m: m,
    "compile": lambda m: torch.compile(m, backend="eager"),
    "dataparallel": nn.DataParallel,
}


# --------------------------------------------------------------------------------------------
# soft_update


@pytest.mark.parametrize("update_buffers", [False, True])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-6), (F64, 1e-14)])
def test_soft_update_matches_float64_reference(update_buffers: bool, dtype: torch.dtype, atol: float) -> None:
    online, target = make(0, dtype), make(1, dtype)
    expected = snap(target)
    for i in range(10):
        train(online, i)
        expected = expected_soft(expected, snap(online), 0.05, update_buffers)
        soft_update(target, online, 0.05, update_buffers=update_buffers)
        assert_state(snap(target), expected, atol)


@pytest.mark.parametrize("online_wrap", list(WRAPS))
@pytest.mark.parametrize("target_wrap", ["plain", "compile"])
def test_soft_update_through_wrappers(online_wrap: str, target_wrap: str) -> None:
    online, target = make(2, F64), make(3, F64)
    wrapped_online = WRAPS[online_wrap](online)
    wrapped_target = WRAPS[target_wrap](target)
    expected = snap(target)
    for i in range(4):
        train(online, i)
        expected = expected_soft(expected, snap(online), 0.3, False)
        soft_update(wrapped_target, wrapped_online, 0.3)
        assert_state(snap(target), expected, 1e-14)
    expected = expected_soft(expected, snap(online), 0.3, True)
    soft_update(wrapped_target, wrapped_online, 0.3, update_buffers=True)
    assert_state(snap(target), expected, 1e-14)


def test_tau_zero_changes_nothing_and_tau_one_copies() -> None:
    online, target = make(4), make(5)
    train(online, 0)
    before = snap(target)
    soft_update(target, online, 0.0, update_buffers=True)
    # tau = 0: the parameters and averaged buffers stay; the integer buffer is still copied
    after = snap(target)
    for k, v in before.items():
        if k == "bn.num_batches_tracked":
            assert torch.equal(after[k], online.bn.num_batches_tracked)
        else:
            assert torch.equal(after[k], v), k
    for update_buffers in (False, True):
        target = make(6)
        soft_update(target, online, 1.0, update_buffers=update_buffers)
        assert_state(snap(target), snap(online), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_tau_as_a_0d_tensor(dtype: torch.dtype) -> None:
    online, target, reference = make(7, F64), make(8, F64), make(8, F64)
    expected = snap(target)
    for i in range(3):
        train(online, i)
        tau = torch.tensor(0.125, dtype=dtype)  # exact in both dtypes
        expected = expected_soft(expected, snap(online), 0.125, True)
        soft_update(target, online, tau, update_buffers=True)
        soft_update(reference, online, 0.125, update_buffers=True)
        assert_state(snap(target), expected, 1e-14)
        assert_state(snap(target), snap(reference), 1e-15)


@pytest.mark.parametrize(
    "tau",
    [
        float("nan"),
        -0.1,
        1.5,
        True,
        False,
        "0.1",
        None,
        torch.tensor([0.1, 0.2]),
        torch.tensor(1),
        torch.tensor(True),
    ],
    ids=repr,
)
def test_bad_tau_is_rejected_and_changes_nothing(tau: object) -> None:
    online, target = make(9), make(10)
    train(online, 0)
    before = snap(target)
    with pytest.raises(ValueError, match="tau"):
        soft_update(target, online, tau)  # type: ignore[arg-type]
    assert_state(snap(target), before, 0.0)


class Extra(QNet):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(2, 2)


class Wider(QNet):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(6, 3)


class NoBias(QNet):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(6, 2, bias=False)


@pytest.mark.parametrize(
    "other", [Extra, Wider, NoBias, lambda: nn.Linear(5, 6)], ids=["extra", "wider", "nobias", "other"]
)
@pytest.mark.parametrize("direction", ["online", "target"])
@pytest.mark.parametrize("update", ["soft", "hard"])
def test_mismatched_networks_raise_and_change_nothing(other: Callable, direction: str, update: str) -> None:
    torch.manual_seed(11)
    odd = other()
    net = make(12)
    target, online = (net, odd) if direction == "online" else (odd, net)
    before = snap(target)
    with pytest.raises(ValueError, match=r"does not match|shape"):
        if update == "soft":
            soft_update(target, online, 0.5, update_buffers=True)
        else:
            hard_update(target, online)
    assert_state(snap(target), before, 0.0)


def test_soft_update_follows_replaced_and_moved_tensors() -> None:
    online, target = make(13), make(14)
    soft_update(target, online, 0.5)  # binds the engine
    # a new Parameter object in the target, and in the online network
    target.fc.weight = nn.Parameter(torch.zeros(6, 5))
    online.out.bias = nn.Parameter(torch.ones(2))
    expected = expected_soft(snap(target), snap(online), 0.5, False)
    soft_update(target, online, 0.5)
    assert_state(snap(target), expected, 1e-6)
    # a dtype change of both (p.data replaced in place of the same Parameter objects)
    target.double()
    online.double()
    train(online, 1)
    expected = expected_soft(snap(target), snap(online), 0.5, False)
    soft_update(target, online, 0.5)
    assert_state(snap(target), expected, 1e-14)


def test_soft_update_leaves_no_autograd_history() -> None:
    online, target = make(15), make(16)
    soft_update(target, online, 0.1, update_buffers=True)
    for p in target.parameters():
        assert p.is_leaf and p.grad_fn is None and p.requires_grad
        assert p.grad is None


def test_target_must_be_a_module() -> None:
    with pytest.raises(TypeError):
        soft_update({"w": torch.zeros(1)}, make(0), 0.1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# hard_update


@pytest.mark.parametrize("online_wrap", list(WRAPS))
def test_hard_update_copies_everything(online_wrap: str) -> None:
    online, target = make(17), make(18)
    train(online, 0)
    hard_update(target, WRAPS[online_wrap](online))
    assert_state(snap(target), snap(online), 0.0)
    # a copy, not shared storage
    for t, o in zip(target.state_dict().values(), online.state_dict().values(), strict=True):
        assert t.data_ptr() != o.data_ptr()
    train(online, 1)
    hard_update(target, online)
    assert_state(snap(target), snap(online), 0.0)
