"""Hugging Face sharded folders, both ways: :class:`HFFolder` reads one lazily (the index, the
shards' headers, then one tensor at a time), :func:`write_hf_folder` writes one as
``save_pretrained`` lays it out, shard by shard as the tensors come, whole or not at all.

The layout (transformers' ``save_pretrained`` with safetensors): ``model.safetensors`` when the
weights fit in one shard; else ``model-0000k-of-0000n.safetensors`` and
``model.safetensors.index.json``, ``{"metadata": {"total_size": bytes}, "weight_map": {tensor:
shard}}``. Shards are filled in the state dict's order; a tensor larger than the limit gets a
shard of its own (numbered where it comes), as ``huggingface_hub.split_torch_state_dict_into_shards``
does. Each shard's safetensors metadata holds ``format: pt`` (which transformers 4.x requires)
beside polyak's labels.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import FormatError, first_line, shown
from .paths import check_input, kind_of
from .sources import Weights
from .streaming import Layout, SafetensorsFile, write_safetensors
from .writing import atomic_directory

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "WEIGHTS_NAME",
    "INDEX_NAME",
    "BESIDE_FILES",
    "parse_size",
    "plan_shards",
    "HFFolder",
    "is_index_file",
    "write_hf_folder",
    "check_model_folder",
]

#: ``max_shard_size``'s default: that of ``PreTrainedModel.save_pretrained`` in transformers
#: 5.24.0 (its signature says ``max_shard_size: int | str = "50GB"``; transformers 4.x said
#: ``"5GB"``). Units as ``huggingface_hub`` parses them: decimal (1 GB = 10**9 bytes).
DEFAULT_MAX_SHARD_SIZE = "50GB"
#: The weights of a folder that holds one shard, and the index of a sharded one.
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: Files of a Hugging Face folder copied beside the averaged weights: the model's
#: configuration, its generation defaults and the tokenizer's files.
BESIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
#: The largest index read (a 1T-parameter model's index is a few MB).
MAX_INDEX_BYTES = 256 << 20

SHARD = re.compile(r"(?P<stem>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.safetensors")
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS.update({"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40})


def parse_size(size: int | str) -> int:
    """A size in bytes: an int, or a string with a unit (``"5GB"``, ``"500MB"``, ``"2GiB"``;
    KB/MB/GB/TB are powers of 10, as transformers reads them, KiB/MiB/GiB/TiB powers of 2).

    >>> parse_size("5GB"), parse_size("1.5MB"), parse_size("2KiB"), parse_size(100)
    (5000000000, 1500000, 2048, 100)
    """
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be a size, got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        unit = m.group(2).upper() if m else ""
        if not m or (unit and unit not in UNITS and unit != "B"):
            raise ValueError(f"max_shard_size must be bytes or a number with KB, MB, GB, TB (or KiB ...), got {size!r}")
        value = int(float(m.group(1)) * UNITS.get(unit, 1))
    if value < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, got {size!r}")
    return value


def plan_shards(layout: Layout, max_shard_size: int | str, *, name: str = WEIGHTS_NAME) -> list[tuple[str, list[str]]]:
    """The shards of a folder holding ``layout`` (name -> (shape, dtype), in order), as
    ``(file name, tensor names)``: filled in order up to ``max_shard_size`` bytes, a larger
    tensor in a shard of its own, named as ``save_pretrained`` names them (``model.safetensors``
    alone, else ``model-0000k-of-0000n.safetensors``)."""
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for key, (shape, dtype) in layout.items():
        n = math.prod(shape) * dtype.itemsize
        if n > limit:
            shards.append([key])
            continue
        if size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += n
    if current or not shards:
        shards.append(current)
    if len(shards) == 1:
        return [(name, shards[0])]
    stem = name.removesuffix(".safetensors")
    return [(f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors", keys) for i, keys in enumerate(shards)]


def is_index_file(path: Path) -> bool:
    """Whether ``path`` names a Hugging Face index (``*.safetensors.index.json``)."""
    return path.name.endswith(".safetensors.index.json")


def _plain_name(folder: Path, name: Any, what: str) -> str:
    """``name`` if it is a file name in ``folder`` (no folder part, not ``..``); else
    :class:`FormatError`: an index may not reach outside its folder."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or os.sep in name
    ):
        raise FormatError(f"{shown(folder)}: {what} names {shown(repr(name))}, which is not a file name in the folder")
    return name


class HFFolder(Weights):
    """A Hugging Face folder of safetensors weights, given as the folder or as its index file:
    ``model.safetensors.index.json`` and the shards it names, or, without an index, one
    ``*.safetensors`` file or one complete set of ``NAME-0000k-of-0000n.safetensors`` shards.

    The tensors come in the shards' order (by file name), each shard's in the order of its
    data, so that every file is read front to back. Every shard's header is read (``safe_open``
    checks it) and checked against the index before any tensor is: a shard the index names
    that is not in the folder, a missing shard of a set, a tensor in two shards, a tensor the
    index places in a shard that does not hold it or one a shard holds that the index does not
    list, a name that reaches outside the folder, a shard that is not a regular file (a FIFO is
    refused by name, never opened) are each a :class:`FormatError`. Tensors are then read one at a time with plain reads
    (:meth:`polyak.files.SafetensorsFile.read`). ``metadata`` is the first shard's."""

    kind = "hf-folder"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if is_index_file(path):
            check_input(path)
            folder, index = path.parent if str(path.parent) else Path("."), path
        else:
            folder, index = path, None
            if (path / INDEX_NAME).exists():
                index = path / INDEX_NAME
        self.root = folder
        self.index = index
        if index is not None:
            names = self._from_index(folder, index)
        else:
            names = self._by_listing(folder)
        self.shards: dict[str, SafetensorsFile] = {}
        for name in names:
            sf = SafetensorsFile(folder / name)
            sf.close()
            self.shards[name] = sf
        if index is None:
            self.weight_map = {}
            for name, sf in self.shards.items():
                for k in sf.keys():
                    if k in self.weight_map:
                        raise FormatError(
                            f"{shown(folder)}: tensor {shown(k)!r} is in two shards, "
                            f"{shown(self.weight_map[k])} and {shown(name)}"
                        )
                    self.weight_map[k] = name
        else:
            self._check_against_index(folder)
        # the shards' order, then each shard's order on disk: every file is read front to back
        position = {name: i for i, name in enumerate(self.shards)}
        offsets = {name: sf.offsets() for name, sf in self.shards.items()}
        self.weight_map = dict(
            sorted(self.weight_map.items(), key=lambda kv: (position[kv[1]], offsets[kv[1]][kv[0]][0]))
        )
        first = next(iter(self.shards.values()))
        where = f"{index.name} ({len(self.shards)} shards)" if index is not None else ", ".join(self.shards)
        super().__init__(folder, where=where, metadata=first.metadata)

    def _from_index(self, folder: Path, index: Path) -> list[str]:
        check_input(index)
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise FormatError(f"{shown(index)} is over {MAX_INDEX_BYTES >> 20} MB: not an index")
        try:
            with open(index, "rb") as f:
                data = json.loads(f.read())
        except (ValueError, RecursionError, UnicodeDecodeError) as e:
            raise FormatError(f"{shown(index)} is not a JSON index: {first_line(e)}") from e
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(f"{shown(index)} has no weight_map (tensor name -> shard file)")
        self.weight_map = {}
        for k, v in weight_map.items():
            self.weight_map[k] = _plain_name(folder, v, f"{index.name}'s weight_map[{shown(repr(k))}]")
        names = sorted(set(self.weight_map.values()))
        for name in names:
            p = folder / name
            try:
                p.stat()
            except FileNotFoundError:
                raise FormatError(
                    f"{shown(folder)}: the index {shown(index.name)} names shard {shown(name)}, which is not in the "
                    "folder (a missing shard)"
                ) from None
            check_input(p)  # a FIFO or a folder is refused by name before it is opened
        return names

    def _by_listing(self, folder: Path) -> list[str]:
        try:
            mode = folder.stat().st_mode
        except FileNotFoundError:
            raise FormatError(f"{shown(folder)}: no such file or folder") from None
        if not stat.S_ISDIR(mode):
            raise FormatError(f"{shown(folder)} is {kind_of(mode)}, not a checkpoint")
        names = sorted(
            e.name for e in os.scandir(folder) if e.name.endswith(".safetensors") and not e.name.startswith(".")
        )
        if not names:
            raise FormatError(
                f"{shown(folder)} holds no weights: neither {INDEX_NAME} nor *.safetensors files "
                "(nor .metadata, for a torch.distributed.checkpoint folder)"
            )
        if len(names) == 1:
            check_input(folder / names[0])
            return names
        sets: dict[tuple[str, int], list[int]] = {}
        others = []
        for name in names:
            m = SHARD.fullmatch(name)
            if m:
                sets.setdefault((m.group("stem"), int(m.group("n"))), []).append(int(m.group("k")))
            else:
                others.append(name)
        if len(sets) != 1 or others:
            listed = ", ".join(shown(n) for n in names[:6]) + (" ..." if len(names) > 6 else "")
            raise FormatError(
                f"{shown(folder)} holds several sets of weights and no {INDEX_NAME} ({listed}): "
                "give the index or one file"
            )
        ((stem, n), ks) = next(iter(sets.items()))
        missing = [k for k in range(1, n + 1) if k not in ks]
        if missing or n == 0:
            first = f"{stem}-{missing[0] if missing else 1:05d}-of-{n:05d}.safetensors"
            raise FormatError(
                f"{shown(folder)}: shard {shown(first)} is missing ({len(missing)} of {n} shards missing)"
            )
        out = [f"{stem}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        for name in out:
            check_input(folder / name)
        return out

    def _check_against_index(self, folder: Path) -> None:
        holder: dict[str, str] = {}
        for name, sf in self.shards.items():
            for k in sf.keys():
                if k in holder:
                    raise FormatError(
                        f"{shown(folder)}: tensor {shown(k)!r} is in two shards, {shown(holder[k])} and {shown(name)}"
                    )
                holder[k] = name
        for k, name in self.weight_map.items():
            if holder.get(k) != name:
                where = f"it is in {shown(holder[k])}" if k in holder else "no shard holds it"
                raise FormatError(f"{shown(folder)}: the index puts tensor {shown(k)!r} in {shown(name)}, but {where}")
        extra = [k for k in holder if k not in self.weight_map]
        if extra:
            raise FormatError(
                f"{shown(folder)}: shard {shown(holder[extra[0]])} holds {shown(extra[0])!r}, "
                "which the index does not list" + (f" ({len(extra)} such tensors)" if len(extra) > 1 else "")
            )

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shards[self.weight_map[key]].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.shards[self.weight_map[key]].dtype(key)

    def read(self, key: str, out: Tensor | None = None) -> Tensor:
        return self.shards[self.weight_map[key]].read(key, out)

    def files(self) -> list[Path]:
        return [sf.path for sf in self.shards.values()] + ([self.index] if self.index is not None else [])

    def folder(self) -> Path | None:
        return self.root

    def beside(self) -> list[Path]:
        out = []
        for name in BESIDE_FILES:
            p = self.root / name
            with contextlib.suppress(OSError):
                if stat.S_ISREG(p.stat().st_mode):
                    out.append(p)
        return out

    def close(self) -> None:
        for sf in self.shards.values():
            sf.close()


def check_model_folder(path: Path) -> None:
    """Refuse (:class:`FormatError`) to replace an existing folder ``path`` unless it holds only
    what a Hugging Face model folder holds (safetensors shards, their index,
    :data:`BESIDE_FILES`): replacing it removes what it holds."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        raise FormatError(f"{shown(path)} is {kind_of(mode)}, not a folder: name a folder to write the shards into")
    others = sorted(
        e.name
        for e in os.scandir(path)
        if not (
            e.is_file(follow_symlinks=False)
            and (e.name.endswith((".safetensors", ".safetensors.index.json")) or e.name in BESIDE_FILES)
        )
    )
    if others:
        listed = ", ".join(shown(n) for n in others[:5]) + (" ..." if len(others) > 5 else "")
        raise FormatError(
            f"{shown(path)} holds more than a model folder ({listed}); the output folder is replaced whole, so "
            "write to a new or empty folder"
        )


def write_hf_folder(
    path: str | os.PathLike[str],
    layout: Layout,
    tensors: Callable[[Sequence[str]], Iterable[tuple[str, Tensor]]],
    metadata: Mapping[str, str] | None = None,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    beside: Sequence[str | os.PathLike[str]] = (),
) -> list[str]:
    """Write a Hugging Face folder at ``path``, whole or not at all
    (:func:`polyak.files.atomic_directory`; an existing folder must hold only a model folder's
    files: :func:`check_model_folder`), and return the names of the shards.

    ``tensors(order)`` yields ``(name, tensor)`` in the order asked (the shards' order, from
    :func:`plan_shards`), each written to its shard as soon as it comes (a tensor may be a view
    of a buffer the producer reuses: it is not kept). ``metadata`` goes into every shard's
    header with ``format: pt`` (a ``format`` in it is kept as ``polyak_format``); ``beside``
    files (``config.json``, tokenizer files) are copied into the folder."""
    path = Path(path)
    check_model_folder(path)
    plan = plan_shards(layout, max_shard_size)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if "format" in meta:
        meta["polyak_format"] = meta.pop("format")
    meta = {"format": "pt", **meta}
    sources = [check_input(p) for p in beside]
    try:
        with atomic_directory(path) as tmp:
            stream = iter(tensors([k for _, keys in plan for k in keys]))
            for name, keys in plan:
                write_safetensors(tmp / name, {k: layout[k] for k in keys}, itertools.islice(stream, len(keys)), meta)
            if next(stream, None) is not None:
                raise FormatError("more tensors were given than the layout names")
            if len(plan) > 1:
                total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())
                index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, keys in plan for k in keys}}
                with open(tmp / INDEX_NAME, "w", encoding="utf-8") as f:
                    f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
            for src in sources:
                shutil.copyfile(src, tmp / src.name)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FormatError(
                f"{shown(path)}: the disk is full; "
                + ("the old folder is intact" if path.exists() else "no folder was written")
            ) from e
        raise
    return [name for name, _ in plan]
