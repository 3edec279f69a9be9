"""``StoreDataloader``: mi_crow 1.0's loader of stored activations, in stored order."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from mi_crow.store.activation_dataset import _RUN_BATCH, _batch_names, _check_run, _listed, _runs, _suggest
from mi_crow.store.store import Store

logger = logging.getLogger(__name__)


class StoreDataloader:
    """Iterate one layer's activations of a run as ``[batch_size, D]`` mini-batches, in stored order.

    A reusable DataLoader-like object: each ``iter()`` is a new epoch. Rows are flattened to
    ``[N, D]`` (``[B, T, D] -> [B*T, D]``; a 1-d tensor becomes one row). Each stored batch
    is read with ``get_detector_metadata_by_layer_by_key``; a batch without the per-batch
    layout falls back to ``get_run_batch`` (its ``key`` entry, else ``"activations"``).
    Mini-batches do not span stored batches, as in mi_crow 1.0.

    Unlike mi_crow 1.0, a run the store does not hold, or a layer its first stored batch (of the
    per-batch layout) does not hold, is an error at the first iteration, not an epoch of nothing
    (or of another layer's activations, which ``get_run_batch``'s fallback returns for a run of
    one layer); the first batch's names are read from its ``metadata.json``, no tensor is loaded.
    A stored batch without the tensor is still skipped, and a missing ``key`` still falls back
    to ``"activations"``, as in mi_crow 1.0.

    Args:
        store: The store to read.
        run_id: The run to iterate over.
        layer: Layer signature to load activations from.
        key: Tensor key to load (default ``"activations"``).
        batch_size: Rows per mini-batch.
        dtype: Convert to this dtype, if given.
        device: Move to this device, if given.
        max_batches: Stop after this many mini-batches per epoch, if given.
        logger_instance: Logger for debug messages (mi_crow 1.0's argument).

    Raises:
        ValueError: At the first iteration, if the run is not in the store or its first stored
            batch has no ``layer`` (the message lists the runs, or the batch's layers).

    Examples:
        >>> import torch
        >>> from mi_crow.store import MemoryStore, StoreDataloader
        >>> store = MemoryStore()
        >>> _ = store.put_detector_metadata("r", 0, {}, {"l": {"activations": torch.ones(2, 3, 4)}})
        >>> [tuple(b.shape) for b in StoreDataloader(store, "r", "l", batch_size=4)]
        [(4, 4), (2, 4)]
    """

    def __init__(
        self,
        store: Store,
        run_id: str,
        layer: str,
        key: str = "activations",
        batch_size: int = 32,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        max_batches: int | None = None,
        logger_instance: Any = None,
    ):
        self.store = store
        self.run_id = run_id
        self.layer = layer
        self.key = key
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.max_batches = max_batches
        self.logger = logger_instance or logger
        self._checked = False

    def _check(self, batches: list[int]) -> None:
        """The run and layer exist (checked once, at the first iteration)."""
        if not batches:
            _check_run(self.store, self.run_id, _runs(self.store))
        else:
            names = _batch_names(self.store, self.run_id, batches[0])
            if _RUN_BATCH not in names and str(self.layer) not in names:
                layers = sorted(names)
                raise ValueError(
                    f"layer {self.layer!r} is not in batch {batches[0]} of run {self.run_id!r}"
                    f"{_suggest(str(self.layer), layers)}; its layers: {_listed(layers)}"
                )
        self._checked = True

    def _load(self, batch_index: int) -> torch.Tensor | None:
        try:
            return self.store.get_detector_metadata_by_layer_by_key(self.run_id, batch_index, self.layer, self.key)
        except FileNotFoundError:
            pass
        try:
            batch = self.store.get_run_batch(self.run_id, batch_index)
        except FileNotFoundError:
            return None
        if isinstance(batch, dict):
            if self.key in batch:
                return batch[self.key]
            if "activations" in batch:
                return batch["activations"]
        return None

    def __iter__(self) -> Iterator[torch.Tensor]:
        """A new epoch over the run's batches, in stored order."""
        yielded = 0
        bs = max(1, int(self.batch_size))
        batches = self.store.list_run_batches(self.run_id)
        if not self._checked:
            self._check(batches)
        for batch_index in batches:
            if self.max_batches is not None and yielded >= self.max_batches:
                return
            acts = self._load(batch_index)
            if acts is None:
                self.logger.debug(
                    "Skipping batch %s: tensor not found (run_id=%s, layer=%s, key=%s)",
                    batch_index,
                    self.run_id,
                    self.layer,
                    self.key,
                )
                continue
            if acts.dim() > 2:
                acts = acts.reshape(-1, acts.shape[-1])
            elif acts.dim() == 1:
                acts = acts.reshape(1, -1)
            if self.dtype is not None:
                acts = acts.to(self.dtype)
            if self.device is not None:
                acts = acts.to(self.device)
            for start in range(0, acts.shape[0], bs):
                if self.max_batches is not None and yielded >= self.max_batches:
                    return
                yield acts[start : start + bs]
                yielded += 1
