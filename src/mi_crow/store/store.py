"""The ``Store`` contract: the documented ``mi_crow.store`` API.

``Store`` keeps the methods of the reference API abstract, exactly as mi_crow 1.0 declares
them, so code typed against ``Store`` keeps working. Concrete stores in this package derive
from :class:`mi_crow.store.LayoutStore`, which implements the whole contract (layout,
naming rules, safetensors encoding) once on top of a few byte-level operations.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Dict, List

import torch

TensorMetadata = Dict[str, Dict[str, torch.Tensor]]
"""``{layer_signature: {tensor_key: tensor}}``, the tensors of one batch or one append."""

RunBatch = List[torch.Tensor] | Dict[str, torch.Tensor]
"""What ``put_run_batch`` takes and ``get_run_batch`` gives back."""


class Store(abc.ABC):
    """Abstract store optimized for tensor batches grouped by run_id.

    This interface intentionally excludes generic bytes/JSON APIs. Implementations
    should focus on efficient safetensors-backed IO.

    The store organizes data hierarchically:

    - Runs: Top-level grouping by run_id
    - Batches: Within each run, data is organized by batch_index
    - Layers: Within each batch, tensors are organized by layer_signature
    - Keys: Within each layer, tensors are identified by key (e.g., "activations")

    Examples:
        >>> import tempfile, torch
        >>> from mi_crow.store import LocalStore
        >>> store = LocalStore(tempfile.mkdtemp())
        >>> store.put_detector_metadata("run", 0, {"n": 1}, {"layer0": {"activations": torch.ones(2, 3)}})
        'runs/run/batch_0'
        >>> meta, tensors = store.get_detector_metadata("run", 0)
        >>> meta, tensors["layer0"]["activations"].shape
        ({'n': 1}, torch.Size([2, 3]))
    """

    def __init__(
        self,
        base_path: Path | str = "",
        runs_prefix: str = "runs",
        dataset_prefix: str = "datasets",
        model_prefix: str = "models",
    ):
        """Initialize Store.

        Args:
            base_path: Base directory path for the store
            runs_prefix: Prefix for runs directory (default: "runs")
            dataset_prefix: Prefix for datasets directory (default: "datasets")
            model_prefix: Prefix for models directory (default: "models")
        """
        self.runs_prefix = runs_prefix
        self.dataset_prefix = dataset_prefix
        self.model_prefix = model_prefix
        self.base_path = Path(base_path)

    # --- Run batches (one safetensors file per batch) ---

    @abc.abstractmethod
    def put_run_batch(self, run_id: str, batch_index: int, tensors: RunBatch) -> str:
        """Save one batch of a run as a single safetensors file.

        Args:
            run_id: Run identifier
            batch_index: Batch index (non-negative)
            tensors: A dict of named tensors, or a list of tensors

        Returns:
            The key of the file, e.g. ``"runs/{run_id}/batch_000003.safetensors"``.

        Raises:
            ValueError: If a parameter or tensor is invalid (nothing is written).
            OSError: If file system operations fail.
        """
        raise NotImplementedError

    @abc.abstractmethod
    def get_run_batch(self, run_id: str, batch_index: int) -> RunBatch:
        """Load one batch of a run, as the type it was saved with (dict or list).

        When only the per-batch detector layout exists for that index, returns
        ``{"activations": t}`` for one layer, ``{"activations_{layer}": t}`` for several.

        Raises:
            ValueError: If a parameter is invalid.
            FileNotFoundError: If the batch does not exist.
            OSError: If a file exists but cannot be read.
        """
        raise NotImplementedError

    @abc.abstractmethod
    def list_run_batches(self, run_id: str) -> List[int]:
        """Return the sorted indices of a run's batches, in either layout (``[]`` if none)."""
        raise NotImplementedError

    def iter_run_batches(self, run_id: str) -> Iterator[RunBatch]:
        """Yield ``get_run_batch`` for every index of ``list_run_batches(run_id)``."""
        for idx in self.list_run_batches(run_id):
            yield self.get_run_batch(run_id, idx)

    def iter_run_batch_range(
        self,
        run_id: str,
        *,
        start: int = 0,
        stop: int | None = None,
        step: int = 1,
    ) -> Iterator[RunBatch]:
        """Iterate run batches for indices in range(start, stop, step).

        If stop is None, it will be set to max(list_run_batches(run_id)) + 1 (or 0 if none).
        Raises ValueError if step == 0 or start < 0. Indices without a batch are skipped.
        The arguments are checked when the method is called, before iteration starts.

        Examples:
            >>> import tempfile, torch
            >>> from mi_crow.store import LocalStore
            >>> store = LocalStore(tempfile.mkdtemp())
            >>> for i in range(4):
            ...     _ = store.put_run_batch("r", i, [torch.tensor([i])])
            >>> [b[0].item() for b in store.iter_run_batch_range("r", start=1, step=2)]
            [1, 3]
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an int, got {type(step).__name__} {step!r}")
        if step == 0:
            raise ValueError("step must not be 0")
        if isinstance(start, bool) or not isinstance(start, int):
            raise ValueError(f"start must be an int, got {type(start).__name__} {start!r}")
        if start < 0:
            raise ValueError("start must be >= 0")
        if stop is not None and (isinstance(stop, bool) or not isinstance(stop, int)):
            raise ValueError(f"stop must be an int or None, got {type(stop).__name__} {stop!r}")
        return self._iter_range(run_id, start, stop, step)

    def _iter_range(self, run_id: str, start: int, stop: int | None, step: int) -> Iterator[RunBatch]:
        # Visits the stored indices that fall in the range, never the range itself: O(stored
        # batches) whatever stop is (stop=10**9 over 3 batches reads 3).
        indices = self.list_run_batches(run_id)
        if not indices:
            return
        if stop is None:
            stop = max(indices) + 1
        wanted = range(start, stop, step)
        for idx in sorted((i for i in indices if i in wanted), reverse=step < 0):
            try:
                yield self.get_run_batch(run_id, idx)
            except FileNotFoundError:
                # Deleted since it was listed: skipped, as a missing index is. A batch that is
                # still there but damaged (a listed tensor file missing) raises.
                if idx in self.list_run_batches(run_id):
                    raise

    @abc.abstractmethod
    def delete_run(self, run_id: str) -> None:
        """Remove everything stored for a run (a missing run is not an error)."""
        raise NotImplementedError

    # --- Run metadata ---

    @abc.abstractmethod
    def put_run_metadata(self, run_id: str, meta: Dict[str, Any]) -> str:
        """Persist metadata for a run (e.g., dataset/model identifiers).

        Args:
            run_id: Run identifier
            meta: Metadata dictionary to save (must be JSON-serializable)

        Returns:
            String path/key where metadata was stored (e.g., "runs/{run_id}/meta.json")

        Raises:
            ValueError: If run_id is invalid or meta is not JSON-serializable
            OSError: If file system operations fail

        Note:
            Implementations should store JSON at a stable location, e.g., runs/{run_id}/meta.json.
        """
        raise NotImplementedError

    @abc.abstractmethod
    def get_run_metadata(self, run_id: str) -> Dict[str, Any]:
        """Load metadata for a run.

        Args:
            run_id: Run identifier

        Returns:
            Metadata dictionary, or empty dict if not found

        Raises:
            ValueError: If run_id is invalid
            json.JSONDecodeError: If metadata file exists but contains invalid JSON
        """
        raise NotImplementedError

    def update_run_metadata(self, run_id: str, update: Callable[[Dict[str, Any]], Dict[str, Any]]) -> Dict[str, Any]:
        """Replace a run's metadata by ``update(current)``, for several writers of one run.

        ``update`` gets a copy of the current metadata (``{}`` when the run has none) and returns
        the new metadata. It may be called more than once (again after a concurrent update won),
        so it must compute its result from its argument alone, with no side effects. The stores
        of this package make the whole read-update-write atomic against every other
        ``update_run_metadata`` call, from any thread or process (``LocalStore``: an exclusive
        ``flock`` on the run's folder; ``ObjectStore``: a conditional PUT, retried). A plain
        ``put_run_metadata`` still replaces the metadata outright.

        This default, for stores that subclass ``Store`` directly, is ``get_run_metadata`` then
        ``put_run_metadata``: **not atomic** (a concurrent writer's update can be lost).

        Args:
            run_id: Run identifier
            update: A function from the current metadata to the new metadata.

        Returns:
            The metadata written.

        Raises:
            TypeError: If ``update`` is not callable.
            ValueError: If run_id is invalid, or ``update`` returns something that is not a
                JSON-serializable dict (nothing is written then).
            OSError: If file system operations fail.

        Examples:
            >>> from mi_crow.store import MemoryStore
            >>> store = MemoryStore()
            >>> for _ in range(3):
            ...     _ = store.update_run_metadata("run", lambda m: {**m, "count": m.get("count", 0) + 1})
            >>> store.get_run_metadata("run")
            {'count': 3}
        """
        if not callable(update):
            raise TypeError(f"update must be a function of the current metadata, got {type(update).__name__}")
        new = update(copy.deepcopy(self.get_run_metadata(run_id)))
        if not isinstance(new, dict):
            raise ValueError(f"update must return the new metadata as a dict, returned {type(new).__name__}")
        self.put_run_metadata(run_id, new)
        return new

    # --- Per-batch detector data ---

    @abc.abstractmethod
    def put_detector_metadata(
        self,
        run_id: str,
        batch_index: int,
        metadata: Dict[str, Any],
        tensor_metadata: TensorMetadata,
    ) -> str:
        """Save detector metadata with separate JSON and tensor store.

        Args:
            run_id: Run identifier
            batch_index: Batch index (must be non-negative)
            metadata: JSON-serializable metadata dictionary (aggregated from all detectors)
            tensor_metadata: Dictionary mapping layer_signature to dict of tensor_key -> tensor
                (from all detectors)

        Returns:
            Full path key used for store (e.g., "runs/{run_id}/batch_{batch_index}")

        Raises:
            ValueError: If parameters are invalid or metadata is not JSON-serializable
            OSError: If file system operations fail
        """
        raise NotImplementedError

    @abc.abstractmethod
    def get_detector_metadata(self, run_id: str, batch_index: int) -> tuple[Dict[str, Any], TensorMetadata]:
        """Load detector metadata with separate JSON and tensor store.

        Args:
            run_id: Run identifier
            batch_index: Batch index

        Returns:
            Tuple of (metadata dict, tensor_metadata dict). Returns empty dicts if not found.

        Raises:
            ValueError: If parameters are invalid or metadata format is invalid
            json.JSONDecodeError: If metadata file exists but contains invalid JSON
            OSError: If tensor files exist but cannot be loaded
        """
        raise NotImplementedError

    @abc.abstractmethod
    def get_detector_metadata_by_layer_by_key(
        self, run_id: str, batch_index: int, layer: str, key: str
    ) -> torch.Tensor:
        """Get a specific tensor from detector metadata by layer and key.

        Args:
            run_id: Run identifier
            batch_index: Batch index
            layer: Layer signature
            key: Tensor key (e.g., "activations")

        Returns:
            The requested tensor

        Raises:
            ValueError: If parameters are invalid
            FileNotFoundError: If the tensor doesn't exist
            OSError: If tensor file exists but cannot be loaded
        """
        raise NotImplementedError

    # --- Unified detector metadata for whole runs ---

    @abc.abstractmethod
    def put_run_detector_metadata(
        self,
        run_id: str,
        metadata: Dict[str, Any],
        tensor_metadata: TensorMetadata,
    ) -> str:
        """Save detector metadata for a whole run in a unified location.

        This differs from ``put_detector_metadata`` which organises data per-batch under
        ``runs/{run_id}/batch_{batch_index}``. ``put_run_detector_metadata`` instead stores
        everything under ``runs/{run_id}/detectors``. Implementations are expected to
        support being called multiple times for the same ``run_id`` and append / aggregate
        new metadata rather than overwrite it.

        Args:
            run_id: Run identifier
            metadata: JSON-serialisable metadata dictionary aggregated from all detectors
                for the current chunk / batch.
            tensor_metadata: Dictionary mapping layer_signature to dict of tensor_key ->
                tensor (from all detectors).

        Returns:
            String path/key where metadata was stored (e.g. ``runs/{run_id}/detectors``).

        Raises:
            ValueError: If parameters are invalid or metadata is not JSON-serialisable.
            OSError: If file system operations fail.
        """
        raise NotImplementedError

    # --- Beyond the reference API (implemented by LayoutStore) ---

    def iter_run_detector_metadata(self, run_id: str) -> Iterator[tuple[Dict[str, Any], TensorMetadata]]:
        """Yield ``(metadata, tensor_metadata)`` for each ``put_run_detector_metadata`` call, in order."""
        raise NotImplementedError(f"{type(self).__name__} does not implement iter_run_detector_metadata")

    def list_runs(self) -> List[str]:
        """Return the sorted ids of the runs in the store."""
        raise NotImplementedError(f"{type(self).__name__} does not implement list_runs")

    def put_model(self, model_id: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, Any] | None = None) -> str:
        """Save a model's tensors (e.g. an SAE's state dict) and metadata; returns its key."""
        raise NotImplementedError(f"{type(self).__name__} does not implement put_model")

    def get_model(self, model_id: str) -> tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """Load a model's tensors and metadata."""
        raise NotImplementedError(f"{type(self).__name__} does not implement get_model")

    def list_models(self) -> List[str]:
        """Return the sorted ids of the models in the store."""
        raise NotImplementedError(f"{type(self).__name__} does not implement list_models")

    def delete_model(self, model_id: str) -> None:
        """Remove a model (a missing model is not an error)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement delete_model")
