"""Time one averaging update: polyak against its peers and against the memory-bound limit.

The limit is one ``lerp_`` over a single contiguous buffer holding as many elements as the
averaged tensors: the least any EMA update of the same bytes can cost. Every timed update is
followed at once by a timed limit, so drifts in memory bandwidth cancel in the ratio.

    python benchmarks/update_speed.py [--device cpu|cuda] [--repeats 15] [--models resnet50,vit_b,small2000]

Peers: torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn, mmengine
ExponentialMovingAverage (mmengine-lite), ema-pytorch EMA(use_foreach=True). timm is not
installed beside torch 2.13 here (it pulls another torch build), so it prints "n/a".
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import polyak

DECAY = 0.999


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


MODELS: dict[str, Callable[[], nn.Module]] = {"resnet50": resnet50, "vit_b": vit_b, "small2000": small2000}


# -- contestants: each returns an update function ------------------------------------------


def make_polyak(model: nn.Module) -> Callable[[], None]:
    ema = polyak.ExponentialMovingAverage(model, momentum=1 - DECAY)
    ema.update_parameters(model)
    return lambda: ema.update_parameters(model)


def make_polyak_flat(model: nn.Module) -> Callable[[], None]:
    polyak.flatten_parameters(model)
    return make_polyak(model)


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
    "torch AveragedModel": make_torch,
    "mmengine EMA": make_mmengine,
    "ema-pytorch EMA": make_ema_pytorch,
}


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


def measure(name: str, model_fn: Callable[[], nn.Module], peer: str, device: torch.device, repeats: int) -> dict:
    torch.manual_seed(0)
    model = model_fn().to(device)
    numel = sum(p.numel() for p in model.parameters())
    try:
        update = PEERS[peer](model)
    except ImportError as e:
        return {"peer": peer, "error": f"n/a ({e.name} not installed)"}
    limit_a = torch.randn(numel, device=device)
    limit_b = torch.randn(numel, device=device)

    def limit() -> None:
        limit_a.lerp_(limit_b, 1 - DECAY)

    for _ in range(3):
        update()
        limit()
    times, ratios = [], []
    for _ in range(repeats):
        t_upd = _timed(update, device)
        t_lim = _timed(limit, device)
        times.append(t_upd)
        ratios.append(t_upd / t_lim)
    return {"peer": peer, "median_ms": 1e3 * statistics.median(times), "ratio": statistics.median(ratios)}


def measure_group(model_fn: Callable[[], nn.Module], n: int, device: torch.device, repeats: int) -> dict:
    """N EMAs of one model: N separate updates against one AverageGroup update."""
    torch.manual_seed(0)
    model = model_fn().to(device)
    decays = [1 - 10.0 ** -(3 + i) for i in range(n)]
    separate = [polyak.ExponentialMovingAverage(model, momentum=1 - d) for d in decays]
    grouped = [polyak.ExponentialMovingAverage(model, momentum=1 - d) for d in decays]
    group = polyak.AverageGroup(grouped)
    for _ in range(3):
        for e in separate:
            e.update_parameters(model)
        group.update_parameters(model)

    def run_separate() -> None:
        for e in separate:
            e.update_parameters(model)

    t_sep, t_grp = [], []
    for _ in range(repeats):
        t_sep.append(_timed(run_separate, device))
        t_grp.append(_timed(lambda: group.update_parameters(model), device))
    return {"separate_ms": 1e3 * statistics.median(t_sep), "group_ms": 1e3 * statistics.median(t_grp)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--runs", type=int, default=2, help="independent runs, to report the spread")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--group", type=int, default=2, help="N averages updated together vs separately (0: skip)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, decay {DECAY}")
    for name in args.models.split(","):
        model = MODELS[name]()
        n = sum(p.numel() for p in model.parameters())
        print(f"\n## {name}: {n / 1e6:.1f}M parameters in {len(list(model.parameters()))} tensors")
        del model
        rows: dict[str, list[dict]] = {}
        for _ in range(args.runs):
            for peer in args.peers.split(","):
                rows.setdefault(peer, []).append(measure(name, MODELS[name], peer, device, args.repeats))
        print(f"| {'method':<22} | {'update (ms)':>11} | {'x limit':>8} | {'spread':>7} |")
        print(f"|{'-' * 24}|{'-' * 13}|{'-' * 10}|{'-' * 9}|")
        for peer, results in rows.items():
            if "error" in results[0]:
                print(f"| {peer:<22} | {results[0]['error']:>32} |")
                continue
            ms = statistics.median(r["median_ms"] for r in results)
            ratio = statistics.median(r["ratio"] for r in results)
            rs = [r["ratio"] for r in results]
            spread = (max(rs) - min(rs)) / ratio
            print(f"| {peer:<22} | {ms:>11.2f} | {ratio:>8.2f} | {spread:>6.1%} |")
        print(f"| {'timm ModelEmaV3':<22} | {'n/a (not installable beside torch 2.13)':>32} |")
        if args.group:
            g = measure_group(MODELS[name], args.group, device, args.repeats)
            print(
                f"{args.group} EMAs of this model: {g['separate_ms']:.2f} ms as separate updates, "
                f"{g['group_ms']:.2f} ms as one AverageGroup update ({g['separate_ms'] / g['group_ms']:.2f}x)"
            )


if __name__ == "__main__":
    main()
