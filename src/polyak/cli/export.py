"""``polyak export``: the averaged weights of a training checkpoint as a plain state dict."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["register", "run", "export_metadata"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def register(sub: Any) -> None:
    from .options import add_io_options, add_output_options, add_source_options

    p = sub.add_parser(
        "export",
        help="write a checkpoint's averaged weights as a plain state dict (.safetensors or .pt)",
        description=(
            "Write the averaged weights of a training checkpoint (polyak's format, or any format "
            "'polyak convert' reads) as a state dict the model loads directly, labelled as averaged "
            "in the file's metadata (method, decay or sigma_rel, step, source). .safetensors: the "
            "metadata are the file's string metadata; .pt: torch.save({'state_dict': weights, "
            "'metadata': {...}}), which loads with weights_only=True; a folder (an existing one, or a name "
            "ending in /): a Hugging Face folder of safetensors shards, written shard by shard. The checkpoint "
            "may be a file, a Hugging Face folder or a torch.distributed.checkpoint folder (read a tensor at a "
            "time)."
        ),
        epilog="examples:\n  polyak export epoch_12.pth -o ema.safetensors\n"
        "  polyak export last.ckpt -o ema.pt --dtype bfloat16\n"
        "  polyak export run.pt --key ema --names-from model.pt -o ema.safetensors   # torch_ema state\n"
        "  polyak export checkpoints/step-5000 -o ema-hf/ --max-shard-size 2GB        # DCP -> Hugging Face",
    )
    p.add_argument(
        "checkpoint",
        type=Path,
        metavar="CKPT",
        help="a training checkpoint holding an average: a file, or a torch.distributed.checkpoint or Hugging Face "
        "folder",
    )
    add_output_options(p)
    p.add_argument(
        "--average",
        metavar="NAME",
        help="which average of a polyak checkpoint that holds several (default: the primary one)",
    )
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="cast the floating tensors to this dtype")
    add_source_options(p)
    add_io_options(p)
    p.set_defaults(run=run)


def export_metadata(record: dict[str, Any], *, name: str, fmt: str, source: Path) -> dict[str, str]:
    """The labels of an exported average (strings, for safetensors): ``averaged``,
    ``method``, ``class``, ``schedule`` (JSON), ``decay`` / ``momentum`` / ``half_life`` /
    ``sigma_rel`` / ``gamma`` where the schedule says (the given one as given, the others derived
    from it), ``description`` (:func:`~polyak.cli.console.describe_average`), ``step``,
    ``average``, ``source_format``, ``source``."""
    from .console import describe_average, schedule_summary

    meta: dict[str, str] = {"format": "polyak-export", "averaged": "true", "average": name}
    summary = schedule_summary(record.get("schedule"))
    meta["method"] = str(record.get("method") or summary.get("method") or record.get("class") or "unknown")
    if record.get("class"):
        meta["class"] = str(record["class"])
    if record.get("schedule") is not None:
        meta["schedule"] = json.dumps(record["schedule"], sort_keys=True)
    for k in ("decay", "momentum", "half_life", "sigma_rel", "gamma"):
        if k in summary:
            meta[k] = repr(float(summary[k]))
    meta["description"] = describe_average(record, name)
    if record.get("steps") is not None:
        meta["step"] = str(int(record["steps"]))
    meta["source_format"] = fmt
    meta["source"] = source.name
    return meta


def run(args: argparse.Namespace) -> int:
    from .. import checkpoint as ckpt
    from ..files import HFFolder, parse_size, write_weights
    from .console import human_bytes, progress, say
    from .options import CLIError, find_average, output_target

    parse_size(args.max_shard_size)  # a bad size is refused before anything is read
    target = output_target(args.out, [args.checkpoint] + ([args.names_from] if args.names_from else []))
    loaded, found = find_average(args, args.checkpoint)
    name = found.primary
    weights: dict[str, Any] = found.weights
    if args.average is not None and args.average != found.primary:
        if found.format != "polyak":
            raise CLIError(f"--average: a {found.format} checkpoint holds one average")
        if args.average not in found.records:
            raise CLIError(f"no average {args.average!r} in {args.checkpoint}; it has {sorted(found.records)}")
        name = args.average
        obj = loaded.obj if not found.key else loaded.obj[found.key]
        weights = ckpt.deployable_weights(obj, name)
    dtype = _DTYPES.get(args.dtype) if args.dtype else None
    state: dict[str, Tensor] = {k: v for k, v in weights.items() if isinstance(v, Tensor)}
    if not state:
        raise CLIError(f"{args.checkpoint}: the average holds no tensors")

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    layout = {k: (tuple(v.shape), cast(v).dtype if dtype is not None else v.dtype) for k, v in state.items()}

    def tensors(order: Any) -> Any:
        # a tensor of a folder is read when it is written (loaded.tensor), one at a time
        items = ((k, cast(loaded.tensor(state[k]))) for k in order)
        return progress(args, items, desc="exporting", total=len(order))

    metadata = export_metadata(found.records[name], name=name, fmt=found.format, source=args.checkpoint)
    beside = loaded.reader.beside() if isinstance(loaded.reader, HFFolder) and target.folder else []
    written = write_weights(target, layout, tensors, metadata, max_shard_size=args.max_shard_size, beside=beside)
    if loaded.reader is not None:
        loaded.reader.close()
    step = f", step {metadata['step']}" if "step" in metadata else ""
    where = str(target.path)
    if written.folder:
        where += f"/ ({len(written.files)} shard{'' if len(written.files) == 1 else 's'})"
    say(
        args,
        f"wrote {len(state)} tensors ({human_bytes(written.nbytes)}) of {found.format} average {name!r} "
        f"({metadata['description']}{step}) to {where}",
    )
    return 0
