"""Weight averaging with the Hugging Face Trainer: train, evaluate the averages, resume, export.

A tiny regression model on synthetic data, on the CPU, in a few seconds:

    python examples/hf_trainer_ema.py [--output-dir DIR]

It keeps two averages: a fast EMA (the primary, deployed in every checkpoint's
model.safetensors) and a slower one, evaluates the live model and both averages side by side
(``eval_loss``, ``eval_ema_loss``, ``eval_ema_slow_loss``), stops, resumes from a checkpoint in
a fresh Trainer, and exports the average with ``save_model``. Needs ``polyak[transformers]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, TrainerCallback, TrainingArguments

import polyak
from polyak.integrations.transformers import AVERAGING_STATE_NAME, AveragingTrainer


class RegressorConfig(PretrainedConfig):
    model_type = "polyak_example_regressor"

    def __init__(self, dim: int = 16, hidden: int = 32, **kwargs) -> None:
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


def synthetic(n: int, seed: int, dim: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    x = torch.randn(n, dim, generator=g)
    y = torch.sin(x @ w) + 0.3 * torch.randn(n, generator=g)  # noisy labels: averaging helps
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


class StopAt(TrainerCallback):
    """Interrupts training after ``step`` optimizer steps (a preempted job)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def make_trainer(output_dir: str, max_steps: int, callbacks: list | None = None) -> AveragingTrainer:
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=128,
        gradient_accumulation_steps=2,  # the averages update once per optimizer step
        learning_rate=3e-3,
        eval_strategy="steps",
        eval_steps=20,
        save_strategy="steps",
        save_steps=20,
        logging_steps=10,
        metric_for_best_model="ema_loss",  # checkpoints ranked by the primary average
        greater_is_better=False,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return AveragingTrainer(
        model=Regressor(RegressorConfig()),
        args=args,
        train_dataset=synthetic(1024, seed=1),
        eval_dataset=synthetic(256, seed=2),
        callbacks=callbacks,
        averages={
            "ema": lambda m: polyak.ExponentialMovingAverage(m, momentum=0.05),
            "ema_slow": lambda m: polyak.ExponentialMovingAverage(m, momentum=0.01),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--max-steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output_dir or tmp

        # 1. Train until interrupted: evaluations report the live model and both averages.
        first = make_trainer(out, args.max_steps, callbacks=[StopAt(args.max_steps // 3 * 2)])
        first.train()
        last = os.path.join(out, f"checkpoint-{first.state.global_step}")
        print("checkpoint:", sorted(os.listdir(last)))
        saved = torch.load(os.path.join(last, AVERAGING_STATE_NAME), map_location="cpu", weights_only=True)
        print("averaging state:", {k: v["steps"] for k, v in saved["polyak"]["averages"].items()})

        # 2. Resume in a fresh Trainer: the live weights go back into the model, the averages
        #    are restored, and training goes on as if it had never stopped.
        second = make_trainer(out, args.max_steps)
        second.train(resume_from_checkpoint=last)
        metrics = second.evaluate()
        for key in ("eval_loss", "eval_ema_loss", "eval_ema_slow_loss"):
            print(f"{key:>20}: {metrics[key]:.4f}")

        # 3. Export: save_model writes the primary average, loadable with from_pretrained.
        export = os.path.join(out, "final-ema")
        second.save_model(export)
        deployed = Regressor.from_pretrained(export)
        average = second.averaging.averages["ema"].averaged_state_dict()
        same = all(torch.equal(deployed.state_dict()[k], v) for k, v in average.items())
        print("exported model == the EMA:", same)


if __name__ == "__main__":
    main()
