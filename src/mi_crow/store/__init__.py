"""mi_crow.store: persistence for activations, the runs that produced them, and models.

``Store`` is the documented contract; ``LocalStore`` keeps a store on local disk and
``MemoryStore`` in memory. Both share ``LayoutStore``, which implements the contract once.
"""

from importlib.metadata import PackageNotFoundError, version

from mi_crow.store._layout import LayoutStore, Problem
from mi_crow.store.activation_dataset import ActivationDataset
from mi_crow.store.capture import ActivationCapture
from mi_crow.store.errors import CorruptFileError, CorruptMetadataError, InvalidJSONError, StoreError
from mi_crow.store.local_store import GcReport, LocalStore
from mi_crow.store.memory_store import MemoryStore
from mi_crow.store.store import Store, TensorMetadata
from mi_crow.store.store_dataloader import StoreDataloader

try:
    __version__ = version("mi-crow-store")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "ActivationCapture",
    "ActivationDataset",
    "CorruptFileError",
    "CorruptMetadataError",
    "GcReport",
    "InvalidJSONError",
    "LayoutStore",
    "LocalStore",
    "MemoryStore",
    "Problem",
    "Store",
    "StoreDataloader",
    "StoreError",
    "TensorMetadata",
    "__version__",
]
