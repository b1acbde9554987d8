"""Half-size averages: the error and the update time of a bfloat16 average with stochastic
rounding, beside round-to-nearest bfloat16 and float32 averages of the same bfloat16 model.

Error: a small bf16 model whose weights drift slowly under noise, 10,000 updates at decays
0.999 and 0.9999; each average against the float64 EMA of the same bf16 weights (computed here),
as the norm of the difference over the norm of how far the reference moved.

Time: one update of each average of a ViT-B-sized bf16 model (86M parameters), the three
timed in turn within each repeat (paired), medians over the repeats.

    python benchmarks/precision.py [--updates 10000] [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from torch import nn

import polyak

KINDS = {
    "bf16, round to nearest": {"dtype": torch.bfloat16},
    "bf16, stochastic rounding": {"dtype": torch.bfloat16, "rounding": "stochastic"},
    "fp32": {},
}


def error_table(decay: float, updates: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 16)).to(torch.bfloat16)
    start = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    drift = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.02 for k, v in start.items()}
    averages = {name: polyak.ExponentialMovingAverage(model, momentum=1 - decay, **kw) for name, kw in KINDS.items()}
    ref = {k: v.clone() for k, v in start.items()}
    for t in range(updates):
        with torch.no_grad():
            for k, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.05
                p.copy_((start[k] + drift[k] * (t / 1000) + noise).to(torch.bfloat16))
        for k, p in model.named_parameters():
            live = p.detach().double()
            ref[k] = live.clone() if t == 0 else decay * ref[k] + (1 - decay) * live
        for a in averages.values():
            a.update_parameters(model)
    moved = sum(float(((ref[k] - start[k]) ** 2).sum()) for k in ref) ** 0.5
    out = {}
    for name, a in averages.items():
        got = dict(a.module.named_parameters())
        out[name] = sum(float(((got[k].double() - ref[k]) ** 2).sum()) for k in ref) ** 0.5 / moved
    return out


def vit_b_bf16() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(768, 768)]
    for _ in range(12):
        layers += [nn.Linear(768, 2304), nn.Linear(768, 768), nn.LayerNorm(768), nn.Linear(768, 3072)]
        layers += [nn.Linear(3072, 768), nn.LayerNorm(768)]
    return nn.Sequential(*layers).to(torch.bfloat16)


def time_table(repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = vit_b_bf16()
    updates = {}
    for name, kw in KINDS.items():
        avg = polyak.ExponentialMovingAverage(model, momentum=1e-3, **kw)
        avg.update_parameters(model)
        updates[name] = avg
    for _ in range(2):
        for a in updates.values():
            a.update_parameters(model)
    times: dict[str, list[float]] = {name: [] for name in updates}
    for _ in range(repeats):
        for name, a in updates.items():
            t = time.perf_counter()
            a.update_parameters(model)
            times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    # round-to-nearest bf16 at these decays stalls, on purpose: that is what is measured
    warnings.filterwarnings("ignore", message=r".*the average stalls.*")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    errors = {d: error_table(d, args.updates) for d in (0.999, 0.9999)}
    print(f"\nerror after {args.updates:,} updates (relative to how far the float64 reference moved)")
    print("| average | decay 0.999 | decay 0.9999 |\n|---|---:|---:|")
    for name in KINDS:
        print(f"| {name} | {errors[0.999][name]:.2e} | {errors[0.9999][name]:.2e} |")
    times = time_table(args.repeats)
    base = times["fp32"]
    print("\nupdate time, ViT-B-sized bf16 model (86M parameters), paired medians")
    print("| average | memory of the average | update (ms) | x fp32 |\n|---|---|---:|---:|")
    for name in KINDS:
        memory = "2 bytes/parameter" if "bf16" in name else "4 bytes/parameter"
        print(f"| {name} | {memory} | {times[name]:.2f} | {times[name] / base:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"errors": {str(d): e for d, e in errors.items()}, "update_ms": times}, f, indent=1)


if __name__ == "__main__":
    main()
