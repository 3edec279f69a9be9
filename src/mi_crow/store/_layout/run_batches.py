"""Run batches: one safetensors file per batch (``put_run_batch``), and listing a run's batches."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Dict, List

import torch

from mi_crow.store import _keys
from mi_crow.store import _tensor_file as tf
from mi_crow.store._keys import (
    EMPTY_LIST_NAME,
    KIND_FIELD,
    METADATA_FILE,
)
from mi_crow.store._layout.batches import Batches
from mi_crow.store._names import check_batch_index
from mi_crow.store.errors import CorruptFileError
from mi_crow.store.store import RunBatch


class RunBatches(Batches):
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
            loaded, meta = self._read_file(key, lambda f: self._tensors(f, where), whole=True)
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
        run_dir = self._run_dir(run_id)
        if self.capabilities.atomic_directories:
            found = [_keys.batch_index(name, is_dir) for name, is_dir in self._list(run_dir)]
            return sorted({i for i in found if i is not None})
        # Commit objects: a batch folder counts once its metadata.json is there (tensor files of a
        # write in progress, or of one killed, are not a batch). One recursive listing, paginated,
        # of the keys from "batch_" on (listings are in key order; the append log is not read),
        # also right where a one-level listing shows folders emptied by a delete (SeaweedFS).
        indices = set()
        for info in self._list_tree(run_dir, after="batch"):
            name, _, rest = info.key.partition("/")
            if not name.startswith("batch_"):
                if name < "batch_":
                    continue  # "batch-x", "batch.json", "batch0": before "batch_" in key order
                break
            if rest == METADATA_FILE or not rest:
                i = _keys.batch_index(name, bool(rest))
                if i is not None:
                    indices.add(i)
        return sorted(indices)
