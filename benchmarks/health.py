"""What health reports cost: nothing on the update path, one pass over the weights when read.

Update: ``update_parameters`` as shipped (it watches the weight of each update for a
low-precision average that would stall: host arithmetic, no device read) against the same
update with that watch removed, the two timed in turn within each repeat (paired), medians.

Report: ``average.health(model).values()`` (a pass over both models' averaged tensors and one
host read), in milliseconds and in updates.

    python benchmarks/health.py [--repeats 41] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import polyak

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_speed import resnet50, small2000

MODELS = {"small2000": small2000, "resnet50": resnet50}


def measure(model_fn, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = model_fn()
    shipped = polyak.ExponentialMovingAverage(model, momentum=1e-3)
    bare = polyak.ExponentialMovingAverage(model, momentum=1e-3)
    bare._warn_if_lost = lambda weight: None  # the baseline: the watch removed
    pair = {"shipped": shipped, "without the watch": bare}
    for a in pair.values():
        for _ in range(3):
            a.update_parameters(model)
    times: dict[str, list[float]] = {name: [] for name in pair}
    for i in range(repeats):
        order = list(pair.items()) if i % 2 == 0 else list(reversed(pair.items()))
        for name, a in order:
            t = time.perf_counter()
            a.update_parameters(model)
            times[name].append(time.perf_counter() - t)
    report = []
    for _ in range(max(5, repeats // 4)):
        t = time.perf_counter()
        shipped.health(model).values()
        report.append(time.perf_counter() - t)
    update = statistics.median(times["shipped"])
    return {
        "update_ms": 1e3 * update,
        "update_without_watch_ms": 1e3 * statistics.median(times["without the watch"]),
        "ratio": update / statistics.median(times["without the watch"]),
        "report_ms": 1e3 * statistics.median(report),
        "report_in_updates": statistics.median(report) / update,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=41)
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    results = {name: measure(fn, args.repeats) for name, fn in MODELS.items()}
    print("\nhealth reports: the update as shipped against the update without the watch (paired medians)")
    print("| model | update (ms) | without the watch (ms) | ratio | one report read (ms) | report / update |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['update_ms']:.3f} | {r['update_without_watch_ms']:.3f} | {r['ratio']:.3f} "
            f"| {r['report_ms']:.2f} | {r['report_in_updates']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
