"""Where one default update's time goes, against a bare ``torch._foreach_lerp_``.

For each model: the whole ``update_parameters``; the averaging alone (the tuned plan, as the
engine runs it); the copy of the non-averaged tensors (BatchNorm buffers); the check that the
model's tensors are still the ones resolved (``engine.bind``); and the bare multi-tensor kernel
over the same parameters, which checks and copies nothing. Every timed call is followed by one
``lerp_`` over as many elements as the model (untimed) that evicts the caches, as a training
step does between two updates. Medians over ``--repeats`` calls, after 16 warm-up updates.

    python benchmarks/update_breakdown.py [--models resnet50,small2000,layers2000] [--repeats 41]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import polyak

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_speed import DECAY, LABELS, MODELS, WARMUP_UPDATES


def timed(fn: Callable[[], object], flush: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``fn``, each call followed by an untimed ``flush``."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        flush()
    return 1e3 * statistics.median(times)


def breakdown(name: str, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = MODELS[name]()
    numel = sum(p.numel() for p in model.parameters())
    a, b = torch.randn(numel), torch.randn(numel)

    def flush() -> None:
        a.lerp_(b, 1 - DECAY)

    ema = polyak.ExponentialMovingAverage(model, momentum=1 - DECAY)
    for _ in range(WARMUP_UPDATES):
        ema.update_parameters(model)
        flush()
    engine = ema.engine
    binding = engine.bind(model)
    src = [p.detach() for p in model.parameters()]
    dst = [p.clone() for p in src]
    return {
        "update_parameters": timed(lambda: ema.update_parameters(model), flush, repeats),
        "averaging (tuned plan)": timed(lambda: engine.lerp_(binding, 1 - DECAY, None), flush, repeats),
        "copying buffers": timed(lambda: [g.copy_() for g in binding.plan("copy")], flush, repeats),
        "checking the model": timed(lambda: engine.bind(model), flush, repeats),
        "bare _foreach_lerp_": timed(lambda: torch._foreach_lerp_(dst, src, 1 - DECAY), flush, repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,small2000,layers2000")
    ap.add_argument("--repeats", type=int, default=41)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; milliseconds, medians\n")
    rows = {name: breakdown(name, args.repeats) for name in args.models.split(",")}
    parts = list(next(iter(rows.values())))
    print("| model | " + " | ".join(parts) + " |")
    print("|---|" + "---:|" * len(parts))
    for name, row in rows.items():
        print(f"| {LABELS[name]} | " + " | ".join(f"{row[p]:.3f}" for p in parts) + " |")


if __name__ == "__main__":
    main()
