"""The checkpoint commands: ``polyak average``, ``export``, ``convert``, ``inspect``.

A few cases run ``polyak`` end to end in a subprocess (the installed entry point, exit codes,
stderr); the rest call :func:`polyak.cli.main` in-process. Averages are checked against
float64 sums computed here; written files are read back with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import polyak
from polyak import checkpoint as ck
from polyak.cli import main

COMMANDS = ("average", "export", "convert", "inspect")


def make_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A model's state dict: floating parameters and buffers, and an int64 counter."""
    g = torch.Generator().manual_seed(seed)
    return {
        "lin.weight": torch.randn(5, 4, generator=g).to(dtype),
        "lin.bias": torch.randn(5, generator=g).to(dtype),
        "bn.running_var": torch.rand(5, generator=g).to(dtype),
        "bn.num_batches_tracked": torch.tensor(10 + seed),
    }


def write(path: Path, state: dict) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def expected_average(states: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    total = sum(weights)
    out = {}
    for k, last in states[-1].items():
        if last.is_floating_point():
            acc = sum(w / total * s[k].double() for w, s in zip(weights, states, strict=True))
            out[k] = acc.to(last.dtype)
        else:
            out[k] = last
    return out


def read_weights(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True)["state_dict"]


def assert_close(got: dict[str, Tensor], want: dict[str, Tensor], exact: bool = False) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        if exact or not want[k].is_floating_point():
            assert torch.equal(got[k], want[k]), k
        elif want[k].dtype in (torch.bfloat16, torch.float16):  # one rounding of the float64 sum
            torch.testing.assert_close(got[k], want[k])
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-12 if want[k].dtype == torch.float64 else 1e-6, atol=0)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def polyak_exe() -> list[str]:
    exe = Path(sys.executable).with_name("polyak")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "polyak"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*polyak_exe(), *args], capture_output=True, text=True, timeout=120, env=env)


def error_line(err: str) -> str:
    """The error: exactly one line of stderr starts with ``polyak``, and no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("polyak ")]
    assert len(lines) == 1, err
    return lines[0]


# -- end to end, in a subprocess ---------------------------------------------------------------------


def test_average_end_to_end(tmp_path: Path) -> None:
    states = [make_state(i) for i in range(3)]
    files = [write(tmp_path / f"ep{i}.pt", s) for i, s in enumerate(states)]
    done = run_cli("average", *map(str, files), "--weights", "1,2,3", "-o", str(tmp_path / "avg.safetensors"))
    assert done.returncode == 0, done.stderr
    assert "wrote 4 tensors" in done.stderr
    assert_close(read_weights(tmp_path / "avg.safetensors"), expected_average(states, [1, 2, 3]))
    with safe_open(str(tmp_path / "avg.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["method"] == "weighted" and json.loads(meta["inputs"]) == ["ep0.pt", "ep1.pt", "ep2.pt"]


def test_errors_end_to_end_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a zip archive")
    done = run_cli("export", str(bad), "-o", str(tmp_path / "out.safetensors"))
    assert done.returncode == 1
    assert error_line(done.stderr).startswith("polyak export: error: ")
    assert "corrupt" in done.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_inspect_json_end_to_end(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    ema = polyak.ExponentialMovingAverage(model, momentum=0.01)
    ema.update_parameters(model)
    ema.update_parameters(model)
    path = tmp_path / "train.pt"
    torch.save(ck.pack({"state_dict": model.state_dict(), "epoch": 1}, {"ema": ema}), path)
    done = run_cli("inspect", str(path), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["format"] == "polyak" and info["read_with"] == "restricted"
    assert info["tensors"] == 4 and info["dtypes"] == {"float32": 4}
    assert set(info["top_level"]) == {"state_dict", "epoch", "live_state_dict", "polyak"}
    avg = info["averages"][0]["averages"]["ema"]
    assert avg["class"] == "ExponentialMovingAverage" and avg["steps"] == 2
    assert avg["decay"] == pytest.approx(0.99)


# -- help --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"polyak {command}" in out and "--quiet" in out and "example" in out


# -- average -----------------------------------------------------------------------------------------


def test_average_uniform_mixed_inputs_and_dtypes(tmp_path: Path) -> None:
    """safetensors and .pt inputs together; bf16 inputs are averaged in float64; the integer
    tensor comes from the last file."""
    states = [make_state(i, torch.bfloat16) for i in range(4)]
    files = [write(tmp_path / f"c{i}{'.safetensors' if i % 2 else '.pt'}", s) for i, s in enumerate(states)]
    out = tmp_path / "avg.pt"
    assert main(["average", *map(str, files), "-o", str(out), "-q"]) == 0
    got = read_weights(out)
    assert_close(got, expected_average(states, [1, 1, 1, 1]))
    assert int(got["bn.num_batches_tracked"]) == 13
    meta = torch.load(out, weights_only=True)["metadata"]
    assert meta["method"] == "uniform"


def test_average_last_k_by_name_and_by_mtime(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = ["ep9.pt", "ep10.pt", "ep8.pt", "ep11.pt"]  # natural order: 8, 9, 10, 11
    states = {n: make_state(i) for i, n in enumerate(names)}
    now = time.time()
    for age, n in enumerate(["ep11.pt", "ep10.pt", "ep9.pt", "ep8.pt"]):  # ep8 is the newest
        write(tmp_path / n, states[n])
        os.utime(tmp_path / n, (now - 100 * (4 - age), now - 100 * (4 - age)))
    files = [str(tmp_path / n) for n in names]
    assert main(["average", *files, "--last", "2", "-o", str(tmp_path / "a.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "the last 2 of 4 files by file name" in err and "ep10.pt" in err and "ep11.pt" in err
    want = expected_average([states["ep10.pt"], states["ep11.pt"]], [1, 1])
    assert_close(read_weights(tmp_path / "a.safetensors"), want)
    assert main(["average", *files, "--last", "2", "--sort", "mtime", "-o", str(tmp_path / "b.safetensors")]) == 0
    assert "by modification time" in capsys.readouterr().err
    want = expected_average([states["ep9.pt"], states["ep8.pt"]], [1, 1])
    assert_close(read_weights(tmp_path / "b.safetensors"), want)
    # --weights apply to the selected files, in --sort order
    code = main(["average", *files, "--last", "2", "--weights", "1,3", "-o", str(tmp_path / "c.safetensors"), "-q"])
    assert code == 0
    want = expected_average([states["ep10.pt"], states["ep11.pt"]], [1, 3])
    assert_close(read_weights(tmp_path / "c.safetensors"), want)


def test_average_training_checkpoints(tmp_path: Path) -> None:
    """Weights come from 'state_dict' (a Lightning-style checkpoint), from polyak's primary
    average, or from --key."""
    states = [make_state(i) for i in range(2)]
    a = write(tmp_path / "a.ckpt", {"state_dict": states[0], "epoch": 1, "optimizer_states": [{"lr": 0.1}]})
    record = {"class": "ExponentialMovingAverage", "steps": 4}
    packed = ck.pack_state({"epoch": 2}, states[1], {"ema": record}, live=make_state(7))
    b = write(tmp_path / "b.pt", packed)
    assert main(["average", str(a), str(b), "-o", str(tmp_path / "o.safetensors"), "-q"]) == 0
    assert_close(read_weights(tmp_path / "o.safetensors"), expected_average(states, [1, 1]))
    c = write(tmp_path / "c.pt", {"model": states[0], "ema": states[1]})
    d = write(tmp_path / "d.pt", {"model": states[1], "ema": states[0]})
    assert main(["average", str(c), str(d), "--key", "ema", "-o", str(tmp_path / "e.safetensors"), "-q"]) == 0
    assert_close(read_weights(tmp_path / "e.safetensors"), expected_average([states[1], states[0]], [1, 1]))


def test_average_legacy_pt_inputs(tmp_path: Path) -> None:
    """Legacy (non-zip) .pt files cannot be memory-mapped: read one file at a time."""
    states = [make_state(i, torch.float64) for i in range(3)]
    files = []
    for i, s in enumerate(states):
        files.append(tmp_path / f"l{i}.pt")
        torch.save(s, files[-1], _use_new_zipfile_serialization=False)
    assert main(["average", *map(str, files), "--weights", "0.2,0.3,0.5", "-o", str(tmp_path / "o.pt"), "-q"]) == 0
    assert_close(read_weights(tmp_path / "o.pt"), expected_average(states, [0.2, 0.3, 0.5]))


def test_average_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path / "a.pt", make_state(0))
    b_state = make_state(1)
    b_state["extra.weight"] = b_state.pop("lin.bias")
    b = write(tmp_path / "b.pt", b_state)
    c_state = make_state(2)
    c_state["lin.weight"] = torch.zeros(4, 5)
    c = write(tmp_path / "c.safetensors", c_state)
    out = str(tmp_path / "o.safetensors")
    cases = [
        ([str(a), str(b)], "lacks ['lin.bias'] and has extra ['extra.weight']"),
        ([str(a), str(c)], "tensor 'lin.weight' has shape (5, 4)"),
        ([str(a), str(tmp_path / "missing.pt")], "no such file"),
        ([str(a), str(c), "--weights", "1,2,3"], "--weights has 3 values for 2 files"),
        ([str(a), str(c), "--weights", "1,-1"], "finite numbers >= 0"),  # an average: no negative weight
        ([str(a), str(c), "--weights", "0,0"], "positive, finite sum"),
        ([str(a), str(c), "--last", "3"], "--last 3 but only 2 files"),
        ([str(a), str(a)], "given twice"),
    ]
    for argv, message in cases:
        assert main(["average", *argv, "-o", out, "-q"]) == 1, argv
        assert message in error_line(capsys.readouterr().err), argv
    assert not Path(out).exists()


def test_output_that_is_an_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path / "a.pt", make_state(0))
    b = write(tmp_path / "b.pt", make_state(1))
    before = digest(a)
    assert main(["average", str(a), str(b), "-o", str(a)]) == 1
    assert "is one of the inputs" in error_line(capsys.readouterr().err)
    link = tmp_path / "link.pt"
    link.symlink_to(a)
    assert main(["average", str(a), str(b), "-o", str(link)]) == 1
    assert main(["export", str(a), "-o", str(a)]) == 1
    assert main(["convert", str(a), "-o", str(tmp_path / ".." / tmp_path.name / "a.pt")]) == 1
    assert digest(a) == before


# -- atomic writes --------------------------------------------------------------------------------


def test_failed_write_leaves_no_output_and_inputs_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from polyak.files import writing

    a = write(tmp_path / "a.safetensors", make_state(0))
    b = write(tmp_path / "b.pt", make_state(1))
    before = {p.name: digest(p) for p in (a, b)}
    out = tmp_path / "avg.safetensors"
    old = write(tmp_path / "old.safetensors", make_state(5))  # an existing output stays as it was
    real = writing.write_safetensors

    def half_then_fail(path: Path, *args: object, **kwargs: object) -> None:
        real(path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writing, "write_safetensors", half_then_fail)
    for target in (out, old):
        old_digest = digest(old)
        assert main(["average", str(a), str(b), "-o", str(target), "-q"]) == 1
        assert digest(old) == old_digest
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.pt", "old.safetensors"]
    assert {p.name: digest(p) for p in (a, b)} == before

    def interrupted(obj: object, f: object, *args: object, **kwargs: object) -> None:
        half = b"PK\x03\x04 half"
        f.write(half) if hasattr(f, "write") else Path(f).write_bytes(half)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    src = write(tmp_path / "swa.safetensors", {"w": torch.ones(2)})
    assert main(["export", str(b), "-o", str(tmp_path / "e.pt"), "-q"]) == 1  # a plain state dict
    assert main(["average", str(a), str(src), "-o", str(tmp_path / "x.pt"), "-q"]) == 1  # different keys
    assert main(["average", str(a), str(b), "-o", str(tmp_path / "x.pt"), "-q"]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.pt", "old.safetensors", "swa.safetensors"]


# -- export ------------------------------------------------------------------------------------------


def _polyak_checkpoint(tmp_path: Path) -> tuple[Path, nn.Module, dict[str, polyak.BaseAveragedModel]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    averages = {
        "ema": polyak.ExponentialMovingAverage(model, momentum=0.1),
        "phema": polyak.AveragedModel(model, schedule=polyak.schedules.PowerFunction(sigma_rel=0.1)),
    }
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.1)
        model.train()
        model(torch.randn(8, 4))
        for a in averages.values():
            a.update_parameters(model)
    path = tmp_path / "train.pt"
    torch.save(ck.pack({"state_dict": model.state_dict(), "epoch": 3}, averages), path)
    return path, model, averages


def test_export_primary_and_secondary_average(tmp_path: Path) -> None:
    path, _, averages = _polyak_checkpoint(tmp_path)
    out = tmp_path / "ema.safetensors"
    assert main(["export", str(path), "-o", str(out), "-q"]) == 0
    want = {k: v.detach() for k, v in averages["ema"].module.state_dict().items()}
    assert_close(load_file(str(out)), want, exact=True)
    fresh = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    fresh.load_state_dict(load_file(str(out)))  # loads directly
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["averaged"] == "true" and meta["method"] == "ema" and meta["class"] == "ExponentialMovingAverage"
    assert float(meta["decay"]) == pytest.approx(0.9) and meta["step"] == "5" and meta["source_format"] == "polyak"
    # the secondary average, as .pt in bfloat16
    out = tmp_path / "phema.pt"
    assert main(["export", str(path), "--average", "phema", "--dtype", "bfloat16", "-o", str(out), "-q"]) == 0
    saved = torch.load(out, weights_only=True)
    want = {k: v.detach() for k, v in averages["phema"].module.state_dict().items()}
    want = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in want.items()}
    assert_close(saved["state_dict"], want, exact=True)
    assert saved["metadata"]["method"] == "power-function-ema"
    assert float(saved["metadata"]["sigma_rel"]) == pytest.approx(0.1)
    assert main(["export", str(path), "--average", "nope", "-o", str(out), "-q"]) == 1


def test_export_a_foreign_checkpoint(tmp_path: Path) -> None:
    """A timm-style checkpoint (built by hand: timm is not installed)."""
    live, ema = make_state(0), make_state(1)
    src = write(tmp_path / "model_best.pth.tar", {"epoch": 9, "state_dict": live, "state_dict_ema": ema})
    assert main(["export", str(src), "-o", str(tmp_path / "ema.safetensors"), "-q"]) == 0
    assert_close(read_weights(tmp_path / "ema.safetensors"), ema, exact=True)


# -- convert ------------------------------------------------------------------------------------------


def test_convert_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _ = _polyak_checkpoint(tmp_path)
    assert main(["convert", str(path), "-o", str(tmp_path / "x.pt")]) == 1
    assert "already in polyak's format" in error_line(capsys.readouterr().err)
    src = write(tmp_path / "t.pt", {"state_dict": make_state(0), "state_dict_ema": make_state(1)})
    assert main(["convert", str(src), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert ".pt, .pth or .ckpt" in error_line(capsys.readouterr().err)
    shadows = {"decay": 0.9, "num_updates": 3, "shadow_params": [torch.ones(2)], "collected_params": None}
    src = write(tmp_path / "e.pt", shadows)
    assert main(["convert", str(src), "-o", str(tmp_path / "x.pt")]) == 1
    assert "--names-from" in error_line(capsys.readouterr().err)
    plain = write(tmp_path / "p.pt", make_state(0))
    assert main(["convert", str(plain), "-o", str(tmp_path / "x.pt")]) == 1
    err = error_line(capsys.readouterr().err)
    assert "formats tried: polyak, polyak-export, mmengine" in err and "diffusers" in err
    two = write(tmp_path / "two.pt", {"a": shadows, "b": shadows})
    assert main(["convert", str(two), "-o", str(tmp_path / "x.pt")]) == 1
    assert "several averages" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.pt").exists()


def test_convert_fills_in_what_the_file_does_not_say(tmp_path: Path) -> None:
    src = write(tmp_path / "t.pt", {"state_dict": make_state(0), "state_dict_ema": make_state(1)})
    out = tmp_path / "o.pt"
    argv = ["convert", str(src), "-o", str(out), "--decay", "0.999", "--steps", "1200", "--name", "slow", "-q"]
    assert main(argv) == 0
    state = torch.load(out, weights_only=True)
    rec = state["polyak"]["averages"]["slow"]
    assert state["polyak"]["primary"] == "slow"
    assert rec["schedule"] == {"type": "ConstantMomentum", "args": {"decay": 0.999}}  # as given
    assert rec["steps"] == 1200 and rec["counters"] == {"n_averaged": 1200}
    assert rec["source"]["format"] == "timm" and rec["source"]["file"] == "t.pt"
    assert main(["convert", str(src), "-o", str(out), "--decay", "1.5"]) == 1


# -- inspect ------------------------------------------------------------------------------------------


def test_inspect_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _ = _polyak_checkpoint(tmp_path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format:     polyak" in out
    assert "ema (primary): an EMA, decay 0.9\n    class ExponentialMovingAverage" in out
    assert "[decay 0.9]" in out and "steps 5" in out
    assert "phema: a power-function EMA, sigma_rel 0.1\n    class AveragedModel" in out
    assert "epoch" in out and "live_state_dict" in out
    shadows = {"decay": 0.9, "num_updates": 3, "shadow_params": [torch.ones(2)], "collected_params": None}
    src = write(tmp_path / "e.pt", {"ema": shadows})
    assert main(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "torch-ema" and info["averages"][0]["key"] == "ema"
    assert "--names-from" in info["averages"][0]["needs"]
    plain = write(tmp_path / "p.safetensors", make_state(0))
    assert main(["inspect", str(plain), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "state-dict" and info["tensors"] == 4 and info["tensor_bytes"] == 4 * (20 + 5 + 5) + 8


def test_quiet_success_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = write(tmp_path / "a.pt", make_state(0)), write(tmp_path / "b.pt", make_state(1))
    assert main(["average", str(a), str(b), "-o", str(tmp_path / "o.pt"), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
