"""``polyak.integrations.mmengine`` with a real mmengine ``Runner`` (mmengine-lite).

A tiny ``BaseModel`` (Linear, BatchNorm1d, Linear) trains for a few iterations on a tiny
dataset with SGD (momentum 0.9), validates with a tiny ``BaseMetric`` and writes checkpoints.
A recording hook keeps the live weights after every iteration; every expected average is
computed here from those in float64 (the formulas are written out below) and compared to the
hook's float32 average with an absolute and relative tolerance of 1e-6. A resumed run is
compared with the uninterrupted one bitwise (``torch.equal``).

This module imports ``polyak.integrations.mmengine`` only inside the tests: the config test
imports this file in a fresh interpreter (for the model, data and metric registered below) and
checks that ``custom_imports`` is what brings the integration in.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("mmengine")

from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, HOOKS, METRICS, MODELS
from mmengine.runner import Runner

PARAMS = ("lin1.weight", "lin1.bias", "bn.weight", "bn.bias", "lin2.weight", "lin2.bias")
FLOAT_BUFFERS = ("bn.running_mean", "bn.running_var")
TOL = {"rtol": 1e-6, "atol": 1e-6}
MOMENTUM = 0.1


def integration():
    return importlib.import_module("polyak.integrations.mmengine")


# --------------------------------------------------------------------------------------------
# the model, data, metric and recorder, registered for configs


class PolyakTestNet(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.lin2 = nn.Linear(4, 1)

    def forward(self, inputs: Tensor, targets: Tensor, mode: str = "tensor"):
        out = self.lin2(torch.relu(self.bn(self.lin1(inputs)))).squeeze(-1)
        if mode == "loss":
            return {"loss": ((out - targets) ** 2).mean()}
        if mode == "predict":
            return [(out, targets)]
        return out


class PolyakTestData(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, generator=g)
        self.y = torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": self.x[i], "targets": self.y[i]}


class PolyakTestMSE(BaseMetric):
    def process(self, data_batch, data_samples) -> None:
        for out, targets in data_samples:
            self.results.append((((out.double() - targets.double()) ** 2).sum().item(), len(targets)))

    def compute_metrics(self, results) -> dict:
        return {"mse": sum(r[0] for r in results) / sum(r[1] for r in results)}


def snapshot64(model: nn.Module) -> dict[str, Tensor]:
    return {
        k: (v.detach().double() if v.is_floating_point() else v.detach()).clone() for k, v in model.state_dict().items()
    }


class PolyakTestRecorder(Hook):
    """Records the live state after every training iteration (before any other hook), checks
    that each iteration starts from the state the previous one ended with (no average left
    in the model), and keeps the validation metrics with the iteration they were computed at."""

    priority = "VERY_HIGH"

    def __init__(self, out: str | None = None) -> None:
        self.out = out
        self.after: dict[int, dict[str, Tensor]] = {}
        self.leaks: list[int] = []
        self.metrics: list[tuple[int, dict]] = []

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        last = self.after.get(runner.iter - 1)
        if last is not None:
            now = snapshot64(runner.model)
            if any(not torch.equal(now[k], last[k]) for k in last):
                self.leaks.append(runner.iter)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.after[runner.iter] = snapshot64(runner.model)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.metrics.append((runner.iter, dict(metrics or {})))

    def after_run(self, runner) -> None:
        if self.out is not None:
            torch.save({"after": self.after, "leaks": self.leaks, "metrics": self.metrics}, self.out)


MODELS.register_module(name="PolyakTestNet", module=PolyakTestNet, force=True)
DATASETS.register_module(name="PolyakTestData", module=PolyakTestData, force=True)
METRICS.register_module(name="PolyakTestMSE", module=PolyakTestMSE, force=True)
HOOKS.register_module(name="PolyakTestRecorder", module=PolyakTestRecorder, force=True)


_RUNS = itertools.count()


def runner_cfg(
    work_dir,
    hooks: list,
    *,
    max_iters: int = 6,
    val_interval: int = 3,
    ckpt_interval: int = 3,
    accumulative_counts: int = 1,
    resume: bool = False,
    load_from: str | None = None,
) -> dict:
    loader = {
        "sampler": {"type": "DefaultSampler", "shuffle": False},
        "batch_size": 4,
        "num_workers": 0,
        "collate_fn": {"type": "default_collate"},
    }
    return {
        "model": {"type": "PolyakTestNet"},
        "work_dir": str(work_dir),
        "train_dataloader": {"dataset": {"type": "PolyakTestData", "n": 16, "seed": 0}, **loader},
        "val_dataloader": {"dataset": {"type": "PolyakTestData", "n": 8, "seed": 1}, **loader},
        "val_evaluator": {"type": "PolyakTestMSE"},
        "train_cfg": {"by_epoch": False, "max_iters": max_iters, "val_interval": val_interval},
        "val_cfg": {},
        "optim_wrapper": {
            "optimizer": {"type": "SGD", "lr": 0.1, "momentum": 0.9},
            "accumulative_counts": accumulative_counts,
        },
        "default_hooks": {
            "checkpoint": {"type": "CheckpointHook", "interval": ckpt_interval, "by_epoch": False},
            "logger": {"type": "LoggerHook", "interval": 1},
        },
        "custom_hooks": hooks,
        "launcher": "none",
        "randomness": {"seed": 0},
        "resume": resume,
        "load_from": load_from,
        "default_scope": "mmengine",
        "experiment_name": f"polyak-test-{next(_RUNS)}",
    }


def run(work_dir, hooks: list, **kwargs) -> tuple[Runner, PolyakTestRecorder, object]:
    """Train a Runner; returns it, its recorder and the first hook (the EMA hook)."""
    runner = Runner(**runner_cfg(work_dir, [{"type": "PolyakTestRecorder"}, *hooks], **kwargs))
    runner.train()
    recorder = next(h for h in runner.hooks if isinstance(h, PolyakTestRecorder))
    ema = next(h for h in runner.hooks if type(h).__name__ in ("PolyakEMAHook", "EMAHook"))
    return runner, recorder, ema


# --------------------------------------------------------------------------------------------
# float64 references


def reference_average(states: list[dict[str, Tensor]], momenta: list[float], averaged) -> dict[str, Tensor]:
    """The average after one update per state: momenta[i] is the weight of states[i] (1 for the
    initial copy); tensors not in ``averaged`` are copied."""
    avg: dict[str, Tensor] = {}
    for state, m in zip(states, momenta, strict=True):
        for k, v in state.items():
            avg[k] = (1.0 - m) * avg[k] + m * v if k in averaged and k in avg else v.clone()
    return avg


def ema_momenta(n: int, m: float = MOMENTUM) -> list[float]:
    return [1.0] + [m] * (n - 1)


def reference_mse(state: dict[str, Tensor]) -> float:
    """The validation metric of a float64 model holding ``state`` (eval mode)."""
    net = PolyakTestNet().double()
    net.load_state_dict(state)
    net.eval()
    data = PolyakTestData(8, seed=1)
    with torch.no_grad():
        out = net(data.x.double(), data.y.double())
    return float(((out - data.y.double()) ** 2).mean())


def assert_state_close(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    for k, e in expected.items():
        a = actual[k].detach()
        if e.is_floating_point():
            torch.testing.assert_close(a.double(), e, **TOL, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a, e), k


def assert_state_equal(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for k, e in expected.items():
        assert actual[k].dtype == e.dtype and torch.equal(actual[k], e), k


def live_of(checkpoint: dict) -> dict[str, Tensor]:
    return {k[len("module.") :]: v for k, v in checkpoint["ema_state_dict"].items() if k.startswith("module.")}


POLYAK_HOOK = {"type": "PolyakEMAHook", "momentum": MOMENTUM, "update_buffers": True}
AVERAGED = PARAMS + FLOAT_BUFFERS


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 iterations, validation and a checkpoint after 3 and 6."""
    integration()
    work_dir = tmp_path_factory.mktemp("uninterrupted")
    runner, recorder, hook = run(work_dir, [POLYAK_HOOK])
    return {"work_dir": work_dir, "runner": runner, "recorder": recorder, "hook": hook}


# --------------------------------------------------------------------------------------------
# registries


def test_registries():
    mm = integration()
    import mmengine.hooks

    import polyak

    assert HOOKS.get("PolyakEMAHook") is mm.PolyakEMAHook
    assert HOOKS.get("EMAHook") is mmengine.hooks.EMAHook  # mmengine's own name is left alone
    assert issubclass(mm.PolyakEMAHook, Hook) and issubclass(mm.PolyakEMAHook, polyak.hooks.EMAHook)
    expected = {
        "PolyakExponentialMovingAverage": polyak.ExponentialMovingAverage,
        "PolyakMomentumAnnealingEMA": polyak.MomentumAnnealingEMA,
        "PolyakStochasticWeightAverage": polyak.StochasticWeightAverage,
        "PolyakRampUpEMA": polyak.RampUpEMA,
        "PolyakCosineEMA": polyak.CosineEMA,
        "PolyakExpMomentumEMA": polyak.ExpMomentumEMA,
        "PolyakAveragedModel": polyak.AveragedModel,
    }
    for name, cls in expected.items():
        assert MODELS.get(name) is cls, name
    built = MODELS.build({"type": "PolyakExponentialMovingAverage", "model": nn.Linear(2, 2), "momentum": 0.01})
    assert type(built) is polyak.ExponentialMovingAverage and built.momentum == 0.01

    # ema_type: mmengine's names and polyak's registered names build polyak's classes
    assert mm.PolyakEMAHook(ema_type="ExponentialMovingAverage").ema_type is polyak.ExponentialMovingAverage
    assert mm.PolyakEMAHook(ema_type="PolyakCosineEMA").ema_type is polyak.CosineEMA
    with pytest.raises(ValueError, match="not a polyak averaged model"):
        mm.PolyakEMAHook(ema_type="PolyakTestNet")
    with pytest.raises(ValueError, match="unknown ema_type"):
        mm.PolyakEMAHook(ema_type="NoSuchAverage")


# --------------------------------------------------------------------------------------------
# training, validation, checkpoints, resume


def test_average_matches_float64_reference_and_validation_uses_it(uninterrupted):
    recorder, hook, runner = uninterrupted["recorder"], uninterrupted["hook"], uninterrupted["runner"]
    assert sorted(recorder.after) == list(range(6))
    assert recorder.leaks == []  # validation and checkpoints put the live weights back
    expected = reference_average([recorder.after[i] for i in range(6)], ema_momenta(6), AVERAGED)
    assert hook.ema_model.steps == 6
    assert_state_close(hook.ema_model.module.state_dict(), expected)

    # validation after iterations 3 and 6 ran on the average of that moment
    assert [i for i, _ in recorder.metrics] == [3, 6]
    for i, metrics in recorder.metrics:
        avg = reference_average([recorder.after[j] for j in range(i)], ema_momenta(i), AVERAGED)
        assert math.isclose(metrics["mse"], reference_mse(avg), rel_tol=1e-5)
        assert not math.isclose(metrics["mse"], reference_mse(recorder.after[i - 1]), rel_tol=1e-3)
    # and the model is left with the live weights
    assert_state_equal(snapshot64(runner.model), recorder.after[5])


def test_momentum_is_logged(uninterrupted):
    runner = uninterrupted["runner"]
    history = runner.message_hub.get_scalar("train/ema_momentum")
    values, _ = history.data
    assert values.tolist() == [1.0] + [MOMENTUM] * 5  # the first update copies
    logs = list(Path(uninterrupted["work_dir"]).glob("*/*.log"))
    assert logs and "ema_momentum: 0.1000" in logs[0].read_text()
    scalars = list(Path(uninterrupted["work_dir"]).glob("*/vis_data/scalars.json"))
    lines = [json.loads(line) for line in scalars[0].read_text().splitlines()]
    assert [d["ema_momentum"] for d in lines if "ema_momentum" in d] == [1.0] + [MOMENTUM] * 5


def test_health_is_logged_at_the_logger_interval(uninterrupted):
    """The logger hook's interval is 1 here: a report after every iteration, its distance the one
    computed here from the recorded weights and the float64 reference average."""
    runner, recorder = uninterrupted["runner"], uninterrupted["recorder"]
    distances, _ = runner.message_hub.get_scalar("train/ema_distance").data
    assert len(distances) == 6
    for i, got in enumerate(distances.tolist()):
        live = recorder.after[i]
        avg = reference_average([recorder.after[j] for j in range(i + 1)], ema_momenta(i + 1), AVERAGED)
        d2 = sum(float(((live[k] - avg[k]) ** 2).sum()) for k in AVERAGED)
        l2 = sum(float((live[k] ** 2).sum()) for k in AVERAGED)
        assert got == pytest.approx(math.sqrt(d2 / l2), rel=1e-5, abs=1e-9), i
    horizons, _ = runner.message_hub.get_scalar("train/ema_horizon").data
    assert horizons.tolist() == pytest.approx([1.0] + [1 / MOMENTUM] * 5)
    assert runner.message_hub.get_scalar("train/ema_moved").data[0].tolist() == [1.0] * 6


def test_health_interval_is_checked_and_none_logs_nothing(tmp_path):
    mm = integration()
    with pytest.raises(ValueError, match="health_interval"):
        mm.PolyakEMAHook(health_interval=0)
    runner, _, _ = run(tmp_path, [dict(POLYAK_HOOK, health_interval=None)], val_interval=10, ckpt_interval=10)
    assert "train/ema_distance" not in runner.message_hub.log_scalars


def test_checkpoint_layout_and_weights_only_load(uninterrupted):
    recorder, work_dir = uninterrupted["recorder"], uninterrupted["work_dir"]
    for n in (3, 6):
        ck = torch.load(work_dir / f"iter_{n}.pth", weights_only=True)  # torch's default, stated
        expected = reference_average([recorder.after[i] for i in range(n)], ema_momenta(n), AVERAGED)
        assert_state_close(ck["state_dict"], expected)  # deployable: the average
        assert_state_equal(
            {k: v.double() if v.is_floating_point() else v for k, v in live_of(ck).items()}, recorder.after[n - 1]
        )
        assert int(ck["ema_state_dict"]["steps"]) == n
        block = ck["polyak"]
        assert block["live_key"] == "ema_state_dict" and block["live_prefix"] == "module."
        assert block["averages"]["ema"]["class"] == "ExponentialMovingAverage"
        assert block["averages"]["ema"]["schedule"] == {"type": "ConstantMomentum", "args": {"momentum": MOMENTUM}}
        # mmengine's own parts load too: the message hub's HistoryBuffers and numpy values
        assert type(ck["message_hub"]["log_scalars"]["train/loss"]).__name__ == "HistoryBuffer"
        assert len(ck["message_hub"]["log_scalars"]["train/ema_momentum"].data[0]) == n


def test_resume_in_a_fresh_runner_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    first = uninterrupted
    path = str(first["work_dir"] / "iter_3.pth")
    runner, recorder, hook = run(tmp_path, [POLYAK_HOOK], resume=True, load_from=path)
    assert sorted(recorder.after) == [3, 4, 5]
    assert recorder.leaks == []
    # bitwise: the live weights and the average
    assert_state_equal(snapshot64(runner.model), snapshot64(first["runner"].model))
    assert_state_equal(snapshot64(hook.ema_model.module), snapshot64(first["hook"].ema_model.module))
    assert hook.ema_model.steps == 6
    # and the float64 reference from the live weights of both halves
    states = [first["recorder"].after[i] for i in range(3)] + [recorder.after[i] for i in range(3, 6)]
    assert_state_close(hook.ema_model.module.state_dict(), reference_average(states, ema_momenta(6), AVERAGED))
    assert recorder.metrics[0][0] == 6
    assert recorder.metrics[0][1]["mse"] == first["recorder"].metrics[1][1]["mse"]


def test_checkpoint_of_mmengines_own_ema_hook_resumes(uninterrupted, tmp_path):
    """mmengine's EMAHook for 3 iterations, then polyak's hook resumes from its checkpoint."""
    first = uninterrupted
    mm_hook = {"type": "EMAHook", "momentum": MOMENTUM, "update_buffers": True}
    _, rec_mm, hook_mm = run(tmp_path / "mm", [mm_hook], max_iters=3)
    assert type(hook_mm).__module__ == "mmengine.hooks.ema_hook"
    path = str(tmp_path / "mm" / "iter_3.pth")
    assert "polyak" not in torch.load(path, weights_only=True)

    runner, recorder, hook = run(tmp_path / "polyak", [POLYAK_HOOK], resume=True, load_from=path)
    assert hook.ema_model.steps == 6
    states = [rec_mm.after[i] for i in range(3)] + [recorder.after[i] for i in range(3, 6)]
    assert_state_close(hook.ema_model.module.state_dict(), reference_average(states, ema_momenta(6), AVERAGED))
    # the live weights were resumed exactly: the same as the uninterrupted polyak run
    assert_state_equal(snapshot64(runner.model), snapshot64(first["runner"].model))


def test_polyak_checkpoint_resumes_into_mmengines_own_ema_hook(uninterrupted, tmp_path):
    """The other way: polyak's checkpoint has mmengine's keys (state_dict = average,
    ema_state_dict = live weights and steps)."""
    first = uninterrupted
    path = str(first["work_dir"] / "iter_3.pth")
    mm_hook = {"type": "EMAHook", "momentum": MOMENTUM, "update_buffers": True}
    runner, recorder, hook = run(tmp_path, [mm_hook], resume=True, load_from=path)
    assert int(hook.ema_model.steps) == 6
    assert_state_equal(snapshot64(runner.model), snapshot64(first["runner"].model))
    states = [first["recorder"].after[i] for i in range(3)] + [recorder.after[i] for i in range(3, 6)]
    expected = reference_average(states, ema_momenta(6), AVERAGED)
    # (mmengine freezes integer buffers after its first update: compare the floating tensors)
    assert_state_close(hook.ema_model.module.state_dict(), {k: expected[k] for k in AVERAGED})


def test_accumulative_counts_gives_one_update_per_optimizer_step(tmp_path):
    """accumulative_counts=2: the optimizer steps after iterations 1, 3 and 5 (0-based), and the
    average is updated then only; CosineEMA's max_steps counts those 3 optimizer steps."""
    integration()
    start, end = 0.5, 0.1
    cfg = {"type": "PolyakEMAHook", "ema_type": "PolyakCosineEMA", "momentum": start, "end_momentum": end}
    runner, recorder, hook = run(tmp_path, [cfg], accumulative_counts=2, val_interval=10, ckpt_interval=10)
    # the test's own check of when the optimizer stepped: the parameters moved only then
    for i in range(1, 6):
        moved = any(not torch.equal(recorder.after[i][k], recorder.after[i - 1][k]) for k in PARAMS)
        assert moved == (i % 2 == 1), i
    assert hook.ema_model.max_steps == 3
    assert hook.ema_model.steps == 3

    def cosine(t: int) -> float:
        return end - (end - start) * (math.cos(math.pi * min(t, 3) / 3) + 1) / 2

    expected = reference_average([recorder.after[i] for i in (1, 3, 5)], [1.0, cosine(1), cosine(2)], PARAMS)
    assert_state_close(hook.ema_model.module.state_dict(), expected)
    values = runner.message_hub.get_scalar("train/ema_momentum").data[0].tolist()
    # logged from the first update on: iterations 1..5
    assert values == pytest.approx([1.0, 1.0, cosine(1), cosine(1), cosine(2)], rel=1e-12)


def test_swap_epoch_with_epoch_based_loop_and_checkpoints(tmp_path):
    """swap="epoch" (mmcv's swap) in an EpochBasedTrainLoop: the average is in the model after
    each epoch, for validation and for the CheckpointHook, whose checkpoint still holds the live
    weights under ema_state_dict; the model ends with the live weights."""
    integration()
    cfg = runner_cfg(tmp_path, [{"type": "PolyakTestRecorder"}, {**POLYAK_HOOK, "swap": "epoch"}])
    cfg["train_dataloader"]["dataset"]["n"] = 8  # 2 iterations per epoch
    cfg["train_cfg"] = {"by_epoch": True, "max_epochs": 2, "val_interval": 1}
    cfg["default_hooks"]["checkpoint"] = {"type": "CheckpointHook", "interval": 1, "by_epoch": True}
    runner = Runner(**cfg)
    runner.train()
    recorder = next(h for h in runner.hooks if isinstance(h, PolyakTestRecorder))
    assert sorted(recorder.after) == [0, 1, 2, 3] and recorder.leaks == []
    for epoch, (i, metrics) in zip((1, 2), recorder.metrics, strict=True):
        n = 2 * epoch
        expected = reference_average([recorder.after[j] for j in range(n)], ema_momenta(n), AVERAGED)
        assert i == n
        assert math.isclose(metrics["mse"], reference_mse(expected), rel_tol=1e-5)
        ck = torch.load(tmp_path / f"epoch_{epoch}.pth", weights_only=True)
        assert_state_close(ck["state_dict"], expected)
        live = {k: v.double() if v.is_floating_point() else v for k, v in live_of(ck).items()}
        assert_state_equal(live, recorder.after[n - 1])
    assert_state_equal(snapshot64(runner.model), recorder.after[3])


# --------------------------------------------------------------------------------------------
# configs and weights_only in fresh interpreters

CONFIG_SCRIPT = """
import pickle
import sys

import torch
from mmengine.config import Config
from mmengine.registry import HOOKS
from mmengine.runner import Runner

config, earlier = sys.argv[1], sys.argv[2]
assert "polyak.integrations.mmengine" not in sys.modules
assert "PolyakEMAHook" not in HOOKS.module_dict
# without the allow-list, torch refuses an mmengine checkpoint (its message hub)
try:
    torch.load(earlier, weights_only=True)
    print("LOADED WITHOUT THE INTEGRATION")
except pickle.UnpicklingError as e:
    print("REFUSED", "Unsupported global" in str(e))
cfg = Config.fromfile(config)
assert "polyak.integrations.mmengine" in sys.modules, "custom_imports did not import the integration"
runner = Runner.from_cfg(cfg)
runner.train()
print("HOOK", type(runner.hooks[[type(h).__name__ for h in runner.hooks].index("PolyakEMAHook")]).__module__)
print("LOADED", sorted(torch.load(earlier, weights_only=True)))
"""


def test_config_with_custom_imports_and_weights_only_in_a_fresh_interpreter(uninterrupted, tmp_path):
    """A config file that names the integration in ``custom_imports``, run by a fresh
    interpreter: the hook comes from polyak, trains as in-process, and the checkpoint that
    torch refused there before the import loads after it."""
    from mmengine.config import Config

    records = tmp_path / "records.pt"
    cfg = runner_cfg(
        tmp_path / "work",
        [{"type": "PolyakTestRecorder", "out": str(records)}, {"type": "PolyakEMAHook", "momentum": MOMENTUM}],
    )
    cfg["custom_imports"] = {
        "imports": [Path(__file__).stem, "polyak.integrations.mmengine"],
        "allow_failed_imports": False,
    }
    Config(cfg).dump(tmp_path / "config.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    earlier = uninterrupted["work_dir"] / "iter_6.pth"
    done = subprocess.run(
        [sys.executable, "-c", CONFIG_SCRIPT, str(tmp_path / "config.py"), str(earlier)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "REFUSED True" in done.stdout
    assert "HOOK polyak.integrations.mmengine" in done.stdout
    assert "LOADED ['ema_state_dict', 'message_hub', 'meta', 'optimizer', 'polyak', 'state_dict']" in done.stdout

    rec = torch.load(records, weights_only=True)
    ck = torch.load(tmp_path / "work" / "iter_6.pth", weights_only=True)
    expected = reference_average([rec["after"][i] for i in range(6)], ema_momenta(6), PARAMS)
    assert_state_close(ck["state_dict"], expected)
    assert rec["leaks"] == []
    avg3 = reference_average([rec["after"][i] for i in range(3)], ema_momenta(3), PARAMS)
    buffers3 = {k: rec["after"][2][k] for k in (*FLOAT_BUFFERS, "bn.num_batches_tracked")}
    assert math.isclose(rec["metrics"][0][1]["mse"], reference_mse({**avg3, **buffers3}), rel_tol=1e-5)


class _Getattr:
    def __init__(self, obj, name: str) -> None:
        self.obj, self.name = obj, name

    def __reduce__(self):
        return (getattr, (self.obj, self.name))


def test_the_allowed_getattr_resolves_only_history_buffer_statistics(tmp_path):
    mm = integration()
    from mmengine.logging import HistoryBuffer

    ok = tmp_path / "ok.pt"
    torch.save({"f": _Getattr(HistoryBuffer, "mean")}, ok)
    assert torch.load(ok, weights_only=True)["f"] is HistoryBuffer.mean
    for name in ("update", "__init__", "__setstate__"):
        bad = tmp_path / f"{name}.pt"
        torch.save({"f": _Getattr(HistoryBuffer, name)}, bad)
        with pytest.raises(pickle.UnpicklingError, match="refused getattr"):
            torch.load(bad, weights_only=True)
    bad = tmp_path / "other.pt"
    torch.save({"f": _Getattr(torch.Tensor, "add")}, bad)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(bad, weights_only=True)
    entries = mm.safe_globals_for_mmengine()
    assert HistoryBuffer in entries and (mm.history_buffer_getattr, "builtins.getattr") in entries
    mm.allow_mmengine_checkpoints()  # again: nothing changes
    assert all(e in torch.serialization.get_safe_globals() for e in entries)


ALLOW_LIST_SCRIPT = """
import json
import torch

def names(entries):
    out = set()
    for e in entries:
        out.add(e[1] if isinstance(e, tuple) else f"{e.__module__}.{e.__qualname__}")
    return out

# what the integration imports adds to the list on its own (torch.distributed's classes)
import mmengine.hooks, mmengine.logging, mmengine.model, mmengine.registry, numpy, polyak.hooks
before = names(torch.serialization.get_safe_globals())
import polyak.integrations.mmengine as mm
after = names(torch.serialization.get_safe_globals())
print(json.dumps({"added": sorted(after - before), "declared": list(mm.ALLOWED_GLOBALS)}))
"""


def test_importing_the_integration_adds_only_what_mmengine_checkpoints_need(tmp_path):
    """What ``import polyak.integrations.mmengine`` adds to torch's process-wide allow-list, in a
    fresh interpreter: exactly the declared list, which is what an mmengine checkpoint's message
    hub pickles (read off a real checkpoint: HistoryBuffer with float64 values and int64 counts, a
    float64 ``eta``); a numpy array of another dtype is still refused."""
    done = subprocess.run(
        [sys.executable, "-c", ALLOW_LIST_SCRIPT],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["added"] == sorted(result["declared"])
    assert set(result["added"]) == {
        "builtins.getattr",
        "mmengine.logging.history_buffer.HistoryBuffer",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.dtypes.Float64DType",
        "numpy.dtypes.Int64DType",
    }
    integration()
    import numpy as np

    ok, bad = tmp_path / "f64.pt", tmp_path / "f32.pt"
    torch.save({"x": np.zeros(3, dtype=np.float64)}, ok)
    torch.save({"x": np.zeros(3, dtype=np.float32)}, bad)
    assert torch.load(ok, weights_only=True)["x"].dtype == np.float64
    with pytest.raises(pickle.UnpicklingError):
        torch.load(bad, weights_only=True)
