"""polyak's EMA in an mmengine Runner (docs/integrations/mmengine.md).

In a config file the integration is one import and one hook::

    custom_imports = dict(imports=["polyak.integrations.mmengine"], allow_failed_imports=False)
    custom_hooks = [dict(type="PolyakEMAHook", ema_type="ExponentialMovingAverage", momentum=2e-4,
                         update_buffers=True)]

This script does the same from Python on a tiny regression model: it trains with validation
(on the average) and checkpoints, resumes from the middle checkpoint in a fresh Runner, tests
with the average, and deploys the average from the last checkpoint (loaded with
``torch.load(..., weights_only=True)``). It runs on the CPU in a few seconds:
``python examples/mmengine_ema.py [--work-dir DIR]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn

import polyak.integrations.mmengine  # noqa: F401  (registers PolyakEMAHook, allow-lists for weights_only)


class Regressor(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, inputs, targets, mode="tensor"):
        out = self.net(inputs).squeeze(-1)
        if mode == "loss":
            return {"loss": nn.functional.mse_loss(out, targets)}
        if mode == "predict":
            return [(out, targets)]
        return out


class Regression(torch.utils.data.Dataset):
    """y = x @ w + noise, one w for every split."""

    def __init__(self, n: int = 256, seed: int = 0) -> None:
        w = torch.randn(8, generator=torch.Generator().manual_seed(1234))
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ w + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"inputs": self.x[i], "targets": self.y[i]}


class MSE(BaseMetric):
    def process(self, data_batch, data_samples) -> None:
        for out, targets in data_samples:
            self.results.append((((out - targets) ** 2).sum().item(), len(targets)))

    def compute_metrics(self, results) -> dict:
        return {"mse": sum(r[0] for r in results) / sum(r[1] for r in results)}


def config(work_dir: Path, **overrides) -> dict:
    loader = {
        "sampler": {"type": "DefaultSampler", "shuffle": True},
        "batch_size": 16,
        "collate_fn": {"type": "default_collate"},
    }
    cfg = {
        "model": Regressor(),
        "work_dir": str(work_dir),
        "train_dataloader": {"dataset": Regression(), **loader},
        "val_dataloader": {"dataset": Regression(64, seed=1), **loader},
        "val_evaluator": {"type": MSE},
        "test_dataloader": {"dataset": Regression(64, seed=2), **loader},
        "test_evaluator": {"type": MSE},
        "train_cfg": {"by_epoch": False, "max_iters": 80, "val_interval": 40},
        "val_cfg": {},
        "test_cfg": {},
        # accumulative_counts=2: the average is updated once per optimizer step (40 updates)
        "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.02, "momentum": 0.9}, "accumulative_counts": 2},
        "default_hooks": {
            "checkpoint": {"type": "CheckpointHook", "interval": 40, "by_epoch": False},
            "logger": {"type": "LoggerHook", "interval": 20},
        },
        # mmengine's EMAHook arguments; the momentum is logged as "ema_momentum"
        "custom_hooks": [{"type": "PolyakEMAHook", "momentum": 0.05, "update_buffers": True}],
        "launcher": "none",
        "randomness": {"seed": 0},
    }
    cfg.update(overrides)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or Path(tmp)

        # 1. train 80 iterations; validation after 40 and 80 runs on the average
        runner = Runner(**config(work_dir / "run", experiment_name="train"))
        runner.train()
        test_metrics = runner.test()  # the same runner keeps its average: tested with it
        print("test with the average:", test_metrics)

        # 2. a fresh Runner resumes from the checkpoint after 40 iterations and ends where the
        #    first run ended (live weights and average)
        resumed = Runner(
            **config(work_dir / "resumed", experiment_name="resume"),
            resume=True,
            load_from=str(work_dir / "run" / "iter_40.pth"),
        )
        resumed.train()
        a = runner.hooks[[type(h).__name__ for h in runner.hooks].index("PolyakEMAHook")].ema_model
        b = resumed.hooks[[type(h).__name__ for h in resumed.hooks].index("PolyakEMAHook")].ema_model
        same = all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
        print("resumed average equals the uninterrupted one:", same)

        # 3. deploy: the checkpoint's state_dict is the average; it loads with weights_only=True
        checkpoint = torch.load(work_dir / "run" / "iter_80.pth", weights_only=True)
        model = Regressor()
        model.load_state_dict(checkpoint["state_dict"])
        print("checkpoint:", sorted(checkpoint), "steps:", checkpoint["polyak"]["averages"]["ema"]["steps"])


if __name__ == "__main__":
    main()
