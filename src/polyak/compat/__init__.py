"""Drop-in replacements for other libraries' EMA classes, on polyak's fused engine.

* :class:`polyak.compat.torch_ema.ExponentialMovingAverage`: torch_ema's class;
* :class:`polyak.compat.diffusers.EMAModel`: ``diffusers.training_utils.EMAModel``.

Each keeps its peer's constructor, attributes, methods and ``state_dict`` layout, so that a
training script changes one import line; neither imports its peer. What they share lives here:
:class:`FusedShadows`, the update of a list of shadow tensors toward a list of tensors, matched
by position, with one fused kernel per (device, dtype) group
(:class:`~polyak.engine.AveragingEngine`), and the checked copies behind ``copy_to`` and
``restore``.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import AveragingEngine, flatten_tensors_
from ..models import average_dtype

__all__ = ["FusedShadows", "as_tensor_list", "new_shadows", "copy_tensors_"]

_data_ptr = Tensor.data_ptr
_requires_grad = operator.attrgetter("requires_grad")
_shape = operator.attrgetter("shape")
_data = operator.attrgetter("data")


def as_tensor_list(name: str, values: Iterable[Any]) -> list[Tensor]:
    """``values`` as a list, each checked to be a tensor (:class:`ValueError` naming
    ``name[i]`` otherwise; :class:`TypeError` if ``values`` is not iterable)."""
    if isinstance(values, Tensor):
        raise TypeError(f"{name} must be an iterable of tensors (e.g. model.parameters()), got a single tensor")
    out = list(values)
    if not all(map(isinstance, out, itertools.repeat(Tensor))):
        i = next(i for i, t in enumerate(out) if not isinstance(t, Tensor))
        raise ValueError(f"{name}[{i}] must be a tensor, got {type(out[i]).__name__}")
    return out


def new_shadows(params: Sequence[Tensor]) -> list[Tensor]:
    """Detached copies of ``params``: a float16/bfloat16 (or float8) tensor's in float32, every
    other tensor in its own dtype, each on its tensor's device; laid out in one buffer per
    (device, dtype), so that runs of small tensors are updated together."""
    shadows = [p.detach().to(dtype=average_dtype(p, None), copy=True) for p in params]
    flatten_tensors_([s for s in shadows if s.is_contiguous()])
    return shadows


def copy_tensors_(dst: Sequence[Tensor], src: Sequence[Tensor], what: str) -> None:
    """``dst[i] <- src[i]`` for every ``i``, cast to ``dst[i]``'s dtype and device, in one fused
    copy (``torch._foreach_copy_``) into the tensors' ``.data``. Lengths and shapes are checked
    first, so a mismatch (:class:`ValueError` for the lengths, :class:`RuntimeError` for a
    shape, as a failed ``copy_`` raises) changes nothing; ``what`` names the source in the
    message."""
    if len(dst) != len(src):
        raise ValueError(f"{len(dst)} parameters but {len(src)} {what}")
    i = _shape_mismatch(dst, src)
    if i is not None:
        raise RuntimeError(
            f"{what}[{i}] has shape {tuple(src[i].shape)} but parameter {i} has shape {tuple(dst[i].shape)}"
        )
    if dst:
        with torch.no_grad():
            torch._foreach_copy_(list(map(_data, dst)), list(map(_data, src)))


def _shape_mismatch(a: Sequence[Tensor], b: Sequence[Tensor]) -> int | None:
    """The first position where two lists of tensors of one length differ in shape, or None."""
    if list(map(_shape, a)) == list(map(_shape, b)):
        return None
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x.shape != y.shape)


class _Tensors(nn.Module):
    """Tensors registered by position (``"0"``, ``"1"``, ...) without a copy: Parameters as
    parameters, other tensors as persistent buffers."""

    def __init__(self, tensors: Sequence[Tensor], *, as_buffers: bool = False) -> None:
        super().__init__()
        for i, t in enumerate(tensors):
            if isinstance(t, nn.Parameter) and not as_buffers:
                self.register_parameter(str(i), t)
            else:
                self.register_buffer(str(i), t)


def _distinct(name: str, tensors: Sequence[Tensor]) -> None:
    if len(set(map(id, tensors))) != len(tensors):
        first: dict[int, int] = {}
        for i, t in enumerate(tensors):
            if id(t) in first:
                raise ValueError(f"{name}[{first[id(t)]}] and {name}[{i}] are the same tensor")
            first[id(t)] = i


class FusedShadows:
    """The update of a list of shadow tensors toward a list of tensors, matched by position:

    .. math:: s_i \\leftarrow s_i + w\\,(\\theta_i - s_i)

    for every floating shadow :math:`s_i` and tensor :math:`\\theta_i`, with :math:`w` the
    weight (one minus the decay); integer tensors, and those marked in ``frozen``, are copied
    instead. One ``torch._foreach_lerp_`` per (device, dtype) group of the engine; a shadow of
    another dtype or device than its tensor (an fp32 shadow of a bf16 parameter, a shadow kept
    on the CPU) is staged through a bounded scratch buffer.

    The plan is built once and kept while the shadows and the tensors are the same objects
    with the same data (checked per call by C-level passes), and rebuilt when either list
    changes (``shadow_params`` assigned or moved, ``model.to()``). It holds references to the
    last tensors it updated from; :meth:`clear` drops them, and a copy or pickle of the
    object starts empty.

    >>> import torch
    >>> s, p = [torch.zeros(2)], [torch.ones(2)]
    >>> FusedShadows().average_(s, p, 0.25)
    >>> s[0].tolist()
    [0.25, 0.25]
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget the plan and the tensors it refers to."""
        self.default: list[Tensor] | None = None
        self._shadows: list[Tensor] = []
        self._shadow_ptrs: list[int] = []
        self._target: nn.Module | None = None
        self._params: list[Tensor] = []
        self._param_ptrs: list[int] = []
        self._source: nn.Module | None = None
        self._engines: dict[tuple[bool, ...] | None, AveragingEngine] = {}
        self._paired = False

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.clear()

    def _same(self, new: Sequence[Tensor], old: list[Tensor], ptrs: list[int]) -> bool:
        if len(new) != len(old) or not all(map(operator.is_, new, old)):
            return False
        return list(map(_data_ptr, new)) == ptrs

    def prepare(self, shadows: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        """Check ``shadows`` against ``params`` (lengths, shapes, distinct tensors) and build the
        plan if either changed; raises before anything is written."""
        if not self._same(shadows, self._shadows, self._shadow_ptrs):
            checked = as_tensor_list("shadow_params", shadows)
            _distinct("shadow_params", checked)
            self._target = _Tensors(checked, as_buffers=True)
            self._shadows, self._shadow_ptrs = checked, list(map(_data_ptr, checked))
            self._engines = {}
            self._paired = False
        if not self._same(params, self._params, self._param_ptrs):
            checked = as_tensor_list("parameters", params)
            _distinct("parameters", checked)
            self._source = _Tensors(checked)
            self._params, self._param_ptrs = checked, list(map(_data_ptr, checked))
            self._paired = False
        if not self._paired:
            if len(self._shadows) != len(self._params):
                raise ValueError(
                    f"{len(self._params)} parameters given but the average holds {len(self._shadows)} shadow_params"
                )
            i = _shape_mismatch(self._shadows, self._params)
            if i is not None:
                raise RuntimeError(
                    f"shadow_params[{i}] has shape {tuple(self._shadows[i].shape)} but parameter {i} has shape "
                    f"{tuple(self._params[i].shape)}"
                )
            self._paired = True

    def average_(
        self, shadows: Sequence[Tensor], params: Sequence[Tensor], weight: float, *, copy_frozen: bool = False
    ) -> None:
        """Move ``shadows`` toward ``params`` by ``weight`` in place (see the class). With
        ``copy_frozen`` a tensor whose ``requires_grad`` is False is copied instead
        (diffusers' rule). Everything is checked before a tensor changes."""
        self.prepare(shadows, params)
        if not self._shadows:
            return
        key: tuple[bool, ...] | None = None
        if copy_frozen:
            grads = tuple(map(_requires_grad, self._params))
            key = None if all(grads) else grads
        engine = self._engines.get(key)
        if engine is None:
            assert self._target is not None
            kinds = {} if key is None else {str(i): "copy" for i, g in enumerate(key) if not g}
            engine = AveragingEngine(self._target, update_buffers=True, kinds=kinds)
            self._engines[key] = engine
        assert self._source is not None
        engine.average_(self._source, weight)
