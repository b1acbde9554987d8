"""The command line against hostile files and impossible values, through the real ``polyak``
command: crafted pickles, FIFOs and devices, names that are not UTF-8 or carry terminal escape
sequences, outputs that are inputs or not files, long names, modes, impossible numbers."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.timeout(120)


def polyak(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the command; bytes out, so that an escape sequence or a bad byte can be looked for."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "polyak", *args], capture_output=True, timeout=60, env=env, cwd=cwd)


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"lin.weight": torch.randn(3, 2, generator=g), "lin.bias": torch.randn(3, generator=g)}


def checkpoint(path: Path, seed: int = 0) -> Path:
    if path.suffix == ".safetensors":
        save_file(state(seed), str(path))
    else:
        with open(path, "wb") as f:
            torch.save(state(seed), f)
    return path


def crafted(path: Path, pickle_bytes: bytes) -> Path:
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(1)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        records = {n: z.read(n) for n in z.namelist()}
    records[next(n for n in records if n.endswith("data.pkl"))] = pickle_bytes
    with zipfile.ZipFile(path, "w") as z:
        for n, b in records.items():
            z.writestr(n, b)
    return path


def one_error(done: subprocess.CompletedProcess[bytes]) -> str:
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    err = done.stderr.decode("utf-8", "backslashreplace")
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("polyak ")]
    assert len(lines) == 1, err
    return lines[0]


# -- loading -------------------------------------------------------------------------------------


def test_a_pickle_that_gives_state_to_a_class_is_refused(tmp_path: Path) -> None:
    evil = crafted(
        tmp_path / "evil.pt",
        b"\x80\x02ccollections\nCounter\nN}X\x0b\x00\x00\x00most_commonX\x05\x00\x00\x00pwneds\x86b.",
    )
    assert "gives state to Counter" in one_error(polyak("inspect", str(evil)))


def test_a_list_of_a_huge_range_is_inert(tmp_path: Path) -> None:
    bomb = crafted(tmp_path / "bomb.pt", b"\x80\x02c__builtin__\nlist\n(c__builtin__\nrange\n(J\x00\xe1\xf5\x05tRtR.")
    done = polyak("inspect", str(bomb))
    assert done.returncode == 0, done.stderr[-2000:]
    assert b"builtins.list" in done.stdout and b"builtins.range" in done.stdout


def test_fifos_are_named_not_waited_for(tmp_path: Path) -> None:
    """A FIFO given as an input, or found among the snapshots, hung the command."""
    a = checkpoint(tmp_path / "a.safetensors")
    fifo = tmp_path / "b.safetensors"
    os.mkfifo(fifo)
    assert "b.safetensors is a FIFO" in one_error(polyak("inspect", str(fifo)))
    assert "is a FIFO" in one_error(polyak("average", str(a), str(fifo), "-o", str(tmp_path / "o.safetensors")))
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    os.mkfifo(snaps / "phema-0.0500-000000010.safetensors")
    assert "is a FIFO" in one_error(polyak("posthoc", "--snapshots", str(snaps), "--sigma-rel", "0.07", "-o", "x.pt"))


def test_a_name_that_is_not_utf8_is_read(tmp_path: Path) -> None:
    """A valid checkpoint whose name is not UTF-8 was reported as corrupt."""
    name = os.fsdecode(b"caf\xe9.pt")
    checkpoint(tmp_path / name)
    done = polyak("inspect", name, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert b"caf\\xe9.pt" in done.stdout  # shown escaped
    assert b"tensors:    2" in done.stdout


def test_names_and_metadata_are_printed_escaped(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a\x1b[2Jb": torch.zeros(1)}, str(path), metadata={"note": "\x1b]0;pwned\x07", "format": "x"})
    done = polyak("inspect", str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert b"\x1b" not in done.stdout + done.stderr and b"\x07" not in done.stdout
    assert b"\\x1b]0;pwned\\x07" in done.stdout


# -- writing -------------------------------------------------------------------------------------


def test_outputs_that_may_not_be_written(tmp_path: Path) -> None:
    a, b, c = (checkpoint(tmp_path / f"{n}.safetensors", i) for i, n in enumerate("abc"))
    before = a.read_bytes()
    # an input named on the command line but not averaged (--last 2 takes b and c)
    assert "is one of the inputs" in one_error(polyak("average", str(a), str(b), str(c), "--last", "2", "-o", str(a)))
    assert a.read_bytes() == before
    # a character device and a FIFO: never replaced by a regular file
    assert "is a character device" in one_error(polyak("average", str(a), str(b), "-o", "/dev/null"))
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    assert "is a FIFO" in one_error(polyak("average", str(a), str(b), "-o", str(fifo)))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_long_name_and_the_mode_of_a_replaced_file(tmp_path: Path) -> None:
    a, b = checkpoint(tmp_path / "a.safetensors", 0), checkpoint(tmp_path / "b.safetensors", 1)
    long = tmp_path / ("x" * (249 - len(".safetensors")) + ".safetensors")
    assert polyak("average", str(a), str(b), "-o", str(long), "-q").returncode == 0
    kept = tmp_path / "kept.safetensors"
    kept.write_bytes(b"old")
    os.chmod(kept, 0o600)
    assert polyak("average", str(a), str(b), "-o", str(kept), "-q").returncode == 0
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600


# -- values that cannot be right -------------------------------------------------------------------


def test_impossible_numbers_are_refused_with_their_range(tmp_path: Path) -> None:
    a, b, c = (checkpoint(tmp_path / f"{n}.safetensors", i) for i, n in enumerate("abc"))
    out = str(tmp_path / "o.safetensors")
    assert ">= 0" in one_error(polyak("average", str(a), str(b), str(c), "--weights", "1e308,-1e308,1", "-o", out))
    assert not Path(out).exists()
    snaps = tmp_path / "snaps"
    import polyak as lib

    model = torch.nn.Linear(2, 2)
    ema = lib.PostHocEMA(model, snapshot_every=5, snapshot_dir=snaps)
    for _ in range(10):
        ema.update_parameters(model)
    for flags, expected in (
        (["--gamma", "nan"], "gamma must be in (-1.0, 1000000.0]"),
        (["--gamma", "1e308"], "gamma must be in (-1.0, 1000000.0]"),
        (["--gamma", "-1"], "gamma must be in (-1.0, 1000000.0]"),
        (["--sigma-rel", "0.07", "--at-step", "99999999999999999999"], "at_step must be an int in [1, 10]"),
    ):
        assert expected in one_error(polyak("posthoc", "--snapshots", str(snaps), *flags, "-o", out)), flags
    assert not Path(out).exists()
