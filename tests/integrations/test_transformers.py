"""polyak.integrations.transformers: real ``Trainer.train`` runs of a tiny model on CPU.

Data order is fixed (``train_sampling_strategy="sequential"``), so two runs, or a run and its
resume, see the same batches. References are computed here in float64 from the live weights
recorded after each optimizer step.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

import polyak
from polyak.integrations.transformers import (
    AVERAGING_STATE_NAME,
    LIVE_KEY,
    WEIGHTS_KEY,
    AveragingCallback,
    AveragingTrainer,
)

N_TRAIN, N_EVAL, DIM = 24, 8, 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")


class TinyConfig(PretrainedConfig):
    model_type = "polyak_tiny"

    def __init__(self, dim: int = DIM, hidden: int = 8, **kwargs) -> None:
        self.dim = dim
        self.hidden = hidden
        super().__init__(**kwargs)


class TinyModel(PreTrainedModel):
    """Linear, LayerNorm, tanh, Linear; MSE loss: floating parameters of several shapes."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.fc1 = nn.Linear(config.dim, config.hidden)
        self.norm = nn.LayerNorm(config.hidden)
        self.fc2 = nn.Linear(config.hidden, 1)
        self.post_init()

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor | None]:
        out = self.fc2(torch.tanh(self.norm(self.fc1(x.to(self.fc1.weight.dtype))))).squeeze(-1).float()
        loss = None if labels is None else nn.functional.mse_loss(out, labels)
        return {"loss": loss, "logits": out}


def make_model() -> TinyModel:
    torch.manual_seed(0)
    model = TinyModel(TinyConfig())
    with torch.no_grad():  # every tensor random, none at a constant
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


def make_data(n: int, seed: int) -> tuple[list[dict[str, Tensor]], Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    y = x.sum(-1) + 0.1 * torch.randn(n, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)], x, y


TRAIN, _, _ = make_data(N_TRAIN, 1)
EVAL, EVAL_X, EVAL_Y = make_data(N_EVAL, 2)


def make_args(out: os.PathLike, **kwargs) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=6,
        learning_rate=0.05,
        lr_scheduler_type="linear",
        train_sampling_strategy="sequential",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    base.update(kwargs)
    return TrainingArguments(**base)


def ema(momentum: float):
    return lambda m: polyak.ExponentialMovingAverage(m, momentum=momentum)


def f64(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to(torch.float64).clone() for k, v in model.state_dict().items()}


class Recorder(TrainerCallback):
    """Live weights (float64) after each optimizer step, and how many micro-batches ran."""

    def __init__(self, trainer_ref: list | None = None) -> None:
        self.weights: list[dict[str, Tensor]] = []
        self.skipped: list[bool] = []
        self.substeps = 0
        self.trainer_ref = trainer_ref

    def on_substep_end(self, args, state, control, **kwargs) -> None:
        self.substeps += 1

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        self.substeps += 1
        self.weights.append(f64(model))
        if self.trainer_ref:
            self.skipped.append(bool(self.trainer_ref[0].accelerator.optimizer_step_was_skipped))


def ema_reference(weights: list[dict[str, Tensor]], momentum: float) -> dict[str, Tensor]:
    avg = dict(weights[0])
    for w in weights[1:]:
        avg = {k: (1 - momentum) * avg[k] + momentum * w[k] for k in avg}
    return avg


def swa_reference(weights: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: sum(w[k] for w in weights) / len(weights) for k in weights[0]}


def assert_close(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert set(actual) == set(expected)
    for k in expected:
        torch.testing.assert_close(actual[k].to(torch.float64), expected[k], rtol=1e-5, atol=1e-6, msg=k)


def assert_equal(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert set(actual) == set(expected)
    for k in expected:
        assert torch.equal(actual[k], expected[k]), k


def hand_loss(state: dict[str, Tensor]) -> float:
    model = make_model()
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(EVAL_X)["logits"], EVAL_Y))


# -- updates ------------------------------------------------------------------------------------


def test_averages_follow_optimizer_steps_with_gradient_accumulation(tmp_path) -> None:
    rec = Recorder()
    trainer = AveragingTrainer(
        model=make_model(),
        args=make_args(tmp_path),
        train_dataset=TRAIN,
        callbacks=[rec],
        averages={"ema": ema(0.25), "swa": polyak.StochasticWeightAverage},
    )
    trainer.train()
    assert rec.substeps == 12 and len(rec.weights) == 6  # 2 micro-batches per optimizer step
    averages = trainer.averaging.averages
    assert averages["ema"].steps == averages["swa"].steps == 6
    assert_close(averages["ema"].averaged_state_dict(), ema_reference(rec.weights, 0.25))
    assert_close(averages["swa"].averaged_state_dict(), swa_reference(rec.weights))
    assert_equal(f64(trainer.model), rec.weights[-1])  # the live weights stay in the model

    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["ema_decay"] for e in train_logs] == [0.0] + [0.75] * 5  # the first update copies
    assert train_logs[-1]["swa_decay"] == pytest.approx(5 / 6)


def test_callback_alone_updates_and_logs(tmp_path) -> None:
    rec = Recorder()
    callback = AveragingCallback({"ema": ema(0.25)})
    trainer = Trainer(model=make_model(), args=make_args(tmp_path), train_dataset=TRAIN, callbacks=[callback, rec])
    trainer.train()
    assert callback.averages["ema"].steps == 6
    assert_close(callback.averages["ema"].averaged_state_dict(), ema_reference(rec.weights, 0.25))
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["ema_decay"] for e in train_logs] == [0.0] + [0.75] * 5


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_skipped_optimizer_step_does_not_update(tmp_path, optim) -> None:
    """A real GradScaler skip: one optimizer step sees an inf loss. With a plain optimizer the
    scaler never calls ``optimizer.step`` (and accelerate reports ``optimizer_step_was_skipped``);
    with a fused one it calls it with ``found_inf`` set and the kernel skips the update (and
    accelerate does not notice). Either way the average leaves that step out."""
    train = [dict(d) for d in TRAIN]
    train[5]["labels"] = torch.tensor(float("inf"))  # micro-batch 3 = the second optimizer step
    ref: list = []
    rec = Recorder(ref)
    trainer = AveragingTrainer(
        model=make_model(),
        args=make_args(tmp_path, max_grad_norm=0.0, optim=optim),
        train_dataset=train,
        callbacks=[rec],
        averages={"ema": ema(0.25)},
    )
    ref.append(trainer)
    # accelerate makes no fp16 GradScaler on CPU; give it a real one (prepare() hands it to the
    # AcceleratedOptimizer, and accelerator.backward scales the loss with it).
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert trainer.accelerator.scaler.get_scale() == 2.0**7  # one inf step seen
    assert_equal(rec.weights[1], rec.weights[0])  # the skipped step changed nothing
    steps = [w["fc1.weight"] for w in rec.weights[1:]]
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(steps))  # the others moved
    if optim == "adamw_torch":
        assert rec.skipped == [False, True, False, False, False, False]
    average = trainer.averaging.averages["ema"]
    assert average.steps == 5
    taken = [w for i, w in enumerate(rec.weights) if i != 1]
    assert_close(average.averaged_state_dict(), ema_reference(taken, 0.25))


# -- evaluation ---------------------------------------------------------------------------------


def test_evaluate_swaps_each_average_in_with_prefixed_metrics(tmp_path) -> None:
    rec = Recorder()
    trainer = AveragingTrainer(
        model=make_model(),
        args=make_args(tmp_path, eval_strategy="steps", eval_steps=3, eval_on_start=True),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        callbacks=[rec],
        averages={"ema": ema(0.25), "swa": polyak.StochasticWeightAverage},
    )
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert "eval_ema_loss" not in evals[0] and "eval_swa_loss" not in evals[0]  # never before an update
    # one log entry per evaluation, with every model's metrics; at step 3 the averages are those
    # of the first three steps
    assert evals[1]["eval_ema_loss"] == pytest.approx(hand_loss(ema_reference(rec.weights[:3], 0.25)), rel=1e-5)
    assert evals[1]["eval_swa_loss"] == pytest.approx(hand_loss(swa_reference(rec.weights[:3])), rel=1e-5)
    assert evals[1]["eval_loss"] == pytest.approx(hand_loss(rec.weights[2]), rel=1e-5)

    live = f64(trainer.model)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(hand_loss(live), rel=1e-5)
    assert metrics["eval_ema_loss"] == pytest.approx(hand_loss(ema_reference(rec.weights, 0.25)), rel=1e-5)
    assert metrics["eval_swa_loss"] == pytest.approx(hand_loss(swa_reference(rec.weights)), rel=1e-5)
    assert metrics["eval_ema_loss"] != pytest.approx(metrics["eval_loss"], rel=1e-3)
    assert_equal(f64(trainer.model), live)  # swapped back

    with trainer.averaged("swa"):  # any other use of the average: predict, generate, ...
        predicted = trainer.predict(EVAL)
    assert predicted.metrics["test_loss"] == pytest.approx(metrics["eval_swa_loss"], rel=1e-6)
    assert_equal(f64(trainer.model), live)

    trainer.evaluate_live = False
    only = trainer.evaluate(metric_key_prefix="test")
    assert "test_loss" not in only and only["test_ema_loss"] == pytest.approx(metrics["eval_ema_loss"], rel=1e-6)


def test_evaluate_restores_live_weights_when_it_raises(tmp_path) -> None:
    def compute_metrics(pred):
        raise RuntimeError("boom")

    trainer = AveragingTrainer(
        model=make_model(),
        args=make_args(tmp_path, max_steps=2),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        averages={"ema": ema(0.25)},
    )
    trainer.train()
    live, avg = (
        f64(trainer.model),
        {k: v.clone() for k, v in trainer.averaging.averages["ema"].averaged_state_dict().items()},
    )
    trainer.evaluate_live = False
    trainer.compute_metrics = compute_metrics
    with pytest.raises(RuntimeError, match="boom"):
        trainer.evaluate()
    assert_equal(f64(trainer.model), live)
    assert_equal(trainer.averaging.averages["ema"].averaged_state_dict(), avg)
    trainer.compute_metrics = None
    assert "eval_ema_loss" in trainer.evaluate()  # not left half-swapped


# -- checkpoints --------------------------------------------------------------------------------


def test_checkpoint_layout_resume_and_export(tmp_path) -> None:
    averages = {
        "ema": ema(0.25),
        "swa": polyak.StochasticWeightAverage,
        "cos": lambda m: polyak.CosineEMA(m, momentum=0.5, end_momentum=0.05),  # max_steps from the run
    }
    full = AveragingTrainer(
        model=make_model(),
        args=make_args(tmp_path / "full", save_strategy="steps", save_steps=3),
        train_dataset=TRAIN,
        averages=averages,
    )
    full.train()
    ckpt3, ckpt6 = tmp_path / "full" / "checkpoint-3", tmp_path / "full" / "checkpoint-6"

    # the layout: model.safetensors = the primary average, polyak_averages.pt = the rest
    state = torch.load(ckpt3 / AVERAGING_STATE_NAME, map_location="cpu", weights_only=True)
    meta = state["polyak"]
    assert meta["format_version"] == 1 and meta["primary"] == "ema"
    assert meta["weights_key"] == WEIGHTS_KEY and meta["live_key"] == LIVE_KEY
    assert WEIGHTS_KEY not in state  # fp32 model: the model file holds the average exactly
    assert meta["averages"]["ema"]["class"] == "ExponentialMovingAverage"
    assert meta["averages"]["ema"]["schedule"] == {"type": "ConstantMomentum", "args": {"momentum": 0.25}}
    assert meta["averages"]["ema"]["steps"] == 3 and meta["averages"]["ema"]["weights"] is None
    assert meta["averages"]["swa"]["counters"] == {"steps": 3}
    assert set(meta["averages"]["swa"]["weights"]) == set(make_model().state_dict())

    # the saved model weights load into a bare model and are the average
    final = full.averaging.averages
    assert_equal(TinyModel.from_pretrained(ckpt6).state_dict(), final["ema"].averaged_state_dict())
    last = torch.load(ckpt6 / AVERAGING_STATE_NAME, map_location="cpu", weights_only=True)
    assert_equal(last[LIVE_KEY], full.model.state_dict())
    assert_equal(last["polyak"]["averages"]["swa"]["weights"], final["swa"].averaged_state_dict())

    # resume from step 3 in a fresh Trainer: the model gets the live weights, training goes on
    # exactly as if it had not stopped
    at_begin: list = []

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            at_begin.append({k: v.clone() for k, v in model.state_dict().items()})

    resumed = AveragingTrainer(
        model=make_model(),
        args=make_args(tmp_path / "resumed", save_strategy="steps", save_steps=3),
        train_dataset=TRAIN,
        callbacks=[Probe()],
        averages=averages,
    )
    resumed.train(resume_from_checkpoint=str(ckpt3))
    assert_equal(at_begin[0], state[LIVE_KEY])
    assert final["cos"].max_steps == resumed.averaging.averages["cos"].max_steps == 6
    for name in averages:
        assert resumed.averaging.averages[name].steps == final[name].steps == 6
        assert_equal(resumed.averaging.averages[name].averaged_state_dict(), final[name].averaged_state_dict())
    assert_equal(resumed.model.state_dict(), full.model.state_dict())

    # the same checkpoint resumed by the callback alone in a plain Trainer (load_state reads the
    # primary average from model.safetensors)
    callback = AveragingCallback(averages)
    plain = Trainer(model=make_model(), args=make_args(tmp_path / "plain"), train_dataset=TRAIN, callbacks=[callback])
    assert callback.load_state(str(ckpt3), plain.model)
    assert_equal(plain.model.state_dict(), state[LIVE_KEY])
    plain.train(resume_from_checkpoint=str(ckpt3))
    for name in averages:
        assert_equal(callback.averages[name].averaged_state_dict(), final[name].averaged_state_dict())

    # save_model exports the primary average, or the live weights
    full.save_model(str(tmp_path / "export"))
    assert_equal(TinyModel.from_pretrained(tmp_path / "export").state_dict(), final["ema"].averaged_state_dict())
    assert not (tmp_path / "export" / AVERAGING_STATE_NAME).exists()
    with full.averaged("swa"):
        full.save_model(str(tmp_path / "swa"))
    assert_equal(TinyModel.from_pretrained(tmp_path / "swa").state_dict(), final["swa"].averaged_state_dict())
    full.export_average = False
    full.save_model(str(tmp_path / "live"))
    assert_equal(TinyModel.from_pretrained(tmp_path / "live").state_dict(), full.model.state_dict())


def test_tied_weights_of_a_real_architecture(tmp_path) -> None:
    """GPT-2 (built from a config, no download): ``save_pretrained`` leaves out the tied
    ``lm_head.weight``; resuming, with the mixin or with the callback alone, is still exact."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2() -> GPT2LMHeadModel:
        torch.manual_seed(0)
        config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        return GPT2LMHeadModel(config)

    ids = torch.randint(0, 50, (N_TRAIN, 8), generator=torch.Generator().manual_seed(0))
    train = [{"input_ids": ids[i], "labels": ids[i]} for i in range(N_TRAIN)]
    averages = {"ema": ema(0.25)}
    full = AveragingTrainer(
        model=gpt2(),
        args=make_args(tmp_path / "full", save_strategy="steps", save_steps=3),
        train_dataset=train,
        averages=averages,
    )
    full.train()
    ckpt3 = str(tmp_path / "full" / "checkpoint-3")
    expected = full.averaging.averages["ema"].averaged_state_dict()
    assert_equal(GPT2LMHeadModel.from_pretrained(tmp_path / "full" / "checkpoint-6").state_dict(), expected)

    resumed = AveragingTrainer(model=gpt2(), args=make_args(tmp_path / "r"), train_dataset=train, averages=averages)
    resumed.train(resume_from_checkpoint=ckpt3)
    assert_equal(resumed.averaging.averages["ema"].averaged_state_dict(), expected)

    callback = AveragingCallback(averages)
    plain = Trainer(model=gpt2(), args=make_args(tmp_path / "p"), train_dataset=train, callbacks=[callback])
    callback.load_state(ckpt3, plain.model)
    plain.train(resume_from_checkpoint=ckpt3)
    assert_equal(callback.averages["ema"].averaged_state_dict(), expected)
    assert_equal(plain.model.state_dict(), full.model.state_dict())


def test_low_precision_model_keeps_its_fp32_average_exactly(tmp_path) -> None:
    def run(out, resume=None):
        trainer = AveragingTrainer(
            model=make_model().to(torch.bfloat16),
            args=make_args(out, save_strategy="steps", save_steps=3, learning_rate=0.01),
            train_dataset=TRAIN,
            averages={"ema": ema(0.25)},
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    average = full.averaging.averages["ema"]
    assert all(t.dtype == torch.float32 for t in average.averaged_state_dict().values())
    ckpt3 = tmp_path / "full" / "checkpoint-3"
    state = torch.load(ckpt3 / AVERAGING_STATE_NAME, map_location="cpu", weights_only=True)
    assert state[WEIGHTS_KEY]["fc1.weight"].dtype == torch.float32  # the model file is bf16: kept here
    deployed = TinyModel.from_pretrained(ckpt3, dtype=torch.bfloat16).state_dict()
    assert_equal(deployed, {k: v.to(torch.bfloat16) for k, v in state[WEIGHTS_KEY].items()})
    resumed = run(tmp_path / "resumed", resume=str(ckpt3))
    assert_equal(resumed.averaging.averages["ema"].averaged_state_dict(), average.averaged_state_dict())
    assert_equal(resumed.model.state_dict(), full.model.state_dict())


def test_load_best_model_restores_that_checkpoints_averages(tmp_path) -> None:
    trainer = AveragingTrainer(
        model=make_model(),
        args=make_args(
            tmp_path,
            eval_strategy="steps",
            eval_steps=2,
            save_strategy="steps",
            save_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="ema_loss",
        ),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        averages={"ema": ema(0.25)},
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    saved = torch.load(os.path.join(best, AVERAGING_STATE_NAME), map_location="cpu", weights_only=True)
    assert_equal(trainer.model.state_dict(), saved[LIVE_KEY])
    assert trainer.averaging.averages["ema"].steps == saved["polyak"]["averages"]["ema"]["steps"]
    assert_equal(trainer.averaging.averages["ema"].averaged_state_dict(), TinyModel.from_pretrained(best).state_dict())


def test_callback_alone_saves_state_and_resumes_with_load_state(tmp_path) -> None:
    def run(out, resume=None):
        callback = AveragingCallback({"ema": ema(0.25)})
        trainer = Trainer(
            model=make_model(),
            args=make_args(out, save_strategy="steps", save_steps=3),
            train_dataset=TRAIN,
            callbacks=[callback],
        )
        if resume is not None:
            assert callback.load_state(resume, trainer.model)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback

    full, cb_full = run(tmp_path / "full")
    ckpt3 = tmp_path / "full" / "checkpoint-3"
    state = torch.load(ckpt3 / AVERAGING_STATE_NAME, map_location="cpu", weights_only=True)
    assert WEIGHTS_KEY in state  # the model file holds the live weights here
    assert_equal(TinyModel.from_pretrained(ckpt3).state_dict(), state[LIVE_KEY])
    resumed, cb_resumed = run(tmp_path / "resumed", resume=str(ckpt3))
    assert_equal(cb_resumed.averages["ema"].averaged_state_dict(), cb_full.averages["ema"].averaged_state_dict())
    assert_equal(resumed.model.state_dict(), full.model.state_dict())


def test_resume_from_checkpoint_without_averages_starts_them_from_its_weights(tmp_path) -> None:
    Trainer(
        model=make_model(),
        args=make_args(tmp_path / "plain", max_steps=3, save_strategy="steps", save_steps=3),
        train_dataset=TRAIN,
    ).train()
    ckpt3 = tmp_path / "plain" / "checkpoint-3"
    rec = Recorder()
    trainer = AveragingTrainer(
        model=make_model(),
        args=make_args(tmp_path / "avg"),
        train_dataset=TRAIN,
        callbacks=[rec],
        averages={"ema": ema(0.25)},
    )
    trainer.train(resume_from_checkpoint=str(ckpt3))
    average = trainer.averaging.averages["ema"]
    assert average.steps == 3 and len(rec.weights) == 3
    assert_close(average.averaged_state_dict(), ema_reference(rec.weights, 0.25))


# -- arguments ----------------------------------------------------------------------------------


def test_arguments_are_checked(tmp_path) -> None:
    with pytest.raises(ValueError, match="primary"):
        AveragingCallback({"ema": ema(0.1)}, primary="swa")
    with pytest.raises(TypeError, match="factory"):
        AveragingCallback({"ema": polyak.ExponentialMovingAverage(make_model())})
    with pytest.raises(ValueError, match="names"):
        AveragingCallback({"": ema(0.1)})
    callback = AveragingCallback({"ema": ema(0.1)})
    with pytest.raises(ValueError, match="not both"):
        AveragingTrainer(model=make_model(), args=make_args(tmp_path), callbacks=[callback], averages={"x": ema(0.1)})
    trainer = AveragingTrainer(model=make_model(), args=make_args(tmp_path), callbacks=[callback])
    assert trainer.averaging is callback
    assert list(AveragingCallback().factories) == ["ema"]
    with pytest.raises(RuntimeError, match="no average"):
        with trainer.averaged():
            pass


def test_save_state_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    """polyak_averages.pt was written with a plain torch.save: a kill during it left the file
    unreadable (and destroyed the good one). It now goes through polyak's atomic writer: a save
    that fails halfway leaves the previous file as it was and no temporary file."""
    import polyak.integrations.transformers as integration

    callback = AveragingCallback({"ema": ema(0.25)})
    trainer = Trainer(model=make_model(), args=make_args(tmp_path), train_dataset=TRAIN, callbacks=[callback])
    trainer.train()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = Path(callback.save_state(str(folder), trainer.model))
    good = path.read_bytes()

    def half_then_die(obj, tmp) -> None:
        Path(tmp).write_bytes(good[: len(good) // 2])
        raise KeyboardInterrupt  # a kill, as far as the file is concerned

    monkeypatch.setattr(integration, "torch_save", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        callback.save_state(str(folder), trainer.model)
    assert path.read_bytes() == good
    assert sorted(p.name for p in folder.iterdir()) == [AVERAGING_STATE_NAME]


@pytest.mark.parametrize("managed", [True, False])
def test_health_reports_reach_the_training_logs(tmp_path, managed: bool) -> None:
    """Each training log carries each average's health report, the distance as computed here
    from the recorded weights; a healthy run warns nothing; ``log_health=False`` leaves it out."""
    rec = Recorder()
    averages = {"ema": ema(0.25), "swa": polyak.StochasticWeightAverage}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=UserWarning, module="polyak")
        if managed:
            trainer = AveragingTrainer(
                model=make_model(), args=make_args(tmp_path), train_dataset=TRAIN, callbacks=[rec], averages=averages
            )
        else:
            callback = AveragingCallback(averages)
            trainer = Trainer(
                model=make_model(), args=make_args(tmp_path), train_dataset=TRAIN, callbacks=[callback, rec]
            )
        trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == len(rec.weights) == 6
    for i, entry in enumerate(logs):
        live, avg = rec.weights[i], ema_reference(rec.weights[: i + 1], 0.25)
        d2 = sum(float(((live[k] - avg[k]) ** 2).sum()) for k in live)
        l2 = sum(float((live[k] ** 2).sum()) for k in live)
        assert entry["ema_distance"] == pytest.approx(math.sqrt(d2 / l2), rel=1e-5, abs=1e-9)
        assert entry["ema_moved"] == 1.0 and entry["ema_horizon"] == pytest.approx(1 if i == 0 else 4)
        assert entry["swa_horizon"] == pytest.approx(i + 1)  # an equal average spans every step
    assert logs[0]["ema_distance"] == 0.0  # the first update copies


def test_log_health_false_keeps_reports_out_of_the_logs(tmp_path) -> None:
    callback = AveragingCallback({"ema": ema(0.25)}, log_health=False)
    trainer = Trainer(model=make_model(), args=make_args(tmp_path), train_dataset=TRAIN, callbacks=[callback])
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and all("ema_decay" in e and "ema_distance" not in e for e in logs)
