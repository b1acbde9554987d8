"""Reading and writing files under attack (polyak.files): crafted pickles, FIFOs and devices,
names that are not UTF-8, long names, modes, a full disk, and SIGKILL in the middle of a write."""

from __future__ import annotations

import collections
import io
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from polyak import files
from polyak.files import FormatError, writing

# -- crafted pickles -----------------------------------------------------------------------------


def as_torch_file(pickle_bytes: bytes, path: Path) -> Path:
    """A torch.save zip file whose data.pkl is ``pickle_bytes`` (the rest from a real save)."""
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(1)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        records = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in records if n.endswith("data.pkl"))
    records[name] = pickle_bytes
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for n, b in records.items():
            z.writestr(n, b)
    return path


def int4(n: int) -> bytes:
    return b"J" + n.to_bytes(4, "little")  # BININT


# protocol-2 pickles written opcode by opcode: GLOBAL is b"c", MARK b"(", TUPLE b"t", REDUCE b"R"
BUILD_ON_A_CLASS = (
    b"\x80\x02ccollections\nCounter\n"
    b"N}X\x0b\x00\x00\x00most_commonX\x05\x00\x00\x00pwneds\x86b."  # (None, {...}) then BUILD
)
LIST_OF_RANGE = b"\x80\x02c__builtin__\nlist\n(c__builtin__\nrange\n(" + int4(10**8) + b"tRtR."
TENSOR_OF_SIZE = b"\x80\x02ctorch\nTensor\n(" + int4(10**8) + b"tR."
BYTEARRAY_OF_SIZE = b"\x80\x02c__builtin__\nbytearray\n(" + int4(10**9) + b"tR."


def test_a_file_may_not_give_state_to_a_class(tmp_path: Path) -> None:
    """BUILD with slot state on an allow-listed class replaced one of its methods for the whole
    process; now the load is refused and the class is untouched."""
    path = as_torch_file(BUILD_ON_A_CLASS, tmp_path / "evil.pt")
    method = collections.Counter.most_common
    with pytest.raises(FormatError, match="gives state to Counter, which it did not create"):
        files.load(path)
    assert collections.Counter.most_common is method


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (TENSOR_OF_SIZE, "calls torch.Tensor"),
        (BYTEARRAY_OF_SIZE, "bytearray may be rebuilt only from the bytes the file holds"),
    ],
    ids=["torch.Tensor(10**8)", "bytearray(10**9)"],
)
def test_a_small_file_cannot_allocate_what_it_does_not_hold(tmp_path: Path, payload: bytes, message: str) -> None:
    path = as_torch_file(payload, tmp_path / "bomb.pt")
    with pytest.raises(FormatError, match=message):
        files.load(path)


def test_list_of_range_is_inert_and_quick(tmp_path: Path) -> None:
    """A 1 KB file calling list(range(10**8)) used 4 GB and two minutes: list and range are not
    allow-listed any more, so they become inert placeholders, built in no time."""
    path = as_torch_file(LIST_OF_RANGE, tmp_path / "bomb.pt")
    start = time.perf_counter()
    loaded = files.load(path)
    assert time.perf_counter() - start < 5
    assert isinstance(loaded.obj, files.Opaque) and loaded.obj.origin == "builtins.list"
    assert set(loaded.replaced) == {"builtins.list", "builtins.range"}


def test_deep_nesting_is_walked_without_recursion(tmp_path: Path) -> None:
    obj: object = {"w": torch.ones(2)}
    for _ in range(50_000):
        obj = [obj]
    found = list(files.iter_tensors(obj))
    assert len(found) == 1 and found[0][1].tolist() == [1.0, 1.0]


# -- what a path is ----------------------------------------------------------------------------------


def test_a_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "ema.pt"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match=r"ema\.pt is a FIFO, not a checkpoint file"):
        files.load(fifo)  # would block for ever on open()
    with pytest.raises(FormatError, match="is a FIFO"):
        files.SafetensorsFile(fifo)


def test_a_device_is_refused() -> None:
    with pytest.raises(FormatError, match="is a character device"):
        files.load("/dev/null")
    with pytest.raises(FormatError, match="is a directory"):
        files.load("/")


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_a_name_that_is_not_utf8_is_read(tmp_path: Path, kind: str) -> None:
    """It was reported as "corrupt": torch and safetensors cannot encode the name."""
    state = {"w": torch.arange(3.0)}
    name = os.fsdecode(b"caf\xe9-ema." + (b"safetensors" if kind == "safetensors" else b"pt"))
    path = tmp_path / name
    if kind == "safetensors":
        save_file(state, str(tmp_path / "x.safetensors"))
        os.replace(tmp_path / "x.safetensors", path)
    else:
        with open(path, "wb") as f:
            torch.save(state, f, _use_new_zipfile_serialization=kind == "zip")
    loaded = files.load(path)
    assert torch.equal(loaded.obj["w"], state["w"])


def test_names_from_a_file_are_shown_escaped() -> None:
    assert files.shown("a\x1b[2Jb\n") == "a\\x1b[2Jb\\n"
    assert files.shown(os.fsdecode(b"caf\xe9")) == "caf\\xe9"


# -- writing -----------------------------------------------------------------------------------------


def test_outputs_that_are_not_regular_files_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    for out in (fifo, Path("/dev/null"), tmp_path):
        with pytest.raises(FormatError):
            files.check_output(out, [])
        with pytest.raises(FormatError):
            files.atomic_write(out, lambda tmp: tmp.write_bytes(b"x"))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_an_output_that_is_an_input_is_refused(tmp_path: Path) -> None:
    a = tmp_path / "a.pt"
    a.write_bytes(b"x")
    with pytest.raises(FormatError, match="is one of the inputs"):
        files.check_output(tmp_path / "." / "a.pt", [a])
    link = tmp_path / "link.pt"
    link.symlink_to(a)
    with pytest.raises(FormatError, match="is one of the inputs"):
        files.check_output(link, [a])


@pytest.mark.parametrize("length", [249, 255])
def test_a_long_legal_name_is_written(tmp_path: Path, length: int) -> None:
    """The temporary name added 14 characters: a legal 249-character name failed."""
    path = tmp_path / ("e" * (length - len(".safetensors")) + ".safetensors")
    files.save_weights(path, {"w": torch.ones(2)}, {"format": "test"})
    assert files.load(path).obj["w"].tolist() == [1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_replaced_file_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "ema.pt"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    files.save_weights(path, {"w": torch.ones(2)}, {})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    new = tmp_path / "new.pt"
    files.save_weights(new, {"w": torch.ones(2)}, {})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o666 & ~umask


def test_a_full_disk_says_so_and_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's writer reports a full disk as ``[enforce fail at inline_container.cc...] file
    write failed``; polyak says the disk is full and that the old file is intact."""
    path = tmp_path / "ema.pt"
    files.save_weights(path, {"w": torch.ones(2)}, {})
    before = path.read_bytes()

    def full(obj: object, f: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0")

    monkeypatch.setattr(writing.torch, "save", full)
    monkeypatch.setattr(writing.shutil, "disk_usage", lambda d: _Usage(512))
    with pytest.raises(FormatError, match=r"the disk is full \(512 B free.*the old file is intact"):
        files.save_weights(path, {"w": torch.zeros(2)}, {})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ema.pt"]


class _Usage:
    def __init__(self, free: int) -> None:
        self.free = free


KILLED_WRITER = textwrap.dedent(
    """
    import sys, torch
    from polyak.files import save_weights
    path = sys.argv[1]
    i = 0
    while True:
        i += 1
        save_weights(path, {"w": torch.full((1 << 18,), float(i))}, {"n": str(i)})
        print(i, flush=True)
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_sigkill_in_the_middle_of_writes_never_damages_the_file(tmp_path: Path, suffix: str) -> None:
    """A writer killed at random moments (10 times): the file is always the old or the new
    one, whole, and readable."""
    import random

    path = tmp_path / ("avg" + suffix)
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], env=env, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one complete write
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        w = files.load(path).obj
        w = w["state_dict"]["w"] if suffix == ".pt" else w["w"]
        assert torch.all(w == w[0])  # one whole write, never half of two


def test_a_folder_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    """atomic_directory (what polyak.distributed.save writes a DCP checkpoint through): an error
    in the block leaves the old folder as it was and no temporary folder; a completed block
    replaces it whole."""
    target = tmp_path / "ckpt"
    with files.atomic_directory(target) as folder:
        (folder / "a.distcp").write_bytes(b"old")
        (folder / ".metadata").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), files.atomic_directory(target) as folder:
        (folder / "a.distcp").write_bytes(b"half")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (target / "a.distcp").read_bytes() == b"old"
    with files.atomic_directory(target) as folder:
        (folder / "b.distcp").write_bytes(b"new")
    assert sorted(p.name for p in target.iterdir()) == ["b.distcp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(FormatError, match="exists and is not a folder"):
        files.atomic_directory(tmp_path / "file").__enter__()
