"""The tensor operations the update plans are built from, shared by :mod:`polyak.engine` and
:mod:`polyak.gpu`: the multi-tensor ``lerp_`` with a weight that is never read on the host,
1-d views over tensors that lie end to end in one storage, and chunk ranges."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Union

import torch
from torch import Tensor

__all__ = ["Weight", "adjacent", "chunk_ranges", "flat_view", "foreach_lerp_"]

#: An update's weight: a host float, or a 0-d tensor on the average's device.
Weight = Union[float, Tensor]  # noqa: UP007 (a runtime alias)


def foreach_lerp_(dst: list[Tensor], src: list[Tensor], weight: Weight) -> None:
    """:math:`d \\leftarrow d + w\\,(s - d)` for every pair, one multi-tensor kernel. A tensor
    weight goes through the Tensor[] overload, which reads it on the device (a 0-d tensor
    passed as a Scalar would be read back to the host)."""
    if isinstance(weight, Tensor):
        torch._foreach_lerp_(dst, src, [weight] * len(dst))
    else:
        torch._foreach_lerp_(dst, src, weight)


def flat_view(first: Tensor, numel: int) -> Tensor:
    """A 1-d view of ``numel`` elements of ``first``'s storage, starting where ``first`` does."""
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (numel,))


def adjacent(a: Tensor, b: Tensor) -> bool:
    """Whether contiguous ``b`` starts in memory where contiguous ``a`` ends."""
    return (
        a.is_contiguous()
        and b.is_contiguous()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() + a.numel() == b.storage_offset()
    )


def chunk_ranges(sizes: list[int], limit: int) -> Iterator[tuple[int, int]]:
    """Consecutive items in [start, stop) ranges of at most ``limit`` elements (an item larger
    than ``limit`` stands alone)."""
    start, used = 0, 0
    for i, n in enumerate(sizes):
        if used and used + n > limit:
            yield start, i
            start, used = i, 0
        used += n
    if start < len(sizes):
        yield start, len(sizes)
