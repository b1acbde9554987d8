"""torch_ema's ``ExponentialMovingAverage`` (0.3) on polyak's fused engine.

Change ``from torch_ema import ExponentialMovingAverage`` to
``from polyak.compat.torch_ema import ExponentialMovingAverage``: the constructor, the attributes
(``decay``, ``num_updates``, ``shadow_params``, ``collected_params``, each read and written as in
torch_ema), the methods and the ``state_dict`` layout are torch_ema's, and states load both ways.
Deliberate differences (docs/migration/torch-ema.md): a float16/bfloat16 parameter gets a float32
shadow; ``load_state_dict`` keeps the shadows' dtype and device and changes nothing when it fails;
``store()`` keeps detached copies; the parameters are held by reference, not weakly.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from ..models import average_dtype
from ..validation import check_int, check_number
from . import FusedShadows, as_tensor_list, copy_tensors_, new_shadows

__all__ = ["ExponentialMovingAverage"]

_KEYS = ("decay", "num_updates", "shadow_params", "collected_params")


class ExponentialMovingAverage:
    """An exponential moving average of a set of tensors: torch_ema's class, updated by polyak's
    fused engine.

    .. math::

        \\beta_n = \\begin{cases} \\min\\left(\\beta, \\frac{1 + n}{10 + n}\\right) &
            \\text{use\\_num\\_updates} \\\\ \\beta & \\text{otherwise} \\end{cases} \\qquad
        s_i \\leftarrow s_i - (1 - \\beta_n)\\,(s_i - \\theta_i)

    at the :math:`n`-th :meth:`update` (``num_updates`` counts them), for every shadow
    :math:`s_i` (``shadow_params[i]``) and parameter :math:`\\theta_i`, where :math:`\\beta` is
    ``decay``. The shadows start as copies of the parameters. Every given tensor is averaged,
    trainable or not; integer tensors are copied. The update is one fused ``lerp_`` per
    (device, dtype) group, so the numbers equal torch_ema's up to the rounding of the last
    bit; a float16/bfloat16 parameter gets a float32 shadow (``to(dtype=...)`` gives torch_ema's
    low-precision shadow).

    Args:
        parameters: the tensors to average (e.g. ``model.parameters()``).
        decay: :math:`\\beta`, in :math:`[0, 1]`.
        use_num_updates: warm the decay up as :math:`(1 + n)/(10 + n)`.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> ema = ExponentialMovingAverage([w], decay=0.75, use_num_updates=False)
    >>> with torch.no_grad():
    ...     _ = w.fill_(1.0)
    >>> ema.update()
    >>> ema.shadow_params[0].tolist()
    [0.25, 0.25]
    """

    def __init__(self, parameters: Iterable[Tensor], decay: float, use_num_updates: bool = True) -> None:
        check_number("decay", decay, 0.0, 1.0)
        if not isinstance(use_num_updates, bool):
            raise ValueError(f"use_num_updates must be a bool, got {use_num_updates!r}")
        params = as_tensor_list("parameters", parameters)
        self._fused = FusedShadows()
        self.decay = decay
        self.num_updates: int | None = 0 if use_num_updates else None
        self.shadow_params = new_shadows(params)
        self.collected_params: list[Tensor] | None = None
        # As torch_ema: the parameters by weak reference, so that a copy of the average refers
        # to the same model. The fused plan holds them strongly while it lives.
        self._params_refs = [weakref.ref(p) for p in params]
        self._fused.default = params

    @property
    def shadow_params(self) -> list[Tensor]:
        """The averaged tensors, by position (the list itself: assigning an element or the whole
        list replaces shadows, as in torch_ema)."""
        return self._shadow_params

    @shadow_params.setter
    def shadow_params(self, value: list[Tensor]) -> None:
        self._shadow_params = value
        self._fused.clear()  # the plan refers to the old shadows: let them go

    def _get_parameters(self, parameters: Iterable[Tensor] | None) -> list[Tensor]:
        if parameters is None:
            params = self._fused.default
            if params is None:
                params = [r() for r in self._params_refs]
                if any(p is None for p in params):
                    raise ValueError(
                        "(One of) the parameters with which this ExponentialMovingAverage was initialized no "
                        "longer exists (was garbage collected); please either provide `parameters` explicitly "
                        "or keep the model to which they belong from being garbage collected."
                    )
                self._fused.default = params
            return params
        params = as_tensor_list("parameters", parameters)
        if len(params) != len(self.shadow_params):
            raise ValueError(
                f"Number of parameters passed as argument ({len(params)}) is different from number of shadow "
                f"parameters maintained by this ExponentialMovingAverage ({len(self.shadow_params)})"
            )
        return params

    def update(self, parameters: Iterable[Tensor] | None = None) -> None:
        """Fold the parameters' current values into the shadows (after ``optimizer.step()``):

        .. math:: s_i \\leftarrow s_i - (1 - \\beta_n)\\,(s_i - \\theta_i)

        with :math:`\\beta_n` as in the class docstring; ``num_updates`` is incremented
        first when it is not None. ``parameters`` defaults to those given at construction.
        Everything is checked before a tensor or a counter changes."""
        params = self._get_parameters(parameters)
        decay = check_number("decay", self.decay, 0.0, 1.0)
        n = None if self.num_updates is None else self.num_updates + 1
        if n is not None:
            decay = min(decay, (1 + n) / (10 + n))
        self._fused.average_(self.shadow_params, params, 1.0 - decay)
        if n is not None:
            self.num_updates = n

    def copy_to(self, parameters: Iterable[Tensor] | None = None) -> None:
        """Write the shadows into the parameters (cast to their dtype and device). Shapes are
        checked first: a mismatch raises :class:`RuntimeError` and changes nothing."""
        copy_tensors_(self._get_parameters(parameters), self.shadow_params, "shadow_params")

    def store(self, parameters: Iterable[Tensor] | None = None) -> None:
        """Keep detached copies of the parameters in ``collected_params``, for :meth:`restore`."""
        self.collected_params = [p.detach().clone() for p in self._get_parameters(parameters)]

    def restore(self, parameters: Iterable[Tensor] | None = None) -> None:
        """Write the values kept by :meth:`store` back into the parameters (they stay kept)."""
        if self.collected_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        copy_tensors_(self._get_parameters(parameters), self.collected_params, "collected_params")

    @contextlib.contextmanager
    def average_parameters(self, parameters: Iterable[Tensor] | None = None) -> Iterator[None]:
        """Use the shadows in the parameters for the block: :meth:`store`, :meth:`copy_to`, and
        :meth:`restore` when the block ends, also when it raises."""
        params = self._get_parameters(parameters)
        self.store(params)
        self.copy_to(params)
        try:
            yield
        finally:
            self.restore(params)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Move the shadows (and ``collected_params``) to ``device``; cast the floating ones to
        ``dtype``."""
        self.shadow_params = [_moved(p, device, dtype) for p in self.shadow_params]
        if self.collected_params is not None:
            self.collected_params = [_moved(p, device, dtype) for p in self.collected_params]

    def state_dict(self) -> dict[str, Any]:
        """``decay``, ``num_updates``, ``shadow_params`` and ``collected_params``, torch_ema's
        layout (references to the tensors, not copies)."""
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow_params": self.shadow_params,
            "collected_params": self.collected_params,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict`'s output, or torch_ema's. The tensors are copied, each shadow
        into the dtype and device of the shadow it replaces, each kept parameter into its
        parameter's. Everything is checked first: a bad state raises :class:`ValueError` and
        changes nothing. Shapes are not compared (as torch_ema): a shadow of the wrong shape
        fails at the next :meth:`update` or :meth:`copy_to`, which then change nothing."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = [k for k in _KEYS if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict is missing {missing}")
        decay = state_dict["decay"]
        check_number("decay", decay, 0.0, 1.0)
        num_updates = state_dict["num_updates"]
        if num_updates is not None:
            check_int("num_updates", num_updates, 0)
        shadows = state_dict["shadow_params"]
        if not isinstance(shadows, list):
            raise ValueError(f"shadow_params must be a list, got {type(shadows).__name__}")
        shadows = as_tensor_list("shadow_params", shadows)
        if len(shadows) != len(self._params_refs):
            raise ValueError(
                f"Tried to `load_state_dict()` with the wrong number of parameters in the saved state: "
                f"{len(shadows)} shadow_params for {len(self._params_refs)} parameters"
            )
        collected = state_dict["collected_params"]
        if collected is not None:
            if not isinstance(collected, list):
                raise ValueError(f"collected_params must be a list or None, got {type(collected).__name__}")
            collected = as_tensor_list("collected_params", collected)
            if len(collected) != len(shadows):
                raise ValueError(f"{len(collected)} collected_params but {len(shadows)} shadow_params")
        params = [r() for r in self._params_refs]
        current = self.shadow_params
        if len(current) == len(shadows):
            new = [_copied(t, a.device, a.dtype) for t, a in zip(shadows, current, strict=True)]
        else:  # shadow_params was replaced by a list of another length: start from the parameters'
            new = [
                _copied(t, None, None) if p is None else _copied(t, p.device, average_dtype(p, None))
                for t, p in zip(shadows, params, strict=True)
            ]
        kept = None
        if collected is not None:
            kept = [
                _copied(t, None, None) if p is None else _copied(t, p.device, p.dtype)
                for t, p in zip(collected, params, strict=True)
            ]
        self.decay = decay
        self.num_updates = num_updates
        self.shadow_params = new
        self.collected_params = kept


def _moved(t: Tensor, device: torch.device | str | None, dtype: torch.dtype | None) -> Tensor:
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)


def _copied(t: Tensor, device: torch.device | None, dtype: torch.dtype | None) -> Tensor:
    """A detached copy of ``t`` on ``device`` in ``dtype`` (``t``'s own where None)."""
    return t.detach().to(device=device, dtype=dtype, copy=True)
