"""mi_crow.store: persistence for activations, the runs that produced them, and models.

``Store`` is the documented contract; ``LocalStore`` keeps a store on local disk and
``MemoryStore`` in memory. Both share ``LayoutStore``, which implements the contract once.
"""

from importlib.metadata import PackageNotFoundError, version

from mi_crow.store._layout import LayoutStore
from mi_crow.store.local_store import LocalStore
from mi_crow.store.memory_store import MemoryStore
from mi_crow.store.store import Store, TensorMetadata

try:
    __version__ = version("mi-crow-store")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["LayoutStore", "LocalStore", "MemoryStore", "Store", "TensorMetadata", "__version__"]
