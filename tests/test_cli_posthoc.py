"""``polyak posthoc``: the command line over ``polyak.posthoc.synthesize``.

Run as a real subprocess (the ``polyak`` entry point installed beside the interpreter) and
in-process through ``polyak.cli.main``. The coefficients the summary prints are checked
against EDM2's ``solve_posthoc_coefficients`` transcribed in numpy; the written file against
``synthesize()`` (the command must add nothing of its own). Errors must end the command with a
non-zero code, exactly one line on stderr naming the problem, and no output file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from polyak import PostHocEMA
from polyak.cli import main
from polyak.posthoc import synthesize


def edm2_gamma(sigma_rel: float) -> float:
    """EDM2 ``std_to_exp``: the largest real root of the cubic, by ``numpy.roots``."""
    t = sigma_rel**-2
    return float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())


def edm2_solve(times: list[int], gammas: list[float], t_out: float, g_out: float) -> np.ndarray:
    """EDM2 ``solve_posthoc_coefficients`` (phema.py), transcribed."""

    def corr(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
        exponent = np.where(t_a < t_b, g_b, -g_a)
        return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** exponent / ((g_a + g_b + 1) * np.maximum(t_a, t_b))

    t = np.asarray(times, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    a = corr(t[:, None], g[:, None], t[None, :], g[None, :])
    b = corr(t[:, None], g[:, None], np.array([[t_out]]), np.array([[g_out]]))
    x = np.linalg.solve(a, b)[:, 0]
    return x / x.sum()


def polyak_command() -> list[str]:
    exe = Path(sys.executable).parent / "polyak"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "polyak"]


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*polyak_command(), *map(str, args)], capture_output=True, text=True, timeout=120)


STEPS, EVERY = 400, 50


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 steps of a tiny model (with BatchNorm) snapshotted every 50 steps for 0.05 and 0.10."""
    d = tmp_path_factory.mktemp("snapshots")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    ema = PostHocEMA(model, (0.05, 0.10), snapshot_every=EVERY, snapshot_dir=d, batch_size=8)
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen), alpha=0.01)
            if step % 25 == 0:  # move the BatchNorm statistics now and then
                model.train()
                model(torch.randn(8, 8, generator=gen))
        ema.update_parameters(model)
    return d


def summary_coefficients(stderr: str) -> dict[str, float]:
    """``{file name: coefficient}`` from the lines ``  +0.123456  name.safetensors``."""
    return {m[2]: float(m[1]) for m in re.finditer(r"^\s+([+-]\d+\.\d+)\s+(\S+\.safetensors)$", stderr, re.M)}


def expected_coefficients(names: list[str], sigma_rel: float, at_step: int) -> dict[str, float]:
    steps = [int(n.rsplit("-", 1)[1].split(".")[0]) for n in names]
    gammas = [edm2_gamma(float(n.split("-")[1])) for n in names]
    return dict(zip(names, edm2_solve(steps, gammas, at_step, edm2_gamma(sigma_rel)).tolist(), strict=True))


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# -- success --------------------------------------------------------------------------------------


def test_subprocess_writes_the_synthesis(snapshots: Path, tmp_path: Path) -> None:
    out = tmp_path / "ema-0.07.safetensors"
    r = cli("posthoc", "--snapshots", snapshots, "--sigma-rel", "0.07", "--out", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert_same_state(load_file(str(out)), synthesize(snapshots, 0.07))
    # the summary lists every snapshot used with its coefficient (EDM2's, to the 6 digits shown)
    got = summary_coefficients(r.stderr)
    names = sorted(p.name for p in snapshots.iterdir())
    assert sorted(got) == names
    expected = expected_coefficients(names, 0.07, STEPS)
    for name in names:
        assert got[name] == pytest.approx(expected[name], abs=2e-6), name
    assert "sigma_rel=0.0700" in r.stderr and f"at step {STEPS}" in r.stderr
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert float(meta["sigma_rel"]) == pytest.approx(0.07, rel=1e-12)
    assert meta["step"] == str(STEPS)
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left


def test_subprocess_help() -> None:
    r = cli("posthoc", "--help")
    assert r.returncode == 0
    for option in ("--snapshots", "--sigma-rel", "--gamma", "--at-step", "--out"):
        assert option in r.stdout


def test_in_process_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "posthoc" in capsys.readouterr().out


def test_in_process(snapshots: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.safetensors"
    assert main(["posthoc", "--snapshots", str(snapshots), "--sigma-rel", "0.07", "--out", str(out)]) == 0
    assert_same_state(load_file(str(out)), synthesize(snapshots, 0.07))
    err = capfd.readouterr().err
    assert len(summary_coefficients(err)) == 2 * STEPS // EVERY
    assert f"wrote {len(load_file(str(out)))} tensors to {out}" in err


def test_at_step(snapshots: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.safetensors"
    assert (
        main(["posthoc", "--snapshots", str(snapshots), "--sigma-rel", "0.07", "--at-step", "200", "-o", str(out)]) == 0
    )
    assert_same_state(load_file(str(out)), synthesize(snapshots, 0.07, at_step=200))
    got = summary_coefficients(capfd.readouterr().err)
    names = sorted(p.name for p in snapshots.iterdir() if int(p.stem.rsplit("-", 1)[1]) <= 200)
    assert sorted(got) == names  # the snapshots after step 200 are not used
    expected = expected_coefficients(names, 0.07, 200)
    for name in names:
        assert got[name] == pytest.approx(expected[name], abs=2e-6), name


def test_gamma_quiet_and_torch_output(snapshots: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    gamma = edm2_gamma(0.07)
    out = tmp_path / "a.pt"
    assert main(["posthoc", "--snapshots", str(snapshots), "--gamma", repr(gamma), "-q", "--out", str(out)]) == 0
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    saved = torch.load(out, weights_only=True)
    reference = synthesize(snapshots, 0.07)
    for k, v in reference.items():
        # the same gamma to ~1e-12, through numpy.roots and polyak's bisection
        torch.testing.assert_close(saved["state_dict"][k], v, rtol=1e-6, atol=1e-7)
    assert saved["metadata"]["step"] == str(STEPS)


# -- errors ---------------------------------------------------------------------------------------


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-40])


def _garbage_header(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[8:20] = b"{{{{{{{{{{{{"
    p.write_bytes(bytes(data))


def _bad_metadata(p: Path) -> None:
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
    meta["step"] = "three hundred"
    save_file(load_file(str(p)), str(p), metadata=meta)


def _nan_gamma(p: Path) -> None:
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
    meta["gamma"] = "nan"
    save_file(load_file(str(p)), str(p), metadata=meta)


DAMAGE = {
    "truncated": _truncate,
    "garbage-header": _garbage_header,
    "bad-metadata": _bad_metadata,
    "nan-gamma": _nan_gamma,
}
VICTIM = "phema-0.1000-000000300.safetensors"


def run_failing(args: list[str], out: Path, capfd: pytest.CaptureFixture[str]) -> str:
    code = main([*args, "--out", str(out)])
    captured = capfd.readouterr()
    assert code != 0
    assert not out.exists()
    if out.parent.exists():
        assert list(out.parent.iterdir()) == []  # no temporary file either
    lines = captured.err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {captured.err!r}"
    assert lines[0].startswith("polyak posthoc: error: ")
    return lines[0]


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_corrupt_snapshot(snapshots: Path, tmp_path: Path, kind: str, capfd: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "snaps"
    shutil.copytree(snapshots, d)
    DAMAGE[kind](d / VICTIM)
    line = run_failing(
        ["posthoc", "--snapshots", str(d), "--sigma-rel", "0.07"], tmp_path / "out" / "a.safetensors", capfd
    )
    assert VICTIM in line


def test_damage_found_while_reading(snapshots: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A snapshot whose header is fine but whose tensors differ from the others is found only
    when the files are read, after the summary was printed: the error is then the last line."""
    d = tmp_path / "snaps"
    shutil.copytree(snapshots, d)
    tensors = load_file(str(d / VICTIM))
    tensors["extra"] = torch.zeros(3)
    with safe_open(str(d / VICTIM), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, str(d / VICTIM), metadata=meta)
    out = tmp_path / "out" / "a.safetensors"
    assert main(["posthoc", "--snapshots", str(d), "--sigma-rel", "0.07", "--out", str(out)]) == 1
    last = capfd.readouterr().err.splitlines()[-1]
    assert last.startswith("polyak posthoc: error: ") and VICTIM in last
    assert not out.exists()


def test_missing_directory(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    line = run_failing(
        ["posthoc", "--snapshots", str(tmp_path / "nope"), "--sigma-rel", "0.07"], tmp_path / "out" / "a.pt", capfd
    )
    assert str(tmp_path / "nope") in line and "does not exist" in line


def test_no_snapshot_before_at_step(snapshots: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    args = ["posthoc", "--snapshots", str(snapshots), "--sigma-rel", "0.07", "--at-step", "49"]
    line = run_failing(args, tmp_path / "out" / "a.safetensors", capfd)
    assert "step 49" in line


@pytest.mark.parametrize("value", ["0.5", "0", "-0.1", "nan"])
def test_bad_sigma_rel(snapshots: Path, tmp_path: Path, value: str, capfd: pytest.CaptureFixture[str]) -> None:
    args = ["posthoc", "--snapshots", str(snapshots), "--sigma-rel", value]
    line = run_failing(args, tmp_path / "out" / "a.safetensors", capfd)
    assert "sigma_rel" in line and value in line


def test_subprocess_error(snapshots: Path, tmp_path: Path) -> None:
    d = tmp_path / "snaps"
    shutil.copytree(snapshots, d)
    _truncate(d / VICTIM)
    out = tmp_path / "a.safetensors"
    r = cli("posthoc", "--snapshots", d, "--sigma-rel", "0.07", "--out", out)
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and VICTIM in r.stderr
    assert not out.exists()


def test_unparsable_argument_is_a_usage_error(snapshots: Path, tmp_path: Path) -> None:
    """argparse's convention: exit 2, the usage, then one line naming the argument."""
    with pytest.raises(SystemExit) as e:
        main(["posthoc", "--snapshots", str(snapshots), "--sigma-rel", "abc", "--out", str(tmp_path / "a.pt")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["posthoc", "--snapshots", str(snapshots), "--sigma-rel", "0.07"])  # no --out
    assert e.value.code == 2
    assert list(tmp_path.iterdir()) == []
