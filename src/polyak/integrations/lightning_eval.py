"""One more validation or test pass in Lightning, with whatever weights are in the module now, and
its epoch metrics: what :class:`~polyak.integrations.lightning.WeightAveraging` runs to evaluate
averages side by side.

The pass calls the module's own hooks and steps (``on_<stage>_epoch_start``, ``<stage>_step``
through ``trainer.strategy``, ``on_<stage>_epoch_end``) over the stage's dataloaders, with the
batches moved as Lightning moves them (``precision_plugin.convert_input``,
``on_before_batch_transfer``, ``strategy.batch_to_device``), and records ``self.log`` calls as
Lightning reduces them over an epoch (:class:`LogRecorder`). Everything here is Lightning's public
API but two things, named in docs/integrations/lightning.md with the versions tested: the
module's ``log`` method is replaced for the duration of the pass (an instance attribute, removed
afterwards), and torchmetrics ``Metric`` objects have their private ``_update_count``,
``_computed`` and ``_forward_cache`` saved and given back with their states
(:func:`metric_states_kept`), so the pass neither sees nor disturbs what the live loops
accumulate.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.data import extract_batch_size
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError(
        "polyak.integrations.lightning_eval needs Lightning 2.x: pip install 'polyak[lightning]'"
    ) from e

__all__ = ["evaluation_pass", "publish", "LogRecorder", "metric_states_kept"]


@dataclass(frozen=True)
class _Stage:
    """Where a stage's loop lives in the trainer and the module."""

    loaders: list[Any]
    limits: list[int | float]
    step: str  # the strategy's (and module's) step method
    hook: str  # the module's epoch hooks: on_{hook}_epoch_start / _end


def _stage(trainer: pl.Trainer, stage: str) -> _Stage:
    if stage == "validate":
        return _Stage(_as_list(trainer.val_dataloaders), list(trainer.num_val_batches), "validation_step", "validation")
    if stage == "test":
        return _Stage(_as_list(trainer.test_dataloaders), list(trainer.num_test_batches), "test_step", "test")
    raise ValueError(f"a side-by-side pass runs in 'validate' or 'test', not {stage!r}")


def _as_list(loaders: Any) -> list[Any]:
    """The dataloaders of a stage in Lightning's sequential order."""
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    return [loaders]


def evaluation_pass(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> dict[str, Tensor]:
    """Run ``stage`` (``"validate"`` or ``"test"``) once more over its dataloaders with the
    weights now in ``pl_module``, without gradients; return the epoch metrics it logged, reduced
    as Lightning would (an empty dict when the stage has no dataloader)."""
    where = _stage(trainer, stage)
    if not where.loaders:
        return {}
    recorder = LogRecorder()
    with torch.no_grad(), metric_states_kept(pl_module), recorder.capturing(pl_module):
        getattr(pl_module, f"on_{where.hook}_epoch_start")()
        for idx, (loader, limit) in enumerate(zip(where.loaders, where.limits, strict=False)):
            recorder.dataloader_idx = idx if len(where.loaders) > 1 else None
            _run_loader(trainer, pl_module, where, recorder, loader, limit, idx)
        recorder.batch = recorder.dataloader_idx = None
        getattr(pl_module, f"on_{where.hook}_epoch_end")()
        return recorder.compute(trainer)


def _run_loader(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    where: _Stage,
    recorder: LogRecorder,
    loader: Any,
    limit: int | float,
    idx: int,
) -> None:
    """The step of one dataloader over at most ``limit`` batches."""
    several = len(where.loaders) > 1
    takes_batch_idx = is_param_in_hook_signature(getattr(pl_module, where.step), "batch_idx", min_args=2)
    step = getattr(trainer.strategy, where.step)
    for batch_idx, batch in enumerate(loader):
        if batch_idx >= limit:
            break
        batch = trainer.precision_plugin.convert_input(batch)
        batch = pl_module.on_before_batch_transfer(batch, dataloader_idx=idx)
        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=idx)
        recorder.batch = batch
        args = (batch, batch_idx) if takes_batch_idx else (batch,)
        step(*args, *((idx,) if several else ()))


def publish(trainer: pl.Trainer, metrics: Mapping[str, Tensor]) -> None:
    """Put ``metrics`` into ``trainer.callback_metrics`` (where ``ModelCheckpoint`` and later
    callbacks read them) and send them to every logger at the current step."""
    if not metrics:
        return
    trainer.callback_metrics.update(metrics)
    scalars = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=trainer.global_step)
        logger.save()


# -- capturing self.log -----------------------------------------------------------------------------

_REDUCE = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}
_REDUCE_FNS = {torch.mean: "mean", torch.sum: "sum", torch.max: "max", torch.min: "min"}


@dataclass
class _Logged:
    """One metric being reduced over the epoch: the reduction, the running value (a weighted sum
    for ``"mean"``), the total weight, and whether to reduce over ranks (``sync_dist``)."""

    reduce: str
    total: Tensor
    weight: float
    sync_dist: bool


class LogRecorder:
    """Stands in for ``LightningModule.log`` during a pass and reduces what is logged over the
    epoch as Lightning would: a mean weighted by the batch size by default, or ``sum``, ``max``,
    ``min``; torchmetrics ``Metric`` objects are computed at the end."""

    def __init__(self) -> None:
        self.batch: Any = None
        self.dataloader_idx: int | None = None
        self.values: dict[str, _Logged] = {}
        self.metric_objects: dict[str, Any] = {}
        self._warned: set[str] = set()

    @contextlib.contextmanager
    def capturing(self, module: nn.Module) -> Iterator[None]:
        """``module.log`` is this recorder's :meth:`log` inside the block."""
        own = module.__dict__.get("log", None)
        module.__dict__["log"] = self.log
        try:
            yield
        finally:
            if own is None:
                del module.__dict__["log"]
            else:
                module.__dict__["log"] = own

    def log(
        self,
        name: str,
        value: Any,
        prog_bar: bool = False,
        logger: bool | None = None,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: str | Callable[..., Any] = "mean",
        enable_graph: bool = False,
        sync_dist: bool = False,
        sync_dist_group: Any = None,
        add_dataloader_idx: bool = True,
        batch_size: int | None = None,
        metric_attribute: str | None = None,
        rank_zero_only: bool = False,
    ) -> None:
        """``LightningModule.log``'s signature; records epoch values only."""
        if on_epoch is False:
            return  # a per-step value: not an epoch metric
        name = self._name(name, add_dataloader_idx)
        if _is_metric_object(value):
            self.metric_objects[name] = value
            return
        reduce = self._reduction(name, reduce_fx)
        if reduce is not None:
            self._accumulate(name, reduce, _scalar(value), self._weight(reduce, batch_size), sync_dist)

    def _name(self, name: str, add_dataloader_idx: bool) -> str:
        if add_dataloader_idx and self.dataloader_idx is not None:
            return f"{name}/dataloader_idx_{self.dataloader_idx}"
        return name

    def _reduction(self, name: str, reduce_fx: str | Callable[..., Any]) -> str | None:
        """``"mean"``, ``"sum"``, ``"max"`` or ``"min"``; None (with one warning per name) for
        any other ``reduce_fx``."""
        reduce = _REDUCE.get(reduce_fx) if isinstance(reduce_fx, str) else _REDUCE_FNS.get(reduce_fx)
        if reduce is None and name not in self._warned:
            self._warned.add(name)
            warnings.warn(
                f"WeightAveraging: {name!r} is logged with reduce_fx={reduce_fx!r}; side-by-side "
                "evaluation reduces only mean, sum, max and min, and leaves it out",
                stacklevel=3,
            )
        return reduce

    def _weight(self, reduce: str, batch_size: int | None) -> float:
        """The weight of this value in a mean: the batch size given, or found in the batch."""
        if reduce != "mean":
            return 1.0
        if batch_size is not None:
            return float(batch_size)
        if self.batch is not None:
            with contextlib.suppress(Exception):
                return float(extract_batch_size(self.batch))
        return 1.0

    def _accumulate(self, name: str, reduce: str, v: Tensor, weight: float, sync_dist: bool) -> None:
        previous = self.values.get(name)
        if previous is None:
            self.values[name] = _Logged(reduce, v * weight if reduce == "mean" else v, weight, sync_dist)
            return
        if reduce == "mean":
            previous.total, previous.weight = previous.total + v * weight, previous.weight + weight
        elif reduce == "sum":
            previous.total = previous.total + v
        else:
            previous.total = torch.maximum(previous.total, v) if reduce == "max" else torch.minimum(previous.total, v)
        previous.sync_dist = sync_dist

    def compute(self, trainer: pl.Trainer) -> dict[str, Tensor]:
        """The epoch value of every metric logged (reduced over ranks where ``sync_dist``)."""
        out: dict[str, Tensor] = {}
        distributed = trainer.world_size > 1
        for name, logged in self.values.items():
            total = logged.total
            if logged.reduce == "mean":
                w = torch.tensor(logged.weight, dtype=torch.float64, device=total.device)
                if distributed and logged.sync_dist:
                    total = trainer.strategy.reduce(total, reduce_op="sum")
                    w = trainer.strategy.reduce(w, reduce_op="sum")
                value = total / w
            else:
                sync = distributed and logged.sync_dist
                value = trainer.strategy.reduce(total, reduce_op=logged.reduce) if sync else total
            out[name] = value.to(torch.float32)
        for name, metric in self.metric_objects.items():
            out[name] = torch.as_tensor(metric.compute()).detach().to(torch.float32)
        return out


def _scalar(value: Any) -> Tensor:
    """A logged value as a 0-d float64 tensor (the mean of a tensor of several values)."""
    v = torch.as_tensor(value).detach().to(torch.float64)
    return v.mean() if v.numel() != 1 else v.reshape(())


def _is_metric_object(value: Any) -> bool:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics comes with Lightning
        return False
    return isinstance(value, Metric)


@contextlib.contextmanager
def metric_states_kept(module: nn.Module) -> Iterator[None]:
    """Reset every torchmetrics ``Metric`` of ``module`` for a pass and give each its state back
    afterwards, so the pass neither sees nor disturbs what the live loops accumulate."""
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover
        yield
        return
    saved = []
    for m in module.modules():
        if isinstance(m, Metric):
            state = {k: v if isinstance(v, Tensor) else list(v) for k, v in m.metric_state.items()}
            extra = {a: getattr(m, a) for a in ("_update_count", "_computed", "_forward_cache") if hasattr(m, a)}
            saved.append((m, state, extra))
            m.reset()
    try:
        yield
    finally:
        for m, state, extra in saved:
            for k, v in state.items():
                setattr(m, k, v)
            for a, v in extra.items():
                setattr(m, a, v)
