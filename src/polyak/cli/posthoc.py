"""``polyak posthoc``: synthesize a post-hoc EMA from snapshots (EDM2)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .console import printable

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "posthoc",
        help="synthesize the average for any sigma_rel from PostHocEMA snapshots",
        description=(
            "Solve EDM2's least-squares problem for the snapshots taken at or before --at-step "
            "(default: the latest) and write the combined average as a state dict the model loads. "
            "The output's extension says its format: .safetensors, or .pt, .pth, .ckpt, .bin (torch.save)."
        ),
    )
    p.add_argument("--snapshots", required=True, type=Path, help="directory of {profile}-{step:09d}.safetensors files")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sigma-rel", type=float, help="relative width of the wanted average (e.g. 0.07)")
    target.add_argument("--gamma", type=float, help="exponent of the wanted power function instead of --sigma-rel")
    p.add_argument("--at-step", type=int, default=None, help="the step to synthesize at (default: the latest)")
    p.add_argument(
        "--out", "-o", required=True, type=Path, help="output: .safetensors, or .pt, .pth, .ckpt, .bin (torch.save)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..posthoc import find_snapshots, plan_synthesis, synthesize
    from .options import CLIError, output_path

    output_path(args.out, [])  # the extension, before any snapshot is read
    snapshots = find_snapshots(args.snapshots)
    if not snapshots:
        raise CLIError(f"no snapshots found in {args.snapshots} (files named {{profile}}-{{step:09d}}.safetensors)")
    output_path(args.out, [s.path for s in snapshots])  # never onto a snapshot
    plan = plan_synthesis(snapshots, args.sigma_rel, gamma=args.gamma, at_step=args.at_step)
    if not args.quiet:
        print(printable(plan.summary()), file=sys.stderr)

    def progress(items: Any) -> Any:
        return tqdm(items, desc="snapshots", unit="file", disable=args.quiet, file=sys.stderr)

    state = synthesize(plan, out=args.out, progress=progress)
    if not args.quiet:
        print(printable(f"wrote {len(state)} tensors to {args.out}"), file=sys.stderr)
    return 0
