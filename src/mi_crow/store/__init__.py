"""mi_crow.store: persistence for activations, the runs that produced them, and models.

``Store`` is the documented contract; ``LocalStore`` keeps a store on local disk,
``ObjectStore`` on S3-compatible object storage (the ``s3`` extra) and ``MemoryStore`` in
memory. All share ``LayoutStore``, which implements the contract once; ``open_store`` picks
one from a path or URL.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from mi_crow.store._backend import Capabilities, GcReport
from mi_crow.store._copy import CopyReport, copy_store
from mi_crow.store._layout import LayoutStore, Problem
from mi_crow.store._open import open_store
from mi_crow.store._progress import disable_progress_bars, enable_progress_bars
from mi_crow.store.activation_dataset import ActivationDataset, ActivationLoader
from mi_crow.store.capture import ActivationCapture
from mi_crow.store.corpus import CaptureSetupError, CorpusReport, capture_corpus, pack_tokens, read_texts
from mi_crow.store.errors import CorruptFileError, CorruptMetadataError, InvalidJSONError, StoreError
from mi_crow.store.local_store import LocalStore
from mi_crow.store.memory_store import MemoryStore
from mi_crow.store.stats import LayerStats, read_stats
from mi_crow.store.store import Store, TensorMetadata
from mi_crow.store.store_dataloader import StoreDataloader

if TYPE_CHECKING:
    from mi_crow.store.object_store import ObjectStore as ObjectStore
    from mi_crow.store.object_store import ObjectStoreError as ObjectStoreError


def __getattr__(name: str) -> Any:
    # ObjectStore needs obstore (the s3 extra): imported when first asked for, so the core
    # install imports nothing of it. It is left out of __all__ so that `import *` works without it.
    if name in ("ObjectStore", "ObjectStoreError"):
        from mi_crow.store import object_store

        return getattr(object_store, name)
    raise AttributeError(f"module 'mi_crow.store' has no attribute {name!r}")


try:
    __version__ = version("mi-crow-store")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "ActivationCapture",
    "ActivationDataset",
    "ActivationLoader",
    "Capabilities",
    "CaptureSetupError",
    "CopyReport",
    "CorpusReport",
    "CorruptFileError",
    "CorruptMetadataError",
    "GcReport",
    "InvalidJSONError",
    "LayerStats",
    "LayoutStore",
    "LocalStore",
    "MemoryStore",
    "Problem",
    "Store",
    "StoreDataloader",
    "StoreError",
    "TensorMetadata",
    "__version__",
    "capture_corpus",
    "copy_store",
    "disable_progress_bars",
    "enable_progress_bars",
    "open_store",
    "pack_tokens",
    "read_stats",
    "read_texts",
]
