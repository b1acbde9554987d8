"""Weight averaging for the Hugging Face ``Trainer``: a callback, and a Trainer mixin for the rest.

transformers' callbacks see no event before an evaluation or a checkpoint, nor when a checkpoint
is loaded, so the work is split in two (docs/integrations/transformers.md):

* :class:`AveragingCallback` does what a callback can: it builds the averages from the model at
  ``on_train_begin``, updates them once per optimizer step that really ran (``on_step_end``,
  which comes once per gradient-accumulation cycle, with steps skipped by a ``GradScaler`` left
  out: see below), logs each average's decay, and, used alone, writes the averaging state into
  each checkpoint directory.
* :class:`AveragingTrainerMixin` (ready made: :class:`AveragingTrainer`) adds evaluation with
  the averages swapped in (metrics prefixed per average: ``eval_ema_loss``), checkpoints whose
  ``model.safetensors`` holds the deployable average with the live weights and the averaging
  state beside it (``polyak_averages.pt``, polyak's checkpoint format), exact resume
  (``trainer.train(resume_from_checkpoint=...)`` puts the live weights back into the model and
  restores every average), ``load_best_model_at_end``, and ``save_model`` exporting the average.

Skipped steps: the callback counts calls of the underlying ``torch.optim.Optimizer.step``
(:class:`polyak.hooks.OptimizerStepCounter`, a step post-hook on the optimizer inside accelerate's
``AcceleratedOptimizer``). A ``GradScaler`` that finds inf/NaN gradients does not call it, so
that step does not update the averages. A fused optimizer (the Trainer's default
``adamw_torch_fused``) is the exception: the scaler calls its ``step()`` with
``optimizer.found_inf`` set and the kernel skips the update, so the hook reads ``found_inf``
too. ``accelerator.optimizer_step_was_skipped`` is not used: it misses that second case.
Unsupported: FSDP and DeepSpeed (the averages would copy parameter shards).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import safetensors.torch
import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .. import checkpoint as ckpt
from ..files import atomic_write, load, torch_save
from ..hooks import OptimizerStepCounter, find_optimizers
from ..models import BaseAveragedModel
from ..openmmlab import ExponentialMovingAverage
from ..tensors import unwrap_model

__all__ = [
    "AVERAGING_STATE_NAME",
    "WEIGHTS_KEY",
    "LIVE_KEY",
    "AveragingCallback",
    "AveragingTrainerMixin",
    "AveragingTrainer",
]

logger = logging.getLogger(__name__)

#: The file, in each checkpoint directory, that holds the averaging state and the live weights.
AVERAGING_STATE_NAME = "polyak_averages.pt"
#: ``weights_key`` of the polyak block: the primary average's weights are the checkpoint's model
#: weights file (left out of ``polyak_averages.pt`` when that file holds them exactly).
WEIGHTS_KEY = "model.safetensors"
#: Where ``polyak_averages.pt`` keeps the live (training) weights, as ``model.state_dict()`` gives them.
LIVE_KEY = "live_state_dict"

AverageFactory = Callable[[nn.Module], BaseAveragedModel]


def _model_file_holds(average: BaseAveragedModel, model: nn.Module) -> bool:
    """Whether ``model`` with ``average`` swapped in holds the average exactly: the same dtype for
    every tensor, and the tensors that are not averaged (copied buffers) equal to the model's."""
    for _, kind, avg, live in average.pairs(model):
        if avg.dtype != live.dtype:
            return False
        if kind != "avg" and not torch.equal(avg, live):
            return False
    return True


def _read_model_file(directory: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the checkpoint's ``model.safetensors`` (or its shards), with the keys
    ``save_pretrained`` leaves out for tied parameters filled in from their partners."""
    single = os.path.join(directory, SAFE_WEIGHTS_NAME)
    index = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(directory, name) for name in json.load(f)["weight_map"].values()})
    else:
        raise FileNotFoundError(f"{directory} has no {SAFE_WEIGHTS_NAME} to take the primary average from")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(safetensors.torch.load_file(file, device="cpu"))
    tied: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        tied.setdefault(id(tensor), []).append(key)
    for keys in tied.values():
        present = [k for k in keys if k in state]
        for key in keys:
            if present:
                state.setdefault(key, state[present[0]])
    return state


class AveragingCallback(TrainerCallback):
    """Keep weight averages of the model during ``Trainer.train``.

    * ``on_train_begin``: builds each average by calling its factory on the (unwrapped) model,
      once per model object: averages already built for this model (restored from a checkpoint,
      or kept from an earlier ``train()`` call) are kept. A :class:`~polyak.CosineEMA` without
      ``max_steps`` gets ``state.max_steps``.
    * ``on_step_end`` (once per optimizer step, after gradient accumulation): updates every
      average, unless the optimizer step did not run. That is found by counting calls of the
      underlying ``torch.optim.Optimizer.step`` (:class:`~polyak.hooks.OptimizerStepCounter`): a
      ``GradScaler`` that found inf/NaN gradients never calls it, or, for a fused optimizer,
      calls it with ``optimizer.found_inf`` set, which is read then.
    * ``on_log``: adds ``"{name}_decay"`` (the decay of the latest update) and the average's
      health report (:meth:`polyak.BaseAveragedModel.health`: ``"{name}_distance"``,
      ``"{name}_moved"``, ``"{name}_horizon"``) to
      training logs, and warns once about each problem the report finds.
    * ``on_save``, used without :class:`AveragingTrainerMixin`: writes the averaging state
      (:data:`AVERAGING_STATE_NAME`, polyak's checkpoint format) into the checkpoint directory,
      whose ``model.safetensors`` then holds the live weights. To resume, call
      :meth:`load_state` with that directory after building the ``Trainer`` and before
      ``trainer.train(resume_from_checkpoint=...)``; the mixin does all this itself.

    Args:
        averages: the averages to keep, by name: ``{"ema": lambda m:
            polyak.ExponentialMovingAverage(m, momentum=1e-3)}``. A factory is called with the
            model and returns a :class:`~polyak.BaseAveragedModel`; a class works
            (``polyak.StochasticWeightAverage``). A single factory is named ``"average"``.
            Defaults to ``{"ema": polyak.ExponentialMovingAverage}`` (momentum 2e-4).
        primary: the average deployed as the model weights (checkpoints, ``save_model``).
            Defaults to the first.
        log_decay: add the decays to training logs. Defaults to True.
        log_health: add the health reports to training logs (each costs a pass over the weights
            and one host read, at ``logging_steps``). Defaults to True.
    """

    def __init__(
        self,
        averages: Mapping[str, AverageFactory] | AverageFactory | None = None,
        *,
        primary: str | None = None,
        log_decay: bool = True,
        log_health: bool = True,
    ) -> None:
        if averages is None:
            averages = {"ema": ExponentialMovingAverage}
        elif not isinstance(averages, Mapping):
            averages = {"average": averages}
        if not averages:
            raise ValueError("averages is empty: give at least one average")
        for name, factory in averages.items():
            if not isinstance(name, str) or not name or name.strip() != name or "/" in name:
                raise ValueError(f"average names must be non-empty strings without '/' or spaces, got {name!r}")
            if isinstance(factory, nn.Module) or not callable(factory):
                raise TypeError(
                    f"averages[{name!r}] must be a factory called with the model (e.g. "
                    f"`lambda m: polyak.ExponentialMovingAverage(m, momentum=1e-3)`), got {factory!r}"
                )
        self.factories: dict[str, AverageFactory] = dict(averages)
        names = list(self.factories)
        self.primary = names[0] if primary is None else primary
        if self.primary not in self.factories:
            raise ValueError(f"primary {self.primary!r} is not one of the averages {names}")
        self.log_decay = bool(log_decay)
        self.log_health = bool(log_health)
        #: The averages by name (empty until built).
        self.averages: dict[str, BaseAveragedModel] = {}
        self._model: nn.Module | None = None
        self._counter: OptimizerStepCounter | None = None
        self._managed = False  # set by AveragingTrainerMixin, which saves and loads
        self._pending_live: dict[str, torch.Tensor] | None = None  # see load_state

    # -- the averages ---------------------------------------------------------------------

    def build(self, model: nn.Module) -> dict[str, BaseAveragedModel]:
        """Build the averages from ``model`` (wrappers removed), unless they were built for this
        very model object already; return them."""
        model = unwrap_model(model)
        if self._model is model and self.averages:
            return self.averages
        averages = {}
        for name, factory in self.factories.items():
            average = factory(model)
            if not isinstance(average, BaseAveragedModel):
                raise TypeError(
                    f"the factory of average {name!r} returned {type(average).__name__}, "
                    "not a polyak averaged model (BaseAveragedModel)"
                )
            averages[name] = average
        self.averages = averages
        self._model = model
        return averages

    def reset(self) -> None:
        """Drop the averages: the next ``on_train_begin`` builds them again from the model."""
        self.averages = {}
        self._model = None

    def ready(self, name: str | None = None) -> bool:
        """Whether the average ``name`` (default: the primary) exists and has been updated at
        least once, so that it may be swapped in."""
        average = self.averages.get(self.primary if name is None else name)
        return average is not None and average.steps > 0

    def decay_logs(self) -> dict[str, float]:
        """``{"{name}_decay": decay of the latest update}`` for every average that has one."""
        out = {}
        for name, average in self.averages.items():
            decay = average.current_decay
            if decay is not None:
                out[f"{name}_decay"] = decay
        return out

    def metric_logs(self) -> dict[str, float]:
        """What :meth:`on_log` adds to a training log: :meth:`decay_logs` (with ``log_decay``)
        and ``"{name}_{key}"`` for each number of each average's health report (with
        ``log_health``)."""
        out = self.decay_logs() if self.log_decay else {}
        if self.log_health and self._model is not None:
            for name, average in self.averages.items():
                out.update({f"{name}_{k}": v for k, v in average.health(self._model).scalars().items()})
        return out

    # -- training events ----------------------------------------------------------------------

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if model is None:
            raise RuntimeError("AveragingCallback.on_train_begin got no model")
        if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
            raise NotImplementedError(
                "AveragingCallback does not support FSDP or DeepSpeed: the averages would copy parameter shards"
            )
        if self._pending_live is not None:
            if self._model is unwrap_model(model):  # after the Trainer loaded the checkpoint's model file
                self._model.load_state_dict(self._pending_live)
            self._pending_live = None
        self.build(model)
        for average in self.averages.values():
            if average.needs_total_steps:
                average.set_total_steps(int(state.max_steps))
        if self._counter is not None:
            self._counter.close()
        optimizers = find_optimizers(kwargs.get("optimizer"))
        self._counter = OptimizerStepCounter(optimizers)
        if not optimizers:
            warnings.warn(
                "AveragingCallback found no torch optimizer to watch: the averages are updated at every "
                "on_step_end, including steps a GradScaler skipped",
                stacklevel=2,
            )

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if not self.averages or self._model is None:
            return
        if self._counter is not None and self._counter.watching and not self._counter.advanced():
            return  # the optimizer step did not run (GradScaler found inf/NaN gradients)
        source = self._model if model is None else unwrap_model(model)
        for average in self.averages.values():
            average.update_parameters(source)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self._managed or logs is None or "loss" not in logs:
            return  # AveragingTrainerMixin.log adds them before any callback sees the log
        new = {k: v for k, v in self.metric_logs().items() if k not in logs}
        if not new:
            return
        logs.update(new)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last.update(new)

    def on_save(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if self._managed or not self.averages or not args.should_save:
            return
        directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(directory):
            warnings.warn(f"AveragingCallback: no checkpoint directory {directory}; averages not saved", stacklevel=2)
            return
        self.save_state(directory, self._model if model is None else model, include_primary=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._counter is not None:
            self._counter.close()
            self._counter = None

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self, model: nn.Module, *, include_primary: bool = True) -> dict[str, Any]:
        """The averaging state in polyak's checkpoint format: ``LIVE_KEY`` holds ``model``'s
        (live) weights, ``"polyak"`` the records, and ``WEIGHTS_KEY`` the primary average's
        weights unless ``include_primary`` is False (they are then the model weights file)."""
        if not self.averages:
            raise RuntimeError("the averages have not been built: nothing to save")
        live = unwrap_model(model).state_dict()
        state = ckpt.pack(
            {}, self.averages, weights_key=WEIGHTS_KEY, live_key=LIVE_KEY, primary=self.primary, live=live
        )
        if not include_primary:
            del state[WEIGHTS_KEY]
        return state

    def save_state(self, directory: str, model: nn.Module, *, include_primary: bool = True) -> str:
        """Write :meth:`state_dict` to ``directory/polyak_averages.pt``; return the path."""
        path = os.path.join(directory, AVERAGING_STATE_NAME)
        state = self.state_dict(model, include_primary=include_primary)
        atomic_write(path, lambda tmp: torch_save(state, tmp))
        return path

    def load_state(self, directory: str, model: nn.Module, *, strict: bool = True, model_loaded: bool = False) -> bool:
        """Restore the averages from ``directory/polyak_averages.pt`` and put the live weights
        into ``model``; return False (and drop any averages, so they are built again from the
        model) if the directory has no averaging state.

        When the file leaves the primary average's weights to the model weights file, they are
        read from ``directory/model.safetensors``, or taken from ``model`` if ``model_loaded``
        says that it holds that file's weights (the ``Trainer`` has just loaded the checkpoint).
        Otherwise (the callback used alone, called before ``trainer.train(resume_from_checkpoint=
        directory)``, which then loads ``model.safetensors``, the average if the mixin wrote the
        checkpoint) the live weights are put into the model again at ``on_train_begin``.
        Everything is checked before anything changes. Averages the file does not know start
        afresh.
        """
        path = os.path.join(directory, AVERAGING_STATE_NAME)
        if not os.path.isfile(path):
            self.reset()
            return False
        state = load(path).obj
        if not ckpt.has_averages(state):
            raise ValueError(f"{path} holds no polyak block: it was not written by polyak")
        model = unwrap_model(model)
        self.build(model)
        records = state[ckpt.KEY].get("averages", {})
        for name, average in self.averages.items():  # CosineEMA needs max_steps to be checked
            saved = (records.get(name) or {}).get("schedule") or {}
            if average.needs_total_steps and "max_steps" in saved.get("args", {}):
                average.set_total_steps(int(saved["args"]["max_steps"]))
        weights_key = state[ckpt.KEY]["weights_key"]
        if weights_key not in state:
            state[weights_key] = model.state_dict() if model_loaded else _read_model_file(directory, model)
        live, missing = ckpt.unpack(state, self.averages, strict=strict)
        if live is None:  # no live weights saved: keep the model's
            live = model.state_dict()
        model.load_state_dict(live, strict=strict)
        self._pending_live = None if model_loaded else live
        if missing:
            warnings.warn(
                f"the checkpoint in {directory} has no state for the averages {missing}: they start afresh",
                stacklevel=2,
            )
            for name in missing:
                self.averages[name] = self.factories[name](model)
        return True


class AveragingTrainerMixin:
    """Evaluate, checkpoint, resume and export with the averages of an :class:`AveragingCallback`.

    Put it before the ``Trainer`` class: ``class MyTrainer(AveragingTrainerMixin, Seq2SeqTrainer)``,
    or use :class:`AveragingTrainer`. It adds the callback itself (or takes the one in
    ``callbacks``) and overrides:

    * ``evaluate``: the live model under ``metric_key_prefix`` (``eval_loss``; unless
      ``evaluate_live=False``), then each average that has been updated swapped into the model
      in place (exception-safe), under ``f"{metric_key_prefix}_{name}"`` (``eval_ema_loss``).
      One log entry and one ``on_evaluate`` carry all the metrics, so
      ``metric_for_best_model="ema_loss"`` selects checkpoints by the average.
    * ``_save_checkpoint`` / ``save_model``: a checkpoint's ``model.safetensors`` holds the primary
      average (loadable with ``from_pretrained`` as is), and ``polyak_averages.pt`` the live
      weights and every average's state (polyak's checkpoint format; ``torch.load(...,
      weights_only=True)``). ``trainer.save_model()`` writes the primary average, or the live
      weights with ``export_average=False``, or, inside ``with trainer.averaged(name):``, that
      average.
    * ``_load_from_checkpoint`` (``train(resume_from_checkpoint=...)``) and ``_load_best_model``:
      the live weights go back into the model and every average is restored, so training goes on
      exactly as if it had not stopped. A checkpoint without averaging state loads as usual and
      the averages start from its weights.
    * ``log``: adds each average's decay and health report to training logs before any
      callback sees them.

    Args (keywords, the rest go to the ``Trainer``):
        averages: an :class:`AveragingCallback`, or its ``averages`` argument.
        primary: the callback's ``primary``.
        evaluate_live: evaluate the live model too. Defaults to True.
        export_average: ``save_model`` writes the primary average. Defaults to True.
    """

    def __init__(
        self,
        *args: Any,
        averages: AveragingCallback | Mapping[str, AverageFactory] | AverageFactory | None = None,
        primary: str | None = None,
        evaluate_live: bool = True,
        export_average: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(self, Trainer):
            raise TypeError("AveragingTrainerMixin must be mixed into a transformers.Trainer, before it in the bases")
        super().__init__(*args, **kwargs)
        given = [cb for cb in self.callback_handler.callbacks if isinstance(cb, AveragingCallback)]
        if len(given) > 1:
            raise ValueError("give at most one AveragingCallback")
        if isinstance(averages, AveragingCallback):
            if given and given[0] is not averages:
                raise ValueError("an AveragingCallback is in callbacks already: pass it once")
            callback = averages
        elif given:
            if averages is not None or primary is not None:
                raise ValueError("give averages= or an AveragingCallback in callbacks, not both")
            callback = given[0]
        else:
            callback = AveragingCallback(averages, primary=primary)
        if not given:
            self.add_callback(callback)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise NotImplementedError(
                "AveragingTrainer does not support FSDP or DeepSpeed: the averages would copy parameter shards"
            )
        callback._managed = True
        self.averaging: AveragingCallback = callback
        self.evaluate_live = bool(evaluate_live)
        self.export_average = bool(export_average)
        self._polyak_evaluating = False
        self._polyak_checkpointing = False

    # -- helpers ------------------------------------------------------------------------------

    def _polyak_model(self) -> nn.Module:
        return unwrap_model(self.model)  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def averaged(self, name: str | None = None) -> Iterator[nn.Module]:
        """Swap the average ``name`` (default: the primary) into ``trainer.model`` for the block:
        ``with trainer.averaged(): trainer.predict(test_set)``. Raises :class:`RuntimeError`
        before the average's first update."""
        name = self.averaging.primary if name is None else name
        if name not in self.averaging.averages:
            raise RuntimeError(f"no average {name!r} yet: the averages are built when training begins")
        with self.averaging.averages[name].swapped(self._polyak_model()) as model:
            yield model

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        ready = [name for name in self.averaging.averages if self.averaging.ready(name)]
        if self._polyak_evaluating or not ready:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)  # type: ignore[misc]
        runs: list[str | None] = ([None] if self.evaluate_live else []) + ready  # type: ignore[operator]
        model = self._polyak_model()
        handler = self.callback_handler  # type: ignore[attr-defined]
        held = handler.__dict__.get("on_evaluate")
        handler.on_evaluate = lambda args, state, control, metrics, **kw: control
        metrics: dict[str, float] = {}
        self._polyak_evaluating = True  # logs and on_evaluate wait for the merged metrics
        try:
            for name in runs:
                if name is None:
                    swap: contextlib.AbstractContextManager = contextlib.nullcontext()
                    prefix = metric_key_prefix
                else:
                    swap = self.averaging.averages[name].swapped(model)
                    prefix = f"{metric_key_prefix}_{name}"
                with swap:
                    metrics.update(super().evaluate(eval_dataset, ignore_keys, prefix))  # type: ignore[misc]
        finally:
            self._polyak_evaluating = False
            if held is None:
                del handler.on_evaluate
            else:
                handler.on_evaluate = held
        self.log(metrics)
        self.control = handler.on_evaluate(self.args, self.state, self.control, metrics)  # type: ignore[attr-defined]
        return metrics

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._polyak_evaluating:
            return  # one evaluation pass of several: evaluate() logs them together
        if "loss" in logs:
            for key, value in self.averaging.metric_logs().items():
                logs.setdefault(key, value)
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    # -- saving -------------------------------------------------------------------------------

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        self._polyak_checkpointing = True
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._polyak_checkpointing = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        callback = self.averaging
        model = self._polyak_model()
        if self._polyak_checkpointing and callback.averages:
            primary = callback.averages[callback.primary]
            updated = primary.steps > 0
            exact = updated and _model_file_holds(primary, model)
            with primary.swapped(model) if updated else contextlib.nullcontext():
                super().save_model(output_dir, _internal_call)  # type: ignore[misc]
            if self.args.should_save:  # type: ignore[attr-defined]
                directory = self.args.output_dir if output_dir is None else output_dir  # type: ignore[attr-defined]
                callback.save_state(directory, model, include_primary=not exact)
        elif (
            not self._polyak_checkpointing
            and self.export_average
            and callback.ready()
            and not any(average.is_swapped for average in callback.averages.values())  # saves what is in
        ):
            with callback.averages[callback.primary].swapped(model):
                super().save_model(output_dir, _internal_call)  # type: ignore[misc]
        else:
            super().save_model(output_dir, _internal_call)  # type: ignore[misc]

    # -- loading ------------------------------------------------------------------------------

    def _polyak_restore(self, directory: str) -> None:
        if not self.averaging.load_state(directory, self._polyak_model(), model_loaded=True):
            logger.warning(
                "The checkpoint %s has no %s: the averages start from its weights", directory, AVERAGING_STATE_NAME
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        self._polyak_restore(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        super()._load_best_model()  # type: ignore[misc]
        self._polyak_restore(self.state.best_model_checkpoint)  # type: ignore[attr-defined]


class AveragingTrainer(AveragingTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that keeps weight averages: see :class:`AveragingTrainerMixin`.

    >>> # trainer = AveragingTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
    >>> #     averages={"ema": lambda m: polyak.ExponentialMovingAverage(m, momentum=1e-3)})
    """
