"""``LayoutStore``: the whole ``Store`` contract, written once over a few byte operations.

The run / batch / layer / key layout (mi_crow 1.0's, see ``docs/format.md`` and ``_keys.py``),
the naming rules and the safetensors encoding live here, one module per concern:

- ``base``: the backend protocol (``_backend.py`` documents it), keys, shared helpers;
- ``runs``: run metadata, listing and deleting runs;
- ``batches``: per-batch detector data (``put_detector_metadata``);
- ``run_batches``: run batches (``put_run_batch``) and ``list_run_batches``;
- ``appends``: run-level appends (``put_run_detector_metadata``);
- ``models``: ``put_model`` and friends;
- ``check``: ``check()``.

A backend (``LocalStore``, ``MemoryStore``, ``ObjectStore``) subclasses :class:`LayoutStore`
and supplies only the byte-level operations.
"""

from mi_crow.store._commit import DirReader
from mi_crow.store._keys import TENSOR_NAME, TENSOR_NAMES_FIELD
from mi_crow.store._layout.base import Payload, Problem
from mi_crow.store._layout.check import Check


class LayoutStore(Check):
    """A :class:`Store` over a tree of keys: layout and encoding, no I/O of its own.

    Subclasses implement the byte-level operations of :mod:`mi_crow.store._backend`
    (``_write``, ``_write_new``, ``_open``, ``_list``, ``_delete``, and either ``_write_dir`` /
    ``_open_dir`` or a recursive ``_list_tree``) and declare their :attr:`capabilities`. All keys
    they receive are ``/``-separated, relative to the store's root, and built only from
    validated names.
    """


__all__ = ["TENSOR_NAME", "TENSOR_NAMES_FIELD", "DirReader", "LayoutStore", "Payload", "Problem"]
