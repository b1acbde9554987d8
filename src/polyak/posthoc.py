"""Post-hoc EMA (Karras et al., 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2): choose the averaging length after training.

During training :class:`PostHocEMA` tracks a few power-function averages
(:class:`~polyak.schedules.PowerFunction`) and saves low-precision snapshots of them. Afterwards
:func:`synthesize` reconstructs the average for any relative width :math:`\\sigma_{\\text{rel}}`
as the least-squares combination of the snapshots.

Why the reconstruction is exact in time: after :math:`T` updates, the power-function average
with exponent :math:`\\gamma` gives the source of step :math:`\\tau` the weight

.. math:: w_T(\\tau) = \\frac{(\\tau + 1)^{\\gamma + 1} - \\tau^{\\gamma + 1}}{T^{\\gamma + 1}}
          = \\int_\\tau^{\\tau + 1} p_T(u)\\,du, \\qquad
          p_T(u) = \\frac{(\\gamma + 1)\\,u^{\\gamma}}{T^{\\gamma + 1}} \\text{ on } [0, T],

(with ``interval`` :math:`k`, the update at step :math:`s` stands for :math:`[s-k+1, s+1]`), so
the discrete average *is* the continuous profile :math:`p_T` applied to a piecewise-constant
trajectory, and EDM2's inner products of continuous profiles are the right least-squares
objective for it. The snapshot taken after :math:`T` updates has time :math:`T`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .averaged_model import AveragedModel
from .checkpoint import FORMAT_VERSION
from .files import FormatError, SafetensorsFile, first_line, save_weights, shown
from .group import AverageGroup
from .health import Health
from .schedules import PowerFunction, gamma_to_sigma_rel, sigma_rel_to_gamma
from .tensors import is_averaged
from .validation import check_int, check_number

__all__ = [
    "PostHocEMA",
    "Snapshot",
    "SynthesisPlan",
    "averaged_time",
    "power_function_response",
    "power_function_correlation",
    "solve_coefficients",
    "find_snapshots",
    "plan_synthesis",
    "synthesize",
    "SnapshotError",
]

FORMAT = "polyak-posthoc"
#: The largest exponent synthesized or read (sigma_rel about 1e-6): beyond it the profiles'
#: inner products overflow float64.
GAMMA_MAX = 1e6
_NAME = re.compile(r"^(?P<profile>.+)-(?P<step>\d{9,})\.safetensors$")


class SnapshotError(FormatError):
    """A snapshot file is missing, unreadable, or inconsistent with the others."""


# -- the maths ----------------------------------------------------------------------------------


def averaged_time(steps: int, interval: int = 1) -> int:
    """The time :math:`T` of a power-function average after ``steps`` calls: one past the
    last step it read, :math:`\\lfloor (s - 1)/k \\rfloor k + 1` (``steps`` itself when
    ``interval`` is 1; calls after the last averaging one add nothing)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return (steps - 1) // interval * interval + 1


def power_function_response(gamma: float, at_step: int, *, interval: int = 1) -> Tensor:
    """The weight each past step's weights receive in the power-function average after
    ``at_step`` calls (float64, one entry per step :math:`\\tau = 0 \\dots` ``at_step`` - 1).

    .. math:: w_T(\\tau) = \\frac{(\\tau + 1)^{\\gamma + 1} - \\tau^{\\gamma + 1}}{T^{\\gamma + 1}}

    where :math:`T` is :func:`averaged_time`. With ``interval`` :math:`k` only the steps the
    average read (0, k, 2k, ...) have weight, each the sum over the steps it stands for. The
    weights sum to one.

    >>> w = power_function_response(6.94, 1000)
    >>> round(float(w.sum()), 12), bool(w[-1] > w[0])
    (1.0, True)
    """
    t = averaged_time(at_step, interval)
    edges = torch.arange(t + 1, dtype=torch.float64)
    w = torch.diff((edges / t) ** (float(gamma) + 1.0))
    out = torch.zeros(at_step, dtype=torch.float64)
    if interval == 1:
        out[:t] = w
        return out
    out[0] = w[0]
    for s in range(interval, t, interval):
        out[s] = w[s - interval + 1 : s + 1].sum()
    return out


def power_function_correlation(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """Inner products :math:`\\int p_a p_b` of power-function profiles (EDM2, float64):

    .. math:: \\langle p_a, p_b \\rangle = \\frac{(\\gamma_a + 1)(\\gamma_b + 1)}{\\gamma_a + \\gamma_b + 1}
              \\cdot \\frac{(t_a / t_b)^{e}}{\\max(t_a, t_b)}, \\qquad
              e = \\begin{cases} \\gamma_b & t_a < t_b \\\\ -\\gamma_a & t_a \\ge t_b \\end{cases}

    broadcast over the arguments (times :math:`t` and exponents :math:`\\gamma`).
    """
    t_a, gamma_a, t_b, gamma_b = (torch.as_tensor(x, dtype=torch.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    ratio = t_a / t_b
    exponent = torch.where(t_a < t_b, gamma_b, -gamma_a)
    num = (gamma_a + 1) * (gamma_b + 1) * ratio**exponent
    den = (gamma_a + gamma_b + 1) * torch.maximum(t_a, t_b)
    return num / den


def solve_coefficients(
    times: Sequence[float],
    gammas: Sequence[float],
    target_time: float,
    target_gamma: float,
    *,
    rcond: float = 1e-12,
) -> tuple[Tensor, dict[str, float]]:
    """Least-squares coefficients :math:`c` with :math:`\\sum_i c_i p_i \\approx p_{\\text{target}}`.

    .. math:: A c = b, \\quad A_{ij} = \\langle p_i, p_j \\rangle, \\quad
              b_i = \\langle p_i, p_{\\text{target}} \\rangle, \\quad c \\leftarrow c / \\textstyle\\sum_i c_i

    solved in float64 by SVD-based least squares (``gelsd``; singular values below
    ``rcond`` times the largest are dropped, which guards against the ill-conditioning of
    nearby snapshots), then normalised to sum to one (EDM2). Returns the coefficients and a
    report: ``cond`` (the condition number of :math:`A`), ``rank`` (kept by the solver), and
    ``relative_error``, :math:`\\lVert \\sum c_i p_i - p_t \\rVert / \\lVert p_t \\rVert`, the
    L2 distance of the synthesized profile from the target's.
    """
    t = torch.tensor(times, dtype=torch.float64)
    g = torch.tensor(gammas, dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError("no snapshot to synthesize from")
    tt = torch.tensor([float(target_time)], dtype=torch.float64)
    gt = torch.tensor([float(target_gamma)], dtype=torch.float64)
    a = power_function_correlation(t[:, None], g[:, None], t[None, :], g[None, :])
    b = power_function_correlation(t[:, None], g[:, None], tt[None, :], gt[None, :])
    sol = torch.linalg.lstsq(a, b, rcond=rcond, driver="gelsd")
    c = sol.solution[:, 0]
    total = c.sum()
    if not torch.isfinite(total) or abs(float(total)) < 1e-300:
        raise ValueError("the least-squares coefficients do not sum to a usable value; the snapshots cannot express it")
    c = c / total
    ptt = power_function_correlation(tt, gt, tt, gt)[0]
    err2 = (c @ a @ c - 2 * c @ b[:, 0] + ptt).clamp_min(0.0)
    report = {
        "cond": float(torch.linalg.cond(a)),
        "rank": float(sol.rank) if sol.rank is not None else float("nan"),
        "relative_error": float(torch.sqrt(err2 / ptt)),
    }
    return c, report


# -- snapshots ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file of one profile, described by its metadata."""

    path: Path
    profile: str
    gamma: float
    step: int  # update_parameters calls made
    time: int  # the average's time (averaged_time(step, interval))
    interval: int
    samples: int | None
    copied: tuple[str, ...]

    @property
    def sigma_rel(self) -> float:
        return gamma_to_sigma_rel(self.gamma)


def _profile_name(sigma_rel: float) -> str:
    return f"phema-{sigma_rel:.4f}"


def _read_snapshot(path: Path) -> Snapshot:
    """A snapshot file's description, from its safetensors metadata, checked field by field:
    every problem is a :class:`SnapshotError` naming the file."""
    try:
        meta = SafetensorsFile(path).metadata
    except FormatError as e:
        raise SnapshotError(f"snapshot {e}") from None
    if meta.get("format") != FORMAT:
        raise SnapshotError(
            f"{shown(path)} is not a polyak post-hoc snapshot (metadata format={shown(meta.get('format'))!r})"
        )
    try:
        snap = Snapshot(
            path=path,
            profile=_text_field(meta, "profile"),
            gamma=_float_field(meta, "gamma"),
            step=_int_field(meta, "step"),
            time=_int_field(meta, "time"),
            interval=_int_field(meta, "interval", "1"),
            samples=_int_field(meta, "samples") if meta.get("samples") else None,
            copied=_names_field(meta, "copied"),
        )
    except ValueError as e:
        raise SnapshotError(f"snapshot {shown(path)} has damaged metadata: {e}") from None
    problems = []
    if not (math.isfinite(snap.gamma) and -1 < snap.gamma <= GAMMA_MAX):
        problems.append(f"gamma={snap.gamma} (must be finite, > -1 and <= {GAMMA_MAX:g})")
    if snap.interval < 1:
        problems.append(f"interval={snap.interval} (must be >= 1)")
    elif snap.step < 1 or snap.time != averaged_time(snap.step, snap.interval):
        problems.append(f"time={snap.time} does not follow from step={snap.step} and interval={snap.interval}")
    named = _NAME.match(path.name)
    if named is not None and int(named.group("step")) != snap.step:
        problems.append(f"step={snap.step} but the file name says {int(named.group('step'))}")
    if problems:
        raise SnapshotError(f"snapshot {shown(path)} has impossible metadata: {'; '.join(problems)}")
    return snap


def _text_field(meta: dict[str, str], key: str) -> str:
    value = meta.get(key)
    if not value or len(value) > 200:
        raise ValueError(f"{key} must be a name of 1 to 200 characters, got {shown(value)[:60]!r}")
    return value


def _int_field(meta: dict[str, str], key: str, default: str | None = None) -> int:
    value = meta.get(key, default)
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 18:
        raise ValueError(f"{key} must be a whole number below 10**18, got {shown(value)[:60]!r}")
    return int(value)


def _float_field(meta: dict[str, str], key: str) -> float:
    value = meta.get(key)
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {shown(value)[:60]!r}") from None


def _names_field(meta: dict[str, str], key: str) -> tuple[str, ...]:
    """A JSON list of tensor names (what a snapshot copied rather than averaged)."""
    try:
        value = json.loads(meta.get(key, "[]"))
    except (ValueError, RecursionError):
        raise ValueError(f"{key} must be a JSON list of names") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a JSON list of names, got a {type(value).__name__}")
    return tuple(value)


def find_snapshots(directory: str | os.PathLike[str]) -> list[Snapshot]:
    """Every snapshot in ``directory`` (``{profile}-{step:09d}.safetensors``), by step then
    profile. Raises :class:`SnapshotError` naming a damaged file."""
    root = Path(directory)
    if not root.is_dir():
        raise SnapshotError(f"snapshot directory {shown(root)} does not exist")
    found = [_read_snapshot(p) for p in sorted(root.iterdir()) if _NAME.match(p.name)]
    return sorted(found, key=lambda s: (s.step, s.profile))


@dataclass
class SynthesisPlan:
    """Which snapshots, with which coefficients, make the requested average."""

    gamma: float
    at_step: int
    snapshots: list[Snapshot]
    coefficients: Tensor
    report: dict[str, float] = field(default_factory=dict)

    @property
    def sigma_rel(self) -> float:
        return gamma_to_sigma_rel(self.gamma)

    def summary(self) -> str:
        lines = [
            f"sigma_rel={self.sigma_rel:.4f} (gamma={self.gamma:.3f}) at step {self.at_step} from "
            f"{len(self.snapshots)} snapshots: relative L2 error of the profile {self.report['relative_error']:.2e}, "
            f"cond(A)={self.report['cond']:.2e}, rank {int(self.report['rank'])}",
        ]
        for snap, c in zip(self.snapshots, self.coefficients.tolist(), strict=True):
            lines.append(f"  {c:+.6f}  {snap.path.name}")
        return "\n".join(lines)


def plan_synthesis(
    snapshots: str | os.PathLike[str] | Iterable[Snapshot],
    sigma_rel: float | None = None,
    *,
    gamma: float | None = None,
    at_step: int | None = None,
    rcond: float = 1e-12,
) -> SynthesisPlan:
    """Choose the snapshots (only those taken at or before ``at_step``; default the latest
    step) and solve for their coefficients (:func:`solve_coefficients`)."""
    if (sigma_rel is None) == (gamma is None):
        raise ValueError("give exactly one of sigma_rel and gamma")
    if gamma is not None:
        target_gamma = check_number("gamma", gamma, -1.0, GAMMA_MAX, open_low=True)
    else:
        target_gamma = sigma_rel_to_gamma(sigma_rel)  # type: ignore[arg-type]
        if target_gamma > GAMMA_MAX:
            raise ValueError(f"sigma_rel={sigma_rel} is too small: its exponent gamma is above {GAMMA_MAX:g}")
    snaps = find_snapshots(snapshots) if isinstance(snapshots, (str, os.PathLike)) else list(snapshots)
    if not snaps:
        where = f" in {shown(snapshots)}" if isinstance(snapshots, (str, os.PathLike)) else ""
        raise SnapshotError(f"no snapshots found{where}")
    latest = max(s.step for s in snaps)
    at_step = latest if at_step is None else check_int("at_step", at_step, 1, latest)
    used = [s for s in snaps if 0 < s.step <= at_step]
    if not used:
        raise SnapshotError(f"no snapshot was taken at or before step {at_step} (the first is at {snaps[0].step})")
    # The target's time: that of an average read at the same interval as the snapshots.
    target_time = averaged_time(at_step, used[-1].interval)
    c, report = solve_coefficients(
        [s.time for s in used], [s.gamma for s in used], target_time, target_gamma, rcond=rcond
    )
    return SynthesisPlan(target_gamma, at_step, used, c, report)


def synthesize(
    snapshots: str | os.PathLike[str] | Iterable[Snapshot] | SynthesisPlan,
    sigma_rel: float | None = None,
    *,
    gamma: float | None = None,
    at_step: int | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> dict[str, Tensor]:
    """The post-hoc average for ``sigma_rel`` (or ``gamma``) at ``at_step``: a state dict that
    the model loads (float32 for floating tensors).

    .. math:: \\hat\\theta = \\sum_i c_i\\,\\bar\\theta_i

    where :math:`\\bar\\theta_i` are the snapshots :func:`plan_synthesis` chose and :math:`c_i`
    its coefficients. Each snapshot file is read once, tensor by tensor, and accumulated in
    float32 (complex64 for complex tensors); tensors the averages copied rather than averaged
    (integer and non-averaged buffers) come from the latest snapshot used. With ``out`` the
    result is also written (``.safetensors``, or ``torch.save`` otherwise), atomically.
    ``progress`` wraps the iteration over files (e.g. ``tqdm.tqdm``).
    """
    plan = (
        snapshots
        if isinstance(snapshots, SynthesisPlan)
        else plan_synthesis(snapshots, sigma_rel, gamma=gamma, at_step=at_step)
    )
    result = _combine(plan, progress)
    if out is not None:
        save_weights(out, result, {"format": "polyak-posthoc-synthesis", **_plan_metadata(plan)})
    return result


def _combine(plan: SynthesisPlan, progress: Callable[[Iterable[Any]], Iterable[Any]] | None) -> dict[str, Tensor]:
    """:math:`\\sum_i c_i \\bar\\theta_i` over the plan's snapshots, oldest first."""
    order = sorted(zip(plan.snapshots, plan.coefficients.tolist(), strict=True), key=lambda x: x[0].step)
    latest = order[-1][0]
    acc: dict[str, Tensor] = {}
    keys: list[str] | None = None
    items: Iterable[tuple[Snapshot, float]] = progress(order) if progress is not None else order
    for snap, coef in items:
        keys = _accumulate(snap, coef, acc, keys, latest=snap is latest)
    return {k: acc[k] for k in (keys or [])}


def _accumulate(
    snap: Snapshot, coef: float, acc: dict[str, Tensor], keys: list[str] | None, *, latest: bool
) -> list[str]:
    """Add ``coef`` times each averaged tensor of one snapshot file to ``acc`` (and take the
    copied ones from it when it is the ``latest``); returns its tensor names, which must be those
    of the first snapshot read (``keys``)."""
    try:
        f = SafetensorsFile(snap.path)
        names = f.keys()
        if keys is not None and sorted(names) != sorted(keys):
            diff = [shown(n) for n in sorted(set(names) ^ set(keys))[:5]]
            raise SnapshotError(f"snapshot {shown(snap.path)} holds other tensors than the first one: {diff}")
        for name in names:
            _add(acc, name, f.get(name), coef, copied=name in snap.copied, latest=latest)
    except SnapshotError:
        raise
    except Exception as e:
        raise SnapshotError(f"snapshot {shown(snap.path)} could not be read: {first_line(e)}") from e
    return names if keys is None else keys


def _add(acc: dict[str, Tensor], name: str, t: Tensor, coef: float, *, copied: bool, latest: bool) -> None:
    """One tensor of one snapshot into the sum (averaged tensors widened to float32/complex64)."""
    if copied or not is_averaged(t):
        if latest:
            acc[name] = t.clone() if not t.is_floating_point() else t.float()
        return
    wide = t.to(torch.complex64 if t.is_complex() else torch.float32)
    if name in acc:
        acc[name].add_(wide, alpha=coef)
    else:
        acc[name] = wide.mul_(coef)


def _plan_metadata(plan: SynthesisPlan) -> dict[str, str]:
    return {
        "method": "posthoc-ema",
        "sigma_rel": repr(plan.sigma_rel),
        "gamma": repr(plan.gamma),
        "step": str(plan.at_step),
        "relative_error": repr(plan.report.get("relative_error")),
        "snapshots": json.dumps([s.path.name for s in plan.snapshots]),
        "coefficients": json.dumps(plan.coefficients.tolist()),
    }


# -- during training ------------------------------------------------------------------------------


class PostHocEMA(nn.Module):
    """Power-function averages for post-hoc EMA, updated together, with snapshots.

    .. math:: \\bar\\theta_i \\leftarrow \\beta_i\\,\\bar\\theta_i + (1 - \\beta_i)\\,\\theta, \\qquad
              \\beta_i(t) = \\left(1 - \\frac{k}{t + 1}\\right)^{\\gamma_i + 1}

    for each profile :math:`i` with exponent :math:`\\gamma_i` from ``sigma_rels`` (EDM2's
    defaults 0.05 and 0.10), :math:`t` the step count and :math:`k` the ``interval`` (the
    interval is accounted for exactly: EDM2's ``t_delta``). All profiles are updated in one
    pass over the model (:class:`~polyak.AverageGroup`). Every ``snapshot_every`` steps each
    profile is written to ``snapshot_dir/{profile}-{step:09d}.safetensors`` in
    ``snapshot_dtype`` (written to a temporary name, then renamed), with the step, the samples
    seen (``step * batch_size``) and the profile in its metadata as exact integers and
    strings. :func:`synthesize` (or ``polyak posthoc`` on the command line) then makes the
    average for any ``sigma_rel``.

    Args:
        model: the model.
        sigma_rels: the profiles to track.
        snapshot_every: steps between snapshots (None: no snapshots).
        snapshot_dir: where snapshots go (required with ``snapshot_every``).
        snapshot_dtype: dtype of the snapshots' floating tensors. Defaults to float16.
        interval: average every ``interval`` steps.
        batch_size: samples per step, recorded as ``samples`` in the snapshots.
        dtype, device, update_buffers: as :class:`~polyak.BaseAveragedModel`.
    """

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: int | None = None,
        snapshot_dir: str | os.PathLike[str] | None = None,
        snapshot_dtype: torch.dtype = torch.float16,
        interval: int = 1,
        batch_size: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
    ) -> None:
        super().__init__()
        sigma_rels = tuple(float(s) for s in sigma_rels)
        names = [_profile_name(s) for s in sigma_rels]
        if not sigma_rels or len(set(names)) != len(names):
            raise ValueError(
                f"sigma_rels must be distinct to 4 decimals (they name the snapshot files), got {sigma_rels}"
            )
        if snapshot_every is not None:
            check_int("snapshot_every", snapshot_every, 1)
            if snapshot_dir is None:
                raise ValueError("snapshot_every needs snapshot_dir")
        if batch_size is not None:
            check_int("batch_size", batch_size, 1)
        if not (isinstance(snapshot_dtype, torch.dtype) and snapshot_dtype.is_floating_point):
            raise ValueError(f"snapshot_dtype must be a floating torch.dtype, got {snapshot_dtype!r}")
        self.sigma_rels = sigma_rels
        self.snapshot_every = snapshot_every
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.snapshot_dtype = snapshot_dtype
        self.batch_size = batch_size
        self.averages = nn.ModuleList(
            AveragedModel(
                model,
                device,
                use_buffers=update_buffers,
                schedule=PowerFunction(sigma_rel=s),
                interval=interval,
                dtype=dtype,
            )
            for s in sigma_rels
        )
        self._group = AverageGroup(list(self.averages))

    @property
    def steps(self) -> int:
        """Updates made (all profiles count together)."""
        return self.averages[0].steps

    def profile(self, sigma_rel: float | None = None) -> AveragedModel:
        """The tracked average with this ``sigma_rel`` (default: the first)."""
        if sigma_rel is None:
            return self.averages[0]
        for s, a in zip(self.sigma_rels, self.averages, strict=True):
            if math.isclose(s, sigma_rel, rel_tol=1e-9):
                return a
        raise KeyError(f"sigma_rel={sigma_rel} is not tracked (tracked: {self.sigma_rels}); synthesize() it")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the first profile's average."""
        return self.averages[0](*args, **kwargs)

    def update_parameters(self, model: nn.Module) -> None:
        """Update every profile from ``model`` (one pass), then snapshot if it is time."""
        self._group.update_parameters(model)
        if self.snapshot_every is not None and self.steps % self.snapshot_every == 0:
            self.snapshot()

    def health(self, model: nn.Module, sigma_rel: float | None = None, *, warn: bool = True) -> Health:
        """One tracked profile's health report against ``model`` (see
        :meth:`polyak.BaseAveragedModel.health`)."""
        return self.profile(sigma_rel).health(model, warn=warn)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module, sigma_rel: float | None = None) -> Iterator[nn.Module]:
        """Put one tracked profile into ``model`` for the block (see
        :meth:`~polyak.BaseAveragedModel.swapped`)."""
        with self.profile(sigma_rel).swapped(model) as m:
            yield m

    def snapshot(self) -> list[Path]:
        """Write every profile's average now (see the class docstring); returns the paths."""
        if self.snapshot_dir is None:
            raise ValueError("PostHocEMA has no snapshot_dir")
        step = self.steps
        paths = []
        for s, avg in zip(self.sigma_rels, self.averages, strict=True):
            weights = avg.averaged_state_dict()
            copied = sorted(n for n, kind in avg.tensor_kinds().items() if kind != "avg" and n in weights)
            tensors = {
                k: (v.to(self.snapshot_dtype) if v.is_floating_point() and k not in copied else v).contiguous()
                for k, v in weights.items()
            }
            metadata = {
                "format": FORMAT,
                "version": str(FORMAT_VERSION),
                "profile": _profile_name(s),
                "sigma_rel": repr(s),
                "gamma": repr(avg.schedule.gamma),  # type: ignore[attr-defined]
                "step": str(step),
                "time": str(averaged_time(step, avg.interval)),
                "samples": "" if self.batch_size is None else str(step * self.batch_size),
                "interval": str(avg.interval),
                "copied": json.dumps(copied),
            }
            path = self.snapshot_dir / f"{_profile_name(s)}-{step:09d}.safetensors"
            save_weights(path, tensors, metadata)
            paths.append(path)
        return paths

    def synthesize(
        self, sigma_rel: float, at_step: int | None = None, out: str | os.PathLike[str] | None = None
    ) -> dict[str, Tensor]:
        """:func:`synthesize` from this object's snapshots."""
        if self.snapshot_dir is None:
            raise ValueError("PostHocEMA has no snapshot_dir")
        return synthesize(self.snapshot_dir, sigma_rel, at_step=at_step, out=out)

    def extra_repr(self) -> str:
        return f"sigma_rels={self.sigma_rels}, snapshot_every={self.snapshot_every}, steps={self.steps}"
