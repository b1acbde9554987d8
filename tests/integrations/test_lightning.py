"""polyak.integrations.lightning: real ``Trainer.fit`` runs of a tiny BatchNorm model on the CPU.

Data order is fixed (``shuffle=False``), so two runs, or a run and its resume, see the same
batches. References are computed here in float64 from the live weights recorded after each
optimizer step that really ran, found from Adam's own step count (not from polyak's counter).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("lightning.pytorch")
pytest.importorskip("torchmetrics")

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import polyak
from polyak.integrations.lightning import EMA, WeightAveraging

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*litlogger.*"),
    pytest.mark.filterwarnings("ignore:.*have no `val_dataloader`.*"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*"),
]

N_TRAIN, N_VAL, DIM = 32, 13, 4
MOMENTUM = 0.3  # large, so that every step shows in the average
WARMUP = polyak.schedules.Warmup(0.9)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin() + 0.1 * torch.randn(n, 1, generator=g)


TRAIN, VAL = _data(N_TRAIN, 1), _data(N_VAL, 2)


def train_loader() -> DataLoader:
    return DataLoader(TensorDataset(*TRAIN), batch_size=4, shuffle=False)


def val_loader() -> DataLoader:
    return DataLoader(TensorDataset(*VAL), batch_size=5, shuffle=False)  # uneven last batch


class Net(pl.LightningModule):
    """Linear, BatchNorm1d, ReLU, Linear; Adam. Logs val_loss (a tensor) and val_mae (a
    torchmetrics object) in validation, test_loss in test. ``nan_at`` makes the loss NaN at
    those global batch indices (a GradScaler then skips the step)."""

    def __init__(
        self, seed: int = 0, nan_at: tuple[int, ...] = (), fail_at_epoch: int | None = None, fused: bool = False
    ) -> None:
        super().__init__()
        self.fused = fused
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(DIM, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        self.val_mae = torchmetrics.MeanAbsoluteError()
        self.nan_at = nan_at
        self.fail_at_epoch = fail_at_epoch
        self.batches = 0
        self.seen_in_validation: list[tuple[bool, int, Tensor]] = []  # (sanity, epoch, first weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        if self.batches in self.nan_at:
            loss = loss * float("nan")
        self.batches += 1
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.fail_at_epoch == self.current_epoch and not self.trainer.sanity_checking:
            raise RuntimeError("validation failed")
        x, y = batch
        out = self(x)
        if batch_idx == 0:
            first = self.net[0].weight.detach().clone()
            self.seen_in_validation.append((self.trainer.sanity_checking, self.current_epoch, first))
        self.log("val_loss", nn.functional.mse_loss(out, y))
        self.val_mae.update(out, y)
        self.log("val_mae", self.val_mae)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y))

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.05, fused=self.fused)


def averages(slow: bool = True) -> dict[str, object]:
    out: dict[str, object] = {"ema": lambda m: polyak.ExponentialMovingAverage(m, momentum=MOMENTUM)}
    if slow:
        out["ema_slow"] = {"type": "AveragedModel", "schedule": WARMUP}
    return out


def make_trainer(tmp_path: Path, callbacks: list[pl.Callback], **kwargs: object) -> pl.Trainer:
    options: dict[str, object] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """The module's state, floating tensors widened to float64."""
    return {
        k: (v.detach().double() if v.is_floating_point() else v.detach()).clone()
        for k, v in module.state_dict().items()
    }


class LiveRecorder(pl.Callback):
    """Records the live weights after every optimizer step that ran (Adam's own step count moved),
    and, with ``averaging``, the averages' state at the same point (list it after the averaging)."""

    def __init__(self, averaging: WeightAveraging | None = None) -> None:
        self.averaging = averaging
        self.live: list[dict[str, Tensor]] = []
        self.averaged: list[dict[str, dict[str, Tensor]]] = []
        self.adam_steps = 0
        self.batches = 0

    @staticmethod
    def _adam_steps(trainer: pl.Trainer) -> int:
        state = trainer.optimizers[0].state
        return int(next(iter(state.values()))["step"]) if state else 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.adam_steps = self._adam_steps(trainer)  # restored by a resume

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.batches += 1
        steps = self._adam_steps(trainer)
        if steps != self.adam_steps:
            assert steps == self.adam_steps + 1
            self.adam_steps = steps
            self.live.append(snapshot(pl_module))
            if self.averaging is not None:
                self.averaged.append({n: snapshot(a.module) for n, a in self.averaging.averages.items()})


def reference(snaps: list[dict[str, Tensor]], momentum: Callable[[int], float], params: set[str]) -> dict[str, Tensor]:
    """polyak's rule in float64: the first update copies; then parameters are lerped with
    ``momentum(steps)`` and buffers copied."""
    avg = dict(snaps[0])
    for s, live in enumerate(snaps[1:], start=1):
        m = momentum(s)
        avg = {k: (1 - m) * avg[k] + m * v if k in params else v for k, v in live.items()}
    return avg


def ema_momentum(s: int) -> float:
    return MOMENTUM


def warmup_momentum(s: int) -> float:
    return 1.0 - min(0.9, max(0.0, 1.0 - (1.0 + s) ** (-2 / 3)))


def assert_close_state(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-6, atol=atol, msg=k)


def assert_equal_state(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        assert torch.equal(actual[k], expected[k]), k


def params_of(module: nn.Module) -> set[str]:
    return {k for k, _ in module.named_parameters()}


def losses_by_hand(state: dict[str, Tensor], data: tuple[Tensor, Tensor] = VAL) -> tuple[float, float]:
    """(MSE, MAE) over ``data`` of a bare Net holding ``state``, in eval mode."""
    net = Net()
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    net.eval()
    with torch.no_grad():
        out = net(data[0])
    return nn.functional.mse_loss(out, data[1]).item(), (out - data[1]).abs().mean().item()


# -- updating -----------------------------------------------------------------------------------


def test_one_update_per_optimizer_step_with_gradient_accumulation(tmp_path: Path) -> None:
    averaging = WeightAveraging(averages())
    recorder = LiveRecorder()
    model = Net()
    trainer = make_trainer(tmp_path, [averaging, recorder], accumulate_grad_batches=2, limit_val_batches=0)
    trainer.fit(model, train_loader())

    steps = 2 * (N_TRAIN // 4) // 2
    assert recorder.batches == 2 * N_TRAIN // 4 and len(recorder.live) == steps == trainer.global_step
    params = params_of(model)
    for name, momentum in (("ema", ema_momentum), ("ema_slow", warmup_momentum)):
        average = averaging.averages[name]
        assert average.steps == steps
        assert_close_state(snapshot(average.module), reference(recorder.live, momentum, params))
    assert averaging.state_dict()["optimizer_steps"] == steps
    # the decay of the latest update is logged per average
    assert trainer.callback_metrics["ema/decay"].item() == pytest.approx(1 - MOMENTUM)
    assert trainer.callback_metrics["ema_slow/decay"].item() == pytest.approx(1 - warmup_momentum(steps - 1))
    # the model keeps its live weights after fit
    assert_equal_state(snapshot(model), recorder.live[-1])


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_step_skipped_by_the_grad_scaler_is_not_an_update(tmp_path: Path, fused: bool) -> None:
    # A fused Adam is stepped by the scaler even when it skips (its kernel reads found_inf).
    averaging = WeightAveraging(averages(slow=False))
    recorder = LiveRecorder()
    model = Net(nan_at=(2, 5), fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)
    trainer = make_trainer(
        tmp_path,
        [averaging, recorder],
        max_epochs=1,
        limit_val_batches=0,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
    )
    trainer.fit(model, train_loader())

    batches = N_TRAIN // 4
    assert trainer.global_step == batches  # Lightning counts the skipped steps too ...
    assert len(recorder.live) == batches - 2  # ... but Adam stepped twice less
    assert scaler.get_scale() == 0.25  # halved at each skip: the scaler did skip
    average = averaging.averages["ema"]
    assert average.steps == batches - 2
    assert_close_state(snapshot(average.module), reference(recorder.live, ema_momentum, params_of(model)))


def test_should_update_policy_and_epoch_updates(tmp_path: Path) -> None:
    class EveryOtherStepAndEpochEnds(WeightAveraging):
        def __init__(self) -> None:
            super().__init__(averages(slow=False))
            self.calls: list[tuple[int | None, int | None]] = []

        def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
            self.calls.append((step_idx, epoch_idx))
            return (step_idx is not None and step_idx % 2 == 1) or epoch_idx is not None

    averaging = EveryOtherStepAndEpochEnds()
    recorder = LiveRecorder()
    model = Net()
    trainer = make_trainer(tmp_path, [averaging, recorder], limit_val_batches=0)
    trainer.fit(model, train_loader())

    per_epoch = N_TRAIN // 4
    step_calls = [(s, None) for s in range(per_epoch)]
    assert averaging.calls == step_calls + [(None, 0)] + [(s + per_epoch, None) for s in range(per_epoch)] + [(None, 1)]
    # the updates: odd steps, and each epoch end (after its last step, same weights)
    snaps = []
    for epoch in range(2):
        snaps += [recorder.live[epoch * per_epoch + s] for s in range(1, per_epoch, 2)]
        snaps.append(recorder.live[(epoch + 1) * per_epoch - 1])
    average = averaging.averages["ema"]
    assert average.steps == len(snaps)
    assert_close_state(snapshot(average.module), reference(snaps, ema_momentum, params_of(model)))
    assert averaging.state_dict()["latest_update_epoch"] == 1


def test_ema_preset(tmp_path: Path) -> None:
    averaging = EMA(decay=1 - MOMENTUM, update_starting_at_step=3)
    recorder = LiveRecorder()
    model = Net()
    trainer = make_trainer(tmp_path, [averaging, recorder], limit_val_batches=0)
    trainer.fit(model, train_loader())
    average = averaging.averages["ema"]
    assert isinstance(average, polyak.AveragedModel) and average.update_buffers is False
    assert average.steps == len(recorder.live) - 3
    assert_close_state(snapshot(average.module), reference(recorder.live[3:], ema_momentum, params_of(model)))

    by_epoch = EMA(decay=0.9, update_starting_at_epoch=1)
    make_trainer(tmp_path, [by_epoch], limit_val_batches=0).fit(Net(), train_loader())
    assert by_epoch.averages["ema"].steps == N_TRAIN // 4  # the second epoch's steps only
    with pytest.raises(ValueError, match="update_starting_at_step"):
        EMA(update_starting_at_step=-1)


# -- evaluating ---------------------------------------------------------------------------------


def test_validation_and_test_run_on_the_averages(tmp_path: Path) -> None:
    averaging = WeightAveraging(averages(), swap_stages=("validate", "test", "predict"), evaluate_live=True)
    recorder = LiveRecorder()
    model = Net()
    initial = model.net[0].weight.detach().clone()
    trainer = make_trainer(tmp_path, [averaging, recorder], num_sanity_val_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_loader(), val_loader())
    assert not [w for w in caught if "not been updated" in str(w.message)]  # the sanity check is quiet

    ema = snapshot(averaging.averages["ema"].module)
    slow = snapshot(averaging.averages["ema_slow"].module)
    live = recorder.live[-1]
    metrics = trainer.callback_metrics
    for prefix, state in (("", ema), ("ema_slow/", slow), ("live/", live)):
        mse, mae = losses_by_hand(state)
        assert metrics[prefix + "val_loss"].item() == pytest.approx(mse, rel=1e-5), prefix
        assert metrics[prefix + "val_mae"].item() == pytest.approx(mae, rel=1e-5), prefix
    assert "ema/val_loss" not in metrics  # the primary's metrics keep their names
    assert losses_by_hand(ema)[0] != pytest.approx(losses_by_hand(live)[0], rel=1e-3)  # the check can fail
    # the sanity check ran before any update: on the live (initial) weights
    sanity = [w for s, _, w in model.seen_in_validation if s]
    assert len(sanity) == 1 and torch.equal(sanity[0], initial)
    # the model holds its live weights after fit
    assert_equal_state(snapshot(model), live)

    # test and predict, after fit, with the same trainer: the averages again
    trainer.test(model, val_loader(), verbose=False)
    for prefix, state in (("", ema), ("ema_slow/", slow), ("live/", live)):
        assert trainer.callback_metrics[prefix + "test_loss"].item() == pytest.approx(
            losses_by_hand(state)[0], rel=1e-5
        )
    predictions = torch.cat(trainer.predict(model, val_loader()))
    net = Net()
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ema.items()})
    torch.testing.assert_close(predictions, net.eval()(VAL[0]).detach())
    assert_equal_state(snapshot(model), live)


def test_side_by_side_without_swapping_and_several_dataloaders(tmp_path: Path) -> None:
    # swap_stages=(): validation runs on the live weights, and every average in a pass of its own
    averaging = WeightAveraging(averages(), swap_stages=())
    recorder = LiveRecorder()
    model = Net()
    trainer = make_trainer(tmp_path, [averaging, recorder], max_epochs=1)
    other = _data(7, 3)
    trainer.fit(model, train_loader(), [val_loader(), DataLoader(TensorDataset(*other), batch_size=3)])

    states = {"": recorder.live[-1]}
    states.update({f"{n}/": snapshot(a.module) for n, a in averaging.averages.items()})
    for prefix, state in states.items():
        for idx, data in enumerate((VAL, other)):
            logged = trainer.callback_metrics[f"{prefix}val_loss/dataloader_idx_{idx}"].item()
            assert logged == pytest.approx(losses_by_hand(state, data)[0], rel=1e-5), (prefix, idx)


def test_metric_objects_are_reset_for_a_pass_and_given_back() -> None:
    from polyak.integrations.lightning_eval import metric_states_kept

    module = nn.Module()
    module.mae = torchmetrics.MeanAbsoluteError()
    module.mae.update(torch.zeros(3), torch.ones(3))
    with metric_states_kept(module):
        assert module.mae.update_count == 0
        module.mae.update(torch.zeros(2), torch.full((2,), 5.0))
        assert module.mae.compute().item() == 5.0
    assert module.mae.update_count == 1 and module.mae.compute().item() == 1.0


def test_validation_never_runs_on_an_average_not_updated_yet(tmp_path: Path) -> None:
    # Lightning issue #21724: with a delayed start, the first validation came before any update.
    averaging = EMA(decay=0.5, update_starting_at_step=N_TRAIN // 4)  # from the second epoch
    recorder = LiveRecorder(averaging)
    model = Net()
    trainer = make_trainer(tmp_path, [averaging, recorder])
    with pytest.warns(UserWarning, match="'ema' has not been updated yet; validate runs on the live weights"):
        trainer.fit(model, train_loader(), val_loader())
    (_, e0, w0), (_, e1, w1) = model.seen_in_validation
    assert (e0, e1) == (0, 1)
    assert torch.equal(w0.double(), recorder.live[N_TRAIN // 4 - 1]["net.0.weight"])  # live
    assert torch.equal(w1.double(), recorder.averaged[-1]["ema"]["net.0.weight"])  # the average


def test_an_exception_in_validation_puts_the_live_weights_back(tmp_path: Path) -> None:
    averaging = WeightAveraging(averages(slow=False))
    recorder = LiveRecorder(averaging)
    model = Net(fail_at_epoch=1)
    trainer = make_trainer(tmp_path, [averaging, recorder])
    with pytest.raises(RuntimeError, match="validation failed"):
        trainer.fit(model, train_loader(), val_loader())
    assert_equal_state(snapshot(model), recorder.live[-1])
    average = averaging.averages["ema"]
    assert_equal_state(snapshot(average.module), recorder.averaged[-1]["ema"])
    average.state_dict()  # not left swapped


def test_metrics_reach_the_logger(tmp_path: Path) -> None:
    averaging = WeightAveraging(averages())
    logger = CSVLogger(tmp_path, name="logs", version=0)
    trainer = make_trainer(tmp_path, [averaging], logger=logger, log_every_n_steps=1)
    trainer.fit(Net(), train_loader(), val_loader())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    decays = [float(r["ema/decay"]) for r in rows if r.get("ema/decay")]
    assert len(decays) == trainer.global_step  # one row per update (the first, a copy, logs decay 0)
    assert decays[0] == 0.0 and decays[1:] == pytest.approx([1 - MOMENTUM] * (len(decays) - 1))
    slow = [float(r["ema_slow/val_loss"]) for r in rows if r.get("ema_slow/val_loss")]
    assert len(slow) == 2 and slow[-1] == pytest.approx(trainer.callback_metrics["ema_slow/val_loss"].item())
    assert len([r for r in rows if r.get("val_loss")]) == 2


def test_copy_average_on_train_end(tmp_path: Path) -> None:
    averaging = WeightAveraging(averages(slow=False), copy_average_on_train_end=True)
    model = Net()
    make_trainer(tmp_path, [averaging], limit_val_batches=0).fit(model, train_loader())
    assert_equal_state(snapshot(model), snapshot(averaging.averages["ema"].module))


# -- checkpoints --------------------------------------------------------------------------------


def _fit_with_checkpoints(tmp_path: Path, epochs: int = 3) -> tuple[WeightAveraging, LiveRecorder, Net]:
    averaging = WeightAveraging(averages())
    recorder = LiveRecorder(averaging)
    model = Net()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    # a side-by-side metric can be monitored: it is logged before ModelCheckpoint looks
    best = ModelCheckpoint(dirpath=tmp_path / "best", filename="best", monitor="ema_slow/val_loss")
    trainer = make_trainer(
        tmp_path, [averaging, recorder, checkpoints, best], max_epochs=epochs, enable_checkpointing=True
    )
    trainer.fit(model, train_loader(), val_loader())
    return averaging, recorder, model


def test_resume_gives_the_same_averages_as_never_stopping(tmp_path: Path) -> None:
    straight, _, straight_model = _fit_with_checkpoints(tmp_path)

    resumed = WeightAveraging(averages())
    model = Net(seed=123)  # different initial weights: everything must come from the checkpoint
    trainer = make_trainer(tmp_path, [resumed], max_epochs=3)
    trainer.fit(model, train_loader(), val_loader(), ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")

    assert_equal_state(snapshot(model), snapshot(straight_model))  # bitwise
    for name in ("ema", "ema_slow"):
        assert resumed.averages[name].steps == straight.averages[name].steps
        assert_equal_state(snapshot(resumed.averages[name].module), snapshot(straight.averages[name].module))
    assert resumed.state_dict() == straight.state_dict()


def test_checkpoint_layout(tmp_path: Path) -> None:
    averaging, recorder, model = _fit_with_checkpoints(tmp_path, epochs=2)
    path = tmp_path / "ckpt" / "epoch=1.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # safe loading works

    ema = averaging.averages["ema"]
    assert_equal_state(snapshot_of(checkpoint["state_dict"]), snapshot(ema.module))
    assert_equal_state(snapshot_of(checkpoint["live_state_dict"]), recorder.live[-1])
    block = checkpoint["polyak"]
    assert block["primary"] == "ema" and block["live_key"] == "live_state_dict"
    assert block["averages"]["ema"]["weights"] is None
    assert block["averages"]["ema"]["steps"] == ema.steps == len(recorder.live)
    assert block["averages"]["ema_slow"]["schedule"] == WARMUP.to_dict()
    assert_equal_state(
        snapshot_of(block["averages"]["ema_slow"]["weights"]), snapshot(averaging.averages["ema_slow"].module)
    )
    assert checkpoint["callbacks"][averaging.state_key] == averaging.state_dict()

    # the file deploys the average: a bare model, and Lightning's own loader
    bare = Net(seed=7)
    bare.load_state_dict(checkpoint["state_dict"])
    assert_equal_state(snapshot(bare), snapshot(ema.module))
    assert_equal_state(snapshot(Net.load_from_checkpoint(path, weights_only=True)), snapshot(ema.module))

    # a fresh Trainer validating from the file (no averages yet) evaluates the average
    fresh = make_trainer(tmp_path, [WeightAveraging(averages())])
    fresh.validate(Net(seed=7), val_loader(), ckpt_path=path, verbose=False, weights_only=True)
    assert fresh.callback_metrics["val_loss"].item() == pytest.approx(losses_by_hand(snapshot(ema.module))[0], rel=1e-5)
    del model


def snapshot_of(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: (v.double() if v.is_floating_point() else v).clone() for k, v in state.items()}


class CopyingStrategy(SingleDeviceStrategy):
    """A strategy whose checkpoint ``state_dict`` is a copy of the module's tensors (as a
    strategy that moves them to the CPU, or gathers them, gives), not the tensors themselves."""

    def lightning_module_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in super().lightning_module_state_dict().items()}


@pytest.mark.parametrize("copying", [False, True], ids=["aliasing-strategy", "copying-strategy"])
def test_a_checkpoint_written_during_validation_saves_the_live_weights_as_live(tmp_path: Path, copying: bool) -> None:
    """The live weights are read from the model once the average is out, not from
    ``checkpoint["state_dict"]``: with a strategy that copies, that dict holds the average."""

    class SaveDuringValidation(pl.Callback):
        def __init__(self) -> None:
            self.in_model: dict[str, Tensor] | None = None

        def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch == 0:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")
                self.in_model = snapshot(pl_module)  # still the average after the save

    averaging = WeightAveraging(averages())
    recorder = LiveRecorder(averaging)
    saver = SaveDuringValidation()
    model = Net()
    extra = {"strategy": CopyingStrategy(device=torch.device("cpu"))} if copying else {}
    trainer = make_trainer(tmp_path, [averaging, recorder, saver], **extra)
    trainer.fit(model, train_loader(), val_loader())

    at = N_TRAIN // 4 - 1  # the last step of the first epoch
    checkpoint = torch.load(tmp_path / "mid.ckpt", map_location="cpu", weights_only=True)
    assert_equal_state(snapshot_of(checkpoint["live_state_dict"]), recorder.live[at])
    assert_equal_state(snapshot_of(checkpoint["state_dict"]), recorder.averaged[at]["ema"])
    assert_equal_state(
        snapshot_of(checkpoint["polyak"]["averages"]["ema_slow"]["weights"]), recorder.averaged[at]["ema_slow"]
    )
    assert saver.in_model is not None
    assert_equal_state(saver.in_model, recorder.averaged[at]["ema"])
    assert_equal_state(snapshot(model), recorder.live[-1])


def test_resuming_from_a_checkpoint_without_averages_starts_them_from_its_weights(tmp_path: Path) -> None:
    plain = make_trainer(tmp_path, [], max_epochs=1, limit_val_batches=0)
    plain.fit(Net(), train_loader())
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    start = snapshot_of(torch.load(tmp_path / "plain.ckpt", weights_only=True)["state_dict"])

    averaging = WeightAveraging(averages())
    recorder = LiveRecorder()
    model = Net(seed=5)
    trainer = make_trainer(tmp_path, [averaging, recorder], max_epochs=2, limit_val_batches=0)
    with pytest.warns(UserWarning, match="holds no averages"):
        trainer.fit(model, train_loader(), ckpt_path=tmp_path / "plain.ckpt")
    params = params_of(model)
    snaps = [start, *recorder.live]
    for name, momentum in (("ema", ema_momentum), ("ema_slow", warmup_momentum)):
        assert averaging.averages[name].steps == len(snaps)
        assert_close_state(snapshot(averaging.averages[name].module), reference(snaps, momentum, params))


def test_resuming_from_lightnings_weight_averaging(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import WeightAveraging as LightningWeightAveraging
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    theirs = LightningWeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=False)
    first = make_trainer(tmp_path, [theirs], max_epochs=1, limit_val_batches=0)
    first.fit(Net(), train_loader())
    first.save_checkpoint(tmp_path / "theirs.ckpt")
    saved = torch.load(tmp_path / "theirs.ckpt", weights_only=False)

    class Probe(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.model = snapshot(pl_module)
            self.ema = snapshot(ours.averages["ema"].module)
            self.steps = ours.averages["ema"].steps

    ours = WeightAveraging(averages())
    probe = Probe()
    second = make_trainer(tmp_path, [ours, probe], max_epochs=2, limit_val_batches=0)
    with pytest.warns(UserWarning, match="Lightning's WeightAveraging"):
        second.fit(Net(seed=3), train_loader(), ckpt_path=tmp_path / "theirs.ckpt")
    assert_equal_state(probe.model, snapshot_of(saved["current_model_state"]))
    assert_equal_state(probe.ema, snapshot_of(saved["state_dict"]))
    assert probe.steps == int(saved["averaging_state"]["n_averaged"]) == N_TRAIN // 4  # one per update


# -- arguments ----------------------------------------------------------------------------------


def test_factories_and_arguments() -> None:
    callback = WeightAveraging(
        {
            "a": polyak.StochasticWeightAverage,
            "b": {"type": "ExponentialMovingAverage", "momentum": 0.01},
            "c": {"type": polyak.AveragedModel, "schedule": {"type": "ConstantMomentum", "args": {"momentum": 0.1}}},
        },
        primary="b",
        side_by_side=["a"],
    )
    model = Net()
    built = {name: factory(model) for name, factory in callback._factories.items()}
    assert isinstance(built["a"], polyak.StochasticWeightAverage)
    assert isinstance(built["b"], polyak.ExponentialMovingAverage) and built["b"].momentum == 0.01
    assert built["c"].schedule == polyak.schedules.ConstantMomentum(0.1)
    assert callback.primary == "b" and callback.side_by_side == ("a",)
    assert list(WeightAveraging(polyak.StochasticWeightAverage)._factories) == ["average"]
    assert callback.metric_name("a", "val_loss") == "a/val_loss"

    bad: list[tuple[dict[str, object], str]] = [
        ({"averages": {}}, "empty"),
        ({"averages": {"a": {"momentum": 0.1}}}, "needs a 'type'"),
        ({"averages": {"a": {"type": "Nope"}}}, "unknown type"),
        ({"averages": {"a": {"type": nn.Linear}}}, "polyak averaged-model class"),
        ({"averages": {"a": 3}}, "must be a callable"),
        ({"averages": {"live": polyak.StochasticWeightAverage}}, "other than 'live'"),
        ({"averages": {"a": polyak.StochasticWeightAverage}, "primary": "b"}, "primary"),
        ({"averages": {"a": polyak.StochasticWeightAverage}, "swap_stages": ["fit"]}, "swap_stages"),
        ({"averages": {"a": polyak.StochasticWeightAverage}, "side_by_side": ["b"]}, "side_by_side"),
        ({"averages": {"a": polyak.StochasticWeightAverage}, "metric_prefix": "avg_"}, "metric_prefix"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            WeightAveraging(**kwargs)  # type: ignore[arg-type]


def test_a_factory_must_return_a_polyak_average(tmp_path: Path) -> None:
    averaging = WeightAveraging(lambda m: nn.Linear(1, 1))  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="not a polyak average"):
        make_trainer(tmp_path, [averaging], limit_val_batches=0).fit(Net(), train_loader())


def test_cosine_ema_gets_max_steps_from_the_trainer(tmp_path: Path) -> None:
    averaging = WeightAveraging(lambda m: polyak.CosineEMA(m, momentum=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, [averaging], max_epochs=1, limit_val_batches=0).fit(Net(), train_loader())
    average = averaging.averages["average"]
    assert average.max_steps == N_TRAIN // 4 and average.steps == N_TRAIN // 4
    assert math.isclose(average.current_momentum or 0.0, average.momentum_at(average.steps - 1))


def test_sharded_strategies_are_refused_before_anything_is_built(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    averaging = WeightAveraging(averages())
    trainer = make_trainer(tmp_path, [averaging], strategy=ModelParallelStrategy())
    with pytest.raises(NotImplementedError, match=r"does not support sharded training.*ModelParallelStrategy"):
        averaging.setup(trainer, Net(), "fit")
    assert averaging.averages == {}


def test_health_is_logged_and_matches_a_reference(tmp_path: Path) -> None:
    """Every ``log_every_n_steps`` optimizer steps each average's health report is logged; the
    distance matches one computed here from the recorded weights; a healthy run warns nothing."""
    averaging = WeightAveraging(averages())
    recorder = LiveRecorder(averaging)
    logger = CSVLogger(tmp_path, name="logs", version=0)
    trainer = make_trainer(tmp_path, [averaging, recorder], logger=logger, log_every_n_steps=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=UserWarning, module="polyak")
        trainer.fit(Net(), train_loader(), val_loader())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("ema/distance")]
    assert [int(r["step"]) for r in rows] == list(range(1, trainer.global_step, 2))  # global_step 2, 4, ...
    params = params_of(Net())
    for row in rows:
        i = int(row["step"])  # the row of global_step i + 1: after the (i + 1)-th update
        live, avg = recorder.live[i], recorder.averaged[i]["ema"]
        d2 = sum(float(((live[k] - avg[k]) ** 2).sum()) for k in params)
        l2 = sum(float((live[k] ** 2).sum()) for k in params)
        assert float(row["ema/distance"]) == pytest.approx(math.sqrt(d2 / l2), rel=1e-5)
        assert float(row["ema/moved"]) == 1.0
        assert float(row["ema/horizon"]) == pytest.approx(1 / MOMENTUM)
        assert float(row["ema_slow/moved"]) == 1.0


def test_log_health_false_logs_no_report(tmp_path: Path) -> None:
    averaging = WeightAveraging(averages(slow=False), log_health=False)
    trainer = make_trainer(tmp_path, [averaging], log_every_n_steps=1)
    trainer.fit(Net(), train_loader(), val_loader())
    assert "ema/distance" not in trainer.callback_metrics and "ema/decay" in trainer.callback_metrics
    with pytest.raises(ValueError, match="log_health"):
        WeightAveraging(averages(), log_health=0)
