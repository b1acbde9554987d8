"""Every script in examples/ runs to the end and prints what it is there to show.

Each example runs as a subprocess (``[sys.executable, path]``) in a temporary working directory,
with one OpenMP thread, offline. The tests check the exit status, the key result lines, that
nothing is left in the working directory, and, where an example says that its averages beat the
live weights, that the numbers it prints say so. An example whose framework is not installed is
skipped. On a 2-core CPU the file takes about 40 s (55 s with the machine busy), most of it
importing the frameworks; each test has a timeout of a few times its usual run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NUMBER = r"([0-9]+\.[0-9]+)"


def run_example(name: str, cwd: Path, *args: str, timeout: float) -> str:
    """Runs ``examples/<name>`` and returns its stdout; fails with its output if it fails."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def needs(*modules: str) -> pytest.MarkDecorator:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


def line(pattern: str, out: str) -> re.Match:
    match = re.search(pattern, out, flags=re.MULTILINE)
    assert match, f"no line matching {pattern!r} in:\n{out}"
    return match


def test_every_example_is_tested() -> None:
    tested = {"plain_loop.py", "posthoc_ema.py", "lightning_ema.py", "hf_trainer_ema.py", "mmengine_ema.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.timeout(40)
def test_plain_loop(tmp_path: Path) -> None:
    out = run_example("plain_loop.py", tmp_path, timeout=35)
    last = line(rf"^plain  epoch 4: live {NUMBER}  ema {NUMBER}  steps 40$", out)
    deployed = line(rf"^plain  deployed average: {NUMBER}$", out)
    assert deployed[1] == last[2]  # the checkpoint's state_dict is the average
    if importlib.util.find_spec("accelerate") is not None:
        line(r"^accel  epoch 4: live [0-9.]+  ema [0-9.]+  steps 40$", out)
    assert not list(tmp_path.iterdir())


@pytest.mark.timeout(60)
def test_posthoc_ema(tmp_path: Path) -> None:
    out = run_example("posthoc_ema.py", tmp_path, timeout=40)
    # the default folder is temporary: no path is printed for it, and the script says so
    line(r"^trained 2000 steps; 40 snapshots in a temporary folder, removed when this script exits", out)
    assert "/tmp" not in out and str(tmp_path) not in out
    line(rf"^  live weights +val loss {NUMBER}$", out)
    for sigma_rel in ("0.05", "0.10"):
        line(rf"^  tracked sigma_rel={sigma_rel} val loss {NUMBER}$", out)
    for sigma_rel in ("0.07", "0.15"):
        line(rf"^  synth\.  sigma_rel={sigma_rel} val loss {NUMBER} +\(profile error [0-9.e+-]+, 40 snapshots\)$", out)
    line(rf"^  synth\.  sigma_rel=0\.07 at step 1000: val loss {NUMBER}$", out)
    assert not list(tmp_path.iterdir())

    # a folder given by the user is kept, and named
    out = run_example(
        "posthoc_ema.py", tmp_path, "--steps", "200", "--every", "50", "--snapshot-dir", "snaps", timeout=15
    )
    line(r"^trained 200 steps; 8 snapshots in snaps$", out)
    assert len(list((tmp_path / "snaps").glob("phema-*.safetensors"))) == 8


@pytest.mark.timeout(75)
@needs("lightning")
def test_lightning_ema(tmp_path: Path) -> None:
    out = run_example("lightning_ema.py", tmp_path, timeout=70)
    line(r"^optimizer steps: 512; updates: 512$", out)
    rows = {}
    for name in ("live", "ema", "ema_slow"):
        m = line(rf"^  {name} +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER}$", out)
        rows[name] = dict(zip(("val_acc", "val_loss", "test_acc", "test_loss"), map(float, m.groups()), strict=True))
    # the docstring says the averages beat the live weights on the test split
    for name in ("ema", "ema_slow"):
        assert rows[name]["test_acc"] > rows["live"]["test_acc"], rows
        assert rows[name]["test_loss"] < rows["live"]["test_loss"], rows
    line(r"^last\.ckpt: state_dict is the EMA: True;", out)
    line(r"^  averages recorded: \['ema', 'ema_slow'\] \(primary 'ema'\)$", out)
    line(r"^resumed for one more epoch: 640 updates, val_acc \(ema\) [0-9.]+$", out)
    assert not list(tmp_path.iterdir())


@pytest.mark.timeout(60)
@needs("transformers")
def test_hf_trainer_ema(tmp_path: Path) -> None:
    out = run_example("hf_trainer_ema.py", tmp_path, timeout=55)
    for step in (100, 200, 300):
        line(rf"^  step {step}: eval_loss {NUMBER}  eval_ema_loss {NUMBER}  eval_ema_slow_loss {NUMBER}$", out)
    line(r"^averaging state: \{'ema': 200, 'ema_slow': 200\}$", out)
    mse = {name: float(line(rf"^  {name} +test mse {NUMBER}$", out)[1]) for name in ("live", "ema", "ema_slow")}
    # the docstring says the averages beat the live weights on the test split
    assert mse["ema"] < mse["live"] and mse["ema_slow"] < mse["live"], mse
    line(r"^exported model == the EMA: True$", out)
    assert "{'loss'" not in out  # the raw training logs are not printed
    assert not list(tmp_path.iterdir())


@pytest.mark.timeout(60)
@needs("mmengine")
def test_mmengine_ema(tmp_path: Path) -> None:
    out = run_example("mmengine_ema.py", tmp_path, timeout=55)
    line(r"^trained 80 iterations \(40 optimizer steps\); logged ema_momentum 0\.05$", out)
    line(rf"^validation with the average: mse {NUMBER}$", out)
    line(rf"^test with the average: \{{'regression/mse': {NUMBER}\}}$", out)
    line(r"^resumed average equals the uninterrupted one: True$", out)
    line(r"^checkpoint: \[.*'polyak'.*'state_dict'.*\] steps: 40$", out)
    # quiet: the result lines and a few warnings, no INFO logging (there were ~300 lines)
    logged = [x for x in out.splitlines() if " - mmengine - " in x]
    assert all(" - mmengine - WARNING - " in x for x in logged), logged
    assert any("Gradient accumulative may slightly decrease performance" in x for x in logged)  # one that matters
    assert len(out.splitlines()) <= 12, out
    assert not list(tmp_path.iterdir())
