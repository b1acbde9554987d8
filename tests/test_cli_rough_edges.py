"""What a user of ``polyak`` sees (issue 10, "The command line"): ``--version``, help laid out to
the terminal, what ``inspect`` calls an average and how it describes it, refusals of a single
input and of an output whose extension says no format, BatchNorm statistics in ``average``
(``--buffers``), the snapshot folder named when it is empty, a ``--decay`` stored and printed as
given.

Each case runs the real command, ``python -m polyak``, in a subprocess, and reads what it
printed and wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

import polyak
from polyak import checkpoint as ck
from polyak.cli import average, convert, demo, export, inspect, posthoc
from polyak.cli.formats import detect
from polyak.files import load

COMMANDS = {"average": average, "export": export, "convert": convert, "inspect": inspect, "posthoc": posthoc}
COMMANDS_AND_DEMO = {**COMMANDS, "demo": demo}


def polyak_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "polyak", *map(str, args)], capture_output=True, text=True, timeout=120, env=environ
    )


def ok(*args: str | Path) -> subprocess.CompletedProcess[str]:
    done = polyak_cli(*args)
    assert done.returncode == 0, done.stderr
    return done


def error(*args: str | Path) -> str:
    """The one error line of a command that must fail with exit status 1."""
    done = polyak_cli(*args)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("polyak ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def make_state(seed: int) -> dict[str, Tensor]:
    """Weights, BatchNorm statistics and the integer counter."""
    g = torch.Generator().manual_seed(seed)
    return {
        "lin.weight": torch.randn(5, 4, generator=g),
        "bn.weight": torch.randn(5, generator=g),
        "bn.running_mean": torch.randn(5, generator=g),
        "bn.running_var": torch.rand(5, generator=g),
        "bn.num_batches_tracked": torch.tensor(10 + seed),
    }


def checkpoints(tmp_path: Path, n: int = 3) -> tuple[list[Path], list[dict[str, Tensor]]]:
    states = [make_state(i) for i in range(n)]
    paths = []
    for i, s in enumerate(states):
        paths.append(tmp_path / f"ep{i}.pt")
        torch.save(s, paths[-1])
    return paths, states


def setup(*args: str | Path) -> None:
    """A command that only makes a file for the case (in-process: quicker than a subprocess)."""
    from polyak.cli import main

    assert main([*map(str, args), "-q"]) == 0


def inspect_json(path: Path) -> dict[str, Any]:
    """What ``polyak inspect PATH --json`` prints (in-process)."""
    import argparse

    return json.loads(json.dumps(inspect.describe(argparse.Namespace(unsafe=False, quiet=True), path), default=str))


# -- 1. --version ----------------------------------------------------------------------------------


def test_version() -> None:
    done = ok("--version")
    assert done.stdout.strip() == f"polyak {polyak.__version__}"


# -- 2. help laid out to the terminal ----------------------------------------------------------------


class _Recorder:
    """Stands for argparse's subparsers action: records what a command registers."""

    def __init__(self) -> None:
        self.kwargs: dict[str, Any] = {}

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        import argparse

        self.kwargs = kwargs
        return argparse.ArgumentParser(prog=name)


def _example_lines(module: Any) -> list[str]:
    sub = _Recorder()
    module.register(sub)
    epilog = sub.kwargs.get("epilog") or ""
    return [line for line in epilog.splitlines() if line.startswith(" ")]


@pytest.mark.parametrize("command", ["", *COMMANDS_AND_DEMO])
def test_help_lines_fit_and_examples_are_kept(command: str) -> None:
    """On a wide terminal (the help was laid out at 300 columns: descriptions of 600)."""
    done = polyak_cli(*([command] if command else []), "--help", env={"COLUMNS": "300"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    examples = _example_lines(COMMANDS_AND_DEMO[command]) if command else []
    for example in examples:
        assert example in lines  # an example command is never wrapped
    if command in ("average", "export", "convert", "inspect"):
        assert examples


def test_help_fits_a_narrow_terminal(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from polyak.cli import main

    monkeypatch.setenv("COLUMNS", "62")
    for command in COMMANDS_AND_DEMO:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        description = out.split("\n\n")[1].splitlines()
        assert max(len(line) for line in description) <= 60, command


# -- 3. what inspect calls an average, and says it is --------------------------------------------------


def test_inspect_an_average_of_checkpoints(tmp_path: Path) -> None:
    paths, _ = checkpoints(tmp_path)
    out = tmp_path / "soup.safetensors"
    setup("average", *paths, "-o", out)
    text = ok("inspect", out).stdout
    assert "format:     polyak-average" in text
    assert "average (primary): the uniform average of 3 checkpoints" in text
    assert "class uniform" not in text and "ema" not in text
    info = inspect_json(out)
    assert info["format"] == "polyak-average"
    record = info["averages"][0]["averages"]["average"]
    assert record["description"] == "the uniform average of 3 checkpoints" and record["class"] is None
    setup("average", *paths, "--weights", "1,2,3", "-o", tmp_path / "w.pt")
    assert inspect_json(tmp_path / "w.pt")["averages"][0]["averages"]["average"]["description"] == (
        "a weighted average of 3 checkpoints"
    )
    # nothing to resume: convert says what the file is and what it needs
    message = error("convert", out, "-o", tmp_path / "x.pt")
    assert "the uniform average of 3 checkpoints" in message and "--class" in message


def test_a_torch_averaged_model_is_not_called_an_ema(tmp_path: Path) -> None:
    from torch.optim.swa_utils import AveragedModel

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    swa = AveragedModel(model)
    for _ in range(3):
        swa.update_parameters(model)
    torch.save(swa.state_dict(), tmp_path / "swa.pt")
    text = ok("inspect", tmp_path / "swa.pt").stdout
    assert "  average (primary): an average whose schedule the file does not say" in text
    assert "ema" not in text.split("average (torch-averaged-model")[1]
    setup("convert", tmp_path / "swa.pt", "-o", tmp_path / "out.pt")
    saved = torch.load(tmp_path / "out.pt", weights_only=True)
    assert saved["polyak"]["primary"] == "average" and list(saved["polyak"]["averages"]) == ["average"]
    record = inspect_json(tmp_path / "out.pt")["averages"][0]["averages"]["average"]
    assert record["description"] == "an average whose schedule the file does not say"
    # given a decay it is an EMA, and named so
    setup("convert", tmp_path / "swa.pt", "-o", tmp_path / "ema.pt", "--decay", "0.999")
    averages = inspect_json(tmp_path / "ema.pt")["averages"][0]["averages"]
    assert list(averages) == ["ema"] and averages["ema"]["description"] == "an EMA, decay 0.999"


def test_descriptions_of_polyak_averages(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    averages = {
        "ema": polyak.ExponentialMovingAverage(model, momentum=0.001),
        "swa": polyak.StochasticWeightAverage(model),
        "phema": polyak.AveragedModel(model, schedule=polyak.schedules.PowerFunction(sigma_rel=0.07)),
    }
    for _ in range(4):
        for a in averages.values():
            a.update_parameters(model)
    torch.save(ck.pack({"state_dict": model.state_dict()}, averages), tmp_path / "train.pt")
    text = ok("inspect", tmp_path / "train.pt").stdout
    assert "  ema (primary): an EMA, decay 0.999\n" in text
    assert "  swa: an SWA (equal average of 4 snapshots)\n" in text
    assert "  phema: a power-function EMA, sigma_rel 0.07\n" in text
    info = inspect_json(tmp_path / "train.pt")["averages"][0]["averages"]
    assert info["swa"]["description"] == "an SWA (equal average of 4 snapshots)"
    # an export keeps the name and says what it holds
    setup("export", tmp_path / "train.pt", "--average", "swa", "-o", tmp_path / "swa.safetensors")
    with safe_open(str(tmp_path / "swa.safetensors"), framework="pt") as f:
        assert f.metadata()["description"] == "an SWA (equal average of 4 snapshots)"
    exported = inspect_json(tmp_path / "swa.safetensors")["averages"][0]
    assert exported["format"] == "polyak-export" and exported["averages"]["swa"]["primary"]


def test_a_post_hoc_synthesis_is_described(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    ema = polyak.PostHocEMA(model, (0.05, 0.10), snapshot_every=10, snapshot_dir=tmp_path / "snaps")
    for _ in range(40):
        with torch.no_grad():
            model.weight.add_(0.01)
        ema.update_parameters(model)
    out = tmp_path / "syn.safetensors"
    setup("posthoc", "--snapshots", tmp_path / "snaps", "--sigma-rel", "0.07", "-o", out)
    text = ok("inspect", out).stdout
    assert "format:     polyak-posthoc-synthesis" in text
    assert "  ema (primary): a post-hoc EMA synthesis, sigma_rel 0.07, at step 40" in text
    snapshot = sorted((tmp_path / "snaps").iterdir())[0]
    before = snapshot.read_bytes()
    assert "is one of the inputs" in error(
        "posthoc", "--snapshots", tmp_path / "snaps", "--sigma-rel", "0.07", "-o", snapshot
    )
    assert snapshot.read_bytes() == before


def _mmengine_checkpoint(ema_type: str | None) -> dict[str, Any]:
    sd = {"w": torch.ones(2), "b": torch.zeros(2)}
    hook = f"dict(type='EMAHook', momentum=0.01{f', ema_type={ema_type!r}' if ema_type else ''})"
    return {
        "meta": {"cfg": f"custom_hooks = [{hook}]\n"},
        "state_dict": sd,
        "ema_state_dict": {"module.w": torch.ones(2) * 2, "module.b": torch.zeros(2), "steps": torch.tensor(4)},
    }


@pytest.mark.parametrize(
    ("ema_type", "name", "description"),
    [
        (None, "ema", "an EMA, decay 0.99"),
        ("StochasticWeightAverage", "swa", "an SWA (equal average of 4 snapshots)"),
        ("MyOwnAverage", "average", "an average whose schedule the file does not say"),
    ],
)
def test_reader_names_say_what_the_file_holds(
    tmp_path: Path, ema_type: str | None, name: str, description: str
) -> None:
    from polyak.cli.console import describe_average

    path = tmp_path / "iter_4.pth"
    torch.save(_mmengine_checkpoint(ema_type), path)
    found = detect(load(path))
    assert found.primary == name and list(found.records) == [name]
    assert describe_average(found.record, name) == description


def test_positional_and_ema_formats_keep_the_name_ema(tmp_path: Path) -> None:
    """torch_ema, diffusers, timm, mmcv and ema-pytorch hold EMAs: ``ema``."""
    live, avg = make_state(0), make_state(1)
    torch.save({"state_dict": live, "state_dict_ema": avg}, tmp_path / "timm.pth")
    found = detect(load(tmp_path / "timm.pth"))
    assert found.format == "timm" and found.primary == "ema"
    shadows = {"decay": 0.9, "num_updates": None, "shadow_params": [avg["lin.weight"], avg["bn.weight"]]}
    torch.save({"model": live, "ema": shadows}, tmp_path / "torch_ema.pt")
    found = detect(load(tmp_path / "torch_ema.pt"))
    assert found.format == "torch-ema" and found.primary == "ema"
    from polyak.cli.console import describe_average

    assert describe_average(found.record, found.primary) == "an EMA, decay 0.9"


# -- 4. one input; the output's extension; BatchNorm statistics ----------------------------------------


def test_average_of_one_file_is_refused(tmp_path: Path) -> None:
    paths, _ = checkpoints(tmp_path)
    message = error("average", paths[0], "-o", tmp_path / "one.safetensors")
    assert "averaging one file" in message and "changes nothing" in message
    assert "polyak export" in message and "polyak convert" in message
    assert "changes nothing" in error("average", *paths, "--last", "1", "-o", tmp_path / "one.safetensors")
    assert not (tmp_path / "one.safetensors").exists()


def test_an_output_extension_that_says_no_format_is_refused(tmp_path: Path) -> None:
    paths, _ = checkpoints(tmp_path)
    torch.save({"state_dict": make_state(0), "state_dict_ema": make_state(1)}, tmp_path / "timm.pth")
    out = tmp_path / "out.txt"
    for argv in (("average", *paths), ("export", tmp_path / "timm.pth")):
        message = error(*argv, "-o", out)
        assert f"-o {out}: its extension is .txt" in message
        assert ".safetensors" in message and ".pt, .pth, .ckpt, .bin" in message
    (tmp_path / "snaps").mkdir()
    message = error("posthoc", "--snapshots", tmp_path / "snaps", "--sigma-rel", "0.1", "-o", out)
    assert ".pt, .pth, .ckpt, .bin" in message
    assert ".pt, .pth or .ckpt" in error("convert", tmp_path / "timm.pth", "-o", out)
    assert not out.exists()


@pytest.mark.parametrize("name", ["out", "out.SAFETENSORS", "out.pt.tmp", "out.safetensors.bak"])
def test_other_names_without_a_format_are_refused(tmp_path: Path, name: str, capsys: pytest.CaptureFixture) -> None:
    from polyak.cli import main

    paths, _ = checkpoints(tmp_path, 2)
    assert main(["average", *map(str, paths), "-o", str(tmp_path / name), "-q"]) == 1
    assert ".pt, .pth, .ckpt, .bin" in capsys.readouterr().err
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin"])
def test_torch_save_extensions_are_written_with_torch_save(tmp_path: Path, suffix: str) -> None:
    from polyak.cli import main

    paths, _ = checkpoints(tmp_path, 2)
    out = tmp_path / f"soup{suffix}"
    assert main(["average", *map(str, paths), "-o", str(out), "-q"]) == 0
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"state_dict", "metadata"}


def test_bn_statistics_are_averaged_with_a_note_or_taken_from_the_last(tmp_path: Path) -> None:
    paths, states = checkpoints(tmp_path)
    out = tmp_path / "avg.safetensors"
    done = ok("average", *paths, "-o", out)
    assert "averaged 2 BatchNorm statistics tensors (running_mean, running_var)" in done.stderr
    assert "polyak.update_bn" in done.stderr and "--buffers last" in done.stderr
    got = load(out).obj
    mean = sum(s["bn.running_mean"].double() for s in states) / 3
    torch.testing.assert_close(got["bn.running_mean"], mean.float())
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["buffers"] == "average"
    out = tmp_path / "last.safetensors"
    done = ok("average", *paths, "--buffers", "last", "-o", out)
    assert "took 2 BatchNorm statistics tensors (running_mean, running_var) from the last checkpoint" in done.stderr
    assert "polyak.update_bn" in done.stderr
    got = load(out).obj
    for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(got[k], states[-1][k]), k
    weight = sum(s["lin.weight"].double() for s in states) / 3
    torch.testing.assert_close(got["lin.weight"], weight.float())  # the weights are still averaged
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["buffers"] == "last"
    # a model without BatchNorm: no note
    for i in range(2):
        save_file({"w": torch.full((2,), float(i))}, str(tmp_path / f"n{i}.safetensors"))
    done = ok("average", tmp_path / "n0.safetensors", tmp_path / "n1.safetensors", "-o", tmp_path / "n.pt")
    assert "BatchNorm" not in done.stderr


def test_buffers_last_with_legacy_inputs(tmp_path: Path) -> None:
    """Legacy (non-zip) .pt inputs are read a file at a time: --buffers last there too."""
    from polyak.cli import main

    paths, states = checkpoints(tmp_path)
    for p, state in zip(paths, states, strict=True):
        torch.save(state, p, _use_new_zipfile_serialization=False)
    assert main(["average", *map(str, paths), "--buffers", "last", "-o", str(tmp_path / "o.pt"), "-q"]) == 0
    got = torch.load(tmp_path / "o.pt", weights_only=True)
    assert got["metadata"]["buffers"] == "last"
    for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(got["state_dict"][k], states[-1][k]), k
    weight = sum(s["bn.weight"].double() for s in states) / 3
    torch.testing.assert_close(got["state_dict"]["bn.weight"], weight.float())


# -- 5. posthoc names the empty folder --------------------------------------------------------------------


def test_posthoc_names_the_folder_without_snapshots(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "phema"
    folder.mkdir(parents=True)
    message = error("posthoc", "--snapshots", folder, "--sigma-rel", "0.07", "-o", tmp_path / "x.safetensors")
    assert f"no snapshots found in {folder}" in message


# -- 6. a --decay stored and printed as given ------------------------------------------------------------


def test_convert_decay_is_stored_and_printed_as_given(tmp_path: Path) -> None:
    torch.save({"state_dict": make_state(0), "state_dict_ema": make_state(1)}, tmp_path / "timm.pth")
    out = tmp_path / "out.pt"
    done = ok("convert", tmp_path / "timm.pth", "-o", out, "--decay", "0.99")
    assert "0.010000000000000009" not in done.stderr and "0.99" in done.stderr
    saved = torch.load(out, weights_only=True)
    assert saved["polyak"]["averages"]["ema"]["schedule"] == {"type": "ConstantMomentum", "args": {"decay": 0.99}}
    text = ok("inspect", out).stdout
    assert "0.010000000000000009" not in text and "an EMA, decay 0.99" in text and "[decay 0.99]" in text
    record = inspect_json(out)["averages"][0]["averages"]["ema"]
    assert record["decay"] == 0.99 and record["momentum"] == 0.01 and record["given"] == "decay"
    setup("export", out, "-o", tmp_path / "ema.safetensors")
    with safe_open(str(tmp_path / "ema.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["decay"] == "0.99" and meta["momentum"] == "0.01"
