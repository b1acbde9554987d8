"""What a checkpoint argument is (a file, a Hugging Face folder or index, a
``torch.distributed.checkpoint`` folder), the reader of each (:func:`open_weights`), and where
an output may go given the inputs (:func:`check_output_target`)."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .dcp import DCPFolder, is_dcp_folder
from .errors import FormatError, shown
from .hf import HFFolder, check_model_folder, is_index_file
from .paths import kind_of
from .sources import Weights, file_weights
from .writing import check_output

__all__ = ["input_kind", "check_source", "open_weights", "Output", "check_output_target", "input_folder"]


def input_kind(path: str | os.PathLike[str]) -> str:
    """``"file"``, ``"hf-folder"`` (a folder, or a ``*.safetensors.index.json``) or ``"dcp"``
    (a folder with ``.metadata``), from the file system (nothing is opened); else
    :class:`FormatError` saying what ``path`` is (a FIFO, a device, nothing)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FormatError(f"{shown(path)}: no such file or folder") from None
    except OSError as e:
        raise FormatError(f"{shown(path)}: cannot read: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        return "dcp" if is_dcp_folder(path) else "hf-folder"
    if not stat.S_ISREG(mode):
        raise FormatError(f"{shown(path)} is {kind_of(mode)}, not a checkpoint file or folder")
    return "hf-folder" if is_index_file(path) else "file"


def check_source(path: str | os.PathLike[str]) -> Path:
    """``path`` if it is a regular file or a folder (following links): what a checkpoint
    argument may be; else :class:`FormatError` (a FIFO is never opened)."""
    input_kind(path)
    return Path(path)


def input_folder(path: str | os.PathLike[str]) -> Path | None:
    """The folder an input argument stands for: the folder itself, an index file's folder, or
    None for a single file."""
    path = Path(path)
    with contextlib.suppress(OSError):
        if path.is_dir():
            return path
        if is_index_file(path):
            return path.parent if str(path.parent) else Path(".")
    return None


def open_weights(
    path: str | os.PathLike[str],
    *,
    key: str | None = None,
    unsafe: bool = False,
    note: Callable[[str], None] | None = None,
) -> Weights:
    """The reader (:class:`polyak.files.Weights`) of a checkpoint's weights, by what ``path``
    is: a safetensors file; a ``torch.save`` file (the weights under ``key``, else found as
    :func:`polyak.files.model_state_dict` finds them; read without running code from it unless
    ``unsafe``; ``note`` is told about objects read as placeholders); a Hugging Face folder or
    its index (:class:`polyak.files.HFFolder`); a ``torch.distributed.checkpoint`` folder
    (:class:`polyak.files.DCPFolder`, ``key`` a prefix). Raises :class:`FormatError`."""
    path = Path(path)
    kind = input_kind(path)
    if kind == "dcp":
        return DCPFolder(path, key=key)
    if kind == "hf-folder":
        return HFFolder(path)
    return file_weights(path, key=key, unsafe=unsafe, note=note)


@dataclass(frozen=True)
class Output:
    """Where an output goes: a file, or a Hugging Face folder (``folder``)."""

    path: Path
    folder: bool


def _same(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        if a.exists() and b.exists() and os.path.samefile(a, b):
            return True
    return a.absolute() == b.absolute() or a.resolve() == b.resolve()


def _inside(child: Path, parent: Path) -> bool:
    c, p = child.resolve(), parent.resolve()
    return c != p and c.is_relative_to(p)


def check_output_target(
    out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]], *, folder: bool | None = None
) -> Output:
    """Where ``out`` goes, refused (:class:`FormatError`) where writing it would touch an input.

    A folder when ``folder`` says so, or (``folder`` None) when ``out`` is an existing folder
    or ends with ``/``: refused when it is one of the inputs, lies inside an input's folder or
    holds an input (the output folder is replaced whole), or when it exists and holds more than
    a model folder (:func:`polyak.files.check_model_folder`). Otherwise a file:
    :func:`polyak.files.check_output` (not a folder, a FIFO or a device, not an input), and not
    inside an input's folder."""
    raw = os.fspath(out)
    path = Path(raw)
    if folder is None:
        folder = raw.endswith(("/", os.sep)) or path.is_dir()
    folders = [(Path(i), input_folder(i)) for i in inputs]
    if folder:
        for given, f in folders:
            if _same(path, given) or (f is not None and _same(path, f)):
                raise FormatError(f"-o {shown(raw)} is one of the inputs ({shown(given)}): write to another folder")
            if f is not None and _inside(path, f):
                raise FormatError(f"-o {shown(raw)} is inside the input {shown(f)}: write the folder elsewhere")
            if _inside(given, path):
                raise FormatError(
                    f"-o {shown(raw)} holds the input {shown(given)}, and the output folder is replaced whole: "
                    "write to another folder"
                )
        check_model_folder(path)
        return Output(path, True)
    path = check_output(path, [g for g, _ in folders])
    for _, f in folders:
        if f is not None and _inside(path, f):
            raise FormatError(f"-o {shown(raw)} is inside the input {shown(f)}: write the file elsewhere")
    return Output(path, False)
