"""Time one averaging update: polyak against its peers and against the memory-bound limit, on an
idle machine and on one shared with a busy process.

The limit is one ``lerp_`` over a single contiguous buffer holding as many elements as the
averaged tensors: the least any EMA update of the same bytes can cost. Every timed update is
followed at once by a timed limit, so drifts in memory bandwidth cancel in the ratio.

Conditions: ``idle``, and ``loaded``: a second process spinning on one core (pinned to the last
one), started before and stopped after those measurements by this script. Each condition is
measured at every thread count of ``--threads``.

    python benchmarks/update_speed.py [--repeats 15] [--runs 2] [--threads 1,2]
        [--conditions idle,loaded] [--models resnet50,vit_b,small2000,layers2000]
        [--json out.json] [--png out.png]

Methods: polyak (``ExponentialMovingAverage``), polyak flat (after ``flatten_parameters``), one
plain ``torch._foreach_lerp_`` over the same tensors (the multi-tensor baseline, no
bookkeeping), torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn, mmengine
ExponentialMovingAverage (mmengine-lite), ema-pytorch EMA(use_foreach=True). timm is not
installed beside torch 2.13 here (it pulls another torch build).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

import polyak

DECAY = 0.999
#: Updates before timing, each followed by the limit as in the timed ones (so that polyak explores
#: its CPU plans, at most 6 candidates x 2 rounds (polyak.tuning), with caches as cold as when it
#: is timed, as after a training step): the same for every method.
WARMUP_UPDATES = 16


# -- models --------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def resnet50() -> nn.Module:
    """ResNet-50's tensors: 25.6M parameters in 161 tensors, plus BatchNorm buffers."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
    layers.append(nn.Linear(2048, 1000))
    return nn.Sequential(*layers)


def vit_b() -> nn.Module:
    """ViT-B/16's tensors: 86M parameters."""
    d = 768
    model = nn.Module()
    model.patch = nn.Conv2d(3, d, 16, 16)
    model.cls = nn.Parameter(torch.zeros(1, 1, d))
    model.pos = nn.Parameter(torch.zeros(1, 197, d))
    layer = nn.TransformerEncoderLayer(d, 12, 4 * d, batch_first=True, norm_first=True)
    model.encoder = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
    model.norm = nn.LayerNorm(d)
    model.head = nn.Linear(d, 1000)
    return model


def small2000() -> nn.Module:
    """2000 tensors of 2500 elements (5M): where per-tensor overhead dominates."""
    model = nn.Module()
    model.params = nn.ParameterList([nn.Parameter(torch.randn(50, 50)) for _ in range(2000)])
    return model


def layers2000() -> nn.Module:
    """1000 ``Linear(50, 50)``: 2000 small tensors of two sizes (2500 and 50), as a model's
    weights and biases are."""
    return nn.Sequential(*[nn.Linear(50, 50) for _ in range(1000)])


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet50": resnet50,
    "vit_b": vit_b,
    "small2000": small2000,
    "layers2000": layers2000,
}
LABELS = {
    "resnet50": "ResNet-50 (25.6M, 161 tensors)",
    "vit_b": "ViT-B/16 (86.6M, 152 tensors)",
    "small2000": "2,000 × 2,500 elements (5M)",
    "layers2000": "1,000 Linear(50, 50): 2,000 tensors of 2,500 and 50",
}


# -- contestants: each returns an update function ------------------------------------------


def make_polyak(model: nn.Module) -> Callable[[], None]:
    ema = polyak.ExponentialMovingAverage(model, momentum=1 - DECAY)
    ema.update_parameters(model)  # the copy; measure() warms up (the CPU plan's exploration)
    return lambda: ema.update_parameters(model)


def make_polyak_flat(model: nn.Module) -> Callable[[], None]:
    polyak.flatten_parameters(model)
    return make_polyak(model)


def make_foreach(model: nn.Module) -> Callable[[], None]:
    """The multi-tensor baseline: one ``_foreach_lerp_`` from the model's parameters into
    separate copies of them, nothing else."""
    src = [p.detach() for p in model.parameters()]
    dst = [p.clone() for p in src]
    return lambda: torch._foreach_lerp_(dst, src, 1 - DECAY)


def make_torch(model: nn.Module) -> Callable[[], None]:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    ema.update_parameters(model)
    return lambda: ema.update_parameters(model)


def make_mmengine(model: nn.Module) -> Callable[[], None]:
    from mmengine.model import ExponentialMovingAverage

    ema = ExponentialMovingAverage(model, momentum=1 - DECAY)
    ema.update_parameters(model)
    return lambda: ema.update_parameters(model)


def make_ema_pytorch(model: nn.Module) -> Callable[[], None]:
    from ema_pytorch import EMA

    ema = EMA(
        model,
        beta=DECAY,
        update_after_step=0,
        update_every=1,
        use_foreach=True,
        include_online_model=False,
        power=1.0,
        inv_gamma=1.0,
    )
    ema.update()
    ema.update()
    return ema.update


PEERS: dict[str, Callable[[nn.Module], Callable[[], None]]] = {
    "polyak": make_polyak,
    "polyak flat": make_polyak_flat,
    "foreach lerp": make_foreach,
    "torch AveragedModel": make_torch,
    "mmengine EMA": make_mmengine,
    "ema-pytorch EMA": make_ema_pytorch,
}


# -- load -----------------------------------------------------------------------------------


@contextmanager
def competing_load(enabled: bool) -> Iterator[str]:
    """With ``enabled``, a second Python process spinning on the last core for the block."""
    if not enabled:
        yield "idle"
        return
    cpu = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    pin = f"import os\nos.sched_setaffinity(0, {{{cpu!r}}})\n" if cpu is not None else ""
    code = pin + "while True: pass\n"
    spinner = subprocess.Popen([sys.executable, "-c", code])
    atexit.register(spinner.kill)
    time.sleep(0.5)  # let it start spinning
    try:
        yield "loaded"
    finally:
        spinner.kill()
        spinner.wait()


# -- timing ---------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def measure(model_fn: Callable[[], nn.Module], peer: str, device: torch.device, repeats: int) -> dict:
    torch.manual_seed(0)
    model = model_fn().to(device)
    numel = sum(p.numel() for p in model.parameters())
    try:
        update = PEERS[peer](model)
    except ImportError as e:
        return {"error": f"n/a ({e.name} not installed)"}
    limit_a = torch.randn(numel, device=device)
    limit_b = torch.randn(numel, device=device)

    def limit() -> None:
        limit_a.lerp_(limit_b, 1 - DECAY)

    for _ in range(WARMUP_UPDATES):
        update()
        limit()
    times, limits, ratios = [], [], []
    for _ in range(repeats):
        t_upd = _timed(update, device)
        t_lim = _timed(limit, device)
        times.append(t_upd)
        limits.append(t_lim)
        ratios.append(t_upd / t_lim)
    return {
        "median_ms": 1e3 * statistics.median(times),
        "limit_ms": 1e3 * statistics.median(limits),
        "ratio": statistics.median(ratios),
    }


def measure_group(model_fn: Callable[[], nn.Module], n: int, device: torch.device, repeats: int) -> dict:
    """N EMAs of one model: N separate updates against one AverageGroup update."""
    torch.manual_seed(0)
    model = model_fn().to(device)
    decays = [1 - 10.0 ** -(3 + i) for i in range(n)]
    separate = [polyak.ExponentialMovingAverage(model, momentum=1 - d) for d in decays]
    grouped = [polyak.ExponentialMovingAverage(model, momentum=1 - d) for d in decays]
    group = polyak.AverageGroup(grouped)
    numel = sum(p.numel() for p in model.parameters())
    flush_a = torch.randn(numel, device=device)
    flush_b = torch.randn(numel, device=device)

    def flush() -> None:  # evicts the caches, as a training step does between two updates
        flush_a.lerp_(flush_b, 1 - DECAY)

    def run_separate() -> None:
        for e in separate:
            e.update_parameters(model)

    def run_group() -> None:
        group.update_parameters(model)

    for _ in range(WARMUP_UPDATES):
        for run in (run_separate, run_group):
            run()
            flush()
    t_sep, t_grp = [], []
    for _ in range(repeats):
        t_sep.append(_timed(run_separate, device))
        flush()
        t_grp.append(_timed(run_group, device))
        flush()
    return {"separate_ms": 1e3 * statistics.median(t_sep), "group_ms": 1e3 * statistics.median(t_grp)}


def combine(runs: list[dict]) -> dict:
    """The median over independent runs, and the spread of the ratio between them."""
    if "error" in runs[0]:
        return runs[0]
    ratio = statistics.median(r["ratio"] for r in runs)
    rs = [r["ratio"] for r in runs]
    return {
        "median_ms": statistics.median(r["median_ms"] for r in runs),
        "limit_ms": statistics.median(r["limit_ms"] for r in runs),
        "ratio": ratio,
        "spread": (max(rs) - min(rs)) / ratio,
    }


# -- output ---------------------------------------------------------------------------------


def table(results: list[dict], condition: str, peers: list[str]) -> str:
    rows = [r for r in results if r["condition"] == condition]
    head = "| model | threads | " + " | ".join(peers) + " |"
    lines = [head, "|---|---:|" + "---|" * len(peers)]
    keys = sorted({(r["model"], r["threads"]) for r in rows}, key=lambda k: (list(MODELS).index(k[0]), k[1]))
    for model, threads in keys:
        cells = []
        for peer in peers:
            r = next(x for x in rows if x["model"] == model and x["threads"] == threads and x["method"] == peer)
            cells.append(r["error"] if "error" in r else f"{r['median_ms']:.2f} ms, {r['ratio']:.2f}×")
        lines.append(f"| {LABELS[model]} | {threads} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _key(r: dict) -> tuple:
    return (r["condition"], r["threads"], r["model"], r["method"])


def plot(results: list[dict], peers: list[str], path: str) -> None:
    """Ratio to the limit per method and model: one panel per (condition, threads), conditions
    in rows and thread counts in columns."""
    from matplotlib.figure import Figure

    conditions = [c for c in ("idle", "loaded") if any(r["condition"] == c for r in results)]
    threads = sorted({r["threads"] for r in results})
    models = [m for m in MODELS if any(r["model"] == m for r in results)]
    fig = Figure(figsize=(6.0 * len(threads), 3.6 * len(conditions)), layout="constrained")
    axes = fig.subplots(len(conditions), len(threads), sharey=True, squeeze=False)
    width = 0.8 / len(peers)
    for row, condition in enumerate(conditions):
        for col, n in enumerate(threads):
            ax = axes[row][col]
            for j, peer in enumerate(peers):
                xs, ys = [], []
                for i, model in enumerate(models):
                    key = (condition, n, model, peer)
                    r = next((x for x in results if _key(x) == key), None)
                    if r is not None and "ratio" in r:
                        xs.append(i + (j - (len(peers) - 1) / 2) * width)
                        ys.append(r["ratio"])
                ax.bar(xs, ys, width, label=peer)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xticks(range(len(models)), models)
            ax.set_title(f"{condition}, {n} thread{'s' if n > 1 else ''}", fontsize=10)
            ax.grid(axis="y", which="both", alpha=0.3)
        axes[row][0].set_ylabel("update / one flat lerp_")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle("One EMA update on the CPU, as a multiple of one lerp_ over the same bytes (lower is better)")
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--runs", type=int, default=2, help="independent runs, to report the spread")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--threads", default="1,2", help="torch intra-op thread counts to measure")
    ap.add_argument("--conditions", default="idle,loaded")
    ap.add_argument("--group", type=int, default=2, help="N averages updated together vs separately (0: skip)")
    ap.add_argument("--json", help="write every number to this file")
    ap.add_argument("--png", help="draw the ratios to the limit into this file (needs matplotlib)")
    args = ap.parse_args()
    device = torch.device(args.device)
    peers = args.peers.split(",")
    models = args.models.split(",")
    threads_list = [int(t) for t in args.threads.split(",")]
    conditions = args.conditions.split(",")
    if device.type != "cpu" and "loaded" in conditions:
        conditions.remove("loaded")  # a competing CPU process says nothing about a GPU
    print(
        f"torch {torch.__version__}, device {device}, {os.cpu_count()} CPUs, "
        f"threads {threads_list}, conditions {conditions}, decay {DECAY}"
    )
    results: list[dict] = []
    groups: list[dict] = []
    for condition in conditions:
        with competing_load(condition == "loaded"):
            for threads in threads_list:
                torch.set_num_threads(threads)
                for name in models:
                    runs: dict[str, list[dict]] = {p: [] for p in peers}
                    for _ in range(args.runs):
                        for peer in peers:
                            runs[peer].append(measure(MODELS[name], peer, device, args.repeats))
                    for peer in peers:
                        row = {"condition": condition, "threads": threads, "model": name, "method": peer}
                        results.append(row | combine(runs[peer]))
                    if args.group and condition == "idle" and threads == max(threads_list):
                        g = measure_group(MODELS[name], args.group, device, args.repeats)
                        groups.append({"model": name, "threads": threads, "n": args.group} | g)
                    print(f"  measured {condition}, {threads} thread(s), {name}", flush=True)
    for condition in conditions:
        print(f"\n### {condition} (update time, then ratio to one flat lerp_ over the same bytes)\n")
        print(table(results, condition, peers))
    for g in groups:
        print(
            f"\n{g['n']} EMAs of {g['model']}: {g['separate_ms']:.2f} ms as separate updates, "
            f"{g['group_ms']:.2f} ms as one AverageGroup update ({g['separate_ms'] / g['group_ms']:.2f}x)"
        )
    machine = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "device": str(device),
        "repeats": args.repeats,
        "runs": args.runs,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": results, "groups": groups}, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.png:
        plot(results, peers, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
