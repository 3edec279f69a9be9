"""The base of ``LayoutStore``: the backend protocol, the keys, and the helpers every concern uses.

``LayoutStore`` is assembled from one module per concern (``runs``, ``batches``, ``run_batches``,
``appends``, ``models``, ``check``), each a class adding that concern's methods on top of this
one. A backend (``LocalStore``, ``MemoryStore``, ``ObjectStore``) subclasses ``LayoutStore`` and
supplies the byte-level operations of :mod:`mi_crow.store._backend`.
"""

from __future__ import annotations

import abc
import contextlib
import io
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, ContextManager, TypeVar

import torch

from mi_crow.store import _json, _keys
from mi_crow.store import _tensor_file as tf
from mi_crow.store._backend import Capabilities, ObjectInfo, ObjectReplaced
from mi_crow.store._commit import CommitObject, CommitStrategy, DirectorySwap, DirReader
from mi_crow.store._keys import TENSOR_NAME, TENSOR_NAMES_FIELD
from mi_crow.store._names import check_batch_index, check_layer, check_name, check_prefix, check_relpath
from mi_crow.store.errors import CorruptFileError, CorruptMetadataError, InvalidJSONError
from mi_crow.store.limits import MAX_JSON_BYTES
from mi_crow.store.store import Store

Payload = tf.Payload
T = TypeVar("T")

# How many times a read that raced with an atomic overwrite of the same entry is retried.
_READ_RETRIES = 8


class LayoutBase(Store):
    """A :class:`Store` over a tree of keys: layout and encoding, no I/O of its own.

    Subclasses implement the byte-level operations below. All keys they receive are
    ``/``-separated, relative to the store's root, and built only from validated names.
    """

    #: What this backend offers; see :class:`~mi_crow.store._backend.Capabilities`.
    capabilities = Capabilities(atomic_directories=True)

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
        self._update_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Stores travel to DataLoader workers and subprocesses: locks and caches stay behind.
        state = self.__dict__.copy()
        del state["_append_lock"]
        del state["_update_lock"]
        state["_append_next"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._append_lock = threading.Lock()
        self._update_lock = threading.Lock()

    # ------------------------------------------------------------------ backend API
    #
    # A Payload's data buffers are views of the caller's tensors: a backend reads them during
    # the call and keeps no reference once it returns (callers such as ActivationCapture
    # reuse that memory for the next batch), unless its capabilities say keeps_payload.

    @abc.abstractmethod
    def _write(self, key: str, payload: Payload) -> None:
        """Atomically create or replace ``key`` with ``payload`` (head, then data): readers see the
        old content or the new, never a part."""

    @abc.abstractmethod
    def _write_new(self, key: str, payload: Payload) -> bool:
        """Atomically create ``key`` unless it exists (put-if-absent); ``False`` if it did."""

    def _update(self, key: str, change: Callable[[bytes | None], bytes]) -> bytes:
        """Replace the small object ``key`` by ``change(its bytes)`` (``None`` when absent), atomically
        against every other ``_update`` of ``key`` from any thread or process; return what was written.

        ``change`` may be called more than once (a backend that detects a concurrent update
        retries with the new contents); an exception from it propagates and nothing is written.
        An object larger than ``MAX_JSON_BYTES`` raises ``InvalidJSONError`` before it is read.

        This default (for third-party backends) is :meth:`_open` then :meth:`_write` under a lock of
        this store object: atomic only among the threads that share it; this package's backends
        override it.
        """
        with self._update_lock:
            try:
                data: bytes | None = self._read_file(key, lambda f: self._read_json_bytes(f, self._where(key)))
            except FileNotFoundError:
                data = None
            new = change(data)
            self._write(key, Payload(new))
            return new

    def _write_many(self, files: Mapping[str, Payload]) -> None:
        """``_write`` each of ``files`` (in parallel where the backend can); not atomic as a whole."""
        for key, payload in files.items():
            self._write(key, payload)

    @abc.abstractmethod
    def _open(self, key: str) -> ContextManager[BinaryIO]:
        """Open ``key`` for reading (seek/read/readinto; ``seek(0, 2)`` gives its size), one
        version of it throughout. Raises ``FileNotFoundError``."""

    def _open_whole(self, key: str) -> ContextManager[BinaryIO]:
        """:meth:`_open` for a file that will be read to its end: a backend that gains by it
        (object storage: one GET instead of a ranged one per part) fetches all of it at once."""
        return self._open(key)

    def _read_many(self, keys: Sequence[str]) -> dict[str, bytes | memoryview]:
        """The whole contents of ``keys``, fetched at once where the backend gains by it (object
        storage: concurrent GETs); missing keys are left out. ``{}``: read each when opened."""
        return {}

    def _reader_of(self, key: str, data: bytes | memoryview) -> BinaryIO:
        """A file object over contents ``_read_many`` returned."""
        return io.BytesIO(data)

    @abc.abstractmethod
    def _list(self, key: str) -> list[tuple[str, bool]]:
        """``(name, is_dir)`` of the direct children of ``key``; ``[]`` if there are none."""

    def _list_tree(self, key: str, *, after: str | None = None) -> Iterator[ObjectInfo]:
        """Every key under ``key`` (recursively, relative to it), in key order (UTF-8 bytes), from
        the first one greater than ``after``; backends whose capabilities say ``listing_is_recursive``."""
        raise NotImplementedError(f"{type(self).__name__} has no recursive listing")

    @abc.abstractmethod
    def _delete(self, key: str) -> None:
        """Remove ``key`` and everything under it; no-op if missing. Backends with atomic
        directories make it vanish at once; others remove commit objects first."""

    # Directory swap: only backends whose capabilities say atomic_directories.

    def _write_dir(self, key: str, files: Mapping[str, Payload]) -> None:
        """Atomically replace directory ``key`` by one holding exactly ``files``.

        ``files`` maps ``/``-separated relative names to contents; readers see either the
        old directory or the new one, never a mix.
        """
        raise NotImplementedError(f"{type(self).__name__} has no atomic directories")

    def _open_dir(self, key: str) -> ContextManager[DirReader]:
        """Open directory ``key`` for a consistent multi-file read. Raises ``FileNotFoundError``."""
        raise NotImplementedError(f"{type(self).__name__} has no atomic directories")

    @property
    def _commit(self) -> CommitStrategy:
        """How this backend makes a multi-file entry visible."""
        if self.capabilities.atomic_directories:
            return DirectorySwap(self)
        return CommitObject(self)

    def _where(self, key: str) -> str:
        """How to name ``key`` in an error message (a path, a URL)."""
        return f"{self.base_path}/{key}"

    # ------------------------------------------------------------------ keys

    def _run_dir(self, run_id: str) -> str:
        return _keys.run_dir(self.runs_prefix, check_name(run_id, "run_id"))

    def _batch_dir(self, run_id: str, batch_index: int) -> str:
        return f"{self._run_dir(run_id)}/{_keys.batch_dir_name(batch_index)}"

    def _run_batch_file(self, run_id: str, batch_index: int) -> str:
        return f"{self._run_dir(run_id)}/{_keys.run_batch_file_name(batch_index)}"

    def _model_dir(self, model_id: str) -> str:
        return _keys.join(self.model_prefix, check_name(model_id, "model_id"))

    def _run_metadata_file(self, run_id: str) -> str:
        return f"{self._run_dir(run_id)}/{_keys.RUN_METADATA_FILE}"

    def _detectors_dir(self, run_id: str) -> str:
        return f"{self._run_dir(run_id)}/{_keys.DETECTORS_DIR}"

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

    def _exists(self, key: str) -> bool:
        """Whether ``key`` can be opened (a file or an object)."""
        try:
            with self._open(key):
                return True
        except FileNotFoundError:
            return False

    def _read_json_file(self, key: str) -> bytes:
        """The bytes of the JSON file ``key``, refused with ``InvalidJSONError`` before they are
        read if over ``MAX_JSON_BYTES``."""
        where = self._where(key)
        return self._read_file(key, lambda f: self._read_json_bytes(f, where))

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

    @staticmethod
    def _parse_head(prefix: bytes | memoryview, rest: BinaryIO | None, where: str) -> tf.Header:
        """The header of a file from what ``DirReader.read_head`` returned (a memoryview is the
        whole file, held by this read alone: its tensors borrow it)."""
        if rest is None:
            return tf.parse_header(prefix, len(prefix), None, where, borrow=isinstance(prefix, memoryview))
        return tf.parse_header(prefix, rest.seek(0, 2), rest, where)

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
        return _json.loads(self._read_json_file(key), where)

    def _read_json_object(self, key: str) -> dict[str, Any]:
        """:meth:`_read_json` for a file that must hold a JSON object (``CorruptMetadataError`` otherwise)."""

        def read(f: BinaryIO) -> dict[str, Any]:
            return self._read_json_object_file(f, self._where(key))[0]

        return self._read_file(key, read)

    def _read_file(self, key: str, read: Callable[[BinaryIO], T], *, whole: bool = False) -> T:
        """``read`` the file ``key`` (one version of it): read again from the start if the backend
        saw it replaced in the middle (object storage: a concurrent overwrite between two GETs).
        ``whole``: ``read`` reads all of it (:meth:`_open_whole`)."""
        for attempt in range(_READ_RETRIES):
            try:
                with self._open_whole(key) if whole else self._open(key) as f:
                    return read(f)
            except ObjectReplaced:
                if attempt + 1 == _READ_RETRIES:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _consistent_read(self, key: str, read: Callable[[DirReader], T], missing: T) -> T:
        """Run ``read`` on directory ``key``; ``missing`` if that directory does not exist.

        ``read`` raises ``FileNotFoundError`` for a file it needs; if the directory moved
        since it was opened, that was a concurrent atomic overwrite, and the read starts
        over on the new directory. Otherwise the error propagates (a damaged entry).
        """
        for attempt in range(_READ_RETRIES):
            try:
                opened = self._commit.open(key)
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
                except ObjectReplaced:
                    if attempt + 1 < _READ_RETRIES:
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

        def read(f: BinaryIO) -> torch.Tensor:
            return self._tensor(f, tf.read_header(f, where), TENSOR_NAME, where)

        return self._read_file(key, read, whole=True)


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
