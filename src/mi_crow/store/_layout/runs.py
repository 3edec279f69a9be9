"""Run metadata and the list of runs."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, Dict, List

from mi_crow.store._layout.base import LayoutBase, Payload, _is_valid_name


class Runs(LayoutBase):
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

    def update_run_metadata(self, run_id: str, update: Callable[[Dict[str, Any]], Dict[str, Any]]) -> Dict[str, Any]:
        """Replace a run's metadata by ``update(current)``, atomically against every other
        ``update_run_metadata`` of the run, from any thread or process.

        ``update`` gets a copy of the current metadata (``{}`` when the run has none) and returns
        the new metadata; it may be called again after a concurrent update won, so it must
        compute its result from its argument alone. ``LocalStore`` holds an exclusive ``flock``
        on the run's folder while it reads and replaces ``meta.json`` (released by the kernel if
        the process dies; no lock file); ``ObjectStore`` writes with ``If-Match`` on the ETag it
        read (``If-None-Match: *`` when absent) and retries when another writer won;
        ``MemoryStore`` holds a lock.

        Args:
            run_id: Run identifier
            update: A function from the current metadata to the new metadata.

        Returns:
            The metadata written.

        Raises:
            TypeError: If ``update`` is not callable.
            ValueError: If run_id is invalid, or ``update`` returns something that is not a
                JSON-serializable dict (checked as ``put_run_metadata`` checks; nothing is written).
            json.JSONDecodeError: If the stored metadata is not valid JSON (an ``InvalidJSONError``).
            CorruptMetadataError: If it holds JSON other than an object.
            OSError: If file system operations fail (``ObjectStoreError`` after too many lost races).

        Examples:
            >>> from mi_crow.store import MemoryStore
            >>> store = MemoryStore()
            >>> _ = store.put_run_metadata("run", {"model": "gpt2"})
            >>> store.update_run_metadata("run", lambda m: {**m, "writers": [*m.get("writers", []), 0]})
            {'model': 'gpt2', 'writers': [0]}
        """
        if not callable(update):
            raise TypeError(f"update must be a function of the current metadata, got {type(update).__name__}")
        key = self._run_metadata_file(run_id)
        where = self._where(key)
        written: list[dict[str, Any]] = []

        def change(old: bytes | None) -> bytes:
            current = {} if old is None else self._read_json_object_file(io.BytesIO(old), where)[0]
            new = update(current)
            if not isinstance(new, dict):
                raise ValueError(f"update must return the new metadata as a dict, returned {type(new).__name__}")
            data = self._dumps(self._metadata(new, "meta"), "meta")
            written[:] = [new]
            return data

        self._update(key, change)
        return written[0]

    def delete_run(self, run_id: str) -> None:
        """Remove everything of a run: batches, metadata and run-level detector data.

        The run disappears at once (on object storage, which cannot delete many objects at
        once, each entry vanishes whole: its commit object goes first); a missing run is not an
        error.
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
