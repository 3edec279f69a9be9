"""How a multi-file entry (a batch's tensors + its ``metadata.json``, a model) becomes visible.

Two strategies, chosen by the backend's :class:`~mi_crow.store._backend.Capabilities`:

- :class:`DirectorySwap` (``atomic_directories``: local disk, memory): the entry's directory is
  built aside and swapped in at once; a reader holds the directory it opened (a descriptor)
  and retries if it was swapped meanwhile. Files keep mi_crow 1.0's names.
- :class:`CommitObject` (object storage): the tensor files go first, to a generation folder
  ``.g{gen}/`` that no other write uses and nothing ever overwrites; then ``metadata.json``,
  naming that generation in ``mi_crow_store.generation``, is written last with one atomic PUT:
  it is the commit. A reader reads the commit, then the files it names; when one is gone (a
  newer generation was committed and ``gc`` collected the old one) it reads the commit again.
  A commit without the field (a local store copied to a bucket) names files at mi_crow's paths.

Both hand the layout code the same :class:`DirReader`, so batches, models and ``check()`` are
written once.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, ContextManager, Protocol

from mi_crow.store import _json, _keys
from mi_crow.store._tensor_file import Payload
from mi_crow.store.errors import CorruptMetadataError

if TYPE_CHECKING:
    from mi_crow.store._layout.base import LayoutBase


class DirReader(Protocol):
    """A consistent view of one entry's files, as the commit strategy opens it."""

    def open(self, rel: str) -> BinaryIO:
        """Open the file ``rel`` (``/``-separated, relative to the entry); close it after use."""
        ...

    def read_head(self, rel: str, n: int) -> tuple[bytes | memoryview, BinaryIO | None]:
        """The first ``n`` bytes of ``rel``, and the file still open if it may hold more.

        ``None`` in place of the file means the bytes are the whole file; a ``memoryview`` then
        says they are the whole file in memory that this read alone holds (tensors may borrow it).
        The caller closes the file.
        """
        ...

    def list(self, rel: str) -> list[tuple[str, bool]]:
        """``(name, is_dir)`` of the entries of subdirectory ``rel`` (``""``: this one); ``[]`` if missing."""
        ...

    def moved(self) -> bool:
        """Whether the entry was replaced or removed since it was opened."""
        ...

    def prefetch(self, rels: Sequence[str]) -> None:
        """Start reading the files ``rels`` (concurrently where the backend can); a hint."""
        ...


class CommitStrategy(Protocol):
    def generation(self) -> str | None:
        """The generation a new entry's files go to (``None``: mi_crow's own paths)."""
        ...

    def commit(self, key: str, files: Mapping[str, Payload], generation: str | None) -> None:
        """Make the entry ``key`` hold exactly ``files`` (``metadata.json`` among them), at once."""
        ...

    def open(self, key: str) -> ContextManager[DirReader]:
        """Open entry ``key`` for a consistent read; ``FileNotFoundError`` if it is not committed."""
        ...


class DirectorySwap:
    """Build the directory aside, rename it into place (``LayoutStore._write_dir``)."""

    def __init__(self, store: LayoutBase):
        self._store = store

    def generation(self) -> str | None:
        return None

    def commit(self, key: str, files: Mapping[str, Payload], generation: str | None) -> None:
        self._store._write_dir(key, files)

    def open(self, key: str) -> ContextManager[DirReader]:
        return self._store._open_dir(key)


class CommitObject:
    """Immutable files in a fresh generation folder, then ``metadata.json`` last."""

    def __init__(self, store: LayoutBase):
        self._store = store

    def generation(self) -> str | None:
        return _keys.new_generation()

    def commit(self, key: str, files: Mapping[str, Payload], generation: str | None) -> None:
        """``files`` are named as the layout code resolves them (under ``.g{generation}/``)."""
        data = {f"{key}/{rel}": p for rel, p in files.items() if rel != _keys.METADATA_FILE}
        self._store._write_many(data)
        self._store._write(f"{key}/{_keys.METADATA_FILE}", files[_keys.METADATA_FILE])

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[DirReader]:
        reader = _CommitReader(self._store, key)
        try:
            yield reader
        finally:
            reader.close()


def named_generation(doc: dict[str, Any], where: str) -> str | None:
    """The generation an entry's parsed ``metadata.json`` names (``None``: mi_crow's own paths).

    Raises:
        CorruptMetadataError: If the field is there but is not a generation id.
    """
    gen = doc.get(_keys.GENERATION_FIELD)
    if gen is None:
        return None
    if not isinstance(gen, str) or _keys.generation_of(f".g{gen}") is None:
        raise CorruptMetadataError(where, f"{_keys.GENERATION_FIELD} must be 24 hex digits, got {str(gen)[:60]!r}")
    return gen


def read_generation(raw: bytes, where: str) -> str | None:
    """:func:`named_generation` for a commit object's bytes.

    Raises:
        CorruptMetadataError: If the bytes are not a JSON object (then which files the entry
            names cannot be known: ``gc`` must leave them all), or the field is not a generation id.
    """
    try:
        doc = _json.loads(raw, where)
    except ValueError as e:
        raise CorruptMetadataError(where, f"not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CorruptMetadataError(where, "must hold a JSON object")
    return named_generation(doc, where)


class _CommitReader:
    """An entry read through its commit object (see :class:`CommitObject`). The layout code
    resolves the files' names through the generation the commit names; this reader only keeps
    the commit it read, so that ``moved()`` can tell whether another one replaced it."""

    def __init__(self, store: LayoutBase, key: str):
        self._store = store
        self._key = key
        self._commit_key = f"{key}/{_keys.METADATA_FILE}"
        self._raw = store._read_json_file(self._commit_key)  # FileNotFoundError: not committed
        self._fetched: dict[str, bytes | memoryview] = {}
        self._files = contextlib.ExitStack()

    def open(self, rel: str) -> BinaryIO:
        if rel == _keys.METADATA_FILE:
            return io.BytesIO(self._raw)
        key = f"{self._key}/{rel}"
        data = self._fetched.pop(key, None)
        if data is not None:
            return self._store._reader_of(key, data)
        return self._files.enter_context(self._store._open_whole(key))  # tensor files are read whole

    def read_head(self, rel: str, n: int) -> tuple[bytes | memoryview, BinaryIO | None]:
        f = self.open(rel)
        whole = getattr(f, "whole", None)
        if isinstance(whole, memoryview):
            f.close()  # the view stays valid: it is the buffer itself, not the file
            return whole, None
        head = f.read(n)
        if len(head) < n:
            f.close()
            return head, None
        return head, f

    def list(self, rel: str) -> list[tuple[str, bool]]:
        return self._store._list(f"{self._key}/{rel}" if rel else self._key)

    def moved(self) -> bool:
        try:
            return self._store._read_json_file(self._commit_key) != self._raw
        except FileNotFoundError:
            return True

    def prefetch(self, rels: Sequence[str]) -> None:
        keys = [f"{self._key}/{rel}" for rel in rels if rel != _keys.METADATA_FILE]
        self._fetched.update(self._store._read_many(keys))

    def close(self) -> None:
        self._fetched.clear()
        self._files.close()
