"""The byte-level backend protocol every store is built on, and what backends declare about themselves.

``LayoutStore`` (the layout, the names, the encoding) needs only these operations on
``/``-separated keys relative to the store's root, all built from validated names:

=========================  ==============================================  ===========================
operation                  local file system (``LocalStore``)              object storage (``ObjectStore``)
=========================  ==============================================  ===========================
``_write(key, p)``         temp file + ``rename``                          PUT (multipart when large)
``_write_new(key, p)``     temp file + ``renameat2(RENAME_NOREPLACE)``     PUT ``If-None-Match: *``
``_write_many(files)``     ``_write`` each                                 parallel PUTs
``_open(key)``             the file, held open                             one GET of the object
``_list(key)``             ``scandir`` of the directory                    LIST with ``/`` delimiter
``_list_tree(key)``        (not needed)                                    LIST, paginated
``_delete(key)``           rename aside, then remove                       LIST + DELETE many
``_update(key, change)``   ``flock`` of the folder, then ``_write``        GET, PUT ``If-Match: etag``, retried
=========================  ==============================================  ===========================

``_update(key, change)`` replaces a small object (run metadata) by ``change(its bytes)`` (``None``
when absent) atomically against every other ``_update`` of that key, from any thread or process,
and returns what it wrote; ``change`` may be called again after a concurrent update won, and
what it raises propagates with nothing written. ``LocalStore`` holds an exclusive ``flock`` on the
descriptor of the key's folder (released by the kernel if the holder dies; no lock file);
``ObjectStore`` PUTs with ``If-Match`` on the ETag it read (``If-None-Match: *`` when absent) and
retries with jittered backoff when it lost; ``MemoryStore`` holds its lock. ``LayoutStore``'s
default is a read then a write under a lock of the store object: atomic only among its threads.

A multi-file entry (a batch of ``put_detector_metadata``, a model) is made visible by a
*commit strategy* (``_commit.py``): where :attr:`Capabilities.atomic_directories` holds, the
whole directory is built aside and swapped in (``_write_dir``, read back through
``_open_dir``); elsewhere its tensor files go to a new, never reused generation folder and
its ``metadata.json``, written last, is the commit object that names that generation.
Backends declare what they can do in :class:`Capabilities` instead of the core checking
their types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers beyond the operations every backend has.

    Attributes:
        atomic_directories: A directory can be replaced at once and read consistently
            (``_write_dir``/``_open_dir``): multi-file entries are committed by a directory
            swap. Without it they are committed through a commit object.
        memory_map: Opened files are real files that tensors can be memory-mapped from.
        keeps_payload: A write may still read the caller's tensors after it returned (a
            cache, an upload in the background); callers must not reuse that memory.
            ``ActivationCapture`` recycles its host buffers only when this is False.
        listing_is_recursive: ``_list_tree`` is available (one paginated listing of every key
            under a prefix), used where a one-level listing could show uncommitted folders.
    """

    atomic_directories: bool
    memory_map: bool = False
    keeps_payload: bool = False
    listing_is_recursive: bool = False


@dataclass(frozen=True)
class ObjectInfo:
    """One key of a recursive listing: relative to the listed key, with its size and age."""

    key: str
    size: int
    modified: datetime | None = None


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` removed: leftover paths (or object URLs) and the bytes they held, and notes on
    what it could not do (an object store whose incomplete uploads it could not list)."""

    removed: list[str]
    bytes_freed: int
    notes: list[str] = field(default_factory=list)


class ObjectReplaced(OSError):
    """Raised by a backend when the object being read was replaced between two of its reads (a
    concurrent overwrite); the core then reads the entry again, from the start."""
