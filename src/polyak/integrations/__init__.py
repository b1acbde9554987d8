"""Integrations with training frameworks: ``lightning``, ``transformers`` and ``mmengine``.

Each submodule imports its framework; ``import polyak`` imports none of them. They are reached as
attributes (``polyak.integrations.lightning.EMA``), imported on first use; install the extra
first: ``polyak[lightning]``, ``polyak[transformers]``, ``polyak[mmengine]``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__: list[str] = []

_FRAMEWORKS = frozenset({"lightning", "lightning_eval", "transformers", "mmengine"})


def __getattr__(name: str) -> Any:
    if name in _FRAMEWORKS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_FRAMEWORKS})
