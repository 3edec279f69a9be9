"""Run-level appends: an append log of one put-if-absent file per entry, and mi_crow 1.0's layout (read)."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from typing import Any, BinaryIO, Dict

from mi_crow.store import _json, _keys
from mi_crow.store import _tensor_file as tf
from mi_crow.store._keys import (
    ENTRIES_DIR,
    ENTRY_DIGITS,
    ENTRY_FIELD,
    METADATA_FILE,
    TENSOR_NAMES_FIELD,
)
from mi_crow.store._layout.run_batches import RunBatches
from mi_crow.store.errors import CorruptFileError, CorruptMetadataError
from mi_crow.store.store import TensorMetadata


class Appends(RunBatches):
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
        lost = 0
        while not self._write_new(f"{det}/{_keys.entry_file(n)}", payload):
            # Another writer took n: look again rather than step by one, in case many did. Numbers
            # stay dense (every number below the last is taken), so a number that is free is past
            # every committed entry: the log's order is the order in which appends were made.
            lost += 1
            # Writers that lost together would race again for the next number at once: wait a
            # random moment first (longer after each loss), so that they arrive one by one.
            time.sleep(random.uniform(0, min(0.001 * 2**lost, 0.05)))
            n = max(n + 1, self._next_entry_number(det, taken=n))
        with self._append_lock:
            self._append_next[run_key] = max(n + 1, self._append_next.get(run_key, 0))
        return det

    def _entry_names(self, det: str) -> list[str]:
        """The append-log files of ``det``, in append order."""
        numbered = [
            (n, name) for name, _ in self._list(f"{det}/{ENTRIES_DIR}") if (n := _keys.entry_number(name)) is not None
        ]
        return [name for _, name in sorted(numbered)]

    def _next_entry_number(self, det: str, taken: int | None = None) -> int:
        """The number after the log's last entry (and after mi_crow 1.0's entries of the run).

        ``taken``: an entry known to exist. Where listings can start after a key (object storage,
        where listing a long log costs a request per 1,000 entries), only the entries after it are
        listed: entry names sort by number while they have 12 digits.
        """
        entries = f"{det}/{ENTRIES_DIR}"
        if taken is not None and self.capabilities.listing_is_recursive and taken < 10**ENTRY_DIGITS - 1:
            after = _keys.entry_file(taken).removeprefix(ENTRIES_DIR + "/")
            names = [info.key for info in self._list_tree(entries, after=after)]
            return max([taken, *(n for name in names if (n := _keys.entry_number(name)) is not None)]) + 1
        numbers = [n for name, _ in self._list(entries) if (n := _keys.entry_number(name)) is not None]
        return max(max(numbers, default=-1) + 1, len(self._legacy_run_entries(det)))

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
            with self._open_whole(key) as f:
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
