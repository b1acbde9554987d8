"""Writing checkpoint files atomically: a file is either untouched or complete, whatever
interrupts the write. Every file polyak writes goes through :func:`atomic_write`."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import FormatError, shown
from .paths import check_writable
from .streaming import Layout, layout_of, write_safetensors

__all__ = [
    "check_output",
    "atomic_write",
    "AtomicDirectory",
    "atomic_directory",
    "torch_save",
    "save_weights",
    "save_checkpoint",
]


def check_output(out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]) -> Path:
    """``out`` as a path, refused (:class:`FormatError`) when it is not a regular file or absent
    (a directory, a FIFO, a device: ``-o /dev/null`` would replace the device node), or when
    it is one of ``inputs`` (every file the command reads or was given, averaged or not)."""
    out = check_writable(out)
    for i in inputs:
        p = Path(i)
        same = False
        with contextlib.suppress(OSError):
            same = out.exists() and p.exists() and os.path.samefile(out, p)
        if same or out.absolute() == p.absolute() or out.resolve() == p.resolve():
            raise FormatError(f"-o {shown(out)} is one of the inputs ({shown(p)}): write to another file")
    return out


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s directory, fsync it, and rename it
    to ``path`` (``os.replace``), so ``path`` is either untouched or complete: the temporary
    file is removed on any failure, ``KeyboardInterrupt`` included.

    ``path`` must be a regular file or absent (a FIFO or a device is never replaced). The file
    that replaces an existing one keeps its permission bits; a new one gets ``0o666`` less the
    umask. The temporary name fits the file system's name limit whatever the length of
    ``path``'s name. A full disk is reported as such (:class:`FormatError`), with the old file
    intact."""
    path = check_writable(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, name = tempfile.mkstemp(prefix=_temporary_prefix(path, directory), suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:
            if _disk_full(e, directory):
                raise FormatError(
                    f"{shown(path)}: the disk is full ({_free(directory)} free in {shown(directory)}); "
                    + ("the old file is intact" if path.exists() else "no file was written")
                ) from e
            raise
        with contextlib.suppress(OSError):
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_directory(directory)  # make the rename durable


class AtomicDirectory:
    """A folder written whole or not at all: files go into a temporary folder beside ``path``,
    which :meth:`commit` renames into place (an existing folder at ``path`` is moved aside
    first and removed after, so that at every moment one of the two is whole); :meth:`abort`
    removes it. Use :func:`atomic_directory` in one process; several processes writing into
    one folder (``torch.distributed.checkpoint``) share :attr:`tmp` and let one commit."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise FormatError(f"{shown(self.path)} exists and is not a folder")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(self.path, parent), suffix=".tmp", dir=parent))
        # mkdtemp makes the folder 0o700; the folder put in place gets the old one's mode, or
        # a new folder's (0o777 less the umask)
        try:
            mode = stat.S_IMODE(self.path.stat().st_mode)
        except FileNotFoundError:
            mode = 0o777 & ~_umask()
        with contextlib.suppress(OSError):
            os.chmod(self.tmp, mode)

    def commit(self) -> None:
        """Make the written folder the one at ``path``."""
        _fsync_tree(self.tmp)
        if not self.path.exists():
            os.replace(self.tmp, self.path)
        else:
            old = Path(
                tempfile.mkdtemp(
                    prefix=_temporary_prefix(self.path, self.tmp.parent), suffix=".old", dir=self.tmp.parent
                )
            )
            os.replace(self.path, old / "folder")
            try:
                os.replace(self.tmp, self.path)
            except BaseException:
                os.replace(old / "folder", self.path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        _fsync_directory(self.path.parent if str(self.path.parent) else Path("."))

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder to write into, put in place of ``path`` when the block ends and
    removed if it raises (:class:`AtomicDirectory`)."""
    folder = AtomicDirectory(path)
    try:
        yield folder.tmp
    except BaseException:
        folder.abort()
        raise
    folder.commit()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError), open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_directory(Path(dirpath))


def _fsync_directory(directory: Path) -> None:
    if sys.platform == "win32":  # pragma: no cover
        return
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


#: What ``tempfile.mkstemp`` adds to the prefix and suffix of a name: 8 random characters.
_RANDOM = 8


def _temporary_prefix(path: Path, directory: Path) -> str:
    """``.{name}.``, the name cut so that prefix, random part and ``.tmp`` fit the file
    system's limit on a name (``NAME_MAX``, in bytes: 255 on most)."""
    try:
        limit = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    room = max(limit - len(b"..") - _RANDOM - len(b".tmp"), 1)
    return "." + os.fsdecode(os.fsencode(path.name)[:room]) + "."


def _disk_full(e: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of space: ``ENOSPC``, or an error of torch's writer (its
    message does not say why) while the disk has under 1 MiB free."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        return False


def _free(directory: Path) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if free < 1024 or unit == "GB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "?"  # pragma: no cover


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` into ``path`` through a Python file object (torch cannot open a name
    that is not valid UTF-8)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_weights(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    metadata: Mapping[str, str],
    *,
    layout: Layout | None = None,
) -> None:
    """Write a plain state dict atomically: ``.safetensors`` with ``metadata`` as its string
    metadata (streamed: :func:`write_safetensors`); any other suffix as
    ``torch.save({"state_dict": tensors, "metadata": metadata})`` (loads with
    ``weights_only=True``). ``tensors`` may be an iterable of ``(name, tensor)`` produced on the
    fly, with their ``layout``: a safetensors output then never holds more than one."""
    path = Path(path)
    meta = {str(k): str(v) for k, v in metadata.items()}
    if isinstance(tensors, Mapping):
        layout = layout_of(tensors) if layout is None else layout
        items: Iterable[tuple[str, Tensor]] = tensors.items()
    else:
        if layout is None:
            raise ValueError("save_weights() needs the layout of a stream of tensors")
        items = tensors
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: write_safetensors(tmp, layout, items, meta))
    else:
        atomic_write(path, lambda tmp: torch_save({"state_dict": dict(items), "metadata": meta}, tmp))


def save_checkpoint(path: str | os.PathLike[str], checkpoint: Mapping[str, Any]) -> None:
    """``torch.save`` a checkpoint dict atomically."""
    if Path(path).suffix == ".safetensors":
        raise FormatError(
            f"{shown(path)}: a training checkpoint holds more than tensors; write it as .pt / .pth / .ckpt"
        )
    atomic_write(path, lambda tmp: torch_save(dict(checkpoint), tmp))
