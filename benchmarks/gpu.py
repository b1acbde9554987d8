"""The GPU comparison, on one CUDA device, in one command (under five minutes on a recent GPU).

    python benchmarks/gpu.py [--json out.json] [--repeats 15] [--steps 20] [--models resnet50,vit_b,small2000]

Update time: for each model (update_speed.py's ResNet-50, ViT-B/16 and 2,000 small tensors) and
method, the average is built and warmed up, then each of ``--repeats`` updates is timed with
CUDA events on the current stream, followed at once by one ``lerp_`` over a single contiguous
buffer of as many elements (the *limit*: the least an update of the same bytes can cost); the
table shows the median update time and the median of the paired ratios. Methods:

* polyak: ``ExponentialMovingAverage(model, momentum=1e-3)``;
* polyak flat: the same after ``polyak.flatten_parameters(model)``;
* side stream: ``side_stream=True``, timed until the current stream has waited for it
  (``ema.wait()``): the cost of the kernels, not of the overlap (see below);
* CPU offload: ``device="cpu"``: pinned double-buffered transfers and CPU lerps (host-bound);
* CUDA graph: ``polyak.gpu.CapturableUpdate`` captured once in a ``torch.cuda.CUDAGraph``, replayed;
* torch AveragedModel (``get_ema_multi_avg_fn``), mmengine ``ExponentialMovingAverage``
  (mmengine-lite), ema-pytorch ``EMA(use_foreach=True)``: where installed.

Step time with overlap: a training step (forward, backward, AdamW step) of each model followed
by the update, ``--steps`` steps timed with CUDA events, with no average, with the default
update and with ``side_stream=True``: the difference to "no average" is what the update costs a
step once it overlaps (or not) with the next forward.

Without CUDA it prints one line saying so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import polyak

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_speed import (
    DECAY,
    make_ema_pytorch,
    make_mmengine,
    make_polyak,
    make_polyak_flat,
    make_torch,
    resnet50,
    small2000,
    vit_b,
)

MODELS: dict[str, Callable[[], nn.Module]] = {"resnet50": resnet50, "vit_b": vit_b, "small2000": small2000}
LABELS = {
    "resnet50": "ResNet-50 (25.6M, 161 tensors)",
    "vit_b": "ViT-B/16 (86.6M, 152 tensors)",
    "small2000": "2,000 × 2,500 elements (5M)",
}


# -- the methods: each builds an average of ``model`` and returns one update ---------------------


def make_side_stream(model: nn.Module) -> Callable[[], None]:
    ema = polyak.ExponentialMovingAverage(model, momentum=1 - DECAY, side_stream=True)
    ema.update_parameters(model)

    def update() -> None:
        ema.update_parameters(model)
        ema.wait()

    return update


def make_offload(model: nn.Module) -> Callable[[], None]:
    ema = polyak.ExponentialMovingAverage(model, momentum=1 - DECAY, device="cpu")
    ema.update_parameters(model)
    return lambda: ema.update_parameters(model)


def make_graph(model: nn.Module) -> Callable[[], None]:
    ema = polyak.ExponentialMovingAverage(model, momentum=1 - DECAY)
    update = polyak.gpu.CapturableUpdate(ema, model)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch recommends
        for _ in range(2):
            update.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        update.step()
    return graph.replay


METHODS: dict[str, Callable[[nn.Module], Callable[[], None]]] = {
    "polyak": make_polyak,
    "polyak flat": make_polyak_flat,
    "side stream": make_side_stream,
    "CPU offload": make_offload,
    "CUDA graph": make_graph,
    "torch AveragedModel": make_torch,
    "mmengine EMA": make_mmengine,
    "ema-pytorch EMA": make_ema_pytorch,
}


def event_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def measure_update(name: str, method: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[name]().cuda()
    numel = sum(p.numel() for p in model.parameters())
    try:
        update = METHODS[method](model)
    except ImportError as e:
        return {"error": f"n/a ({e.name} not installed)"}
    a, b = torch.randn(numel, device="cuda"), torch.randn(numel, device="cuda")

    def limit() -> None:
        a.lerp_(b, 1 - DECAY)

    for _ in range(3):
        update()
        limit()
    torch.cuda.synchronize()
    times, limits, ratios = [], [], []
    for _ in range(repeats):
        t, lim = event_ms(update), event_ms(limit)
        times.append(t)
        limits.append(lim)
        ratios.append(t / lim)
    return {"ms": statistics.median(times), "limit_ms": statistics.median(limits), "ratio": statistics.median(ratios)}


# -- training steps ---------------------------------------------------------------------------


def forward_resnet(model: nn.Module, x: Tensor) -> Tensor:
    layers = list(model)
    x = F.max_pool2d(F.relu(layers[1](layers[0](x))), 3, 2, 1)
    for block in layers[2:-1]:
        out = F.relu(block.bn1(block.conv1(x)))
        out = F.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
        x = F.relu(out + (block.down(x) if block.down is not None else x))
    return layers[-1](x.mean((2, 3)))


def forward_vit(model: nn.Module, x: Tensor) -> Tensor:
    h = model.patch(x).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls.expand(h.shape[0], -1, -1), h], 1) + model.pos
    return model.head(model.norm(model.encoder(h))[:, 0])


def forward_small(model: nn.Module, x: Tensor) -> Tensor:
    for p in model.params:
        x = torch.tanh(x @ p)
    return x


STEPS: dict[str, tuple[Callable[[nn.Module, Tensor], Tensor], Callable[[], Tensor]]] = {
    "resnet50": (forward_resnet, lambda: torch.randn(64, 3, 224, 224, device="cuda")),
    "vit_b": (forward_vit, lambda: torch.randn(64, 3, 224, 224, device="cuda")),
    "small2000": (forward_small, lambda: torch.randn(256, 50, device="cuda")),
}
VARIANTS = ("no average", "polyak", "side stream")


def step_ms(name: str, variant: str, steps: int) -> float:
    """ms per training step of one variant (after three warm-up steps)."""
    forward, batch = STEPS[name]
    torch.manual_seed(0)
    model = MODELS[name]().cuda().train()
    x = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ema = None
    if variant != "no average":
        ema = polyak.ExponentialMovingAverage(model, momentum=1 - DECAY, side_stream=variant == "side stream")

    def step() -> None:
        forward(model, x).float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(model)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return event_ms(lambda: [step() for _ in range(steps)]) / steps


def measure_steps(name: str, steps: int) -> dict:
    """ms per training step with no average, the default update and the side-stream update;
    two rounds in alternating order, median of the rounds."""
    out: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for order in (VARIANTS, tuple(reversed(VARIANTS))):
        for variant in order:
            out[variant].append(step_ms(name, variant, steps))
            torch.cuda.empty_cache()
    return {v: statistics.median(ts) for v, ts in out.items()}


# -- output -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20, help="training steps timed per variant and round")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", help="also write every number to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(f"benchmarks/gpu.py: no CUDA device (torch {torch.__version__}): nothing measured")
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    models, methods = args.models.split(","), args.methods.split(",")
    device = torch.cuda.get_device_name()
    print(f"torch {torch.__version__}, {device}, decay {DECAY}, repeats {args.repeats}, steps {args.steps}")
    updates: list[dict] = []
    for name in models:
        for method in methods:
            updates.append({"model": name, "method": method} | measure_update(name, method, args.repeats))
        print(f"  measured updates of {name}", flush=True)
    steps = []
    for name in models:
        steps.append({"model": name} | measure_steps(name, args.steps))
        print(f"  measured training steps of {name}", flush=True)

    print("\n### Update time (CUDA events), then the ratio to one flat lerp_ over the same bytes\n")
    print("| model | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for name in models:
        cells = []
        for method in methods:
            r = next(u for u in updates if u["model"] == name and u["method"] == method)
            cells.append(r["error"] if "error" in r else f"{r['ms']:.3f} ms, {r['ratio']:.2f}×")
        print(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    print("\n### Training step with the update (ms per step; the update's cost over no average)\n")
    print("| model | no average | polyak | side stream | polyak's cost | side stream's cost |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in steps:
        base = s["no average"]
        print(
            f"| {LABELS[s['model']]} | {base:.2f} | {s['polyak']:.2f} | {s['side stream']:.2f} "
            f"| {s['polyak'] - base:+.2f} | {s['side stream'] - base:+.2f} |"
        )
    if args.json:
        machine = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "updates": updates, "steps": steps}, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
