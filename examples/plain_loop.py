"""An EMA in a plain PyTorch loop and in an accelerate-style loop (docs/integrations/plain-loops.md).

Both loops follow the same four rules:

1. build the average once, from the model being trained (wrappers are fine);
2. update it once per optimizer step that really ran: :class:`polyak.hooks.OptimizerStepCounter`
   watches ``optimizer.step`` (a step skipped by a ``GradScaler`` or held back by gradient
   accumulation is not counted), so the loop never has to know why a step did not happen;
3. evaluate with ``with ema.swapped(model):`` (the average inside the live model, in place, the
   live weights back when the block ends, also on an exception);
4. checkpoint with :mod:`polyak.checkpoint` (``state_dict`` holds the average, ready to deploy;
   ``live_state_dict`` the training weights; a ``"polyak"`` block with the step count), and
   resume with :func:`polyak.checkpoint.unpack`.

Run it: ``python examples/plain_loop.py`` (the accelerate part runs where accelerate is
installed; both run on the CPU in a few seconds).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import polyak
from polyak import checkpoint as ckpt


def make_data(n: int = 256, seed: int = 0) -> torch.utils.data.TensorDataset:
    """A noisy regression y = x @ w + noise; one w for every split, x and noise from ``seed``."""
    w = torch.randn(8, 1, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.utils.data.TensorDataset) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in data.tensors)
    loss = nn.functional.mse_loss(model(x), y).item()
    model.train(was_training)
    return loss


# --------------------------------------------------------------------------------------------
# 1. a plain loop, with mixed precision's GradScaler and gradient accumulation


def plain_loop(work_dir: Path, epochs: int = 5, accumulate: int = 2) -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    amp = device == "cuda"  # float16 autocast with a GradScaler on a GPU; plain float32 on the CPU
    train, val = make_data(), make_data(64, seed=1)
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True)
    model = make_model().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=amp)  # skips steps with inf/NaN gradients

    ema = polyak.ExponentialMovingAverage(model, momentum=0.1)  # momentum = 1 - decay
    steps = polyak.hooks.OptimizerStepCounter([optimizer])

    for epoch in range(epochs):
        model.train()
        for i, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device)
            with torch.autocast(device, dtype=torch.float16, enabled=amp):
                loss = nn.functional.mse_loss(model(x).float(), y) / accumulate
            scaler.scale(loss).backward()
            if (i + 1) % accumulate == 0:
                scaler.step(optimizer)  # may skip optimizer.step()
                scaler.update()
                optimizer.zero_grad()
            if steps.advanced():  # True once per optimizer step that ran
                ema.update_parameters(model)

        with ema.swapped(model):  # evaluate the average, in the live model
            ema_loss = evaluate(model, val)
        print(f"plain  epoch {epoch}: live {evaluate(model, val):.4f}  ema {ema_loss:.4f}  steps {ema.steps}")

    # a checkpoint: the average under "state_dict" (deployable), the live weights beside it
    path = work_dir / "plain.pt"
    checkpoint = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epochs}
    torch.save(ckpt.pack(checkpoint, {"ema": ema}), path)

    # resume in a fresh process: build the same objects, then unpack
    model2 = make_model()
    ema2 = polyak.ExponentialMovingAverage(model2, momentum=0.1)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    live, missing = ckpt.unpack(loaded, {"ema": ema2})
    model2.load_state_dict(live)
    assert not missing and ema2.steps == ema.steps

    # deploy: a bare model loads the average
    deployed = make_model()
    deployed.load_state_dict(loaded["state_dict"])
    print(f"plain  deployed average: {evaluate(deployed, val):.4f}")


# --------------------------------------------------------------------------------------------
# 2. an accelerate-style loop


def accelerate_loop(work_dir: Path, epochs: int = 5) -> None:
    try:
        from accelerate import Accelerator
    except ImportError:
        print("accelerate is not installed: skipping the accelerate loop")
        return
    torch.manual_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=2)
    train, val = make_data(), make_data(64, seed=1)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    # The average is built from the prepared model (DDP and torch.compile wrappers are
    # looked through); each process keeps the same average of its identical replica.
    ema = polyak.ExponentialMovingAverage(model, momentum=0.1)
    # AcceleratedOptimizer.step() calls the inner optimizer's step only at the end of an
    # accumulation cycle, and not when its GradScaler skips: count the inner optimizer.
    steps = polyak.hooks.OptimizerStepCounter(polyak.hooks.find_optimizers(optimizer))

    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if steps.advanced():  # here the same as accelerator.sync_gradients without a skipped step
                ema.update_parameters(model)

        with ema.swapped(model):
            ema_loss = evaluate(model, val)
        print(f"accel  epoch {epoch}: live {evaluate(model, val):.4f}  ema {ema_loss:.4f}  steps {ema.steps}")

    if accelerator.is_main_process:
        checkpoint = {"state_dict": accelerator.unwrap_model(model).state_dict()}
        torch.save(ckpt.pack(checkpoint, {"ema": ema}), work_dir / "accelerate.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        plain_loop(work_dir, args.epochs)
        accelerate_loop(work_dir, args.epochs)


if __name__ == "__main__":
    main()
