"""Importing polyak is cheap: no framework, no compiler stack; the public names exist."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import polyak

#: Modules that ``import polyak`` must not pull in (integrations and heavy extras load lazily).
FORBIDDEN = (
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "transformers",
    "diffusers",
    "accelerate",
    "timm",
    "mmengine",
    "mmcv",
    "ema_pytorch",
    "safetensors",
    "torch._dynamo",
    "torch._inductor",
)

REPO = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _offenders(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


@pytest.mark.parametrize(
    "code",
    [
        "import polyak",
        # every submodule, present and future, but the integrations (which import their framework)
        "import importlib, pkgutil, polyak\n"
        "for m in pkgutil.walk_packages(polyak.__path__, 'polyak.'):\n"
        "    if not m.name.startswith('polyak.integrations.') and m.name != 'polyak.__main__':\n"
        "        importlib.import_module(m.name)",
        "from polyak import *",
    ],
    ids=["import-polyak", "every-submodule", "star-import"],
)
def test_import_pulls_in_no_heavy_modules(code: str) -> None:
    modules = _modules_after(code)
    assert "polyak" in modules and "torch" in modules  # the check sees real imports
    assert _offenders(modules) == []


def test_building_and_updating_an_average_pulls_in_no_compiler() -> None:
    code = (
        "import torch, polyak\n"
        "m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))\n"
        "e = polyak.ExponentialMovingAverage(m, momentum=0.1)\n"
        "e.update_parameters(m); e.update_parameters(m); e.state_dict()\n"
        "polyak.update_bn([torch.randn(3, 2)], m)"
    )
    assert [m for m in _offenders(_modules_after(code)) if m.startswith("torch.")] == []


SUBMODULES = sorted(m.name for m in pkgutil.walk_packages(polyak.__path__, "polyak.") if m.name != "polyak.__main__")


@pytest.mark.parametrize("module", ["polyak", *SUBMODULES])
def test_all_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    if names is None:
        assert module != "polyak", "polyak must define __all__"
        pytest.skip(f"{module} defines no __all__")
    assert len(names) == len(set(names)), "duplicates in __all__"
    missing = [n for n in names if not hasattr(mod, n)]
    assert missing == []


def test_star_import_gives_all_names() -> None:
    namespace: dict[str, object] = {}
    exec("from polyak import *", namespace)
    assert set(polyak.__all__) <= set(namespace)
    for name in polyak.__all__:
        assert namespace[name] is getattr(polyak, name)


def test_version() -> None:
    assert isinstance(polyak.__version__, str) and polyak.__version__
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert polyak.__version__ == project["version"]


def test_py_typed_marker_exists_and_is_packaged() -> None:
    assert (Path(polyak.__file__).parent / "py.typed").is_file()
    assert (REPO / "src" / "polyak" / "py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["polyak"]


def test_submodules_are_attributes_without_an_import_of_their_own() -> None:
    """``polyak.distributed.save`` and ``polyak.integrations.lightning.EMA`` after a bare ``import
    polyak`` (PEP 562), each imported on first use: the distributed module only when asked for,
    the framework only when its integration is."""
    code = (
        "import sys, polyak\n"
        "assert 'polyak.distributed' not in sys.modules and 'lightning' not in sys.modules\n"
        "save = polyak.distributed.save\n"
        "assert 'lightning' not in sys.modules\n"
        "ema = polyak.integrations.lightning.EMA\n"
        "print(save.__module__, ema.__module__, polyak.schedules.Warmup.__module__, polyak.checkpoint.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == [
        "polyak.distributed",
        "polyak.integrations.lightning",
        "polyak.schedules",
        "polyak.checkpoint",
    ]


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'formats'"):
        polyak.formats  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        polyak.integrations.nope  # noqa: B018


def test_top_level_is_what_a_training_script_types() -> None:
    assert set(polyak.__all__) == {
        "BaseAveragedModel",
        "ExponentialMovingAverage",
        "MomentumAnnealingEMA",
        "StochasticWeightAverage",
        "RampUpEMA",
        "CosineEMA",
        "ExpMomentumEMA",
        "AveragedModel",
        "AverageGroup",
        "ParameterAverage",
        "PostHocEMA",
        "update_bn",
        "soft_update",
        "hard_update",
        "flatten_parameters",
        "schedules",
        "checkpoint",
        "distributed",
        "integrations",
    }
