"""Lightning callbacks: keep weight averages during ``Trainer.fit``; validate, test and checkpoint
with them.

:class:`WeightAveraging` keeps one or more named polyak averages of the ``LightningModule``,
updates them once per optimizer step that really ran, swaps the primary one into the model for
validation and test (exception-safe), evaluates the others side by side under prefixed metric
names, and writes polyak's checkpoint format (docs/checkpoint-format.md): ``state_dict`` holds
the primary average (deployable), ``live_state_dict`` the training weights. :class:`EMA` is the
preset for one exponential moving average. docs/integrations/lightning.md has the details and
the differences from Lightning's own ``WeightAveraging``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError(
        "polyak.integrations.lightning needs Lightning 2.x: pip install 'polyak[lightning]'"
    ) from e

from .. import checkpoint as ckpt
from ..averaged_model import AveragedModel
from ..hooks import OptimizerStepCounter
from ..models import AVERAGES, BaseAveragedModel
from ..schedules import ConstantMomentum, Warmup, schedule_from_dict
from ..tensors import is_dtensor
from ..validation import check_int
from .lightning_eval import evaluation_pass, publish

__all__ = ["EMA", "WeightAveraging"]

#: What builds one average from the ``LightningModule``: a callable ``module -> average`` (an
#: averaged-model class, a ``functools.partial`` or a lambda), or a mapping
#: ``{"type": class or class name, **keyword arguments}``.
AverageFactory = Callable[[nn.Module], BaseAveragedModel] | Mapping[str, Any]

_STAGES = ("validate", "test", "predict")
_LIVE = "live"
_WEIGHTS_KEY = "state_dict"
_LIVE_KEY = "live_state_dict"
_LIGHTNING_LIVE_KEY = "current_model_state"  # Lightning's own WeightAveraging


def _factory(name: str, spec: Any) -> Callable[[nn.Module], BaseAveragedModel]:
    """A callable ``module -> average`` for one entry of ``averages``."""
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        if "type" not in kwargs:
            raise ValueError(
                f"average {name!r}: a mapping needs a 'type' (an averaged-model class or one of "
                f"{sorted(AVERAGES)}), got keys {sorted(kwargs)}"
            )
        cls = kwargs.pop("type")
        if isinstance(cls, str):
            try:
                cls = AVERAGES.lookup(cls, what="type")
            except ValueError as e:
                raise ValueError(f"average {name!r}: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, BaseAveragedModel)):
            raise ValueError(f"average {name!r}: type must be a polyak averaged-model class, got {cls!r}")
        if isinstance(kwargs.get("schedule"), Mapping):  # {"type": "Warmup", "args": {...}} from a config file
            kwargs["schedule"] = schedule_from_dict(kwargs["schedule"])
        return functools.partial(cls, **kwargs)
    if callable(spec):
        return spec
    raise ValueError(
        f"average {name!r} must be a callable (module -> averaged model) or a mapping with a 'type', got {spec!r}"
    )


def _refuse_sharded(trainer: pl.Trainer, pl_module: nn.Module) -> None:
    """Sharded strategies are not supported: each rank's average would copy its parameter
    shards and swap them as whole tensors. Refused before anything is built."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    sharded = isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy))
    if sharded or any(is_dtensor(p) for p in pl_module.parameters()):
        raise NotImplementedError(
            f"WeightAveraging does not support sharded training ({type(strategy).__name__}): the averages "
            "would copy parameter shards. Use DDP or a single device, or polyak's FSDP2 support in your own "
            "loop (docs/distributed.md)."
        )


def _detached_clone(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in state.items()}


class WeightAveraging(Callback):
    """Keep named weight averages of the model; validate, test and checkpoint with them.

    * **Building.** At the start of ``fit`` (``on_fit_start``: after ``configure_model`` and once
      the strategy has moved the model to its device) each factory is called with the
      ``LightningModule``, so the averages' names are those of ``pl_module.state_dict()`` and they
      live on the training device unless the factory says ``device=``. A later ``fit`` of the same
      module keeps them. :class:`~polyak.CosineEMA` without ``max_steps`` gets
      ``trainer.estimated_stepping_batches``.
    * **Updating.** Once per optimizer step that really ran, every average folds in the live
      weights if :meth:`should_update` agrees. Steps are counted with
      :class:`polyak.hooks.OptimizerStepCounter` (a post-hook on each of ``trainer.optimizers``): a step
      that a ``GradScaler`` skipped (inf/NaN gradients) calls no ``optimizer.step()`` and does not
      count, although ``trainer.global_step`` advances; a fused optimizer, which the scaler calls
      anyway, is asked for its ``found_inf`` (one host sync per step, only then);
      gradient-accumulation micro-batches do not count. The decay of each update is logged as
      ``"<prefix>decay"``.
    * **Evaluating.** In the stages of ``swap_stages`` the primary average is swapped into the model
      in place (``on_<stage>_start`` to ``on_<stage>_end``; also undone by ``on_exception`` and
      ``teardown``), so metrics keep their names. An average that has not been updated yet is never
      swapped in (the live weights are evaluated, with a warning). In validation and test, the
      averages named by ``side_by_side`` (and the live weights with ``evaluate_live``) are then
      evaluated each in one more pass over the same dataloaders, re-running the module's
      ``on_<stage>_epoch_start``, ``<stage>_step`` and ``on_<stage>_epoch_end`` with ``self.log``
      captured: their epoch metrics go to ``trainer.callback_metrics`` and the loggers as
      ``"<prefix><metric>"`` (``"ema_slow/val_loss"``), before ``ModelCheckpoint`` and other
      callbacks listed after this one read them.
    * **Checkpoints** (polyak's format, docs/checkpoint-format.md): ``checkpoint["state_dict"]`` holds
      the primary average as a complete model state dict (``load_from_checkpoint`` or a bare
      ``model.load_state_dict`` gives the average), ``checkpoint["live_state_dict"]`` the training
      weights, ``checkpoint["polyak"]`` the averages' records (the other averages' weights included).
      A checkpoint written while an average is swapped in still saves the live weights as live.
      Loading restores the averages and puts the live weights back into the model (and into
      ``checkpoint["state_dict"]``). A checkpoint without averages (plain, or written before this
      callback was added) starts them from its weights, with a warning; one written by Lightning's
      own ``WeightAveraging`` is read too. Outside ``fit``, before any average exists, a loaded
      checkpoint leaves the primary average in the model: that is what ``validate``/``test`` evaluate.

    Args:
        averages: one factory (named ``"average"``) or a mapping ``{name: factory}``; the first is
            the primary unless ``primary`` says. A factory is a callable ``module -> average``
            (``polyak.ExponentialMovingAverage``, ``functools.partial(polyak.AveragedModel,
            schedule=...)``, a lambda) or a mapping ``{"type": class or name, **kwargs}`` (for
            config files; a ``"schedule"`` mapping goes through
            :func:`polyak.schedules.schedule_from_dict`).
        primary: the average swapped in for evaluation and saved under ``state_dict``.
        swap_stages: the stages, among ``"validate"``, ``"test"`` and ``"predict"``, in which the
            primary average replaces the live weights. Defaults to validation and test.
        side_by_side: the averages evaluated in a pass of their own in validation and test (in the
            stages of ``swap_stages`` that is all but the primary); ``True`` for all, ``False`` for
            none, or their names.
        evaluate_live: in validation and test, also evaluate the live weights in a pass of their
            own, logged under ``metric_prefix.format(name="live")``. Defaults to False.
        metric_prefix: the prefix of the metrics of an average, formatted with its ``name``.
        log_decay: log each average's decay at each update. Defaults to True.
        log_health: log each average's health report (:meth:`polyak.BaseAveragedModel.health`:
            ``distance``, ``moved``, ``horizon``) every that many
            optimizer steps, and warn once about each problem it finds; ``True``: at the
            trainer's ``log_every_n_steps``; ``False``: never (the report costs a pass over the
            weights and one host read). Defaults to True.
        copy_average_on_train_end: at the end of training, write the primary average into the
            model for good (Lightning's behaviour). Defaults to False: the model keeps its live
            weights, and the average is in the averages and the checkpoints.

    Example::

        import polyak
        from polyak.integrations.lightning import WeightAveraging

        averaging = WeightAveraging({
            "ema": lambda m: polyak.ExponentialMovingAverage(m, momentum=1e-3),
            "ema_slow": {"type": "AveragedModel", "schedule": polyak.schedules.Warmup(0.9999)},
        })
        trainer = Trainer(callbacks=[averaging], max_steps=10_000)
        trainer.fit(model, datamodule=dm)  # logs val_loss (ema) and ema_slow/val_loss

    Subclass and override :meth:`should_update` to choose when to update::

        class LateEMA(WeightAveraging):
            def should_update(self, step_idx=None, epoch_idx=None):
                return step_idx is not None and step_idx >= 1000
    """

    def __init__(
        self,
        averages: AverageFactory | Mapping[str, AverageFactory],
        *,
        primary: str | None = None,
        swap_stages: Iterable[str] = ("validate", "test"),
        side_by_side: bool | Iterable[str] = True,
        evaluate_live: bool = False,
        metric_prefix: str = "{name}/",
        log_decay: bool = True,
        log_health: bool | int = True,
        copy_average_on_train_end: bool = False,
    ) -> None:
        specs = dict(averages) if isinstance(averages, Mapping) else {"average": averages}
        if not specs:
            raise ValueError("averages is empty: give at least one factory")
        for name in specs:
            if not isinstance(name, str) or not name or name == _LIVE:
                raise ValueError(f"average names must be non-empty strings other than {_LIVE!r}, got {name!r}")
        self._factories = {name: _factory(name, spec) for name, spec in specs.items()}
        self.primary = next(iter(specs)) if primary is None else primary
        if self.primary not in specs:
            raise ValueError(f"primary {self.primary!r} is not one of the averages {list(specs)}")
        stages = (swap_stages,) if isinstance(swap_stages, str) else tuple(swap_stages)
        unknown = [s for s in stages if s not in _STAGES]
        if unknown:
            raise ValueError(f"swap_stages must name stages among {_STAGES}, got {unknown}")
        self.swap_stages = frozenset(stages)
        if isinstance(side_by_side, bool):
            self.side_by_side = tuple(specs) if side_by_side else ()
        else:
            names = (side_by_side,) if isinstance(side_by_side, str) else tuple(side_by_side)
            unknown = [n for n in names if n not in specs]
            if unknown:
                raise ValueError(f"side_by_side names {unknown}, which are not averages {list(specs)}")
            self.side_by_side = names
        if "{name}" not in metric_prefix:
            raise ValueError(f"metric_prefix must contain '{{name}}', got {metric_prefix!r}")
        self.evaluate_live = bool(evaluate_live)
        self.metric_prefix = metric_prefix
        self.log_decay = bool(log_decay)
        if not isinstance(log_health, bool):
            log_health = check_int("log_health", log_health, 1)
        self.log_health = log_health
        self.copy_average_on_train_end = bool(copy_average_on_train_end)

        #: The averages by name, built at the start of ``fit`` (empty before).
        self.averages: dict[str, BaseAveragedModel] = {}
        self._module: weakref.ref[nn.Module] | None = None
        self._steps = OptimizerStepCounter()
        self._swap: contextlib.ExitStack | None = None
        self._swapped_name: str | None = None
        self._restore: Callable[[nn.Module], None] | None = None  # a checkpoint loaded before the build
        self._warned: set[tuple[str, str]] = set()
        self._epoch_idx = 0  # the epoch of the step now being decided, for should_update
        self._seen_global_step = 0  # fallback when no optimizer can be watched
        # Saved in the callback's state (checkpoint["callbacks"][state_key]):
        self._optimizer_steps = 0  # optimizer steps that ran, seen by this callback
        self._latest_update_step = 0  # trainer.global_step at the latest step update
        self._latest_update_epoch = -1  # the epoch of the latest epoch-end update (-1: none)

    # -- policy -----------------------------------------------------------------------------------

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to update the averages now. Override it to choose when (Lightning's contract).

        Called after each optimizer step that really ran with ``step_idx`` (zero-based:
        ``trainer.global_step - 1``), and at each training epoch end with ``epoch_idx`` (zero-based);
        the other argument is ``None``. The default updates after every optimizer step and never at
        an epoch end.
        """
        return step_idx is not None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(averages=list(self._factories))

    def metric_name(self, name: str, metric: str) -> str:
        """The name under which ``metric`` of the average ``name`` is logged."""
        return self.metric_prefix.format(name=name) + metric

    # -- building ---------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _refuse_sharded(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _refuse_sharded(trainer, pl_module)  # parameters made sharded in configure_model
        if not self.averages or self._module is None or self._module() is not pl_module:
            self.averages = {n: self._build(n, f, trainer, pl_module) for n, f in self._factories.items()}
            self._module = weakref.ref(pl_module)
        if self._restore is not None:  # a checkpoint was loaded before the averages existed
            restore, self._restore = self._restore, None
            restore(pl_module)

    def _build(
        self, name: str, factory: Callable[[nn.Module], BaseAveragedModel], trainer: pl.Trainer, pl_module: nn.Module
    ) -> BaseAveragedModel:
        average = factory(pl_module)
        if not isinstance(average, BaseAveragedModel):
            raise TypeError(f"the factory of average {name!r} returned {type(average).__name__}, not a polyak average")
        if average.needs_total_steps:
            total = trainer.estimated_stepping_batches
            if math.isfinite(total):
                average.set_total_steps(int(total))
        return average

    def _start_from_model(self, names: Iterable[str], pl_module: nn.Module) -> None:
        """Start these averages from the model's weights, counted as their first update."""
        for name in names:
            average = self.averages[name]
            average.sync_parameters(pl_module)
            average.steps = max(average.steps, 1)

    # -- updating ---------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps.watch(trainer.optimizers)
        self._steps.advanced()  # steps taken before training (none, normally) do not count
        self._seen_global_step = trainer.global_step

    def _stepped(self, trainer: pl.Trainer) -> bool:
        if self._steps.watching:
            return self._steps.advanced()
        moved = trainer.global_step > self._seen_global_step  # no optimizer to watch: Lightning's count
        self._seen_global_step = trainer.global_step
        return moved

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.averages or not self._stepped(trainer):
            return  # accumulating gradients, or a step the GradScaler skipped
        self._optimizer_steps += 1
        self._epoch_idx = trainer.current_epoch
        if self.should_update(step_idx=trainer.global_step - 1):
            self._update(pl_module, on_step=True)
            self._latest_update_step = trainer.global_step
            every = trainer.log_every_n_steps if self.log_health is True else int(self.log_health)
            if self.log_health is not False and every > 0 and trainer.global_step % every == 0:
                self._log_health(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.averages and epoch > self._latest_update_epoch and self.should_update(epoch_idx=epoch):
            self._update(pl_module, on_step=False)
            self._latest_update_epoch = epoch

    def _update(self, pl_module: pl.LightningModule, *, on_step: bool) -> None:
        self._swap_out()
        for name, average in self.averages.items():
            average.update_parameters(pl_module)
            decay = average.current_decay
            if self.log_decay and decay is not None:
                # a CPU tensor: a float would be copied to the model's device, a host sync per step
                value = torch.tensor(decay, dtype=torch.float32)
                pl_module.log(
                    self.metric_name(name, "decay"), value, on_step=on_step, on_epoch=not on_step, batch_size=1
                )

    def _log_health(self, pl_module: pl.LightningModule) -> None:
        for name, average in self.averages.items():
            for key, value in average.health(pl_module).scalars().items():
                # read already (one host sync per report): a CPU tensor keeps it off the device
                pl_module.log(self.metric_name(name, key), torch.tensor(value), on_step=True, batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.copy_average_on_train_end or not self.averages:
            return
        self._swap_out()
        average = self.averages[self.primary]
        if average.steps == 0:
            rank_zero_warn(f"WeightAveraging: {self.primary!r} was never updated; the model keeps its live weights")
            return
        average.copy_to(pl_module)

    # -- swapping ---------------------------------------------------------------------------------

    def _ready(self, name: str, stage: str, *, warn: bool = True) -> bool:
        """Whether the average ``name`` has been updated (Lightning issue #21724: never evaluate the
        construction-time copy); warns once per stage if not."""
        if self.averages[name].steps > 0:
            return True
        if warn and (name, stage) not in self._warned:
            self._warned.add((name, stage))
            what = "runs on the live weights" if name == self.primary else "leaves it out"
            rank_zero_warn(f"WeightAveraging: the average {name!r} has not been updated yet; {stage} {what}")
        return False

    def _swap_in(self, name: str, pl_module: nn.Module, stage: str, *, warn: bool = True) -> bool:
        if name not in self.averages or self._swap is not None or not self._ready(name, stage, warn=warn):
            return False
        stack = contextlib.ExitStack()
        stack.enter_context(self.averages[name].swapped(pl_module))
        self._swap, self._swapped_name = stack, name
        return True

    def _swap_out(self) -> None:
        if self._swap is not None:
            stack, self._swap, self._swapped_name = self._swap, None, None
            stack.close()

    def _start(self, stage: str, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        if stage in self.swap_stages:  # the sanity check before training is on the live weights, quietly
            self._swap_in(self.primary, pl_module, stage, warn=not trainer.sanity_checking)

    def _end(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        swapped = self._swap is not None
        self._swap_out()
        if stage == "predict" or trainer.sanity_checking or not self.averages:
            return
        names = [n for n in self.side_by_side if not (swapped and n == self.primary)]
        runs = [n for n in names if self._ready(n, stage)]
        if self.evaluate_live and swapped:
            runs.append(_LIVE)
        for name in runs:
            self._evaluate(name, stage, trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("validate", trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end("validate", trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("test", trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end("test", trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("predict", trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end("predict", trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_out()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._swap_out()
        if stage == "fit":
            self._steps.close()

    # -- side-by-side evaluation ------------------------------------------------------------------

    def _evaluate(self, name: str, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One more pass of the stage with ``name`` swapped in (or the live weights); its epoch
        metrics go to ``trainer.callback_metrics`` and the loggers under the average's prefix."""
        with contextlib.ExitStack() as stack:
            if name != _LIVE:
                if not self._swap_in(name, pl_module, stage):
                    return
                stack.callback(self._swap_out)
            metrics = evaluation_pass(trainer, pl_module, stage)
        publish(trainer, {self.metric_name(name, k): v for k, v in metrics.items()})

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer_steps": self._optimizer_steps,
            "latest_update_step": self._latest_update_step,
            "latest_update_epoch": self._latest_update_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._optimizer_steps = int(state_dict.get("optimizer_steps", 0))
        self._latest_update_step = int(state_dict.get("latest_update_step", 0))
        self._latest_update_epoch = int(state_dict.get("latest_update_epoch", -1))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.averages:
            rank_zero_info(
                "WeightAveraging: no averages yet (they are built when fit starts); the checkpoint holds the model only"
            )
            return
        name = self._swapped_name
        if name is None:
            ckpt.pack(checkpoint, self.averages, weights_key=_WEIGHTS_KEY, live_key=_LIVE_KEY, primary=self.primary)
            return
        # Written while an average is in the model (a save during validation): put the live weights
        # back and read them from the model (what the strategy put in checkpoint["state_dict"]
        # was the average, and may be a copy of it), and clone what the file holds before the
        # average goes back in.
        self._swap_out()
        try:
            live = _detached_clone(trainer.strategy.lightning_module_state_dict())
            ckpt.pack(
                checkpoint, self.averages, weights_key=_WEIGHTS_KEY, live_key=_LIVE_KEY, primary=self.primary, live=live
            )
            checkpoint[_WEIGHTS_KEY] = _detached_clone(checkpoint[_WEIGHTS_KEY])
            for record in checkpoint[ckpt.KEY]["averages"].values():
                if record["weights"] is not None:
                    record["weights"] = _detached_clone(record["weights"])
        finally:
            self._swap_in(name, pl_module, "checkpoint")

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning has already loaded checkpoint["state_dict"] (the primary average) into the model;
        # the live weights go in now. The averages are restored now if they exist, else when fit
        # starts (they are built then, on the training device).
        self._swap_out()
        fitting = trainer.state.fn == "fit"
        if not self.averages and not fitting:
            if ckpt.has_averages(checkpoint):
                rank_zero_info(
                    "WeightAveraging: the model holds the checkpoint's primary average "
                    f"({checkpoint[ckpt.KEY].get('primary')!r}); the averages are restored only in fit"
                )
            return
        if ckpt.has_averages(checkpoint):
            restore = self._polyak_layout(trainer, checkpoint)
        elif _LIGHTNING_LIVE_KEY in checkpoint:
            restore = self._lightning_layout(trainer, checkpoint)
        elif fitting:
            rank_zero_warn(
                "WeightAveraging: the checkpoint holds no averages; they start from its weights "
                "(counted as their first update)"
            )

            def restore(module: nn.Module) -> None:
                self._start_from_model(list(self.averages), module)

        else:
            return
        if self.averages:
            restore(pl_module)
        else:
            self._restore = restore

    def _polyak_layout(self, trainer: pl.Trainer, checkpoint: dict[str, Any]) -> Callable[[nn.Module], None]:
        meta = checkpoint[ckpt.KEY]
        missing = [k for k in (meta["weights_key"], meta["live_key"]) if k not in checkpoint]
        if missing:
            raise KeyError(f"the checkpoint's polyak block names {missing}, which the checkpoint lacks")
        saved = {k: checkpoint[k] for k in (ckpt.KEY, meta["weights_key"], meta["live_key"])}
        prefix = meta.get("live_prefix", "")
        live = {k[len(prefix) :]: v for k, v in saved[meta["live_key"]].items() if k.startswith(prefix)}
        self._load_live(trainer, checkpoint, live)

        def restore(module: nn.Module) -> None:
            _, missing = ckpt.unpack(saved, self.averages)
            if missing:
                rank_zero_warn(
                    f"WeightAveraging: the checkpoint has no record of {missing}; they start from its live weights"
                )
                self._start_from_model(missing, module)

        return restore

    def _lightning_layout(self, trainer: pl.Trainer, checkpoint: dict[str, Any]) -> Callable[[nn.Module], None]:
        """A checkpoint of Lightning's ``WeightAveraging``: ``state_dict`` is its average,
        ``current_model_state`` the live weights, ``averaging_state`` holds ``n_averaged``."""
        rank_zero_warn(
            "WeightAveraging: reading a checkpoint of Lightning's WeightAveraging; its average goes into "
            f"{self.primary!r}, the other averages start from the live weights"
        )
        averaged = checkpoint[_WEIGHTS_KEY]
        n_averaged = int(checkpoint.get("averaging_state", {}).get("n_averaged", 1))
        self._load_live(trainer, checkpoint, checkpoint[_LIGHTNING_LIVE_KEY])

        def restore(module: nn.Module) -> None:
            self._start_from_model(list(self.averages), module)
            primary = self.averages[self.primary]
            own = primary.module.state_dict(keep_vars=True)
            with torch.no_grad():
                for k, v in averaged.items():
                    if k in own:
                        own[k].copy_(v)
            primary.steps = max(n_averaged, 1)

        return restore

    def _load_live(self, trainer: pl.Trainer, checkpoint: dict[str, Any], live: dict[str, Any]) -> None:
        checkpoint[_WEIGHTS_KEY] = live
        trainer.strategy.load_model_state_dict(checkpoint, strict=trainer.lightning_module.strict_loading)


class EMA(WeightAveraging):
    """One exponential moving average of the weights: Lightning's ``EMAWeightAveraging`` on polyak.

    The average is ``polyak.AveragedModel(module, schedule=...)`` with a constant decay
    (:class:`~polyak.schedules.ConstantMomentum`), or with ``warmup=True`` the timm/diffusers
    warm-up towards it (:class:`~polyak.schedules.Warmup`, power 2/3: a decay of 0.999 is reached
    after 31.6k updates). ``decay=0.999`` forgets with a half-life of 693 updates.

    Unlike Lightning's preset, ``update_starting_at_epoch`` delays the per-step updates (it does
    not add updates at epoch ends), ``interval`` averages every ``interval`` steps with the decay
    compensated (``decay**interval`` per update) so the horizon in steps does not change, floating
    buffers are copied unless ``update_buffers=True``, and the update is one fused kernel per
    (device, dtype).

    Args:
        decay: the decay :math:`\\beta` (weight kept on the average), in [0, 1]. Defaults to 0.999.
        half_life: instead of ``decay``, in updates.
        warmup: warm the decay up (above). Defaults to False.
        interval: average every ``interval`` optimizer steps (compensated). Defaults to 1.
        update_buffers: average floating buffers (BatchNorm statistics) instead of copying them.
        device: keep the average there (``"cpu"`` to offload). Defaults to the model's.
        dtype: dtype of the average's floating tensors (float32 for a bf16/fp16 model by default).
        update_starting_at_step: the first ``step_idx`` (zero-based ``trainer.global_step - 1``) that
            updates; earlier steps leave the average untouched (and never swapped in).
        update_starting_at_epoch: the first epoch whose steps update.
        name: the average's name (metric prefix, checkpoint record). Defaults to ``"ema"``.
        **kwargs: :class:`WeightAveraging`'s options (``swap_stages``, ``copy_average_on_train_end``, ...).

    Example::

        trainer = Trainer(callbacks=[EMA(decay=0.999, update_starting_at_step=1000)])
    """

    def __init__(
        self,
        decay: float | None = None,
        *,
        half_life: float | None = None,
        warmup: bool = False,
        interval: int = 1,
        update_buffers: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        name: str = "ema",
        **kwargs: Any,
    ) -> None:
        if decay is None and half_life is None:
            decay = 0.999
        schedule = Warmup(decay, half_life=half_life) if warmup else ConstantMomentum(decay=decay, half_life=half_life)
        for arg, value in (
            ("update_starting_at_step", update_starting_at_step),
            ("update_starting_at_epoch", update_starting_at_epoch),
        ):
            if value is not None:
                check_int(arg, value, 0)
        factory = functools.partial(
            AveragedModel, schedule=schedule, interval=interval, use_buffers=update_buffers, device=device, dtype=dtype
        )
        super().__init__({name: factory}, **kwargs)
        self.schedule = schedule
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None:
            return False
        if self.update_starting_at_step is not None and step_idx < self.update_starting_at_step:
            return False
        return self.update_starting_at_epoch is None or self._epoch_idx >= self.update_starting_at_epoch
