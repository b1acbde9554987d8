"""diffusers' ``EMAModel`` (``diffusers.training_utils``) on polyak's fused engine.

Change ``from diffusers.training_utils import EMAModel`` to
``from polyak.compat.diffusers import EMAModel``: the constructor (with its deprecated
``max_value``, ``min_value`` and ``device`` keywords and a module in place of its parameters),
the attributes (``decay``, ``min_decay``, ``update_after_step``, ``use_ema_warmup``,
``inv_gamma``, ``power``, ``optimization_step``, ``cur_decay_value``, ``shadow_params``,
``temp_stored_params``, ``foreach``, ``model_cls``, ``model_config``, each read and written as in
diffusers), the methods (``step``, ``get_decay``, ``copy_to``, ``store``, ``restore``, ``to``,
``pin_memory``, ``save_pretrained``, ``from_pretrained``) and the ``state_dict`` layout are
diffusers', and states load both ways. This module does not import diffusers:
``save_pretrained`` and ``from_pretrained`` use the model class they are given. Deliberate
differences are in docs/migration/diffusers.md.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..validation import check_int, check_number, warning_stacklevel
from . import FusedShadows, as_tensor_list, copy_tensors_, new_shadows

__all__ = ["EMAModel"]

_DEPRECATED = ("max_value", "min_value", "device")


def _deprecated(what: str, message: str) -> None:
    warnings.warn(
        f"{what} is deprecated and will be removed in version 1.0.0. {message}",
        FutureWarning,
        stacklevel=warning_stacklevel(),
    )


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


class EMAModel:
    """An exponential moving average of a model's parameters: diffusers' ``EMAModel``, updated
    by polyak's fused engine.

    At the :math:`t`-th :meth:`step` (``optimization_step`` counts them), with
    :math:`u = \\max(0, t - t_0 - 1)`,

    .. math::

        \\beta_t = \\begin{cases} 0 & u = 0 \\\\
            \\max\\left(\\beta_{\\min}, \\min\\left(\\beta, 1 - (1 + u/\\gamma)^{-p}\\right)\\right)
                & \\text{use\\_ema\\_warmup} \\\\
            \\max\\left(\\beta_{\\min}, \\min\\left(\\beta, \\frac{1 + u}{10 + u}\\right)\\right)
                & \\text{otherwise} \\end{cases} \\qquad
        s_i \\leftarrow s_i - (1 - \\beta_t)\\,(s_i - \\theta_i)

    for every shadow :math:`s_i` (``shadow_params[i]``) and parameter :math:`\\theta_i` with
    ``requires_grad``; a parameter without it is copied. :math:`\\beta` is ``decay``,
    :math:`\\beta_{\\min}` ``min_decay``, :math:`t_0` ``update_after_step``, :math:`\\gamma`
    ``inv_gamma`` and :math:`p` ``power``. The first step copies (:math:`\\beta_1 = 0`). The
    update is one fused ``lerp_`` per (device, dtype) group whatever ``foreach`` says, so the
    numbers equal diffusers' up to the rounding of the last bit; a float16/bfloat16 parameter
    gets a float32 shadow (``to(dtype=...)`` gives diffusers' low-precision shadow).

    Args:
        parameters: the parameters to average (e.g. ``unet.parameters()``); a module is
            deprecated (its parameters, with ``use_ema_warmup=True``), as in diffusers.
        decay, min_decay: :math:`\\beta` and :math:`\\beta_{\\min}`, in :math:`[0, 1]`.
        update_after_step: :math:`t_0`, an int >= 0.
        use_ema_warmup: the inverse-power warm-up instead of :math:`(1 + u)/(10 + u)`.
        inv_gamma, power: :math:`\\gamma` and :math:`p`, both > 0.
        foreach: kept for diffusers' sake (every update here is fused).
        model_cls, model_config: the model class and config for :meth:`save_pretrained`.
        **kwargs: diffusers' deprecated ``max_value`` (``decay``), ``min_value``
            (``min_decay``) and ``device`` (:meth:`to`), with a :class:`FutureWarning`; any
            other keyword is a :class:`TypeError` (diffusers ignores it).

    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> ema = EMAModel([w], decay=0.5)
    >>> with torch.no_grad():
    ...     _ = w.fill_(1.0)
    >>> ema.step([w]); ema.step([w])  # the first step copies
    >>> ema.optimization_step, ema.cur_decay_value, ema.shadow_params[0].tolist()
    (2, 0.18181818181818182, [1.0, 1.0])
    """

    def __init__(
        self,
        parameters: Iterable[Tensor] | nn.Module,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_ema_warmup: bool = False,
        inv_gamma: float | int = 1.0,
        power: float | int = 2 / 3,
        foreach: bool = False,
        model_cls: Any | None = None,
        model_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - set(_DEPRECATED))
        if unknown:
            raise TypeError(f"EMAModel got unexpected keyword arguments {unknown}")
        if isinstance(parameters, nn.Module):
            _deprecated(
                "passing a `torch.nn.Module` to `ExponentialMovingAverage`",
                "Please pass the parameters of the module instead.",
            )
            parameters = parameters.parameters()
            use_ema_warmup = True  # as diffusers, for backward compatibility
        if kwargs.get("max_value") is not None:
            _deprecated("max_value", "Please use `decay` instead.")
            decay = kwargs["max_value"]
        if kwargs.get("min_value") is not None:
            _deprecated("min_value", "Please use `min_decay` instead.")
            min_decay = kwargs["min_value"]
        check_number("decay", decay, 0.0, 1.0)
        check_number("min_decay", min_decay, 0.0, 1.0)
        check_int("update_after_step", update_after_step, 0)
        _check_bool("use_ema_warmup", use_ema_warmup)
        check_number("inv_gamma", inv_gamma, 0.0, open_low=True)
        check_number("power", power, 0.0, open_low=True)
        _check_bool("foreach", foreach)
        params = as_tensor_list("parameters", parameters)

        self._fused = FusedShadows()
        self.shadow_params = new_shadows(params)
        if kwargs.get("device") is not None:
            _deprecated("device", "Please use `to` instead.")
            self.to(device=kwargs["device"])
        self.temp_stored_params: list[Tensor] | None = None
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_ema_warmup = use_ema_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.optimization_step = 0
        self.cur_decay_value: float | None = None  # set in step()
        self.foreach = foreach
        self.model_cls = model_cls
        self.model_config = model_config

    @property
    def shadow_params(self) -> list[Tensor]:
        """The averaged tensors, by position (the list itself: assigning an element or the whole
        list replaces shadows, as in diffusers)."""
        return self._shadow_params

    @shadow_params.setter
    def shadow_params(self, value: list[Tensor]) -> None:
        self._shadow_params = value
        self._fused.clear()  # the plan refers to the old shadows: let them go

    # -- saving as a model ------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], model_cls: Any, foreach: bool = False) -> EMAModel:
        """An average read from a folder written by :meth:`save_pretrained` (here or by
        diffusers): the model's weights are the shadows, its config holds the EMA's settings."""
        _, ema_kwargs = model_cls.from_config(path, return_unused_kwargs=True)
        model = model_cls.from_pretrained(path)
        ema_model = cls(model.parameters(), model_cls=model_cls, model_config=model.config, foreach=foreach)
        ema_model.load_state_dict(ema_kwargs)
        return ema_model

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write the average as a model of ``model_cls`` (built from ``model_config``) into
        ``path``, the EMA's settings in its config (diffusers' layout)."""
        if self.model_cls is None:
            raise ValueError("`save_pretrained` can only be used if `model_cls` was defined at __init__.")
        if self.model_config is None:
            raise ValueError("`save_pretrained` can only be used if `model_config` was defined at __init__.")
        model = self.model_cls.from_config(self.model_config)
        state_dict = self.state_dict()
        state_dict.pop("shadow_params", None)
        model.register_to_config(**state_dict)
        self.copy_to(model.parameters())
        model.save_pretrained(path)

    # -- the update -----------------------------------------------------------------------------

    def get_decay(self, optimization_step: int) -> float:
        """:math:`\\beta_t` at ``optimization_step`` :math:`t` (the class docstring's formula)."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_ema_warmup:
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        value = min(value, self.decay)
        return max(value, self.min_decay)

    def step(self, parameters: Iterable[Tensor] | nn.Module) -> None:
        """Fold the parameters' current values into the shadows (after ``optimizer.step()``):

        .. math:: s_i \\leftarrow s_i - (1 - \\beta_t)\\,(s_i - \\theta_i)

        with :math:`t` = ``optimization_step + 1`` (see the class docstring); a parameter
        with ``requires_grad=False`` is copied. Everything is checked before a tensor or a
        counter changes (``decay`` and ``min_decay`` must be in :math:`[0, 1]`)."""
        if isinstance(parameters, nn.Module):
            _deprecated(
                "passing a `torch.nn.Module` to `ExponentialMovingAverage.step`",
                "Please pass the parameters of the module instead.",
            )
            parameters = parameters.parameters()
        params = as_tensor_list("parameters", parameters)
        check_number("decay", self.decay, 0.0, 1.0)
        check_number("min_decay", self.min_decay, 0.0, 1.0)
        t = self.optimization_step + 1
        decay = self.get_decay(t)
        self._fused.average_(self.shadow_params, params, 1 - decay, copy_frozen=True)
        self.optimization_step = t
        self.cur_decay_value = decay

    # -- using the average ----------------------------------------------------------------------

    def copy_to(self, parameters: Iterable[Tensor]) -> None:
        """Write the shadows into ``parameters`` (cast to their dtype and device). Lengths and
        shapes are checked first; a mismatch changes nothing."""
        copy_tensors_(as_tensor_list("parameters", parameters), self.shadow_params, "shadow_params")

    def pin_memory(self) -> None:
        """Move the shadows to pinned host memory (for non-blocking copies when offloading)."""
        self.shadow_params = [p.pin_memory() for p in self.shadow_params]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None, non_blocking: bool = False
    ) -> None:
        """Move the shadows to ``device``; cast the floating ones to ``dtype``."""
        self.shadow_params = [
            p.to(device=device, dtype=dtype, non_blocking=non_blocking)
            if p.is_floating_point()
            else p.to(device=device, non_blocking=non_blocking)
            for p in self.shadow_params
        ]

    def store(self, parameters: Iterable[Tensor]) -> None:
        """Keep CPU copies of ``parameters`` in ``temp_stored_params``, for :meth:`restore`."""
        self.temp_stored_params = [p.detach().cpu().clone() for p in as_tensor_list("parameters", parameters)]

    def restore(self, parameters: Iterable[Tensor]) -> None:
        """Write the values kept by :meth:`store` back into ``parameters``, and drop them."""
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        copy_tensors_(as_tensor_list("parameters", parameters), self.temp_stored_params, "temp_stored_params")
        self.temp_stored_params = None

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """diffusers' layout: the settings, ``optimization_step`` and ``shadow_params``
        (references to the tensors, not copies)."""
        return {
            "decay": self.decay,
            "min_decay": self.min_decay,
            "optimization_step": self.optimization_step,
            "update_after_step": self.update_after_step,
            "use_ema_warmup": self.use_ema_warmup,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "shadow_params": self.shadow_params,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict`'s output, or diffusers' (a missing key keeps its value, as in
        diffusers). The shadows are copied into the dtype and device of those they replace, and
        must match them in number and shape. Everything is checked first: a bad state raises
        :class:`ValueError` and changes nothing."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}")

        def get(key: str) -> Any:
            return state_dict.get(key, getattr(self, key))

        decay, min_decay, power, inv_gamma = get("decay"), get("min_decay"), get("power"), get("inv_gamma")
        check_number("decay", decay, 0.0, 1.0)
        check_number("min_decay", min_decay, 0.0, 1.0)
        optimization_step = check_int("optimization_step", get("optimization_step"), 0)
        update_after_step = check_int("update_after_step", get("update_after_step"), 0)
        use_ema_warmup = _check_bool("use_ema_warmup", get("use_ema_warmup"))
        check_number("inv_gamma", inv_gamma, 0.0, open_low=True)
        check_number("power", power, 0.0, open_low=True)
        new = None
        shadows = state_dict.get("shadow_params")
        if shadows is not None:
            if not isinstance(shadows, list):
                raise ValueError(f"shadow_params must be a list, got {type(shadows).__name__}")
            shadows = as_tensor_list("shadow_params", shadows)
            current = self.shadow_params
            if len(shadows) != len(current):
                raise ValueError(f"state_dict holds {len(shadows)} shadow_params, the average {len(current)}")
            for i, (t, c) in enumerate(zip(shadows, current, strict=True)):
                if t.shape != c.shape:
                    raise ValueError(
                        f"shadow_params[{i}] has shape {tuple(t.shape)} in state_dict but {tuple(c.shape)} here"
                    )
            pairs = zip(shadows, current, strict=True)
            new = [t.detach().to(device=c.device, dtype=c.dtype, copy=True) for t, c in pairs]
        self.decay = decay
        self.min_decay = min_decay
        self.optimization_step = optimization_step
        self.update_after_step = update_after_step
        self.use_ema_warmup = use_ema_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        if new is not None:
            self.shadow_params = new
