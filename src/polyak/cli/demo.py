"""``polyak demo``: train a small CNN on scikit-learn's digits and compare weight averages.

One run of SGD at a constant learning rate on digits whose training labels are partly
wrong (so that the live weights keep moving), with weight averages tracked side by side:
EMAs at two decays and SWA over the last quarter (one :class:`~polyak.AverageGroup`), and a
post-hoc EMA (:class:`~polyak.PostHocEMA` snapshots, then :func:`polyak.posthoc.synthesize`
after training for the ``sigma_rel`` that does best on the validation split). Each average
is evaluated with BatchNorm statistics recomputed by :func:`polyak.update_bn`; the EMAs also
as they are, with the statistics averaged along with the weights (``update_buffers=True``).
Writes ``demo.png`` (test accuracy and loss against step) and ``demo.json`` (settings, final
numbers, curves) to ``--out`` and prints a table of the final test accuracy and loss.
docs/demo.md explains the settings and the numbers.

The split and which training labels are wrong are fixed (``DATA_SEED``), so every run is
measured on the same test images; ``--seed`` decides the initialisation and the batch
order (there is no data augmentation). With the default single thread a run is
deterministic. Needs the ``demo`` extra (``pip install 'polyak[demo]'``: scikit-learn and
matplotlib); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["register", "run", "DEFAULTS", "QUICK"]

#: The settings of the full run (docs/demo.md says why these).
DEFAULTS: dict[str, Any] = {
    "steps": 3000,
    "lr": 0.2,
    "label_noise": 0.3,
    "eval_every": 50,
    "posthoc_points": 10,  # synthesized checkpoints drawn in the plot
}
#: ``--quick``: a few seconds, for tests and a first look (numbers not meaningful).
QUICK: dict[str, Any] = {"steps": 100, "eval_every": 25, "posthoc_points": 3}

BATCH_SIZE = 32
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-3
EMA_DECAYS = (0.99, 0.999)
SWA_START_FRACTION = 0.75
POSTHOC_TRACKED = (0.05, 0.10)  # EDM2's default profiles
POSTHOC_CANDIDATES = (0.02, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20, 0.25, 0.28)
SNAPSHOTS = 20  # snapshots of each tracked profile over the run
N_TEST = 500
N_VAL = 300
DATA_SEED = 0  # the split and the wrong labels are the same for every --seed


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small CNN on digits and compare live weights, EMA, SWA and post-hoc EMA",
        description=(
            "Train a small convolutional network on scikit-learn's 8x8 digits (on the CPU, about half a "
            "minute) with a constant learning rate and noisy training labels, tracking the live "
            "weights, EMA at decays 0.99 and 0.999, SWA over the last quarter (with update_bn) and "
            "a post-hoc EMA side by side. Prints a table of the final test accuracy and loss and "
            "writes demo.png and demo.json to --out. Needs polyak[demo]."
        ),
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initialisation and the batch order (default 0); the data split and the wrong labels "
        f"are fixed (seed {DATA_SEED})",
    )
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {DEFAULTS['steps']})")
    p.add_argument("--lr", type=float, default=None, help=f"constant SGD learning rate (default {DEFAULTS['lr']})")
    p.add_argument(
        "--label-noise",
        type=float,
        default=None,
        help=f"fraction of training labels replaced by a wrong class (default {DEFAULTS['label_noise']})",
    )
    p.add_argument(
        "--eval-every", type=int, default=None, help=f"steps between evaluations (default {DEFAULTS['eval_every']})"
    )
    p.add_argument("--out", "-o", type=Path, default=Path("out/demo"), help="output directory (default out/demo)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK['steps']} steps, evaluated every {QUICK['eval_every']}: a few seconds (for tests)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: deterministic, and fastest)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from .options import CLIError

    base = {**DEFAULTS, **(QUICK if args.quick else {})}
    s = {
        "seed": args.seed,
        "steps": args.steps if args.steps is not None else base["steps"],
        "lr": args.lr if args.lr is not None else base["lr"],
        "label_noise": args.label_noise if args.label_noise is not None else base["label_noise"],
        "eval_every": args.eval_every if args.eval_every is not None else base["eval_every"],
        "threads": args.threads,
        "posthoc_points": base["posthoc_points"],
    }
    if s["steps"] < 20:
        raise CLIError(f"--steps must be at least 20, got {s['steps']}")
    if not (math.isfinite(s["lr"]) and s["lr"] > 0):
        raise CLIError(f"--lr must be a positive number, got {s['lr']}")
    if not (0.0 <= s["label_noise"] < 0.9):
        raise CLIError(f"--label-noise must be in [0, 0.9), got {s['label_noise']}")
    if s["eval_every"] < 1:
        raise CLIError(f"--eval-every must be at least 1, got {s['eval_every']}")
    if s["threads"] < 1:
        raise CLIError(f"--threads must be at least 1, got {s['threads']}")
    s.update(
        batch_size=BATCH_SIZE,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        nesterov=True,
        ema_decays=list(EMA_DECAYS),
        swa_start=math.ceil(SWA_START_FRACTION * s["steps"]),
        posthoc_tracked=list(POSTHOC_TRACKED),
        snapshot_every=max(1, s["steps"] // SNAPSHOTS),
    )
    return s


def run(args: argparse.Namespace) -> int:
    from .options import CLIError

    settings = _settings(args)
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as e:
        raise CLIError(f"the demo needs {e.name}: pip install 'polyak[demo]' (or run make demo)") from e
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(settings["threads"])
    try:
        with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory(prefix="polyak-demo-") as tmp:
            start = time.perf_counter()
            results = _train(settings, Path(tmp), quiet=args.quiet)
            results["runtime_s"] = round(time.perf_counter() - start, 1)
    finally:
        torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "demo.png"
    _plot(results, png)
    _write_json(results, args.out / "demo.json")
    print(_table(results))
    print(
        f"\n{settings['steps']} steps in {results['runtime_s']:.0f} s "
        f"({settings['threads']} thread{'s' if settings['threads'] > 1 else ''}); "
        f"wrote {png} and {args.out / 'demo.json'}"
    )
    return 0


# -- data and model ----------------------------------------------------------------------------


def _data(label_noise: float) -> dict[str, Any]:
    """scikit-learn's digits split into train / validation / test (by ``DATA_SEED``), with
    ``label_noise`` of the training labels replaced by a different, random class. Validation
    and test keep the true labels."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(DATA_SEED)
    perm = torch.randperm(len(y), generator=g)
    test, val, train = perm[:N_TEST], perm[N_TEST : N_TEST + N_VAL], perm[N_TEST + N_VAL :]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    y_train = y[train].clone()
    flip = torch.rand(len(train), generator=g) < label_noise
    y_train[flip] = (y_train[flip] + torch.randint(1, 10, (len(train),), generator=g)[flip]) % 10
    return {
        "x_train": x[train],
        "y_train": y_train,
        "x_val": x[val],
        "y_val": y[val],
        "x_test": x[test],
        "y_test": y[test],
        "flipped": int(flip.sum()),
    }


def _make_model() -> Any:
    from torch import nn

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        *block(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


# -- training ----------------------------------------------------------------------------------


METRICS = ("val_acc", "val_loss", "test_acc", "test_loss")


def _train(settings: dict[str, Any], tmp: Path, *, quiet: bool) -> dict[str, Any]:
    """One run: train with the averages beside the live weights, evaluating as it goes, then
    choose the post-hoc profile; the results as written to ``demo.json``."""
    import torch

    data = _data(settings["label_noise"])
    torch.manual_seed(settings["seed"])
    model = _make_model()
    run = _Run(settings, data, model, tmp)
    run.fit(quiet=quiet)
    posthoc = run.choose_posthoc()
    return run.results(posthoc)


class _Curves:
    """The metrics of every method at every evaluation step."""

    def __init__(self, methods: list[str]) -> None:
        self.methods = methods
        self.values: dict[str, dict[str, list]] = {m: {"step": [], **{k: [] for k in METRICS}} for m in methods}

    def record(self, step: int, scores: dict[str, dict[str, float]]) -> None:
        for m, s in scores.items():
            self.values[m]["step"].append(step)
            for k, v in s.items():
                self.values[m][k].append(v)

    def final(self, method: str) -> dict[str, float]:
        return {k: v[-1] for k, v in self.values[method].items() if k != "step"}


class _Run:
    """The model, its optimizer and the averages a user would write; how they are evaluated."""

    def __init__(self, settings: dict[str, Any], data: dict[str, Any], model: Any, tmp: Path) -> None:
        import copy

        import torch

        import polyak
        from polyak.schedules import EqualAverage, StartAt

        self.settings, self.data, self.model, self.tmp = settings, data, model, tmp
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=settings["lr"], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True
        )
        self.ema_names = {d: f"ema_{d:g}" for d in EMA_DECAYS}
        self.averages = polyak.AverageGroup(
            {
                # EMA, with the BatchNorm statistics averaged along with the weights
                # (update_buffers=True); evaluated both as it is and with update_bn.
                **{
                    name: polyak.ExponentialMovingAverage(model, momentum=1 - d, update_buffers=True)
                    for d, name in self.ema_names.items()
                },
                # SWA: the equal average of the weights after each step from swa_start on (a copy
                # of the model before it); BatchNorm statistics recomputed by update_bn to evaluate it.
                "swa": polyak.AveragedModel(model, schedule=StartAt(EqualAverage(), start=settings["swa_start"])),
            }
        )
        self.posthoc = polyak.PostHocEMA(
            model,
            sigma_rels=POSTHOC_TRACKED,
            snapshot_every=settings["snapshot_every"],
            snapshot_dir=tmp / "snapshots",
            snapshot_dtype=torch.float32,
            batch_size=BATCH_SIZE,
        )
        self.x_eval = torch.cat([data["x_val"], data["x_test"]])
        self.y_eval = torch.cat([data["y_val"], data["y_test"]])
        self.n_val = len(data["y_val"])
        self.bn_batches = list(data["x_train"].split(128))  # update_bn's loader: the training inputs, in order
        self.net = copy.deepcopy(model)  # scratch copy: an average with recomputed BatchNorm statistics
        methods = ["live", *(m for n in self.ema_names.values() for m in (n, n + "_bn_averaged")), "swa", "posthoc"]
        self.curves = _Curves(methods)

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self, net: Any) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            net.eval()
            logits = net(self.x_eval)
            net.train()
            losses = F.cross_entropy(logits, self.y_eval, reduction="none")
            correct = (logits.argmax(1) == self.y_eval).float()
        n = self.n_val
        return {
            "val_acc": correct[:n].mean().item(),
            "val_loss": losses[:n].mean().item(),
            "test_acc": correct[n:].mean().item(),
            "test_loss": losses[n:].mean().item(),
        }

    def with_update_bn(self, average: Any) -> dict[str, float]:
        """An average evaluated with BatchNorm statistics recomputed for its weights."""
        import polyak

        average.copy_to(self.net)
        polyak.update_bn(self.bn_batches, self.net)
        return self.evaluate(self.net)

    def evaluate_all(self, step: int) -> dict[str, dict[str, float]]:
        out = {"live": self.evaluate(self.model)}
        for name in self.ema_names.values():
            with self.averages[name].swapped(self.model):  # the EMA's weights and averaged statistics
                out[name + "_bn_averaged"] = self.evaluate(self.model)
            out[name] = self.with_update_bn(self.averages[name])
        if step > self.settings["swa_start"]:  # at least two snapshots
            out["swa"] = self.with_update_bn(self.averages["swa"])
        return out

    # -- training ----------------------------------------------------------------------------

    def fit(self, *, quiet: bool) -> None:
        """SGD over shuffled batches, every average updated after each step, all evaluated every
        ``eval_every`` steps and at the end."""
        import torch.nn.functional as F
        from tqdm import tqdm

        steps, eval_every = self.settings["steps"], self.settings["eval_every"]
        x_train, y_train = self.data["x_train"], self.data["y_train"]
        batches = _batches(len(y_train), self.settings["seed"] + 1)
        self.model.train()
        bar = tqdm(range(1, steps + 1), desc="training", unit="step", file=sys.stderr, disable=quiet, mininterval=0.5)
        for step in bar:
            idx = next(batches)
            loss = F.cross_entropy(self.model(x_train[idx]), y_train[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.averages.update_parameters(self.model)
            self.posthoc.update_parameters(self.model)
            if step % eval_every == 0 or step == steps:
                scores = self.evaluate_all(step)
                self.curves.record(step, scores)
                ema = scores[self.ema_names[EMA_DECAYS[-1]]]
                bar.set_postfix(
                    {"live": f"{scores['live']['val_acc']:.3f}", "ema": f"{ema['val_acc']:.3f}"}, refresh=False
                )
        bar.close()

    # -- post-hoc EMA ------------------------------------------------------------------------

    def synthesized(self, sigma_rel: float, at_step: int) -> tuple[dict[str, float], float]:
        """The post-hoc average for ``sigma_rel`` at ``at_step``, evaluated with recomputed
        BatchNorm statistics (a least-squares mix of snapshots has no valid ones)."""
        import polyak
        from polyak.posthoc import plan_synthesis, synthesize

        plan = plan_synthesis(self.tmp / "snapshots", sigma_rel, at_step=at_step)
        self.net.load_state_dict(synthesize(plan))
        polyak.update_bn(self.bn_batches, self.net)
        return self.evaluate(self.net), plan.report["relative_error"]

    def choose_posthoc(self) -> dict[str, Any]:
        """Choose sigma_rel on the validation split at the end of training, then synthesize that
        profile at a few earlier snapshot steps too (for the curve)."""
        from polyak.posthoc import find_snapshots

        steps = self.settings["steps"]
        snapshot_steps = sorted({snap.step for snap in find_snapshots(self.tmp / "snapshots")})
        candidates = {}
        for s in POSTHOC_CANDIDATES:
            scores, err = self.synthesized(s, steps)
            candidates[s] = {**scores, "relative_error": err}
        sigma_rel = min(candidates, key=lambda s: candidates[s]["val_loss"])
        stride = max(1, len(snapshot_steps) // self.settings["posthoc_points"])
        for at in sorted({*snapshot_steps[stride - 1 :: stride], steps}):
            scores, _ = self.synthesized(sigma_rel, at)
            self.curves.record(at, {"posthoc": scores})
        return {
            "sigma_rel": sigma_rel,
            "chosen_by": "lowest validation loss at the last step",
            "candidates": {
                f"{s:g}": {k: round(v, 6) for k, v in c.items() if k in ("val_acc", "val_loss", "relative_error")}
                for s, c in candidates.items()
            },
            "snapshot_steps": snapshot_steps,
        }

    # -- results -----------------------------------------------------------------------------

    def results(self, posthoc: dict[str, Any]) -> dict[str, Any]:
        settings, data = self.settings, self.data
        return {
            "settings": {**settings, "train": len(data["y_train"]), "val": self.n_val, "test": len(data["y_test"])},
            "labels_flipped": data["flipped"],
            "methods": {
                m: {
                    "label": _label(m, settings, posthoc["sigma_rel"]),
                    **{k: round(v, 6) for k, v in self.curves.final(m).items()},
                    "curve": {
                        k: [round(x, 6) if isinstance(x, float) else x for x in v]
                        for k, v in self.curves.values[m].items()
                    },
                }
                for m in self.curves.methods
            },
            "posthoc": posthoc,
        }


def _batches(n: int, seed: int) -> Iterator[Any]:
    """Batch indices for ever: each epoch a new permutation, the incomplete last batch dropped."""
    import torch

    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    while True:
        if len(order) < BATCH_SIZE:
            order = torch.randperm(n, generator=g)
        idx, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        yield idx


def _label(method: str, settings: dict[str, Any], sigma_rel: float) -> str:
    if method == "live":
        return "live weights"
    if method.endswith("_bn_averaged"):
        return f"EMA {method[4:-12]}, BN statistics averaged"
    if method.startswith("ema_"):
        return f"EMA {method[4:]} (+ update_bn)"
    if method == "swa":
        return f"SWA, last {settings['steps'] - settings['swa_start']} steps (+ update_bn)"
    return f"post-hoc EMA, sigma_rel {sigma_rel:g} (+ update_bn)"


# -- output ------------------------------------------------------------------------------------


def _table(results: dict[str, Any]) -> str:
    rows = ["| weights | test accuracy | test loss | val accuracy | val loss |", "|---|---:|---:|---:|---:|"]
    for m in results["methods"].values():
        rows.append(
            f"| {m['label']} | {m['test_acc']:.2%} | {m['test_loss']:.3f} | {m['val_acc']:.2%} | {m['val_loss']:.3f} |"
        )
    return "\n".join(rows)


def _write_json(results: dict[str, Any], path: Path) -> None:
    from ..files import atomic_write

    atomic_write(path, lambda p: p.write_text(json.dumps(results, indent=1) + "\n"))


def _plot(results: dict[str, Any], path: Path) -> None:
    """Test accuracy over the whole run (top), over the last half zoomed on the averages
    (bottom left), and test loss (bottom right)."""
    from matplotlib.figure import Figure

    s = results["settings"]
    methods = results["methods"]
    styles = {
        "live": {"color": "0.5", "lw": 0.9},
        "swa": {"color": "tab:green", "lw": 2.0},
        "posthoc": {"color": "tab:red", "lw": 1.4, "marker": "o", "ms": 4},
    }
    for decay, color in zip(EMA_DECAYS, ("tab:blue", "tab:orange"), strict=True):
        styles[f"ema_{decay:g}"] = {"color": color, "lw": 1.6}
        styles[f"ema_{decay:g}_bn_averaged"] = {"color": color, "lw": 1.0, "ls": "--"}

    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, 2)
    ax_all, ax_zoom, ax_loss = fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    half = s["steps"] / 2
    for name, m in methods.items():
        c = m["curve"]
        ax_all.plot(c["step"], c["test_acc"], label=m["label"], **styles[name])
        ax_loss.plot(c["step"], c["test_loss"], **styles[name])
        late = [(st, a) for st, a in zip(c["step"], c["test_acc"], strict=True) if st >= half]
        if late:
            ax_zoom.plot(*zip(*late, strict=True), **styles[name])

    def late_values(key: str, names: list[str]) -> list[float]:
        return [
            v
            for n in names
            for st, v in zip(methods[n]["curve"]["step"], methods[n]["curve"][key], strict=True)
            if st >= half
        ]

    averages = [n for n in methods if n != "live" and not n.endswith("_bn_averaged")]
    zoom = late_values("test_acc", averages)
    if zoom:
        ax_zoom.set_ylim(max(0.0, min(zoom) - 0.01), min(1.0, max(zoom) + 0.006))
    losses = late_values("test_loss", list(methods))
    if losses:
        ax_loss.set_ylim(0.0, max(losses) * 1.1)
    ax_all.set_ylim(0.0, 1.0)
    ax_all.set_title("test accuracy", fontsize=10)
    ax_zoom.set_title("test accuracy, second half, zoomed on the averages", fontsize=10)
    ax_loss.set_title("test loss (cross-entropy)", fontsize=10)
    for ax in (ax_all, ax_zoom, ax_loss):
        ax.axvline(s["swa_start"], color="tab:green", ls=":", lw=0.8)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.legend(*ax_all.get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(
        f"polyak demo: digits ({s['train']} training images, {s['label_noise']:.0%} of their labels wrong), "
        f"SGD at a constant lr {s['lr']:g}, batch {s['batch_size']}, seed {s['seed']}",
        fontsize=11,
    )
    from ..files import atomic_write

    atomic_write(path, lambda p: _save_png(fig, p))


def _save_png(fig: Any, path: Path) -> None:
    """The figure as a PNG of 128 colours (a third of the size, no visible difference)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    try:
        from PIL import Image  # matplotlib's own dependency
    except ImportError:  # pragma: no cover
        path.write_bytes(buf.getvalue())
        return
    image = Image.open(buf).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, format="png", optimize=True
    )
