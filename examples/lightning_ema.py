"""Train a small classifier with Lightning and two weight averages; validate and checkpoint with them.

Synthetic data, a few seconds on a CPU::

    python examples/lightning_ema.py

What it shows:

* ``WeightAveraging`` keeps an EMA (the primary: validation runs on it, under the usual metric
  names) and a slower, warmed-up EMA evaluated side by side (``ema_slow/val_acc``); with
  ``evaluate_live=True`` the live weights are evaluated too (``live/val_acc``);
* the checkpoint's ``state_dict`` is the EMA, ready to deploy; the training weights are under
  ``live_state_dict``; resuming with ``ckpt_path=`` restores both and the averages.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import polyak
from polyak.integrations.lightning import WeightAveraging


def make_data(n: int, seed: int) -> TensorDataset:
    """Two interleaved half-moons with noise: small, but not linearly separable."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * torch.pi
    label = torch.randint(0, 2, (n,), generator=g)
    upper = torch.stack([t.cos(), t.sin()], dim=1)
    lower = torch.stack([1 - t.cos(), 0.5 - t.sin()], dim=1)
    x = torch.where(label[:, None] == 0, upper, lower) + 0.25 * torch.randn(n, 2, generator=g)
    return TensorDataset(x, label)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def main(workdir: Path) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a tiny model: threads only add synchronisation
    train = DataLoader(make_data(2048, seed=1), batch_size=32, shuffle=True)
    val = DataLoader(make_data(1024, seed=2), batch_size=256)

    averaging = WeightAveraging(
        {
            # the primary: half-life of about 35 optimizer steps
            "ema": lambda m: polyak.ExponentialMovingAverage(m, momentum=0.02),
            # a slower average with the timm/diffusers warm-up, from a config-style mapping
            "ema_slow": {"type": "AveragedModel", "schedule": polyak.schedules.Warmup(0.995)},
        },
        evaluate_live=True,
    )
    trainer = pl.Trainer(
        max_epochs=4,
        accumulate_grad_batches=2,  # one average update per optimizer step, not per batch
        callbacks=[averaging, ModelCheckpoint(dirpath=workdir, filename="last")],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=workdir,
    )
    model = Classifier()
    trainer.fit(model, train, val)

    m = trainer.callback_metrics
    print(f"optimizer steps: {trainer.global_step}; updates: {averaging.averages['ema'].steps}")
    print(f"val_acc   live {m['live/val_acc']:.4f}   ema {m['val_acc']:.4f}   ema_slow {m['ema_slow/val_acc']:.4f}")
    print(f"decay of the latest update: ema {m['ema/decay']:.4f}, ema_slow {m['ema_slow/decay']:.4f}")

    # The checkpoint deploys the average: load its state_dict into a bare model.
    path = workdir / "last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    deployed = Classifier()
    deployed.load_state_dict(checkpoint["state_dict"])
    ema = averaging.averages["ema"].module.state_dict()
    same = all(torch.equal(v, ema[k]) for k, v in deployed.state_dict().items())
    print(f"{path.name}: state_dict is the EMA: {same}; the live weights are under 'live_state_dict'")
    print(
        f"  averages recorded: {list(checkpoint['polyak']['averages'])} (primary {checkpoint['polyak']['primary']!r})"
    )

    # Resuming restores the live weights, the optimizer and the averages, then trains on.
    resumed = WeightAveraging(
        {
            "ema": lambda m: polyak.ExponentialMovingAverage(m, momentum=0.02),
            "ema_slow": {"type": "AveragedModel", "schedule": polyak.schedules.Warmup(0.995)},
        }
    )
    more = pl.Trainer(
        max_epochs=5,
        accumulate_grad_batches=2,
        callbacks=[resumed],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=workdir,
    )
    more.fit(Classifier(), train, val, ckpt_path=path)
    acc = more.callback_metrics["val_acc"]
    print(f"resumed for one more epoch: {resumed.averages['ema'].steps} updates, val_acc (ema) {acc:.4f}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="polyak-lightning-") as tmp:
        main(Path(tmp))
