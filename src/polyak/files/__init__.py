"""Checkpoint files, read without running code from them and written atomically.

* :mod:`~polyak.files.reading`: :func:`load` (``weights_only``, then the restricted unpickler of
  :mod:`~polyak.files.unpickler`), and finding the weights inside what was loaded;
* :mod:`~polyak.files.streaming`: safetensors one tensor at a time, both ways;
* :mod:`~polyak.files.writing`: :func:`atomic_write`, through which every file polyak writes
  goes, and the writers built on it.

polyak's own checkpoint layout (what the dict holds) is :mod:`polyak.checkpoint`; the readers of
other libraries' layouts live with their only user, the command line (``polyak.cli.formats``).
"""

from .errors import FormatError, first_line, shown
from .paths import check_input, check_writable, openable
from .reading import MODEL_KEYS, Loaded, is_state_dict, iter_tensors, load, model_state_dict, sniff, tensors_only
from .streaming import SAFETENSORS_DTYPES, Layout, SafetensorsFile, layout_of, write_safetensors
from .unpickler import Opaque, restricted_pickle_module
from .writing import (
    AtomicDirectory,
    atomic_directory,
    atomic_write,
    check_output,
    save_checkpoint,
    save_weights,
    torch_save,
)

__all__ = [
    "FormatError",
    "first_line",
    "shown",
    "check_input",
    "check_writable",
    "openable",
    "load",
    "Loaded",
    "sniff",
    "iter_tensors",
    "is_state_dict",
    "tensors_only",
    "MODEL_KEYS",
    "model_state_dict",
    "SafetensorsFile",
    "SAFETENSORS_DTYPES",
    "Layout",
    "layout_of",
    "write_safetensors",
    "Opaque",
    "restricted_pickle_module",
    "atomic_write",
    "AtomicDirectory",
    "atomic_directory",
    "torch_save",
    "check_output",
    "save_weights",
    "save_checkpoint",
]
