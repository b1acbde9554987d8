"""``polyak demo``: a --quick run in-process and as the installed command, flags, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from polyak.cli import build_parser, main

METHODS = {"live", "ema_0.99", "ema_0.99_bn_averaged", "ema_0.999", "ema_0.999_bn_averaged", "swa", "posthoc"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_outputs(out: Path, steps: int) -> dict:
    png = out / "demo.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    results = json.loads((out / "demo.json").read_text())
    assert set(results["methods"]) == METHODS
    for name, m in results["methods"].items():
        for key in ("test_acc", "val_acc"):
            assert 0.0 <= m[key] <= 1.0, (name, key, m[key])
        for key in ("test_loss", "val_loss"):
            assert m[key] >= 0.0, (name, key, m[key])
        curve = m["curve"]
        assert curve["step"] and curve["step"][-1] == steps
        assert len(curve["test_acc"]) == len(curve["step"])
    assert results["settings"]["steps"] == steps
    assert f"{results['posthoc']['sigma_rel']:g}" in results["posthoc"]["candidates"]
    assert not list(out.glob(".*tmp*")), "a temporary file was left behind"
    return results


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``polyak demo --quick`` through ``polyak.cli.main``, into a directory it creates."""
    out = tmp_path_factory.mktemp("demo") / "nested" / "out"
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    return out


def test_quick_in_process(quick_run: Path) -> None:
    results = _check_outputs(quick_run, steps=100)
    assert results["settings"]["threads"] == 1
    assert results["settings"]["swa_start"] == 75
    assert results["methods"]["swa"]["curve"]["step"] == [100]  # evaluated once it holds two snapshots


def test_short_run_table_determinism_and_global_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    flags = ["demo", "--quiet", "--steps", "40", "--eval-every", "20", "--seed", "3"]
    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    assert main([*flags, "--out", str(tmp_path / "a")]) == 0
    assert torch.equal(torch.rand(3), expected)  # the demo's seeding did not touch the caller's RNG
    assert torch.get_num_threads() == threads

    stdout = capsys.readouterr().out
    assert "| weights | test accuracy | test loss | val accuracy | val loss |" in stdout
    for label in (
        "live weights",
        "EMA 0.99 (+ update_bn)",
        "EMA 0.999, BN statistics averaged",
        "SWA, last 10 steps (+ update_bn)",
        "post-hoc EMA, sigma_rel",
    ):
        assert label in stdout

    assert main([*flags, "--out", str(tmp_path / "b")]) == 0
    first = _check_outputs(tmp_path / "a", steps=40)
    second = _check_outputs(tmp_path / "b", steps=40)
    assert first["settings"]["seed"] == 3
    for name in METHODS:
        for key in ("test_acc", "test_loss", "val_acc", "val_loss", "curve"):
            assert first["methods"][name][key] == second["methods"][name][key], (name, key)


def _polyak_command() -> list[str]:
    exe = Path(sys.executable).with_name("polyak")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("polyak")
    return [found] if found else [sys.executable, "-m", "polyak"]


def test_quick_subprocess(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*_polyak_command(), "demo", "--quick", "--out", "tmp"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    _check_outputs(tmp_path / "tmp", steps=100)
    assert "| live weights |" in proc.stdout
    assert "training" in proc.stderr  # the progress bar


def test_help_says_what_the_seed_decides() -> None:
    """The run has no data augmentation: the help does not say the seed decides one."""
    proc = subprocess.run(
        [sys.executable, "-m", "polyak", "demo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "augment" not in proc.stdout
    assert "seed of the initialisation and the batch order" in " ".join(proc.stdout.split())


def test_flags_parse() -> None:
    args = build_parser().parse_args(
        [
            "demo",
            "--seed",
            "3",
            "--steps",
            "500",
            "--lr",
            "0.05",
            "--label-noise",
            "0.1",
            "--eval-every",
            "10",
            "--out",
            "somewhere",
            "--threads",
            "2",
            "--quick",
            "-q",
        ]
    )
    assert (args.seed, args.steps, args.lr, args.label_noise, args.eval_every) == (3, 500, 0.05, 0.1, 10)
    assert args.out == Path("somewhere") and args.threads == 2 and args.quick and args.quiet
    defaults = build_parser().parse_args(["demo"])
    assert defaults.seed == 0 and defaults.steps is None and defaults.out == Path("out/demo") and not defaults.quick


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "5"], "--steps must be at least 20"),
        (["--lr", "0"], "--lr must be a positive number"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--label-noise", "1.5"], "--label-noise must be in [0, 0.9)"),
        (["--eval-every", "0"], "--eval-every must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1"),
    ],
)
def test_bad_values_one_line_error(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path), *flags]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("polyak demo: error: ") and message in err, err
    assert not (tmp_path / "demo.json").exists()


@pytest.mark.parametrize("flags", [["--steps", "many"], ["--no-such-flag"], ["--seed"]])
def test_bad_flags_exit_nonzero(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # argparse's way: the usage, then one error line (the top-level parser reports unknown flags)
    assert err[-1].startswith(("polyak demo: error: ", "polyak: error: ")), err


def test_bad_flag_subprocess(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*_polyak_command(), "demo", "--steps", "3"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "polyak demo: error: --steps must be at least 20, got 3"
    assert proc.stdout == ""


def test_missing_extra_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if polyak[demo] were not installed
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("polyak demo: error: the demo needs sklearn"), err
    assert "polyak[demo]" in err
