"""Post-hoc EMA (EDM2): train once, choose the averaging length afterwards (docs/posthoc.md).

1. Train a small MLP on a synthetic regression with noisy SGD, tracking two power-function
   averages (sigma_rel 0.05 and 0.10) with :class:`polyak.PostHocEMA`, which writes a
   float16 snapshot of each every ``--every`` steps.
2. After training, :func:`polyak.posthoc.synthesize` builds the average for sigma_rels that were
   never tracked, 0.07 (between the tracked ones) and 0.15 (wider), from the snapshots alone.
3. Evaluate the live weights, the tracked averages and the synthesized ones on held-out data.

The same synthesis from the command line::

    python examples/posthoc_ema.py --snapshot-dir SNAPSHOT_DIR   # keeps the snapshots
    polyak posthoc --snapshots SNAPSHOT_DIR --sigma-rel 0.07 --out ema-0.07.safetensors

Run it: ``python examples/posthoc_ema.py [--snapshot-dir DIR]`` (CPU, about 5 s, most of it
importing torch). Without ``--snapshot-dir`` the snapshots go to a temporary folder that is
removed when the script exits; it says so.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import polyak
from polyak.posthoc import plan_synthesis, synthesize

BATCH = 16


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y = sin(x @ w) + noise; one w for every split."""
    w = torch.randn(8, 1, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, torch.sin(x @ w) + 0.3 * torch.randn(n, 1, generator=g)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))


@torch.no_grad()
def loss_of(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = data
    return nn.functional.mse_loss(model(x), y).item()


def train(snapshot_dir: Path, steps: int, every: int) -> tuple[nn.Module, polyak.PostHocEMA]:
    torch.manual_seed(0)
    x, y = make_data(4096, seed=0)
    model = make_model()
    # a large learning rate and small batches: the live weights jitter around the optimum
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = polyak.PostHocEMA(
        model,
        sigma_rels=(0.05, 0.10),  # EDM2's defaults
        snapshot_every=every,  # -> snapshot_dir/phema-0.0500-000000100.safetensors, ...
        snapshot_dir=snapshot_dir,
        batch_size=BATCH,  # recorded as "samples" in each snapshot
    )
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (BATCH,))
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update_parameters(model)  # once per optimizer step; snapshots when due
    return model, ema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100, help="steps between snapshots")
    parser.add_argument(
        "--snapshot-dir",
        type=Path,
        default=None,
        help="where the snapshots go, kept after the script ends (default: a temporary folder, removed at exit)",
    )
    args = parser.parse_args()
    val = make_data(2048, seed=1)

    with tempfile.TemporaryDirectory() as tmp:
        snapshot_dir = args.snapshot_dir or Path(tmp)
        model, ema = train(snapshot_dir, args.steps, args.every)
        n_files = len(list(snapshot_dir.glob("phema-*.safetensors")))
        where = (
            f"in {snapshot_dir}"
            if args.snapshot_dir
            else "in a temporary folder, removed when this script exits (--snapshot-dir DIR keeps them)"
        )
        print(f"trained {ema.steps} steps; {n_files} snapshots {where}")
        print(f"  live weights          val loss {loss_of(model, val):.5f}")
        for sigma_rel in ema.sigma_rels:
            with ema.swapped(model, sigma_rel):  # the tracked average inside the live model
                print(f"  tracked sigma_rel={sigma_rel:.2f} val loss {loss_of(model, val):.5f}")

        for sigma_rel in (0.07, 0.15):
            plan = plan_synthesis(snapshot_dir, sigma_rel)  # which snapshots, which coefficients
            state = synthesize(plan)  # a state dict the model loads (float32)
            deployed = make_model()
            deployed.load_state_dict(state)
            print(
                f"  synth.  sigma_rel={sigma_rel:.2f} val loss {loss_of(deployed, val):.5f}"
                f"   (profile error {plan.report['relative_error']:.1e}, {len(plan.snapshots)} snapshots)"
            )

        # the same, half-way through training: only the snapshots up to that step are used
        half = args.steps // 2 // args.every * args.every
        state = synthesize(snapshot_dir, 0.07, at_step=half)
        deployed = make_model()
        deployed.load_state_dict(state)
        print(f"  synth.  sigma_rel=0.07 at step {half}: val loss {loss_of(deployed, val):.5f}")


if __name__ == "__main__":
    main()
