"""``LayoutStore``: the whole ``Store`` contract, written once over a few byte operations.

The run / batch / layer / key layout (mi_crow 1.0's, see ``docs/format.md``), the naming
rules and the safetensors encoding live here. A backend (``LocalStore``, ``MemoryStore``, an
object store later) subclasses :class:`LayoutStore` and supplies only the abstract
``_write``, ``_write_new``, ``_write_dir``, ``_open``, ``_open_dir``, ``_list`` and
``_delete`` operations on ``/``-separated keys relative to ``base_path``.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, ContextManager, Dict, List, Protocol, TypeVar

import torch

from mi_crow.store import _json
from mi_crow.store import _tensor_file as tf
from mi_crow.store._names import check_batch_index, check_layer, check_name, check_prefix, check_relpath
from mi_crow.store.errors import CorruptFileError, CorruptMetadataError, InvalidJSONError
from mi_crow.store.limits import MAX_JSON_BYTES
from mi_crow.store.store import RunBatch, Store, TensorMetadata

Payload = tf.Payload
T = TypeVar("T")

TENSOR_NAMES_FIELD = "_tensor_metadata_names"  # mi_crow 1.0's field in batch metadata.json
TENSOR_NAME = "tensor"  # the one tensor in a per-batch detector file
EMPTY_LIST_NAME = "_empty_list"
KIND_FIELD = "mi_crow_store.kind"  # "list" or "dict", in a run batch file's __metadata__
ENTRY_FIELD = "mi_crow_store.entry"  # JSON of one run-level append, in its __metadata__
ENTRIES_DIR = ".entries"  # our append log under runs/{run}/detectors
ENTRY_DIGITS = 12  # entry numbers are zero-padded to 12 digits; larger ones simply have more
# In every tensor file of a batch or model: the CRC-32 of that entry's metadata.json bytes, so that
# `check()` and verified reads also cover the JSON that lists the entry's tensors.
METADATA_CRC_FIELD = "mi_crow_store.metadata_crc32"
METADATA_FILE = "metadata.json"  # a batch's (and a model's) metadata; no layer may take this name
MODEL_FILE = "model.safetensors"
RUN_METADATA_FILE = "meta.json"
DETECTORS_DIR = "detectors"

_ENTRY_FILE = re.compile(rf"(0[0-9]{{{ENTRY_DIGITS - 1}}}|[1-9][0-9]{{{ENTRY_DIGITS - 1},}})\.safetensors")


def _entry_number(name: str) -> int | None:
    """The number of an append-log file ``{n:012d}.safetensors`` (12 digits or more), else ``None``."""
    m = _ENTRY_FILE.fullmatch(name)
    return int(m.group(1)) if m and m.group(1).isascii() else None


def _join(prefix: str, name: str) -> str:
    """``prefix/name``; just ``name`` for the empty prefix (mi_crow 1.0 allows ``runs_prefix=""``)."""
    return f"{prefix}/{name}" if prefix else name


def _batch_index(name: str, is_dir: bool) -> int | None:
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
    if not name.endswith(".safetensors"):
        return None
    digits = name[6:-12]
    if len(digits) >= 6 and digits.isdigit() and digits.isascii():
        i = int(digits)
        if f"{i:06d}" == digits:
            return i
    return None


# How many times a read that raced with an atomic overwrite of the same entry is retried.
_READ_RETRIES = 8


class DirReader(Protocol):
    """A consistent view of one directory, as returned by ``LayoutStore._open_dir``."""

    def open(self, rel: str) -> BinaryIO:
        """Open the file ``rel`` (``/``-separated, relative to the directory); close it after use."""
        ...

    def read_head(self, rel: str, n: int) -> tuple[bytes, BinaryIO | None]:
        """The first ``n`` bytes of ``rel``, and the file still open if it may hold more.

        ``None`` in place of the file means the bytes are the whole file. The caller closes it.
        """
        ...

    def list(self, rel: str) -> list[tuple[str, bool]]:
        """``(name, is_dir)`` of the entries of subdirectory ``rel`` (``""``: this one); ``[]`` if missing."""
        ...

    def moved(self) -> bool:
        """Whether the directory was replaced or removed since it was opened."""
        ...


class LayoutStore(Store):
    """A :class:`Store` over a tree of files: layout and encoding, no I/O of its own.

    Subclasses implement the byte-level operations below. All keys they receive are
    ``/``-separated, relative to ``base_path``, and built only from validated names.
    """

    def __init__(
        self,
        base_path: Path | str = "",
        runs_prefix: str = "runs",
        dataset_prefix: str = "datasets",
        model_prefix: str = "models",
        *,
        verify: bool = False,
        checksums: bool = True,
        allow_nan: bool = True,
    ):
        """Initialize the store.

        Args:
            base_path: Base directory path for the store
            runs_prefix: Prefix for runs directory
            dataset_prefix: Prefix for datasets directory
            model_prefix: Prefix for models directory
            verify: Check every tensor read against the CRC-32 recorded when it was written,
                raising ``OSError`` naming the file on a mismatch (costs one pass over the bytes).
            checksums: Record the CRC-32 of every tensor written (computed on a helper thread
                while the data is written), for ``verify``, ``check()`` and
                ``mi-crow-store verify``. False writes plain safetensors files without them.
            allow_nan: Accept NaN and ±Infinity in metadata and write them as Python's ``json``
                (and mi_crow 1.0) does (``NaN``, ``Infinity``); False writes strict JSON and
                refuses them with ``ValueError``.
        """
        for what, prefix in (
            ("runs_prefix", runs_prefix),
            ("dataset_prefix", dataset_prefix),
            ("model_prefix", model_prefix),
        ):
            check_prefix(prefix, what)
        super().__init__(base_path, runs_prefix, dataset_prefix, model_prefix)
        self.verify_reads = verify
        self.checksums = checksums
        self.allow_nan = allow_nan
        # Tensors of at least this many bytes come back memory-mapped (backends with real files).
        self._mmap_min: int | None = None
        self._append_lock = threading.Lock()
        self._append_next: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Stores travel to DataLoader workers and subprocesses: locks and caches stay behind.
        state = self.__dict__.copy()
        del state["_append_lock"]
        state["_append_next"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._append_lock = threading.Lock()

    # ------------------------------------------------------------------ backend API
    #
    # A Payload's data buffers are views of the caller's tensors: a backend reads them during
    # the call and keeps no reference once it returns (callers such as ActivationCapture
    # reuse that memory for the next batch).

    @abc.abstractmethod
    def _write(self, key: str, payload: Payload) -> None:
        """Atomically create or replace file ``key`` with ``payload`` (head, then data)."""

    @abc.abstractmethod
    def _write_new(self, key: str, payload: Payload) -> bool:
        """Atomically create file ``key`` unless it exists (put-if-absent); ``False`` if it did."""

    @abc.abstractmethod
    def _write_dir(self, key: str, files: Mapping[str, Payload]) -> None:
        """Atomically replace directory ``key`` by one holding exactly ``files``.

        ``files`` maps ``/``-separated relative names to contents; readers see either the
        old directory or the new one, never a mix.
        """

    @abc.abstractmethod
    def _open(self, key: str) -> ContextManager[BinaryIO]:
        """Open file ``key`` for reading (seek/read/readinto). Raises ``FileNotFoundError``."""

    @abc.abstractmethod
    def _open_dir(self, key: str) -> ContextManager[DirReader]:
        """Open directory ``key`` for a consistent multi-file read. Raises ``FileNotFoundError``."""

    @abc.abstractmethod
    def _list(self, key: str) -> list[tuple[str, bool]]:
        """``(name, is_dir)`` of the direct children of directory ``key``; ``[]`` if missing."""

    @abc.abstractmethod
    def _delete(self, key: str) -> None:
        """Remove file or directory tree ``key`` so that it vanishes at once; no-op if missing."""

    def _where(self, key: str) -> str:
        """How to name ``key`` in an error message (a path, a URL)."""
        return os.path.join(self.base_path, key)

    # ------------------------------------------------------------------ keys

    def _run_dir(self, run_id: str) -> str:
        return _join(self.runs_prefix, check_name(run_id, "run_id"))

    def _batch_dir(self, run_id: str, batch_index: int) -> str:
        return f"{self._run_dir(run_id)}/batch_{batch_index}"

    def _run_batch_file(self, run_id: str, batch_index: int) -> str:
        return f"{self._run_dir(run_id)}/batch_{batch_index:06d}.safetensors"

    def _model_dir(self, model_id: str) -> str:
        return _join(self.model_prefix, check_name(model_id, "model_id"))

    def _run_metadata_file(self, run_id: str) -> str:
        return f"{self._run_dir(run_id)}/{RUN_METADATA_FILE}"

    def _detectors_dir(self, run_id: str) -> str:
        return f"{self._run_dir(run_id)}/{DETECTORS_DIR}"

    # mi_crow 1.0's own library calls these private helpers of its Store (its SaeTrainer saves a
    # training run's model.pt, history.json and snapshots/ under ``_run_key(run_id)``); they
    # return what mi_crow 1.0 returns. Files put there are not the store's: they are never
    # listed as batches, not checked, not touched by gc, and removed with the run.

    def _run_key(self, run_id: str) -> Path:
        """mi_crow 1.0's path of a run's folder: ``base_path / runs_prefix / run_id``."""
        return self.base_path / self._run_dir(run_id)

    def _run_batch_key(self, run_id: str, batch_index: int) -> Path:
        """mi_crow 1.0's path of a batch's folder: ``base_path / runs_prefix / run_id / batch_{i}``."""
        return self.base_path / self._batch_dir(run_id, check_batch_index(batch_index))

    def _run_metadata_key(self, run_id: str) -> Path:
        """mi_crow 1.0's path of a run's metadata: ``base_path / runs_prefix / run_id / meta.json``."""
        return self.base_path / self._run_metadata_file(run_id)

    def _top_names(self, prefix: str) -> set[str]:
        """Names at the top of ``base_path`` that belong to the other prefixes, when ``prefix`` is
        empty (runs or models then live directly under ``base_path``)."""
        if prefix:
            return set()
        others = (self.runs_prefix, self.model_prefix, self.dataset_prefix)
        return {p.split("/")[0] for p in others if p}

    # ------------------------------------------------------------------ helpers

    def _read_bytes(self, key: str) -> bytes:
        with self._open(key) as f:
            return f.read()

    @staticmethod
    def _read_json_bytes(f: BinaryIO, where: str) -> bytes:
        """The bytes of the JSON file open as ``f``, refused before reading if over ``MAX_JSON_BYTES``."""
        size = f.seek(0, 2)
        if size > MAX_JSON_BYTES:
            raise InvalidJSONError(where, f"{size:,} bytes of JSON; at most {MAX_JSON_BYTES:,} are read")
        f.seek(0)
        return f.read(size)  # exactly its size: read(MAX_JSON_BYTES) would allocate that much first

    @classmethod
    def _read_json_object_file(cls, f: BinaryIO, where: str) -> tuple[dict[str, Any], bytes]:
        """The JSON object in the file open as ``f``, and its bytes (for the metadata CRC).

        Raises:
            InvalidJSONError: If the file is over ``MAX_JSON_BYTES`` or not valid JSON.
            CorruptMetadataError: If it holds JSON other than an object.
        """
        raw = cls._read_json_bytes(f, where)
        doc = _json.loads(raw, where)
        if not isinstance(doc, dict):
            raise CorruptMetadataError(where, f"must hold a JSON object, holds a {_json_type(doc)}")
        return doc, raw

    def _metadata(self, meta: Any, what: str, reserved: Sequence[str] = ()) -> dict[str, Any]:
        """Check the caller's metadata by this store's JSON rules (``allow_nan``)."""
        return _json.check(meta, what, reserved=reserved, allow_nan=self.allow_nan)

    def _dumps(self, obj: Any, what: str = "metadata") -> bytes:
        return _json.dumps(obj, allow_nan=self.allow_nan, what=what)

    def _encode(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Payload:
        return tf.encode(tensors, metadata, checksums=self.checksums)

    def _tensor(self, f: BinaryIO | None, header: tf.Header, name: str, where: str) -> torch.Tensor:
        """Read one tensor the way this store reads (checksums, memory mapping)."""
        return tf.read_tensor(f, header, name, where, verify=self.verify_reads, mmap_min=self._mmap_min)

    def _tensors(self, f: BinaryIO, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Read every tensor of a file the way this store reads."""
        return tf.read_all(f, where, verify=self.verify_reads, mmap_min=self._mmap_min)

    def _read_json(self, key: str) -> Any:
        """Parse the JSON file ``key``; ``FileNotFoundError`` if it is missing, ``InvalidJSONError``
        if it is larger than ``MAX_JSON_BYTES`` (checked before reading) or not valid JSON."""
        where = self._where(key)
        with self._open(key) as f:
            return _json.loads(self._read_json_bytes(f, where), where)

    def _read_json_object(self, key: str) -> dict[str, Any]:
        """:meth:`_read_json` for a file that must hold a JSON object (``CorruptMetadataError`` otherwise)."""
        with self._open(key) as f:
            return self._read_json_object_file(f, self._where(key))[0]

    def _consistent_read(self, key: str, read: Callable[[DirReader], T], missing: T) -> T:
        """Run ``read`` on directory ``key``; ``missing`` if that directory does not exist.

        ``read`` raises ``FileNotFoundError`` for a file it needs; if the directory moved
        since it was opened, that was a concurrent atomic overwrite, and the read starts
        over on the new directory. Otherwise the error propagates (a damaged entry).
        """
        for attempt in range(_READ_RETRIES):
            try:
                opened = self._open_dir(key)
                d = opened.__enter__()
            except FileNotFoundError:
                return missing
            with contextlib.ExitStack() as stack:
                stack.push(opened)
                try:
                    return read(d)
                except FileNotFoundError:
                    if attempt + 1 < _READ_RETRIES and d.moved():
                        continue
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _prepare_tensor_metadata(
        tensor_metadata: Any,
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, list[str]]]:
        """Validate ``{layer: {key: tensor}}`` completely; return prepared tensors and names."""
        if not isinstance(tensor_metadata, Mapping):
            raise ValueError(
                f"tensor_metadata must be a dict of {{layer: {{key: tensor}}}}, got {type(tensor_metadata).__name__}"
            )
        prepared: dict[str, dict[str, torch.Tensor]] = {}
        names: dict[str, list[str]] = {}
        for raw_layer, tensors in tensor_metadata.items():
            layer = check_layer(raw_layer)
            if layer in prepared:
                raise ValueError(f"tensor_metadata has the layer {raw_layer!r} twice (as an int and as a str)")
            if not isinstance(tensors, Mapping):
                raise ValueError(
                    f"tensor_metadata[{layer!r}] must be a dict of {{key: tensor}}, got {type(tensors).__name__}"
                )
            if not tensors:
                continue  # mi_crow 1.0 skips layers without tensors too
            prepared[layer] = {}
            for key, value in tensors.items():
                check_name(key, f"tensor key in layer {layer!r}")
                prepared[layer][key] = tf.prepare_tensor(value, f"tensor_metadata[{layer!r}][{key!r}]")
            names[layer] = list(prepared[layer])
        return prepared, names

    @staticmethod
    def _check_tensor_names(tensors: Any, what: str) -> dict[str, torch.Tensor]:
        if not isinstance(tensors, Mapping):
            raise ValueError(f"{what} must be a dict of {{name: tensor}}, got {type(tensors).__name__}")
        out = {}
        for name, value in tensors.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"{what} has an invalid tensor name {name!r}; names must be non-empty strings")
            if name == "__metadata__":
                raise ValueError(f"{what} must not contain the name '__metadata__': safetensors reserves it")
            out[name] = tf.prepare_tensor(value, f"{what}[{name!r}]")
        return out

    def _read_names_field(self, names: Any, where: str) -> dict[str, list[str]]:
        """Validate a ``{layer: [key, ...]}`` map read from a file before using it in paths.

        Raises:
            CorruptMetadataError: (a ``ValueError``) if it is not such a map or holds a name the
                store would refuse (``../x``, a control character...).
        """
        if not isinstance(names, dict):
            raise CorruptMetadataError(where, f"{TENSOR_NAMES_FIELD} must be a JSON object, got {_json_type(names)}")
        out: dict[str, list[str]] = {}
        for layer, keys in names.items():
            if not isinstance(keys, list):
                raise CorruptMetadataError(where, f"{TENSOR_NAMES_FIELD}[{layer!r}] must be a list of keys")
            try:
                out[check_name(layer, "layer signature")] = [check_name(k, "tensor key") for k in keys]
            except ValueError as e:
                raise CorruptMetadataError(where, f"unsafe name in {TENSOR_NAMES_FIELD}: {e}") from None
        return out

    # ------------------------------------------------------------------ run metadata

    def put_run_metadata(self, run_id: str, meta: Dict[str, Any]) -> str:
        """Persist metadata for a run at ``runs/{run_id}/meta.json`` (atomically replaced).

        Raises:
            ValueError: If run_id is invalid or meta is not JSON-serializable (nothing is written).
            OSError: If file system operations fail.
        """
        key = self._run_metadata_file(run_id)
        data = self._dumps(self._metadata(meta, "meta"), "meta")
        self._write(key, Payload(data))
        return key

    def get_run_metadata(self, run_id: str) -> Dict[str, Any]:
        """Load metadata for a run, or ``{}`` if the run has none.

        Raises:
            ValueError: If run_id is invalid.
            json.JSONDecodeError: If the metadata file is not valid JSON (an ``InvalidJSONError``,
                naming the file).
            CorruptMetadataError: If it holds JSON other than an object.
            CorruptFileError: If it is not a regular file (a FIFO, a link...).
        """
        key = self._run_metadata_file(run_id)
        try:
            return self._read_json_object(key)
        except FileNotFoundError:
            return {}

    # ------------------------------------------------------------------ per-batch detector data

    def put_detector_metadata(
        self,
        run_id: str,
        batch_index: int,
        metadata: Dict[str, Any],
        tensor_metadata: TensorMetadata,
    ) -> str:
        """Save a batch as ``runs/{run_id}/batch_{i}/`` (mi_crow 1.0's layout), atomically.

        The whole batch directory is built aside and swapped in at once: a reader sees the
        previous version or the new one, never a mix, and a failed call changes nothing.

        Raises:
            ValueError: If a name, the index, a tensor or the metadata is invalid; nothing is
                written.
            OSError: If file system operations fail.
        """
        batch_index = check_batch_index(batch_index)
        key = self._batch_dir(run_id, batch_index)
        self._metadata(metadata, "metadata", reserved=(TENSOR_NAMES_FIELD,))
        prepared, names = self._prepare_tensor_metadata(tensor_metadata)
        if METADATA_FILE in prepared:
            raise ValueError(
                f"layer signature {METADATA_FILE!r} is not allowed in put_detector_metadata: the batch's own "
                f"{METADATA_FILE} has that name"
            )
        meta_bytes = self._dumps({**metadata, TENSOR_NAMES_FIELD: names})
        meta_crc = self._metadata_crc(meta_bytes)
        files: dict[str, Payload] = {}
        for layer, tensors in prepared.items():
            for tkey, t in tensors.items():
                files[f"{layer}/{tkey}.safetensors"] = self._encode({TENSOR_NAME: t}, meta_crc)
        files[METADATA_FILE] = Payload(meta_bytes)  # last: the file that makes the batch readable
        self._write_dir(key, files)
        return key

    def _metadata_crc(self, meta_bytes: bytes) -> dict[str, str] | None:
        """The ``__metadata__`` field that ties an entry's tensor files to its metadata.json."""
        return {METADATA_CRC_FIELD: f"{tf.checksum_of(meta_bytes):08x}"} if self.checksums else None

    def _check_metadata_crc(self, header: tf.Header, meta_bytes: bytes, meta_where: str) -> None:
        """Raise ``CorruptFileError`` if ``header`` records a metadata.json CRC that ``meta_bytes`` fails."""
        header.check_header()
        recorded = header.metadata.get(METADATA_CRC_FIELD)
        if recorded is not None and recorded != f"{tf.checksum_of(meta_bytes):08x}":
            raise CorruptMetadataError(
                meta_where,
                f"checksum mismatch: it has CRC-32 {tf.checksum_of(meta_bytes):08x}, but {header.where} records "
                f"{recorded} for the metadata.json written with it",
            )

    def get_detector_metadata(self, run_id: str, batch_index: int) -> tuple[Dict[str, Any], TensorMetadata]:
        """Load a batch's metadata and tensors; ``({}, {})`` if the batch does not exist.

        Raises:
            ValueError: If a parameter is invalid or the metadata lacks ``_tensor_metadata_names``.
            json.JSONDecodeError: If metadata.json is not valid JSON.
            FileNotFoundError: If a tensor file the metadata lists is missing (a damaged entry).
            OSError: If a tensor file exists but cannot be read.
        """
        batch_index = check_batch_index(batch_index)
        key = self._batch_dir(run_id, batch_index)

        def read(d: DirReader) -> tuple[Dict[str, Any], TensorMetadata]:
            try:
                metadata, names, meta_bytes = self._read_batch_metadata(d, key)
            except FileNotFoundError:
                if d.moved():
                    raise
                return {}, {}
            out: TensorMetadata = {}
            batch_where = self._where(key)
            meta_where = self._where(f"{key}/{METADATA_FILE}")
            for layer, keys in names.items():
                if not keys:
                    continue
                tensors = out[layer] = {}
                for tkey in keys:
                    rel = f"{layer}/{tkey}.safetensors"
                    tensors[tkey] = self._read_listed(
                        d, rel, f"{batch_where}/{rel}", meta_bytes if self.verify_reads else None, meta_where
                    )
            return metadata, out

        not_found: tuple[Dict[str, Any], TensorMetadata] = ({}, {})
        return self._consistent_read(key, read, not_found)

    def _read_batch_metadata(self, d: DirReader, key: str) -> tuple[dict[str, Any], dict[str, list[str]], bytes]:
        """A batch's metadata.json: the caller's metadata, the validated tensor names, the raw bytes.

        Raises:
            FileNotFoundError: If the batch has no metadata.json.
            CorruptMetadataError: If it is not an object with a valid ``_tensor_metadata_names``.
        """
        where = self._where(f"{key}/{METADATA_FILE}")
        with d.open(METADATA_FILE) as f:
            metadata, raw = self._read_json_object_file(f, where)
        if TENSOR_NAMES_FIELD not in metadata:
            raise CorruptMetadataError(
                where, f"field {TENSOR_NAMES_FIELD!r} not found in detector metadata; cannot retrieve tensors"
            )
        names = self._read_names_field(metadata.pop(TENSOR_NAMES_FIELD), where)
        return metadata, names, raw

    def _read_listed(
        self, d: DirReader, rel: str, where: str, meta_bytes: bytes | None = None, meta_where: str = ""
    ) -> torch.Tensor:
        """Read the one-tensor file ``rel`` that a batch's metadata.json lists (with ``meta_bytes``,
        also check the metadata.json CRC the file records)."""
        try:
            prefix, rest = d.read_head(rel, tf.PREFETCH)
            try:
                header = tf.parse_header(prefix, rest, where)
                if meta_bytes is not None:
                    self._check_metadata_crc(header, meta_bytes, meta_where)
                return self._tensor(rest, header, TENSOR_NAME, where)
            finally:
                if rest is not None:
                    rest.close()
        except FileNotFoundError:
            raise FileNotFoundError(f"tensor file {where} is listed in its batch's metadata.json but missing") from None

    def get_detector_metadata_by_layer_by_key(
        self, run_id: str, batch_index: int, layer: str, key: str
    ) -> torch.Tensor:
        """Read one tensor of a batch, touching only that tensor's file.

        Raises:
            ValueError: If a parameter is invalid.
            FileNotFoundError: If the tensor doesn't exist.
            OSError: If the tensor file exists but cannot be read.
        """
        batch_index = check_batch_index(batch_index)
        rel = f"{check_layer(layer, 'layer')}/{check_name(key, 'key')}.safetensors"
        fkey = f"{self._batch_dir(run_id, batch_index)}/{rel}"
        where = self._where(fkey)
        try:
            with self._open(fkey) as f:
                header = tf.read_header(f, where)
                return self._tensor(f, header, TENSOR_NAME, where)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"Tensor not found at {where} for run_id={run_id!r}, batch_index={batch_index}, "
                f"layer={layer!r}, key={key!r}"
            ) from None

    # ------------------------------------------------------------------ run batches

    def put_run_batch(self, run_id: str, batch_index: int, tensors: RunBatch) -> str:
        """Save a batch as one file ``runs/{run_id}/batch_{i:06d}.safetensors`` (atomically replaced).

        A dict is saved under its own names; a list as ``item_0..item_n``; an empty list as one
        empty tensor ``_empty_list`` (mi_crow 1.0's encoding). The container type is also
        recorded in the file's ``__metadata__`` so ``get_run_batch`` returns the same type even
        for a dict whose names look like ``item_0``.

        Raises:
            ValueError: If a parameter or tensor is invalid (nothing is written).
            OSError: If file system operations fail.
        """
        batch_index = check_batch_index(batch_index)
        key = self._run_batch_file(run_id, batch_index)
        if isinstance(tensors, Mapping):
            kind = "dict"
            to_save = self._check_tensor_names(tensors, "tensors")
        elif isinstance(tensors, (list, tuple)):
            kind = "list"
            if tensors:
                to_save = {f"item_{i}": tf.prepare_tensor(t, f"tensors[{i}]") for i, t in enumerate(tensors)}
            else:
                to_save = {EMPTY_LIST_NAME: torch.tensor([])}
        else:
            raise ValueError(f"tensors must be a dict or a list of tensors, got {type(tensors).__name__}")
        self._write(key, self._encode(to_save, {KIND_FIELD: kind}))
        return key

    def get_run_batch(self, run_id: str, batch_index: int) -> RunBatch:
        """Load a batch saved by ``put_run_batch``, as the type it was saved with.

        When only the per-batch detector layout exists for that index, returns
        ``{"activations": t}`` for one layer and ``{"activations_{layer}": t}`` for several,
        as mi_crow 1.0 does.

        Raises:
            ValueError: If a parameter is invalid.
            FileNotFoundError: If neither layout has the batch.
            OSError: If a file exists but cannot be read.
        """
        batch_index = check_batch_index(batch_index)
        key = self._run_batch_file(run_id, batch_index)
        where = self._where(key)
        try:
            with self._open(key) as f:
                loaded, meta = self._tensors(f, where)
        except FileNotFoundError:
            return self._run_batch_from_detector_layout(run_id, batch_index)
        kind = meta.get(KIND_FIELD)
        if kind == "dict":
            return loaded
        names = list(loaded)
        if names == [EMPTY_LIST_NAME]:
            return []
        items = {}
        for name in names:
            m = re.fullmatch(r"item_(0|[1-9]\d*)", name)
            if m is None:
                break
            items[int(m.group(1))] = loaded[name]
        else:
            if sorted(items) == list(range(len(items))):
                return [items[i] for i in range(len(items))]
        if kind == "list":
            raise CorruptFileError(where, f"is marked as a list but holds tensors {names[:10]}")
        return loaded

    def _run_batch_from_detector_layout(self, run_id: str, batch_index: int) -> Dict[str, torch.Tensor]:
        _, tensors = self.get_detector_metadata(run_id, batch_index)
        with_acts = {layer: t["activations"] for layer, t in tensors.items() if "activations" in t}
        if not with_acts:
            raise FileNotFoundError(f"Batch {batch_index} not found for run {run_id}")
        if len(tensors) == 1:
            return {"activations": next(iter(with_acts.values()))}
        return {f"activations_{layer}": t for layer, t in with_acts.items()}

    def list_run_batches(self, run_id: str) -> List[int]:
        """Return the sorted batch indices of a run, from both layouts (``[]`` for no run)."""
        found = [_batch_index(name, is_dir) for name, is_dir in self._list(self._run_dir(run_id))]
        return sorted({i for i in found if i is not None})

    def delete_run(self, run_id: str) -> None:
        """Remove everything of a run: batches, metadata and run-level detector data.

        The run disappears at once; a missing run is not an error.
        """
        key = self._run_dir(run_id)
        self._delete(key)
        with self._append_lock:
            self._append_next.pop(key, None)

    def list_runs(self) -> List[str]:
        """Return the sorted ids of the runs in the store."""
        others = self._top_names(self.runs_prefix)
        return sorted(
            name
            for name, is_dir in self._list(self.runs_prefix)
            if is_dir and name not in others and _is_valid_name(name)
        )

    # ------------------------------------------------------------------ run-level appends

    def put_run_detector_metadata(
        self,
        run_id: str,
        metadata: Dict[str, Any],
        tensor_metadata: TensorMetadata,
    ) -> str:
        """Append one entry of run-level detector data under ``runs/{run_id}/detectors``.

        Each call writes one new file, ``detectors/.entries/{n:012d}.safetensors``, holding
        its tensors and its metadata, created only if absent: a call costs O(its own size)
        however long the run is, and concurrent appenders (threads or processes) each get
        their own number. A run started by mi_crow 1.0 (``detectors/metadata.json``)
        continues after its last entry. Read the entries back with
        ``iter_run_detector_metadata``.

        Returns:
            ``"runs/{run_id}/detectors"``.

        Raises:
            ValueError: If parameters are invalid or metadata is not JSON-serialisable.
            OSError: If file system operations fail.
        """
        det = self._detectors_dir(run_id)
        self._metadata(metadata, "metadata", reserved=(TENSOR_NAMES_FIELD,))
        prepared, names = self._prepare_tensor_metadata(tensor_metadata)
        entry = _json.dumps_compact({"metadata": metadata, "tensors": names}, allow_nan=self.allow_nan)
        flat = {f"{layer}/{k}": t for layer, tensors in prepared.items() for k, t in tensors.items()}
        payload = self._encode(flat, {ENTRY_FIELD: entry})
        run_key = self._run_dir(run_id)
        with self._append_lock:
            n = self._append_next.get(run_key)
        if n is None:
            n = self._next_entry_number(det)
        while not self._write_new(f"{det}/{ENTRIES_DIR}/{n:0{ENTRY_DIGITS}d}.safetensors", payload):
            # Another writer took n: look again rather than step by one, in case many did.
            n = max(n + 1, self._next_entry_number(det))
        with self._append_lock:
            self._append_next[run_key] = max(n + 1, self._append_next.get(run_key, 0))
        return det

    def _entry_names(self, det: str) -> list[str]:
        """The append-log files of ``det``, in append order."""
        numbered = [
            (n, name) for name, _ in self._list(f"{det}/{ENTRIES_DIR}") if (n := _entry_number(name)) is not None
        ]
        return [name for _, name in sorted(numbered)]

    def _next_entry_number(self, det: str) -> int:
        taken = [n for name, _ in self._list(f"{det}/{ENTRIES_DIR}") if (n := _entry_number(name)) is not None]
        return max(max(taken, default=-1) + 1, len(self._legacy_run_entries(det)))

    def _legacy_run_entries(self, det: str) -> list[Any]:
        """The ``batches`` list of mi_crow 1.0's ``detectors/metadata.json`` (``[]`` if none)."""
        key = f"{det}/{METADATA_FILE}"
        try:
            doc = self._read_json(key)
        except FileNotFoundError:
            return []
        batches = doc.get("batches") if isinstance(doc, dict) else None
        if not isinstance(batches, list):
            raise CorruptMetadataError(
                self._where(key), "has no 'batches' list; it is not mi_crow's run detector metadata"
            )
        return batches

    @staticmethod
    def _parse_entry(header: tf.Header, where: str) -> tuple[dict[str, Any], Any]:
        """The metadata and tensor names of a run-level append, from its file's header."""
        raw = header.metadata.get(ENTRY_FIELD)
        if raw is None:
            raise CorruptFileError(where, f"is not a run detector entry: no {ENTRY_FIELD!r} in its __metadata__")
        entry = _json.loads(raw, where)
        if not isinstance(entry, dict) or not isinstance(entry.get("metadata"), dict) or "tensors" not in entry:
            raise CorruptMetadataError(where, f"{ENTRY_FIELD!r} must be an object with 'metadata' and 'tensors'")
        return entry["metadata"], entry["tensors"]

    def iter_run_detector_metadata(self, run_id: str) -> Iterator[tuple[Dict[str, Any], TensorMetadata]]:
        """Yield ``(metadata, tensor_metadata)`` for each ``put_run_detector_metadata`` call, in order.

        Entries written by mi_crow 1.0 come first (without the ``batch_index`` and
        ``_tensor_metadata_names`` fields it adds), then this package's. Entries are read one
        at a time: memory stays bounded by one entry. Yields nothing for a run without any.

        Examples:
            >>> import tempfile, torch
            >>> from mi_crow.store import LocalStore
            >>> store = LocalStore(tempfile.mkdtemp())
            >>> for step in range(3):
            ...     _ = store.put_run_detector_metadata("r", {"step": step}, {"l": {"top": torch.arange(step)}})
            >>> [(m["step"], t["l"]["top"].tolist()) for m, t in store.iter_run_detector_metadata("r")]
            [(0, []), (1, [0]), (2, [0, 1])]
        """
        return self._iter_entries(self._detectors_dir(run_id))

    def _iter_entries(self, det: str) -> Iterator[tuple[Dict[str, Any], TensorMetadata]]:
        legacy = self._legacy_run_entries(det)
        if legacy:
            yield from self._iter_legacy_entries(det, legacy)
        for name in self._entry_names(det):
            key = f"{det}/{ENTRIES_DIR}/{name}"
            where = self._where(key)
            with self._open(key) as f:
                header = tf.read_header(f, where)
                if self.verify_reads:
                    header.check_header()  # also for an entry without tensors
                metadata, tnames = self._parse_entry(header, where)
                tensors: TensorMetadata = {}
                for layer, keys in self._read_names_field(tnames, where).items():
                    tensors[layer] = {k: self._tensor(f, header, f"{layer}/{k}", where) for k in keys}
            yield metadata, tensors

    def _iter_legacy_entries(self, det: str, batches: list[Any]) -> Iterator[tuple[Dict[str, Any], TensorMetadata]]:
        """mi_crow 1.0's layout: one file per layer/key holding tensors ``batch_0..batch_n``."""
        with contextlib.ExitStack() as stack:
            files: dict[str, tuple[BinaryIO, tf.Header, str]] = {}
            for i, raw in enumerate(batches):
                where = self._where(f"{det}/{METADATA_FILE}")
                if not isinstance(raw, dict):
                    raise CorruptMetadataError(where, f"entry {i} of 'batches' is not a JSON object")
                metadata = dict(raw)
                n = metadata.pop("batch_index", i)
                names = self._read_names_field(metadata.pop(TENSOR_NAMES_FIELD, {}), where)
                tensors: TensorMetadata = {}
                for layer, keys in names.items():
                    for k in keys:
                        rel = f"{layer}/{k}.safetensors"
                        if rel not in files:
                            fwhere = self._where(f"{det}/{rel}")
                            f = stack.enter_context(self._open(f"{det}/{rel}"))
                            files[rel] = (f, tf.read_header(f, fwhere), fwhere)
                        f, header, fwhere = files[rel]
                        tensors.setdefault(layer, {})[k] = self._tensor(f, header, f"batch_{n}", fwhere)
                yield metadata, tensors

    # ------------------------------------------------------------------ models

    def put_model(self, model_id: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, Any] | None = None) -> str:
        """Save a model as ``models/{model_id}/model.safetensors`` + ``metadata.json``, atomically.

        Args:
            model_id: A single path component (use ``org--name`` for Hugging Face-style ids).
            tensors: The model's tensors, e.g. ``sae.state_dict()``.
            metadata: JSON-serialisable metadata (config, training settings); ``{}`` if None.

        Returns:
            ``"models/{model_id}"``.

        Raises:
            ValueError: If a parameter, tensor or the metadata is invalid (nothing is written).

        Examples:
            >>> import tempfile, torch
            >>> from mi_crow.store import LocalStore
            >>> store = LocalStore(tempfile.mkdtemp())
            >>> store.put_model("sae-l3", {"W_enc": torch.zeros(4, 8)}, {"d_sae": 8})
            'models/sae-l3'
            >>> tensors, meta = store.get_model("sae-l3")
            >>> tensors["W_enc"].shape, meta
            (torch.Size([4, 8]), {'d_sae': 8})
        """
        key = self._model_dir(model_id)
        meta = self._metadata({} if metadata is None else metadata, "metadata")
        prepared = self._check_tensor_names(tensors, "tensors")
        meta_bytes = self._dumps(meta)
        self._write_dir(
            key,
            {
                MODEL_FILE: self._encode(prepared, {"format": "pt", **(self._metadata_crc(meta_bytes) or {})}),
                METADATA_FILE: Payload(meta_bytes),
            },
        )
        return key

    def get_model(self, model_id: str) -> tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """Load a model saved by ``put_model``: ``(tensors, metadata)``.

        Raises:
            ValueError: If model_id is invalid.
            FileNotFoundError: If there is no such model.
            OSError: If its files cannot be read.
        """
        key = self._model_dir(model_id)

        def read(d: DirReader) -> tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
            meta_where = self._where(f"{key}/{METADATA_FILE}")
            with d.open(METADATA_FILE) as f:
                meta, raw = self._read_json_object_file(f, meta_where)
            with d.open(MODEL_FILE) as f:
                where = self._where(f"{key}/{MODEL_FILE}")
                if self.verify_reads:
                    self._check_metadata_crc(tf.read_header(f, where), raw, meta_where)
                tensors, _ = self._tensors(f, where)
            return tensors, meta

        missing: tuple[Dict[str, torch.Tensor], Dict[str, Any]] | None = None
        found = self._consistent_read(key, read, missing)
        if found is None:
            raise FileNotFoundError(f"no model {model_id!r} at {self._where(key)}")
        return found

    def list_models(self) -> List[str]:
        """Return the sorted ids of the models in the store."""
        others = self._top_names(self.model_prefix)
        return sorted(
            name
            for name, is_dir in self._list(self.model_prefix)
            if is_dir and name not in others and _is_valid_name(name)
        )

    def delete_model(self, model_id: str) -> None:
        """Remove a model; a missing model is not an error."""
        self._delete(self._model_dir(model_id))

    # ------------------------------------------------------------------ integrity

    def check(self, run_ids: Sequence[str] | None = None) -> list[Problem]:
        """Read and verify every entry; return the damaged files (``[]`` when all is well).

        Checks run metadata, every per-batch directory (its metadata.json, each listed tensor
        file, and tensor files it does not list), run batches, run-level detector data
        (mi_crow's and ours, metadata included) and, when ``run_ids`` is None, every model: JSON
        must parse and have the shape the store writes, tensor files must be regular files,
        complete, and match the CRC-32s recorded at write time (of their data, of their header,
        and of the metadata.json written with them). Never raises on damaged data: each damaged
        file is one :class:`Problem`. Files the store does not own (``model.pt`` that mi_crow's
        trainer saves in a run folder) are not checked. Reads one tensor at a time.

        Args:
            run_ids: Only these runs (and no models); all runs and models when None.

        Raises:
            ValueError: If a run id in ``run_ids`` is not a valid name.

        Examples:
            >>> import tempfile, torch
            >>> from mi_crow.store import LocalStore
            >>> store = LocalStore(tempfile.mkdtemp())
            >>> _ = store.put_detector_metadata("r", 0, {}, {"l": {"k": torch.ones(3)}})
            >>> store.check()
            []
        """
        problems: list[Problem] = []
        if run_ids is None:
            runs = self._guarded(self._where(self.runs_prefix), self.list_runs, problems) or []
        else:
            runs = [check_name(r, "run_id") for r in run_ids]
        for run in runs:
            problems += self._check_run(run)
        if run_ids is None:
            for model in self._guarded(self._where(self.model_prefix), self.list_models, problems) or []:
                problems += self._check_model(model)
        return problems

    @staticmethod
    def _guarded(where: str, fn: Callable[[], T], problems: list[Problem]) -> T | None:
        """``fn()``, or ``None`` with its damage recorded as a Problem at ``where``."""
        try:
            return fn()
        except (OSError, ValueError) as e:
            problems.append(_problem(where, e))
            return None

    def _check_json(self, key: str, *, required: bool = True) -> list[Problem]:
        try:
            self._read_json_object(key)
        except FileNotFoundError:
            return [Problem(self._where(key), "missing")] if required else []
        except (ValueError, OSError) as e:
            return [_problem(self._where(key), e)]
        return []

    def _check_header(
        self, f: BinaryIO, where: str, names: Sequence[str] | None = None, meta: tuple[bytes, str] | None = None
    ) -> tf.Header:
        """Check the tensor file open as ``f``: header, every tensor (or ``names``), and the
        metadata.json CRC it records (``meta``: its bytes and name). Raises on damage."""
        header = tf.read_header(f, where)
        header.check_header()
        if meta is not None:
            self._check_metadata_crc(header, *meta)
        for name in header.tensors if names is None else names:
            tf.read_tensor(f, header, name, where, verify=True)
        return header

    def _check_tensor_file(
        self, key: str, names: Sequence[str] | None = None, meta: tuple[bytes, str] | None = None
    ) -> list[Problem]:
        where = self._where(key)
        try:
            with self._open(key) as f:
                self._check_header(f, where, names, meta)
        except FileNotFoundError:
            return [Problem(where, "missing (listed in its entry's metadata)")]
        except (OSError, ValueError) as e:
            return [_problem(where, e)]
        return []

    def _check_batch(self, key: str) -> list[Problem]:
        """Check one per-batch directory consistently (retried if an overwrite swaps it meanwhile)."""

        def read(d: DirReader) -> list[Problem]:
            meta_where = self._where(f"{key}/{METADATA_FILE}")
            try:
                _, names, raw = self._read_batch_metadata(d, key)
            except FileNotFoundError:
                if d.moved():
                    raise
                return [Problem(meta_where, "missing: the batch directory has no metadata.json")]
            except (OSError, ValueError) as e:
                return [_problem(meta_where, e)]
            problems: list[Problem] = []
            listed = {f"{layer}/{k}.safetensors" for layer, keys in names.items() for k in keys}
            for rel in sorted(listed):
                where = self._where(f"{key}/{rel}")
                try:
                    with d.open(rel) as f:
                        self._check_header(f, where, [TENSOR_NAME], (raw, meta_where))
                except FileNotFoundError:
                    if d.moved():
                        raise
                    problems.append(Problem(where, "missing (listed in its batch's metadata.json)"))
                except (OSError, ValueError) as e:
                    problems.append(_problem(where, e))
            # A tensor file the metadata does not list: a name was removed from it (or a file planted).
            for layer, is_dir in d.list(""):
                if not is_dir:
                    continue
                for name, sub_is_dir in d.list(layer):
                    rel = f"{layer}/{name}"
                    if name.endswith(".safetensors") and not sub_is_dir and rel not in listed:
                        problems.append(
                            Problem(self._where(f"{key}/{rel}"), "tensor file not listed in the batch's metadata.json")
                        )
            return problems

        try:
            return self._consistent_read(key, read, [])
        except (OSError, ValueError) as e:
            return [_problem(self._where(key), e)]

    def _check_entry(self, key: str) -> list[Problem]:
        """Check one run-level append: header, metadata JSON, the tensors it lists, every tensor."""
        where = self._where(key)
        try:
            with self._open(key) as f:
                header = self._check_header(f, where)
                _, tnames = self._parse_entry(header, where)
                for layer, keys in self._read_names_field(tnames, where).items():
                    for k in keys:
                        if f"{layer}/{k}" not in header.tensors:
                            raise CorruptFileError(where, f"lists tensor {layer}/{k}, which the file does not hold")
        except FileNotFoundError:
            return []  # removed meanwhile (delete_run)
        except (OSError, ValueError) as e:
            return [_problem(where, e)]
        return []

    def _check_run(self, run: str) -> list[Problem]:
        problems: list[Problem] = []
        run_dir = self._run_dir(run)
        problems += self._check_json(self._run_metadata_file(run), required=False)
        entries = self._guarded(self._where(run_dir), lambda: self._list(run_dir), problems) or []
        for name, is_dir in sorted(entries):
            key = f"{run_dir}/{name}"
            index = _batch_index(name, is_dir)
            if index is not None and is_dir:
                problems += self._check_batch(key)
            elif index is not None:
                problems += self._check_tensor_file(key)
            elif is_dir and _batch_index(name, False) is not None:
                problems.append(Problem(self._where(key), "is a directory, not a run batch file"))
        det = self._detectors_dir(run)
        legacy = self._guarded(self._where(f"{det}/{METADATA_FILE}"), lambda: self._legacy_run_entries(det), problems)
        legacy_where = self._where(f"{det}/{METADATA_FILE}")
        legacy_files: set[str] = set()
        for i, entry in enumerate(legacy or []):
            if not isinstance(entry, dict):
                problems.append(Problem(legacy_where, f"entry {i} of 'batches' is not a JSON object"))
                continue
            try:
                listed = self._read_names_field(entry.get(TENSOR_NAMES_FIELD, {}), legacy_where)
            except CorruptFileError as e:
                problems.append(Problem(e.path, f"entry {i} of 'batches': {e.reason}"))
                continue
            legacy_files |= {f"{det}/{layer}/{k}.safetensors" for layer, keys in listed.items() for k in keys}
        for key in sorted(legacy_files):
            problems += self._check_tensor_file(key)
        names = self._guarded(self._where(f"{det}/{ENTRIES_DIR}"), lambda: self._entry_names(det), problems) or []
        for name in names:
            problems += self._check_entry(f"{det}/{ENTRIES_DIR}/{name}")
        return problems

    def _check_model(self, model: str) -> list[Problem]:
        key = self._model_dir(model)
        meta_key = f"{key}/{METADATA_FILE}"
        meta_where = self._where(meta_key)
        try:
            with self._open(meta_key) as f:
                _, raw = self._read_json_object_file(f, meta_where)
        except FileNotFoundError:
            return [Problem(meta_where, "missing")]
        except (OSError, ValueError) as e:
            return [_problem(meta_where, e)]
        return self._check_tensor_file(f"{key}/{MODEL_FILE}", meta=(raw, meta_where))

    # ------------------------------------------------------------------ single tensors

    def put_tensor(self, key: str, tensor: torch.Tensor) -> None:
        """Save one tensor (named ``"tensor"``) at ``key``, a relative path under ``base_path``.

        Raises:
            ValueError: If ``key`` is unsafe or ``tensor`` cannot be stored (nothing is written).
        """
        check_relpath(key, "key")
        self._write(key, self._encode({TENSOR_NAME: tf.prepare_tensor(tensor, "tensor")}))

    def get_tensor(self, key: str) -> torch.Tensor:
        """Load a tensor saved by ``put_tensor``.

        Raises:
            ValueError: If ``key`` is unsafe.
            FileNotFoundError: If there is no file at ``key``.
            OSError: If the file cannot be read.
        """
        check_relpath(key, "key")
        where = self._where(key)
        with self._open(key) as f:
            header = tf.read_header(f, where)
            return self._tensor(f, header, TENSOR_NAME, where)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if isinstance(value, list):
        return "JSON array"
    if isinstance(value, str):
        return "JSON string"
    if isinstance(value, bool) or value is None:
        return f"JSON {json.dumps(value)}"
    return "JSON number" if isinstance(value, (int, float)) else type(value).__name__


def _problem(where: str, e: BaseException) -> Problem:
    """A Problem for the damage ``e`` found at ``where`` (its own file, when it names one)."""
    if isinstance(e, CorruptFileError):
        return Problem(e.path, e.reason)
    return Problem(where, f"{type(e).__name__}: {e}")


def _is_valid_name(name: str) -> bool:
    try:
        check_name(name, "name")
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Problem:
    """One damaged file found by :meth:`LayoutStore.check`."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"
