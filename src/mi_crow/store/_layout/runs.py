"""Run metadata and the list of runs."""

from __future__ import annotations

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
