"""Checkpoint files, read without running code from them and written atomically.

* :mod:`~polyak.files.reading`: :func:`load` (``weights_only``, then the restricted unpickler of
  :mod:`~polyak.files.unpickler`), and finding the weights inside what was loaded;
* :mod:`~polyak.files.streaming`: safetensors one tensor at a time, both ways;
* :mod:`~polyak.files.writing`: :func:`atomic_write`, through which every file polyak writes
  goes, and the writers built on it;
* :mod:`~polyak.files.sources`, :mod:`~polyak.files.hf`, :mod:`~polyak.files.dcp`,
  :mod:`~polyak.files.inputs`: a checkpoint's weights read one tensor at a time
  (:class:`Weights`), from a file, a Hugging Face sharded folder or a
  ``torch.distributed.checkpoint`` folder (:func:`open_weights`), and Hugging Face folders
  written shard by shard (:func:`write_hf_folder`);
* :mod:`~polyak.files.averaging`: :func:`average_checkpoints`, the average of checkpoints in
  bounded memory (what ``polyak average`` runs).

polyak's own checkpoint layout (what the dict holds) is :mod:`polyak.checkpoint`; the readers of
other libraries' layouts live with their only user, the command line (``polyak.cli.formats``).
"""

from .averaging import Averager, Written, average_checkpoints, is_bn_statistic, write_weights
from .dcp import DCPFolder, read_dcp_metadata
from .errors import FormatError, first_line, shown
from .hf import (
    BESIDE_FILES,
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_NAME,
    WEIGHTS_NAME,
    HFFolder,
    check_model_folder,
    parse_size,
    plan_shards,
    write_hf_folder,
)
from .inputs import Output, check_output_target, check_source, input_kind, open_weights
from .paths import check_input, check_writable, openable
from .reading import MODEL_KEYS, Loaded, is_state_dict, iter_tensors, load, model_state_dict, sniff, tensors_only
from .sources import SafetensorsWeights, StateDictWeights, Weights
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
    "Weights",
    "SafetensorsWeights",
    "StateDictWeights",
    "HFFolder",
    "DCPFolder",
    "read_dcp_metadata",
    "open_weights",
    "input_kind",
    "check_source",
    "Output",
    "check_output_target",
    "check_model_folder",
    "DEFAULT_MAX_SHARD_SIZE",
    "WEIGHTS_NAME",
    "INDEX_NAME",
    "BESIDE_FILES",
    "parse_size",
    "plan_shards",
    "write_hf_folder",
    "Averager",
    "Written",
    "write_weights",
    "average_checkpoints",
    "is_bn_statistic",
]
