"""Framework-free training hooks: an optimizer-step counter and a runner-style ``EMAHook``.

:class:`OptimizerStepCounter` is how every integration updates the average once per *real*
optimizer step: it counts calls of ``optimizer.step`` through the optimizer's step post-hooks,
which do not run when a ``torch.amp.GradScaler`` skips a step (inf/NaN gradients) and run once
per gradient-accumulation cycle. No tensor is read on the host to find out.

:class:`EMAHook` follows mmengine's ``EMAHook`` (arguments, swap around validation and test,
``ema_state_dict`` in checkpoints) for any runner-like object with ``.model``, ``.iter``,
``.epoch`` and ``.max_iters``; ``polyak.integrations.mmengine`` registers it with mmengine.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .averaged_model import AveragedModel
from .files import load
from .models import AVERAGES, BaseAveragedModel
from .schedules import MMCVWarmup
from .tensors import unwrap_model
from .validation import check_choice, check_int

__all__ = ["OptimizerStepCounter", "EMAHook", "find_optimizers"]


class OptimizerStepCounter:
    """Counts the optimizer steps that really ran, via ``Optimizer.register_step_post_hook``.

    A ``GradScaler`` that finds inf/NaN gradients does not call ``optimizer.step()`` of an
    ordinary optimizer, so such a step is not counted; with gradient accumulation ``step()``
    runs once per cycle. Fused optimizers (``fused=True`` Adam, AdamW, SGD) are the exception:
    the scaler always calls their ``step()`` with ``optimizer.found_inf`` set and the kernel
    skips the update itself, so for them the hook keeps ``found_inf`` and :meth:`advanced`
    reads it (one host sync per optimizer step, only in that case). Use :meth:`advanced` to
    ask, once per batch, whether a new step was taken since the last ask.
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        self.count = 0
        self._seen = 0
        self._pending: list[torch.Tensor] = []  # found_inf of fused steps, not yet read
        self._handles: list[Any] = []
        self._hooked: set[int] = set()
        self.watch(optimizers)

    def watch(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Count the steps of these optimizers too (each optimizer once)."""
        for opt in optimizers:
            if id(opt) in self._hooked:
                continue
            self._hooked.add(id(opt))
            self._handles.append(opt.register_step_post_hook(self._on_step))

    @property
    def watching(self) -> bool:
        return bool(self._handles)

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, torch.Tensor):
            self._pending.append(found_inf)
        else:
            self.count += 1

    def advanced(self) -> bool:
        """True if at least one optimizer step ran since the previous call."""
        if self._pending:
            pending, self._pending = self._pending, []
            self.count += sum(1 for found_inf in pending if not bool(found_inf.item()))
        moved = self.count != self._seen
        self._seen = self.count
        return moved

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked.clear()


def find_optimizers(obj: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside ``obj``: an optimizer, mmengine's ``OptimWrapper`` or
    ``OptimWrapperDict``, accelerate's ``AcceleratedOptimizer``, a list or dict of them."""
    if obj is None:
        return []
    if isinstance(obj, torch.optim.Optimizer):
        inner = getattr(obj, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not obj:
            # accelerate's AcceleratedOptimizer subclasses Optimizer without its step hooks, and
            # calls the inner step only when a step really happens: count the inner one.
            return find_optimizers(inner)
        return [obj]
    if isinstance(obj, dict):
        return [o for v in obj.values() for o in find_optimizers(v)]
    if isinstance(obj, (list, tuple)):
        return [o for v in obj for o in find_optimizers(v)]
    inner = getattr(obj, "optim_wrappers", None)  # mmengine OptimWrapperDict
    if isinstance(inner, dict):
        return find_optimizers(inner)
    inner = getattr(obj, "optimizer", None)  # OptimWrapper, AcceleratedOptimizer
    return find_optimizers(inner) if inner is not obj else []


class EMAHook:
    """Keep an averaged model during training; evaluate and checkpoint with it.

    mmengine's ``EMAHook``, for any runner-like object with ``.model``, ``.iter`` (0-based
    index of the current iteration), ``.epoch`` and ``.max_iters``, calling the hook methods
    below at the usual points:

    * ``before_run``: builds ``ema_type(model, **kwargs)`` from the unwrapped ``runner.model``
      (and gives :class:`~polyak.CosineEMA` its ``max_steps``: ``runner.max_iters``, divided by
      mmengine's gradient-accumulation count); a later run on the same model (``runner.test()``
      after ``runner.train()``) keeps the average, so that the average is what is tested;
    * ``after_train_iter``: updates the average, once per optimizer step that ran (found
      through :class:`OptimizerStepCounter` on ``runner.optim_wrapper`` / ``runner.optimizer``
      when there is one, else every iteration), or copies the model before ``begin_iter`` /
      ``begin_epoch`` (those calls do not count);
    * ``before/after_val_epoch``, ``before/after_test_epoch``: swap the average into the model
      and back (exception-safe, in place), unless it has not been updated yet;
    * ``before_save_checkpoint`` / ``after_load_checkpoint``: polyak's checkpoint format in its
      mmengine flavour (docs/checkpoint-format.md): ``state_dict`` holds the average,
      ``ema_state_dict`` the live weights under ``module.`` keys and ``steps``, so mmengine's own
      hook reads it too; checkpoints written by mmengine's hook load as well. A checkpoint
      written while the average is swapped in (``swap="epoch"``) still has the live weights
      under ``ema_state_dict``. ``after_load_checkpoint`` puts the live weights back under
      ``state_dict`` for the runner to load into the model, and on a resume (``runner._resume``,
      True where the runner has no such attribute) restores the average; otherwise (mmengine's
      ``load_from`` without ``resume``) the average starts from the checkpoint's ``state_dict``.

    mmcv 1.x's ``EMAHook(momentum, interval, warm_up, resume_from)`` translates as: ``momentum``
    and ``interval`` as they are (with interval compensation instead of mmcv's freezing
    ``momentum ** interval``); ``warm_up=w`` averages with mmcv's ``min(momentum,
    (1+t)/(w+t))`` (:class:`~polyak.schedules.MMCVWarmup`, on an :class:`~polyak.AveragedModel`;
    ``t`` counts optimizer steps, which is mmcv's ``runner.iter`` when every iteration steps);
    ``resume_from=path`` resumes from that checkpoint in ``before_run`` (through
    ``runner.resume(path)`` where the runner has one, which must call
    ``after_load_checkpoint``; otherwise the hook loads the weights and the average itself);
    ``swap="epoch"`` swaps at epoch boundaries as mmcv did (average in after each training
    epoch, live weights back before the next, and at ``after_run``).

    Args:
        ema_type: an averaged-model class or its name (:data:`polyak.models.AVERAGES`).
        strict_load: load averages strictly. Defaults to False, as mmengine.
        begin_iter, begin_epoch: copy the model until the iteration/epoch (1-based counts, as
            mmengine) is reached.
        swap: ``"val"`` (validation and test, mmengine), ``"epoch"`` (mmcv) or ``None``.
        warm_up, resume_from: mmcv's arguments (above).
        **kwargs: passed to ``ema_type`` (``momentum``, ``interval``, ``update_buffers``, ...).
    """

    priority = "NORMAL"

    def __init__(
        self,
        ema_type: str | type[BaseAveragedModel] = "ExponentialMovingAverage",
        strict_load: bool = False,
        begin_iter: int = 0,
        begin_epoch: int = 0,
        *,
        swap: str | None = "val",
        warm_up: int | None = None,
        resume_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(ema_type, str):
            ema_type = AVERAGES.lookup(ema_type, what="ema_type")
        if not (isinstance(ema_type, type) and issubclass(ema_type, BaseAveragedModel)):
            raise ValueError(f"ema_type must name a polyak averaged model, got {ema_type!r}")
        check_int("begin_iter", begin_iter, 0)
        check_int("begin_epoch", begin_epoch, 0)
        if begin_iter and begin_epoch:
            raise ValueError("give begin_iter or begin_epoch, not both")
        check_choice("swap", swap, ("val", "epoch", None))
        if warm_up is not None:
            schedule = MMCVWarmup(kwargs.pop("momentum", 0.0002), warm_up)
            if "update_buffers" in kwargs:  # AveragedModel's (torch's) name for it
                kwargs["use_buffers"] = kwargs.pop("update_buffers")
            ema_type, kwargs = AveragedModel, {"schedule": schedule, **kwargs}
        self.ema_type = ema_type
        self.ema_cfg = kwargs
        self.strict_load = strict_load
        self.begin_iter = begin_iter
        self.begin_epoch = begin_epoch
        self.swap = swap
        self.resume_from = resume_from
        self.ema_model: BaseAveragedModel | None = None
        self.src_model: nn.Module | None = None
        self._steps = OptimizerStepCounter()
        self._swap: contextlib.ExitStack | None = None

    # -- building ---------------------------------------------------------------------------

    def before_run(self, runner: Any) -> None:
        self._watch(runner)  # mmcv's runners have no before_train
        model = self._unwrap(runner.model)
        if self.ema_model is not None and self.src_model is model:
            # A second run on the same runner (``runner.test()`` after ``runner.train()``):
            # keep the average, so that it is what gets evaluated.
            return
        self.src_model = model
        self.ema_model = self.ema_type(self.src_model, **self.ema_cfg)
        if self.ema_model.needs_total_steps:
            total = _total_optimizer_steps(runner)
            if total is not None:
                self.ema_model.set_total_steps(total)
        if self.resume_from is not None:
            if hasattr(runner, "resume"):
                runner.resume(self.resume_from)
            else:
                checkpoint = load(self.resume_from).obj
                self.after_load_checkpoint(runner, checkpoint)
                self.src_model.load_state_dict(checkpoint["state_dict"])

    def _unwrap(self, model: nn.Module) -> nn.Module:
        """The model to average: ``runner.model`` without DDP / DataParallel / compile wrappers."""
        return unwrap_model(model)

    def before_train(self, runner: Any) -> None:
        max_iters = getattr(runner, "max_iters", None)
        max_epochs = getattr(runner, "max_epochs", None)
        if max_iters is not None and self.begin_iter >= max_iters:
            raise ValueError(f"begin_iter={self.begin_iter} is not below max_iters={max_iters}: nothing would average")
        if max_epochs is not None and self.begin_epoch >= max_epochs:
            raise ValueError(
                f"begin_epoch={self.begin_epoch} is not below max_epochs={max_epochs}: nothing would average"
            )
        self._watch(runner)

    def _watch(self, runner: Any) -> None:
        optimizers = getattr(runner, "optim_wrapper", None)
        if optimizers is None:
            optimizers = getattr(runner, "optimizer", None)
        self._steps.watch(find_optimizers(optimizers))

    # -- training -----------------------------------------------------------------------------

    def _started(self, runner: Any) -> bool:
        return runner.iter + 1 >= self.begin_iter and runner.epoch + 1 >= self.begin_epoch

    def _models(self) -> tuple[BaseAveragedModel, nn.Module]:
        """The average and the model it averages; :class:`RuntimeError` before ``before_run``."""
        if self.ema_model is None or self.src_model is None:
            raise RuntimeError("EMAHook: before_run(runner) was not called, so there is no average yet")
        return self.ema_model, self.src_model

    def after_train_iter(self, runner: Any, batch_idx: int = 0, data_batch: Any = None, outputs: Any = None) -> None:
        ema_model, src_model = self._models()
        if self._steps.watching and not self._steps.advanced():
            return  # accumulating gradients, or a step the GradScaler skipped
        if self._started(runner):
            ema_model.update_parameters(src_model)
        else:
            ema_model.sync_parameters(src_model)

    @property
    def momentum(self) -> float | None:
        """The momentum of the latest averaging update, for logging."""
        return None if self.ema_model is None else self.ema_model.current_momentum

    # -- swapping -------------------------------------------------------------------------------

    def _swap_in(self) -> None:
        ema_model, src_model = self._models()
        if self._swap is not None:
            return
        if ema_model.steps == 0:
            warnings.warn("EMAHook: the average has not been updated yet; evaluating the live model", stacklevel=3)
            return
        stack = contextlib.ExitStack()
        stack.enter_context(ema_model.swapped(src_model))
        self._swap = stack

    def _swap_out(self) -> None:
        if self._swap is not None:
            stack, self._swap = self._swap, None
            stack.close()

    def before_val_epoch(self, runner: Any) -> None:
        if self.swap == "val":
            self._swap_in()

    def after_val_epoch(self, runner: Any, metrics: Any = None) -> None:
        if self.swap == "val":
            self._swap_out()

    def before_test_epoch(self, runner: Any) -> None:
        if self.swap == "val":
            self._swap_in()

    def after_test_epoch(self, runner: Any, metrics: Any = None) -> None:
        if self.swap == "val":
            self._swap_out()

    def after_train_epoch(self, runner: Any) -> None:
        if self.swap == "epoch":
            self._swap_in()

    def before_train_epoch(self, runner: Any) -> None:
        if self.swap == "epoch":
            self._swap_out()

    def after_run(self, runner: Any) -> None:
        self._swap_out()
        self._steps.close()

    # -- checkpoints ------------------------------------------------------------------------------

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        _, src_model = self._models()
        swapped = self._swap is not None
        if not swapped:
            self._pack(checkpoint, live=None, clone=False)
            return
        # Saved while the average is swapped in (``swap="epoch"``: a checkpoint at the end of an
        # epoch): the model holds the average and the average the live weights, and the
        # framework's ``state_dict`` may alias the model's tensors. Swap back, write copies of
        # both (the tensors change again when the average goes back in), then swap in again.
        self._swap_out()
        try:
            live = {k: v.detach().clone() for k, v in src_model.state_dict().items()}
            self._pack(checkpoint, live=live, clone=True)
        finally:
            self._swap_in()

    def _pack(self, checkpoint: dict, *, live: dict | None, clone: bool) -> None:
        ema_model, _ = self._models()
        ckpt.pack(
            checkpoint,
            {"ema": ema_model},
            weights_key="state_dict",
            live_key="ema_state_dict",
            live_prefix="module.",
            live=live,
        )
        # CPU tensors under both keys, as the framework's own ``state_dict`` (mmengine moves it
        # to the CPU); ``clone`` also detaches them from the storage of the model and the average.
        for key in ("state_dict", "ema_state_dict"):
            checkpoint[key] = {
                k: v.detach().to("cpu", copy=clone) if isinstance(v, torch.Tensor) else v
                for k, v in checkpoint[key].items()
            }
        checkpoint["ema_state_dict"]["steps"] = torch.tensor(ema_model.steps, dtype=torch.long)

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        ema_model, _ = self._models()
        resume = bool(getattr(runner, "_resume", True))
        if ckpt.has_averages(checkpoint) and resume:
            live, missing = ckpt.unpack(checkpoint, {"ema": ema_model}, strict=self.strict_load)
            if missing:
                self._init_from(checkpoint["state_dict"])
            if live is not None:  # else the checkpoint's weights are all there is
                checkpoint["state_dict"] = live
        elif "ema_state_dict" in checkpoint and resume:  # written by mmengine's EMAHook
            model_state, ema_state = checkpoint["state_dict"], checkpoint["ema_state_dict"]
            for k in list(ema_state):
                if k.startswith("module.") and k[7:] in model_state:
                    ema_state[k], model_state[k[7:]] = model_state[k[7:]], ema_state[k]
            ema_model.load_state_dict(ema_state, strict=self.strict_load)
        else:
            if resume:
                warnings.warn(
                    "EMAHook: the checkpoint has no average; starting it from the checkpoint's weights",
                    stacklevel=2,
                )
            self._init_from(checkpoint["state_dict"])

    def _init_from(self, state_dict: dict) -> None:
        ema_model, _ = self._models()
        sd = {"module." + k: v for k, v in copy.copy(state_dict).items()}
        sd["steps"] = torch.tensor(max(ema_model.steps, 1), dtype=torch.long)
        ema_model.load_state_dict(sd, strict=self.strict_load)


def _total_optimizer_steps(runner: Any) -> int | None:
    """The number of optimizer steps of the whole run: ``runner.max_iters``, divided by the
    gradient-accumulation count of mmengine's ``OptimWrapper`` (its last, partial cycle steps
    too); None when the runner has no training loop (``runner.val()`` / ``runner.test()``)."""
    try:
        max_iters = int(runner.max_iters)
    except (AttributeError, RuntimeError, TypeError):
        return None
    counts = getattr(getattr(runner, "optim_wrapper", None), "_accumulative_counts", 1)
    counts = counts if isinstance(counts, int) and counts > 1 else 1
    return max(1, -(-max_iters // counts))
