"""Several averages of one model, updated together in one call."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from torch import nn

from .engine import average_many_
from .models import BaseAveragedModel

__all__ = ["AverageGroup"]


class AverageGroup:
    """Averages of the same model updated by one call that reads the model once for all.

    .. math:: \\bar\\theta_i \\leftarrow (1 - m_i)\\,\\bar\\theta_i + m_i\\,\\theta, \\quad i = 1 \\dots N

    where :math:`m_i` is average :math:`i`'s own (interval-compensated) momentum at its own
    ``steps``: each average follows its counting rule exactly as if updated alone, with any
    mix of schedules and intervals. Those that average on this call are updated by
    :func:`polyak.engine.average_many_`: each chunk of the model's tensors is read from
    memory once and folded into every average while it is in cache.

    Args:
        averages: the averages (a sequence, or a mapping from names), all built from the
            same model.
    """

    def __init__(self, averages: Mapping[str, BaseAveragedModel] | Sequence[BaseAveragedModel]) -> None:
        items = dict(averages) if isinstance(averages, Mapping) else {str(i): a for i, a in enumerate(averages)}
        if not items:
            raise ValueError("AverageGroup needs at least one average")
        for name, a in items.items():
            if not isinstance(a, BaseAveragedModel):
                raise ValueError(f"average {name!r} is a {type(a).__name__}, not a polyak averaged model")
        self.averages = items

    def __iter__(self) -> Iterator[BaseAveragedModel]:
        return iter(self.averages.values())

    def __len__(self) -> int:
        return len(self.averages)

    def __getitem__(self, name: str) -> BaseAveragedModel:
        return self.averages[name]

    def update_parameters(self, model: nn.Module) -> None:
        """One ``update_parameters(model)`` of every average, the averaging ones fused."""
        updates = [(a, a.next_update()) for a in self]  # decided before any tensor changes
        for a in self:
            a.check_model(model)
        fused = [(a, u) for a, u in updates if u.kind == "average"]
        if fused:
            engines, weights = [a.engine for a, _ in fused], [u.weight for _, u in fused]
            average_many_(engines, model, weights, steps=[a.steps for a, _ in fused])  # type: ignore[arg-type]
        for a, u in updates:
            if u.kind != "average":
                a.apply_update(model, u)
        for a, u in updates:
            a.commit_update(u)
