"""polyak's EMA in an mmengine Runner (docs/integrations/mmengine.md).

In a config file the integration is one import and one hook::

    custom_imports = dict(imports=["polyak.integrations.mmengine"], allow_failed_imports=False)
    custom_hooks = [dict(type="PolyakEMAHook", ema_type="ExponentialMovingAverage", momentum=2e-4,
                         update_buffers=True)]

This script does the same from Python on a tiny regression model: it trains with validation
(on the average) and checkpoints, resumes from the middle checkpoint in a fresh Runner, tests
with the average, and deploys the average from the last checkpoint (loaded with
``torch.load(..., weights_only=True)``). It runs on the CPU in about 6 s, most of it
importing torch and mmengine: ``python examples/mmengine_ema.py [--work-dir DIR]``.

The runners log at ``log_level="WARNING"``: mmengine's INFO lines (the environment, the hook
order, the training losses) stay out of the output, which is the few result lines and the
warnings that say something about this run (gradient accumulation with BatchNorm; the resumed
run skipping the batches it already trained on). A filter drops mmengine's warnings about its
own deprecated ``FileClient`` and about the parameter schedulers this run does not have. The
losses and ``ema_momentum`` still reach mmengine's ``MessageHub`` and the visualizer
(``<work_dir>/<timestamp>/vis_data/scalars.json``); the script prints the logged momentum.
mmengine prints one line outside its logger, the checkpoint the resumed run loads; without
``--work-dir`` that path is in a temporary folder, removed when the script exits.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import ClassVar

import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import MessageHub
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

    metainfo: ClassVar[dict] = {"task": "regression"}  # mmengine hands it to the visualizer and the metrics

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
    default_prefix = "regression"  # the metric is reported as "regression/mse"

    def process(self, data_batch, data_samples) -> None:
        for out, targets in data_samples:
            self.results.append((((out - targets) ** 2).sum().item(), len(targets)))

    def compute_metrics(self, results) -> dict:
        return {"mse": sum(r[0] for r in results) / sum(r[1] for r in results)}


class QuietDeprecations(logging.Filter):
    """Drops mmengine 0.10's warnings about its own internals that a user cannot act on."""

    NOISE = (
        '"FileClient" will be deprecated',  # CheckpointHook builds one in any case
        '"HardDiskBackend" is the alias',
        "but `self.param_schedulers` is None",  # this run has no parameter scheduler to save or resume
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.NOISE)


def make_runner(cfg: dict) -> Runner:
    runner = Runner(**cfg)
    runner.logger.addFilter(QuietDeprecations())  # the runner's logger is mmengine's "current" one
    return runner


def config(work_dir: Path, **overrides) -> dict:
    loader = {
        "sampler": {"type": "DefaultSampler", "shuffle": True},
        "batch_size": 16,
        "collate_fn": {"type": "default_collate"},
    }
    # an iteration-based run: the training sampler never ends (no "end of the dataloader" restarts)
    train_loader = {**loader, "sampler": {"type": "InfiniteSampler", "shuffle": True}}
    torch.manual_seed(0)  # the model is built here, before the Runner seeds the random generators
    cfg = {
        "model": Regressor(),
        "work_dir": str(work_dir),
        "train_dataloader": {"dataset": Regression(), **train_loader},
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
            "checkpoint": {"type": "CheckpointHook", "interval": 40, "by_epoch": False, "save_param_scheduler": False},
            "logger": {"type": "LoggerHook", "interval": 20},
        },
        "log_level": "WARNING",  # mmengine's INFO lines (environment, hooks, losses) stay quiet
        # mmengine's EMAHook arguments; the momentum is logged as "ema_momentum"
        "custom_hooks": [{"type": "PolyakEMAHook", "momentum": 0.05, "update_buffers": True}],
        "launcher": "none",
        "randomness": {"seed": 0},
    }
    cfg.update(overrides)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder, removed at exit")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: threads only add synchronisation (and nondeterminism)
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or Path(tmp)

        # 1. train 80 iterations; validation after 40 and 80 runs on the average
        runner = make_runner(config(work_dir / "run", experiment_name="train"))
        runner.train()
        hub = MessageHub.get_current_instance()
        val_mse = hub.get_scalar("val/regression/mse").current()
        momentum = hub.get_scalar("train/ema_momentum").current()
        print(f"trained 80 iterations (40 optimizer steps); logged ema_momentum {momentum}")
        print(f"validation with the average: mse {val_mse:.4f}")
        test_metrics = runner.test()  # the same runner keeps its average: tested with it
        print("test with the average:", test_metrics)

        # 2. a fresh Runner resumes from the checkpoint after 40 iterations and ends where the
        #    first run ended (live weights and average)
        resumed = make_runner(
            config(
                work_dir / "resumed",
                experiment_name="resume",
                resume=True,
                load_from=str(work_dir / "run" / "iter_40.pth"),
            )
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
