"""Weight averaging with the Hugging Face Trainer: train, evaluate the averages, resume, export.

A small regression model on synthetic data made in the script, on the CPU in one thread,
about 8 s on a 2-core machine (most of it importing transformers)::

    python examples/hf_trainer_ema.py [--output-dir DIR]

It keeps two averages: a fast EMA (the primary, deployed in every checkpoint's
model.safetensors) and a slower one, evaluates the live model and both averages side by side
(``eval_loss``, ``eval_ema_loss``, ``eval_ema_slow_loss``), stops, resumes from a checkpoint in
a fresh Trainer, evaluates on a test split, and exports the average with ``save_model``.
Needs ``polyak[transformers]``.

**What averaging is for, shown honestly** (the regime of ``polyak demo``, docs/demo.md): AdamW
at a constant learning rate (no decay at the end) on noisy training targets, so the live
weights keep moving from step to step and the averages smooth that out. The data: 16-dimensional
inputs, the target a fixed random tanh network of them (variance 0.89); the 4,096 training
targets carry Gaussian noise of standard deviation 0.5, validation and test (2,048 points each)
none. Fixed before looking at any result: the noise, the model, batch 16 with two batches per
optimizer step, 300 optimizer steps (what fits the time budget), the decays (half-lives of
13.5 and 34 optimizer steps, about a twentieth and a tenth of the run). Chosen on the
**validation split only**: the learning rate, by the primary EMA's validation MSE at the end,
averaged over training seeds 0 and 1, from {3e-3, 1e-2, 3e-2, 1e-1}, extended to 1e-3 and 3e-4
because the best was at the edge: 1e-3 (validation MSE: EMA 0.086, live weights 0.095; the
live weights' best was 0.095 too, at 3e-4 and 1e-3). The averages had the lower validation
MSE at every learning rate tried but 3e-4 (seed 0). The numbers printed at the end are on the
**test split**, seen once; there the averages beat the live weights: test MSE 0.0813 (EMA)
and 0.0804 (slow EMA) against 0.0862 (torch 2.13 on a CPU; tests/test_examples.py checks
that the averages win).
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

import polyak
from polyak.integrations.transformers import AVERAGING_STATE_NAME, AveragingTrainer

LR = 1e-3  # chosen on the validation split (see the docstring)
MAX_STEPS = 300  # optimizer steps
NOISE = 0.5  # standard deviation of the noise on the training targets
DIM = 16


class RegressorConfig(PretrainedConfig):
    model_type = "polyak_example_regressor"

    def __init__(self, dim: int = DIM, hidden: int = 64, **kwargs) -> None:
        self.dim = dim
        self.hidden = hidden
        super().__init__(**kwargs)


class Regressor(PreTrainedModel):
    config_class = RegressorConfig

    def __init__(self, config: RegressorConfig) -> None:
        super().__init__(config)
        self.net = nn.Sequential(
            nn.Linear(config.dim, config.hidden), nn.GELU(), nn.LayerNorm(config.hidden), nn.Linear(config.hidden, 1)
        )
        self.post_init()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        pred = self.net(x).squeeze(-1)
        loss = None if labels is None else nn.functional.mse_loss(pred, labels)
        return {"loss": loss, "logits": pred}


def synthetic(n: int, seed: int, noise: float = 0.0) -> list[dict[str, torch.Tensor]]:
    """y = a fixed random tanh network of x (the "teacher", one for every split) + ``noise``."""
    teacher = torch.Generator().manual_seed(1234)
    w1 = torch.randn(DIM, 32, generator=teacher) / DIM**0.5
    w2 = torch.randn(32, generator=teacher) / 32**0.5
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    y = torch.tanh(2 * x @ w1) @ w2 + noise * torch.randn(n, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


class StopAt(TrainerCallback):
    """Interrupts training after ``step`` optimizer steps (a preempted job)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


class PrintEvaluations(TrainerCallback):
    """One line per evaluation: the live model and the averages side by side."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        keys = [k for k in ("eval_loss", "eval_ema_loss", "eval_ema_slow_loss") if k in (metrics or {})]
        if keys:
            print(f"  step {state.global_step:>3}: " + "  ".join(f"{k} {metrics[k]:.4f}" for k in keys))


def make_trainer(
    output_dir: str, max_steps: int = MAX_STEPS, lr: float = LR, seed: int = 0, callbacks: list | None = None
) -> AveragingTrainer:
    torch.manual_seed(seed)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=1024,
        gradient_accumulation_steps=2,  # the averages update once per optimizer step
        learning_rate=lr,
        lr_scheduler_type="constant",  # no decay: the live weights never settle
        eval_strategy="steps",
        eval_steps=100,
        save_strategy="steps",
        save_steps=100,
        logging_steps=50,
        metric_for_best_model="ema_loss",  # checkpoints ranked by the primary average
        greater_is_better=False,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
    )
    trainer = AveragingTrainer(
        model=Regressor(RegressorConfig()),
        args=args,
        train_dataset=synthetic(4096, seed=1, noise=NOISE),
        eval_dataset=synthetic(2048, seed=2),  # the validation split
        callbacks=[PrintEvaluations(), *(callbacks or [])],
        averages={
            "ema": lambda m: polyak.ExponentialMovingAverage(m, momentum=0.05),  # half-life 13.5 steps
            "ema_slow": lambda m: polyak.ExponentialMovingAverage(m, momentum=0.02),  # half-life 34 steps
        },
    )
    trainer.remove_callback(PrinterCallback)  # the raw log dicts; PrintEvaluations prints a summary
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=None, help="default: a temporary folder, removed at exit")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: threads only add synchronisation (and nondeterminism)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output_dir or tmp

        # 1. Train until interrupted: evaluations report the live model and both averages.
        print(f"constant lr {LR}, noisy training targets; validation split (noiseless targets):")
        first = make_trainer(out, callbacks=[StopAt(MAX_STEPS // 3 * 2)])
        first.train()
        last = os.path.join(out, f"checkpoint-{first.state.global_step}")
        print("checkpoint:", sorted(os.listdir(last)))
        saved = torch.load(os.path.join(last, AVERAGING_STATE_NAME), map_location="cpu", weights_only=True)
        print("averaging state:", {k: v["steps"] for k, v in saved["polyak"]["averages"].items()})

        # 2. Resume in a fresh Trainer: the live weights go back into the model, the averages
        #    are restored, and training goes on as if it had never stopped.
        second = make_trainer(out)
        second.train(resume_from_checkpoint=last)
        decays = [log for log in second.state.log_history if "ema_decay" in log][-1]
        print(f"decay of the latest update: ema {decays['ema_decay']:.4f}, ema_slow {decays['ema_slow_decay']:.4f}")

        # 3. The test split, seen once: the live model and both averages.
        metrics = second.evaluate(synthetic(2048, seed=3), metric_key_prefix="test")
        print(f"test split (noiseless targets), after {second.state.global_step} steps:")
        for name, key in (("live", "test_loss"), ("ema", "test_ema_loss"), ("ema_slow", "test_ema_slow_loss")):
            print(f"  {name:<10} test mse {metrics[key]:.4f}")

        # 4. Export: save_model writes the primary average, loadable with from_pretrained.
        export = os.path.join(out, "final-ema")
        second.save_model(export)
        deployed = Regressor.from_pretrained(export)
        average = second.averaging.averages["ema"].averaged_state_dict()
        same = all(torch.equal(deployed.state_dict()[k], v) for k, v in average.items())
        print("exported model == the EMA:", same)


if __name__ == "__main__":
    main()
