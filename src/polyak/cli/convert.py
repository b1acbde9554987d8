"""``polyak convert``: read the average another library saved and write polyak's checkpoint format."""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    from .options import add_io_options, add_source_options

    p = sub.add_parser(
        "convert",
        help="convert another library's saved average to polyak's checkpoint format",
        description=(
            "Read the average another library saved (mmengine EMAHook, mmcv 1.x EMAHook, timm "
            "state_dict_ema, torch AveragedModel, Lightning WeightAveraging, torch_ema, diffusers "
            "EMAModel, ema-pytorch) and write polyak's checkpoint format (docs/checkpoint-format.md): "
            "'state_dict' = the averaged weights (a complete state dict), 'live_state_dict' = the live "
            "weights where the file has them, and the 'polyak' block with the record: class, schedule "
            "where the file says it, counters and steps. The format is detected (--format to force it). "
            "torch_ema and diffusers save their tensors by position: --names-from names them. The checkpoint "
            "may be a torch.distributed.checkpoint or Hugging Face folder (read into memory: torch.save "
            "writes the output whole)."
        ),
        epilog="examples:\n  polyak convert work_dirs/iter_1000.pth -o iter_1000.polyak.pt        # mmengine\n"
        "  polyak convert ema_state.pt --names-from model.pt -o ema.polyak.pt   # torch_ema, diffusers\n"
        "  polyak convert model_best.pth.tar -o best.polyak.pt --decay 0.9998    # timm (decay not saved)",
    )
    p.add_argument(
        "checkpoint",
        type=Path,
        metavar="CKPT",
        help="the other library's checkpoint: a file, or a torch.distributed.checkpoint or Hugging Face folder",
    )
    p.add_argument("--out", "-o", required=True, type=Path, help="output file: .pt, .pth or .ckpt (torch.save)")
    p.add_argument(
        "--name",
        help="the average's name in the polyak block (default: what the file holds: 'ema' for a format known to "
        "hold an EMA or given --decay, 'swa' for an SWA, else 'average')",
    )
    p.add_argument(
        "--class",
        dest="cls",
        metavar="CLASS",
        help="record this polyak class instead of the one inferred (the class a resume builds)",
    )
    p.add_argument(
        "--decay",
        type=float,
        help="record a constant decay (ConstantMomentum(decay=D), stored as given) where the file does not say "
        "its schedule",
    )
    p.add_argument("--steps", type=int, help="record this update count where the file does not say it")
    add_source_options(p)
    add_io_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import checkpoint as ckpt
    from ..files import save_checkpoint
    from ..schedules import ConstantMomentum
    from .console import describe_average, human_bytes, progress, say
    from .options import CHECKPOINT_SUFFIXES, CLIError, find_average, output_path

    inputs = [args.checkpoint] + ([args.names_from] if args.names_from else [])
    out = output_path(args.out, inputs, suffixes=CHECKPOINT_SUFFIXES)
    loaded, found = find_average(args, args.checkpoint)
    if found.format == "polyak":
        raise CLIError(f"{args.checkpoint} is already in polyak's format (use 'polyak export' for plain weights)")
    record = dict(found.record)
    name = args.name or found.primary
    if args.cls:
        record["class"] = args.cls
    if not record.get("class"):
        raise CLIError(
            f"{args.checkpoint} ({found.format}) holds {describe_average(record, found.primary)}, with no "
            "averaging state to resume: --class names the polyak class to record"
        )
    if args.decay is not None:
        if not (0.0 <= args.decay < 1.0 and math.isfinite(args.decay)):
            raise CLIError(f"--decay must be in [0, 1), got {args.decay}")
        if record.get("schedule") is not None:
            say(args, f"note: --decay replaces the schedule read from the file, {json.dumps(record['schedule'])}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record["schedule"] = ConstantMomentum(decay=args.decay).to_dict()
        for w in caught:
            say(args, f"note: --decay: {w.message}")
        name = args.name or "ema"
    if args.steps is not None:
        if args.steps < 0:
            raise CLIError(f"--steps must be >= 0, got {args.steps}")
        counter = "n_averaged" if record["class"] == "AveragedModel" else "steps"
        record["steps"] = args.steps
        record["counters"] = {counter: args.steps}
    record["source"] = {
        **dict(record.get("source") or {}),
        "file": args.checkpoint.name,
        "key": found.key,
        "notes": list(found.notes),
    }
    # torch.save needs every tensor: a folder's placeholders are read here (loaded.tensor), each once
    cache: dict[int, Tensor] = {}

    def data(v: Tensor) -> Tensor:
        if id(v) not in cache:
            cache[id(v)] = loaded.tensor(v)
        return cache[id(v)]

    items = progress(args, list(found.weights.items()), desc="converting")
    weights = {k: data(v) for k, v in items if isinstance(v, Tensor)}
    live = None if found.live is None else {k: data(v) if isinstance(v, Tensor) else v for k, v in found.live.items()}
    checkpoint = ckpt.pack_state({}, weights, {name: record}, live=live)
    save_checkpoint(out, checkpoint)
    size = sum(t.numel() * t.element_size() for t in weights.values())
    if found.live is None:
        say(args, "note: the file holds no live weights: the output has no live_state_dict")
    if record.get("steps") is None:
        say(args, "note: the update count is unknown (--steps gives it): a resume would restart the average")
    schedule = json.dumps(record["schedule"]) if record.get("schedule") is not None else "unknown"
    steps = record["steps"] if record.get("steps") is not None else "unknown"
    say(
        args,
        f"wrote {out}: {found.format} average {name!r}, {describe_average(record, name)}, as {record['class']} "
        f"({len(weights)} tensors, {human_bytes(size)}), schedule {schedule}, steps {steps}",
    )
    return 0
