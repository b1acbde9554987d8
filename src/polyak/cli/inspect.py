"""``polyak inspect``: what a checkpoint file holds, and the averages in it."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .console import printable

__all__ = ["register", "run", "describe"]


def register(sub: Any) -> None:
    from .options import add_io_options

    p = sub.add_parser(
        "inspect",
        help="show what a checkpoint holds: format, tensors, sizes, dtypes, keys, averaging state",
        description=(
            "Show the detected format, the number of tensors and their total size, the dtypes, the "
            "top-level keys, and for each average what it is in one line (an EMA and its decay, an SWA, "
            "an average of checkpoints, a post-hoc synthesis, ...) with the class, schedule and step count "
            "where the file says them. Tensor data is not read (safetensors headers; .pt files are memory-mapped; "
            "a folder's index and headers, or a torch.distributed.checkpoint folder's .metadata, read without "
            "running code from it; only tensors of at most 64 elements, such as step counters, are read)."
        ),
        epilog="examples:\n  polyak inspect work_dirs/iter_1000.pth\n  polyak inspect ema.safetensors --json\n"
        "  polyak inspect checkpoints/step-5000/    # a torch.distributed.checkpoint or Hugging Face folder",
    )
    p.add_argument(
        "checkpoint",
        type=Path,
        metavar="CKPT",
        help="a .pt/.pth/.ckpt or .safetensors file, a Hugging Face folder (or its index), or a "
        "torch.distributed.checkpoint folder",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_io_options(p)
    p.set_defaults(run=run)


def _describe_value(v: Any) -> str:
    from ..files import Opaque, iter_tensors

    if isinstance(v, Tensor):
        return f"tensor {str(v.dtype).removeprefix('torch.')} {list(v.shape)}"
    if isinstance(v, Opaque):
        return f"object {v.origin} (not loaded)"
    if isinstance(v, Mapping):
        n = sum(1 for _ in iter_tensors(v))
        return f"dict of {len(v)} entries" + (f", {n} tensors" if n else "")
    if isinstance(v, (list, tuple)):
        n = sum(1 for _ in iter_tensors(v))
        return f"{type(v).__name__} of {len(v)}" + (f", {n} tensors" if n else "")
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _average_info(found: Any) -> dict[str, Any]:
    from .console import describe_average, health_summary, schedule_summary

    averages = {}
    for name, rec in found.records.items():
        averages[name] = {
            "description": describe_average(rec, name),
            "class": rec.get("class"),
            "schedule": rec.get("schedule"),
            **{k: v for k, v in schedule_summary(rec.get("schedule")).items() if k != "schedule"},
            "steps": rec.get("steps"),
            "counters": rec.get("counters"),
            "interval": rec.get("interval"),
            "update_buffers": rec.get("update_buffers"),
            "dtype": rec.get("dtype"),
            "health": health_summary(rec.get("health")),
            "primary": name == found.primary,
        }
    return {
        "format": found.format,
        "key": found.key or None,
        "tensors": None if found.weights is None else len(found.weights),
        "live_weights": found.live is not None,
        "needs": found.needs,
        "averages": averages,
        "notes": list(found.notes),
    }


def describe(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """What :func:`run` prints, as a dict (the ``--json`` output)."""
    from ..files import SafetensorsFile, is_state_dict, iter_tensors
    from .formats import identify
    from .options import read_any

    loaded = read_any(args, path, note=False, mmap=True, lazy_safetensors=True)
    obj = loaded.obj
    if isinstance(obj, SafetensorsFile):  # shapes from the header: no tensor data is read
        obj = {k: torch.empty(obj.shape(k), dtype=obj.dtype(k), device="meta") for k in obj.keys()}
        loaded.obj = obj
    tensors = list(iter_tensors(obj))
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for _, t in tensors)
    reader = loaded.reader
    files = reader.files() if reader is not None else [path]
    info: dict[str, Any] = {
        "file": str(path),
        "file_bytes": sum(f.stat().st_size for f in files),
        "read_with": loaded.loader,
        "placeholders": dict(loaded.replaced),
        "tensors": len(tensors),
        "tensor_bytes": sum(t.numel() * t.element_size() for _, t in tensors),
        "dtypes": dict(dtypes.most_common()),
        "top_level": {str(k): _describe_value(v) for k, v in obj.items()} if isinstance(obj, Mapping) else {},
    }
    if reader is not None:
        info["folder"] = {
            "kind": reader.kind,
            "files": [f.name for f in files],
            "weights": reader.where,
            "weight_tensors": len(reader.keys()),
        }
        reader.close()
    if loaded.metadata:
        info["metadata"] = dict(loaded.metadata)
    try:
        found = identify(loaded)
    except ValueError as e:
        found, info["error"] = [], str(e)
    if found:
        info["format"] = found[0].format if len(found) == 1 else "several"
        info["averages"] = [_average_info(f) for f in found]
    else:
        info["format"] = "state-dict" if is_state_dict(obj) else "unknown"
        info["averages"] = []
    return info


def _text(info: dict[str, Any]) -> str:
    from .console import health_line, human_bytes, schedule_numbers

    lines = [f"file:       {info['file']} ({human_bytes(info['file_bytes'])})"]
    folder = info.get("folder")
    if folder:
        kind = {"hf-folder": "Hugging Face folder", "dcp": "torch.distributed.checkpoint folder"}[folder["kind"]]
        n = len(folder["files"])
        shown_files = ", ".join(folder["files"][:4]) + (" ..." if n > 4 else "")
        lines.append(f"folder:     {kind}, {n} file{'' if n == 1 else 's'} ({shown_files})")
        lines.append(f"weights:    {folder['weight_tensors']} tensors, from {folder['weights']}")
    read_with = {
        "weights_only": "torch.load(weights_only=True)",
        "restricted": "restricted unpickler (other objects as inert placeholders)",
        "safetensors": "safetensors header" + ("s" if folder else ""),
        "unsafe": "torch.load(weights_only=False) (--unsafe)",
        "dcp": ".metadata through the restricted unpickler (no code run); tensor data not read",
    }[info["read_with"]]
    lines.append(f"read with:  {read_with}")
    if info["placeholders"]:
        shown = ", ".join(f"{k} x{n}" for k, n in sorted(info["placeholders"].items()))
        lines.append(f"not loaded: {shown}")
    formats = ", ".join(f"{a['format']}" + (f" (under {a['key']!r})" if a["key"] else "") for a in info["averages"])
    lines.append(f"format:     {formats or info['format']}")
    dtypes = ", ".join(f"{k} x{n}" for k, n in info["dtypes"].items()) or "-"
    lines.append(f"tensors:    {info['tensors']} ({human_bytes(info['tensor_bytes'])}); dtypes: {dtypes}")
    if info.get("metadata"):
        lines.append("metadata:")
        lines += [f"  {k}: {v}" for k, v in info["metadata"].items()]
    if info["top_level"]:
        lines.append("top-level keys:")
        width = min(max(len(k) for k in info["top_level"]), 30)
        lines += [f"  {k:<{width}}  {v}" for k, v in info["top_level"].items()]
    for a in info["averages"]:
        where = f" under {a['key']!r}" if a["key"] else ""
        live = "with live weights" if a["live_weights"] else "no live weights"
        count = f"{a['tensors']} tensors" if a["tensors"] is not None else "tensors by position"
        lines.append(f"average ({a['format']}{where}): {count}, {live}")
        for name, r in a["averages"].items():
            lines.append(f"  {name}{' (primary)' if r['primary'] else ''}: {r['description']}")
            details = []  # of an averaging state: none for an average of checkpoints (no class, no schedule)
            if r["class"] or r["schedule"] is not None:
                sched = json.dumps(r["schedule"]) if r["schedule"] is not None else "unknown"
                numbers = schedule_numbers(r)
                details += [f"class {r['class']}"] if r["class"] else []
                details.append(f"schedule {sched}" + (f" [{numbers}]" if numbers else ""))
                details.append(f"steps {r['steps'] if r['steps'] is not None else 'unknown'}")
            elif r["steps"] is not None:
                details.append(f"steps {r['steps']}")
            if details:
                lines.append("    " + ", ".join(details))
            if r.get("health"):
                lines.append("    " + health_line(r["health"]))
                lines += [f"      problem: {p}" for p in r["health"]["problems"]]
        if a["needs"]:
            lines.append(f"  note: {a['needs']}")
        lines += [f"  note: {n}" for n in a["notes"]]
    if info.get("error"):
        lines.append(f"error:      {info['error']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = describe(args, args.checkpoint)
    if args.json:
        json.dump(info, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(printable(_text(info)))
    return 0
