"""Shared helpers: a tiny random CNN with BatchNorm and a train-like step.

The tests import nothing from here directly (pytest runs with ``--import-mode=importlib``);
the helpers are handed out as fixtures.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn


class TinyNet(nn.Module):
    """Conv2d + BatchNorm2d + ReLU + Linear: parameters, floating BN buffers and the int64
    ``num_batches_tracked``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


def _make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet().to(dtype)
    # Random BN affine parameters and statistics, so that no tensor starts at a constant.
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model


@torch.no_grad()
def _train_step(model: nn.Module, scale: float = 0.05) -> None:
    """A stand-in for one optimizer step: perturb every parameter, then run a forward in
    train mode so that the BN running statistics and ``num_batches_tracked`` change."""
    for p in model.parameters():
        p.add_(torch.randn_like(p, dtype=torch.float32).to(p.dtype), alpha=scale)
    model.train()
    dtype = next(model.parameters()).dtype
    model(torch.randn(4, 3, 6, 6).to(dtype))


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    """The model's state, floating tensors widened to float64 (exact), integers kept."""
    return {
        k: (v.detach().to(torch.float64) if v.is_floating_point() else v.detach()).clone()
        for k, v in model.state_dict().items()
    }


@pytest.fixture
def make_model() -> Callable[..., TinyNet]:
    return _make_model


@pytest.fixture
def train_step() -> Callable[..., None]:
    return _train_step


@pytest.fixture
def snapshot() -> Callable[[nn.Module], dict[str, Tensor]]:
    return _snapshot
