"""The key scheme: every name the store gives a file or an object, in one place.

Keys are ``/``-separated and relative to the store's root (``base_path`` on disk, the bucket
prefix on object storage). ``runs`` below is ``runs_prefix``, ``models`` is ``model_prefix``;
either may be empty, and then its entries sit at the root. See ``docs/format.md``.

=====================================================  ==============================================
key                                                    what
=====================================================  ==============================================
``runs/{run}/meta.json``                               run metadata (mi_crow 1.0's)
``runs/{run}/batch_{i}/metadata.json``                 a batch's metadata + ``_tensor_metadata_names``
``runs/{run}/batch_{i}/{layer}/{key}.safetensors``     one tensor of that batch (mi_crow 1.0's)
``runs/{run}/batch_{i}/.g{gen}/{layer}/{key}...``      the same, written through a commit object
``runs/{run}/batch_{i:06d}.safetensors``               a run batch (``put_run_batch``)
``runs/{run}/detectors/.entries/{n:012d}.safetensors`` one run-level append (ours)
``runs/{run}/detectors/metadata.json`` + files         mi_crow 1.0's run-level detector data (read)
``models/{model}/metadata.json``                       a model's metadata
``models/{model}/model.safetensors``                   its tensors (``.g{gen}/model.safetensors``)
=====================================================  ==============================================

A *generation* (``.g{gen}``) exists only on backends that commit a multi-file entry with a
commit object (object storage): the entry's ``metadata.json`` names it in
``GENERATION_FIELD`` and its tensor files live under it, never overwritten. Names of runs,
layers, keys and models never start with ``.`` (``_names.check_name``), so a generation
folder cannot be mistaken for a layer.
"""

from __future__ import annotations

import os
import re
import time

# The model inputs of a captured batch, stored once per batch (not once per layer) in the pseudo-layer
# mi_crow 1.0's own capture uses for the attention mask (language_model/activations.py).
INPUTS_LAYER = "attention_masks"
MASK_KEY = "attention_mask"
INPUT_IDS_KEY = "input_ids"
TENSOR_NAMES_FIELD = "_tensor_metadata_names"  # mi_crow 1.0's field in batch metadata.json
TENSOR_NAME = "tensor"  # the one tensor in a per-batch detector file
EMPTY_LIST_NAME = "_empty_list"
KIND_FIELD = "mi_crow_store.kind"  # "list" or "dict", in a run batch file's __metadata__
ENTRY_FIELD = "mi_crow_store.entry"  # JSON of one run-level append, in its __metadata__
# In every tensor file of a batch or model: the CRC-32 of that entry's metadata.json bytes, so that
# `check()` and verified reads also cover the JSON that lists the entry's tensors.
METADATA_CRC_FIELD = "mi_crow_store.metadata_crc32"
# In a batch's or model's metadata.json written through a commit object: the generation folder
# that holds its tensor files.
GENERATION_FIELD = "mi_crow_store.generation"
ENTRIES_DIR = ".entries"  # our append log under runs/{run}/detectors
ENTRY_DIGITS = 12  # entry numbers are zero-padded to 12 digits; larger ones simply have more
METADATA_FILE = "metadata.json"  # a batch's (and a model's) metadata; no layer may take this name
MODEL_FILE = "model.safetensors"
RUN_METADATA_FILE = "meta.json"
DETECTORS_DIR = "detectors"
SUFFIX = ".safetensors"

_ENTRY_FILE = re.compile(rf"(0[0-9]{{{ENTRY_DIGITS - 1}}}|[1-9][0-9]{{{ENTRY_DIGITS - 1},}})\.safetensors")
_GENERATION = re.compile(r"\.g([0-9a-f]{24})")


def join(prefix: str, name: str) -> str:
    """``prefix/name``; just ``name`` for the empty prefix (mi_crow 1.0 allows ``runs_prefix=""``)."""
    return f"{prefix}/{name}" if prefix else name


def run_dir(runs_prefix: str, run_id: str) -> str:
    return join(runs_prefix, run_id)


def batch_dir_name(batch_index: int) -> str:
    return f"batch_{batch_index}"


def run_batch_file_name(batch_index: int) -> str:
    return f"batch_{batch_index:06d}{SUFFIX}"


def tensor_file(layer: str, key: str) -> str:
    """A batch's tensor file, relative to the batch folder (or to its generation folder)."""
    return f"{layer}/{key}{SUFFIX}"


def entry_file(n: int) -> str:
    """An append-log file, relative to ``detectors/``."""
    return f"{ENTRIES_DIR}/{n:0{ENTRY_DIGITS}d}{SUFFIX}"


def entry_number(name: str) -> int | None:
    """The number of an append-log file ``{n:012d}.safetensors`` (12 digits or more), else ``None``."""
    m = _ENTRY_FILE.fullmatch(name)
    return int(m.group(1)) if m and m.group(1).isascii() else None


def batch_index(name: str, is_dir: bool) -> int | None:
    """The index of a per-batch directory ``batch_{i}`` or a run batch file
    ``batch_{i:06d}.safetensors`` exactly as the store names them; ``None`` for any other name.

    String methods rather than a regular expression: ``list_run_batches`` calls this for every
    entry of a run (100,000 batches: 10 ms less). ASCII digits only, canonical form only.
    """
    if not name.startswith("batch_"):
        return None
    if is_dir:
        digits = name[6:]
        if digits.isdigit() and digits.isascii() and (digits[0] != "0" or digits == "0"):
            return int(digits)
        return None
    if not name.endswith(SUFFIX):
        return None
    digits = name[6:-12]
    if len(digits) >= 6 and digits.isdigit() and digits.isascii():
        i = int(digits)
        if f"{i:06d}" == digits:
            return i
    return None


def new_generation() -> str:
    """A generation id no other write will draw: 24 hex digits, time-ordered (nanoseconds, then
    32 random bits), so that listings show generations in the order they were written."""
    return f"{time.time_ns():016x}{os.urandom(4).hex()}"


def generation_dir(generation: str) -> str:
    return f".g{generation}"


def generation_of(name: str) -> str | None:
    """The generation of a generation folder's name ``.g{gen}``, else ``None``."""
    m = _GENERATION.fullmatch(name)
    return m.group(1) if m else None


def in_generation(rel: str, generation: str | None) -> str:
    """Where the entry file ``rel`` of a committed entry lives: under its generation folder, or
    (an entry written by a directory swap, or copied from a local store) at ``rel`` itself."""
    return rel if generation is None else f"{generation_dir(generation)}/{rel}"
