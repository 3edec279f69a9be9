"""``open_store``: one entry point from a path or URL to the right backend."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mi_crow.store._layout import LayoutStore

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def open_store(url_or_path: str | os.PathLike[str], **options: Any) -> LayoutStore:
    """Open the store at a local path or a URL.

    - a path (or ``file://PATH``): :class:`~mi_crow.store.LocalStore`;
    - ``s3://bucket/prefix``: :class:`~mi_crow.store.ObjectStore` (``pip install
      'mi-crow-store[s3]'``); endpoint, region and credentials come from the standard
      ``AWS_*`` environment variables unless given as keyword options;
    - ``memory://``: a new, empty :class:`~mi_crow.store.MemoryStore`.

    Args:
        url_or_path: Where the store is.
        **options: Passed to the backend's constructor (``runs_prefix``, ``verify``...).

    Raises:
        ValueError: For a URL scheme no backend serves.

    Examples:
        >>> from mi_crow.store import open_store
        >>> open_store("memory://")
        MemoryStore(0 files)
    """
    if isinstance(url_or_path, os.PathLike):
        url_or_path = os.fspath(url_or_path)
    if not isinstance(url_or_path, str):
        raise ValueError(f"url_or_path must be a path or a URL string, got {type(url_or_path).__name__}")
    m = _SCHEME.match(url_or_path)
    scheme = m.group(1).lower() if m else None
    if scheme is None:
        from mi_crow.store.local_store import LocalStore

        return LocalStore(Path(url_or_path), **options)
    rest = url_or_path[m.end() :] if m else ""
    if scheme == "file":
        from mi_crow.store.local_store import LocalStore

        return LocalStore(Path(rest), **options)
    if scheme == "memory":
        from mi_crow.store.memory_store import MemoryStore

        if rest:
            raise ValueError(f"a memory:// store has no path, got {url_or_path!r}")
        return MemoryStore(**options)
    if scheme == "s3":
        from mi_crow.store.object_store import ObjectStore

        return ObjectStore(url_or_path, **options)
    raise ValueError(f"no store serves the URL scheme {scheme!r} in {url_or_path!r}; use a path, s3:// or memory://")
