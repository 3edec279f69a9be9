"""The library's own errors: one vocabulary for damaged or non-conforming stored data.

As zarr's ``errors.py`` does, every class derives from a small base (:class:`StoreError`) *and*
from the built-in type the ``Store`` contract documents, so ``except OSError`` and
``except json.JSONDecodeError`` written against the reference API keep working:

- :class:`CorruptFileError` (an ``OSError``): a stored file is truncated, unparseable, fails its
  checksum, is not a regular file (a FIFO, a device, a directory) or is a symbolic link.
- :class:`CorruptMetadataError` (also a ``ValueError``): a stored JSON file parses but has the
  wrong shape (the reference documents ``ValueError`` for "metadata format is invalid").
- :class:`InvalidJSONError` (also a ``json.JSONDecodeError``): a stored JSON file does not parse,
  is larger than :data:`mi_crow.store.limits.MAX_JSON_BYTES` or nested deeper than
  :data:`mi_crow.store.limits.MAX_JSON_DEPTH`.

Bad *input* (names, indices, tensors, metadata) is a plain ``ValueError`` naming the value,
raised before anything is written; a missing entry is a ``FileNotFoundError``.
"""

from __future__ import annotations

import json


class StoreError(Exception):
    """Base class of the errors this library defines."""


class CorruptFileError(StoreError, OSError):
    """A stored file is damaged or is not what the store writes (an ``OSError``).

    Attributes:
        path: The file, as the store names it (a path under ``base_path``, or a URL).
        reason: What is wrong with it.
    """

    def __init__(self, path: str, reason: str):
        OSError.__init__(self, f"corrupt or non-conforming stored file {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type[CorruptFileError], tuple[str, str]]:  # DataLoader workers pickle errors
        return type(self), (self.path, self.reason)


class CorruptMetadataError(CorruptFileError, ValueError):
    """A stored JSON file parses but does not have the shape the store wrote (also a ``ValueError``)."""


class InvalidJSONError(CorruptMetadataError, json.JSONDecodeError):
    """A stored JSON file is not valid JSON, too large or too deeply nested (also a ``json.JSONDecodeError``)."""

    def __init__(self, path: str, reason: str, doc: str = "", pos: int = 0):
        CorruptFileError.__init__(self, path, reason)
        # json.JSONDecodeError's attributes, for code written against it.
        self.msg = reason
        self.doc = doc
        self.pos = pos
        self.lineno = doc.count("\n", 0, pos) + 1
        self.colno = pos - doc.rfind("\n", 0, pos)

    def __reduce__(self) -> tuple[type[InvalidJSONError], tuple[str, str]]:
        return type(self), (self.path, self.reason)
