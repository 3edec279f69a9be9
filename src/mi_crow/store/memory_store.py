"""``MemoryStore``: the store in a process's memory, for tests and scratch work.

It supplies the same byte-level operations as ``LocalStore`` over a dict of immutable
``bytes``, so it runs the same layout code and passes the same conformance suite; that it
needs so little code is the point.
"""

from __future__ import annotations

import contextlib
import errno
import io
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

from mi_crow.store._layout import LayoutStore
from mi_crow.store._tensor_file import Payload


def _join(payload: Payload) -> bytes:
    return b"".join(memoryview(p).cast("B") for p in payload.buffers())


def _missing(key: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, "No such file or directory", f"memory://{key}")


class _MemoryDir:
    def __init__(self, files: dict[str, bytes], key: str):
        self._files = files
        self._key = key

    def open(self, rel: str) -> BinaryIO:
        try:
            data = self._files[rel]
        except KeyError:
            raise _missing(f"{self._key}/{rel}") from None
        return io.BytesIO(data)

    def read_head(self, rel: str, n: int) -> tuple[bytes, BinaryIO | None]:
        with self.open(rel) as f:
            data = f.getvalue()  # type: ignore[attr-defined]
        return (data[:n], io.BytesIO(data)) if len(data) >= n else (data, None)

    def list(self, rel: str) -> list[tuple[str, bool]]:
        prefix = f"{rel}/" if rel else ""
        children: dict[str, bool] = {}
        for k in self._files:
            if k.startswith(prefix):
                name, sep, _ = k[len(prefix) :].partition("/")
                children[name] = children.get(name, False) or bool(sep)
        return list(children.items())

    def prefetch(self, rels: Sequence[str]) -> None:
        pass  # files are read when opened

    def moved(self) -> bool:
        return False  # a snapshot: it never changes under the reader


class MemoryStore(LayoutStore):
    """An in-memory :class:`Store` with the same behaviour as :class:`LocalStore`.

    Thread-safe; nothing is persisted. ``base_path`` is only used in messages.

    Examples:
        >>> import torch
        >>> from mi_crow.store import MemoryStore
        >>> store = MemoryStore()
        >>> store.put_run_batch("r", 0, {"x": torch.ones(2)})
        'runs/r/batch_000000.safetensors'
        >>> store.get_run_batch("r", 0)
        {'x': tensor([1., 1.])}
    """

    def __init__(
        self,
        base_path: str = "",
        runs_prefix: str = "runs",
        dataset_prefix: str = "datasets",
        model_prefix: str = "models",
        *,
        verify: bool = False,
        checksums: bool = True,
        allow_nan: bool = True,
    ):
        super().__init__(
            base_path,
            runs_prefix,
            dataset_prefix,
            model_prefix,
            verify=verify,
            checksums=checksums,
            allow_nan=allow_nan,
        )
        self._files: dict[str, bytes] = {}
        self._lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._files)} files)"

    def _where(self, key: str) -> str:
        return f"memory://{key}"

    @staticmethod
    def _prefix(key: str) -> str:
        return f"{key}/" if key else ""

    def _under(self, key: str) -> list[str]:
        prefix = self._prefix(key)
        return [k for k in self._files if k.startswith(prefix)]

    def _write(self, key: str, payload: Payload) -> None:
        data = _join(payload)
        with self._lock:
            self._files[key] = data

    def _write_new(self, key: str, payload: Payload) -> bool:
        data = _join(payload)
        with self._lock:
            if key in self._files:
                return False
            self._files[key] = data
            return True

    def _update(self, key: str, change: Callable[[bytes | None], bytes]) -> bytes:
        # Under the store's lock: no other write of any thread lands between the read and the write.
        with self._lock:
            new = bytes(change(self._files.get(key)))
            self._files[key] = new
            return new

    def _write_dir(self, key: str, files: Mapping[str, Payload]) -> None:
        new = {f"{key}/{rel}": _join(payload) for rel, payload in files.items()}
        with self._lock:
            for k in self._under(key):
                del self._files[k]
            self._files.update(new)

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[BinaryIO]:
        with self._lock:
            data = self._files.get(key)
        if data is None:
            raise _missing(key)
        yield io.BytesIO(data)

    @contextlib.contextmanager
    def _open_dir(self, key: str) -> Iterator[_MemoryDir]:
        with self._lock:
            n = len(self._prefix(key))
            snapshot = {k[n:]: self._files[k] for k in self._under(key)}
        if not snapshot:
            raise _missing(key)
        yield _MemoryDir(snapshot, key)

    def _list(self, key: str) -> list[tuple[str, bool]]:
        children: dict[str, bool] = {}
        n = len(self._prefix(key))
        with self._lock:
            for k in self._under(key):
                name, sep, _ = k[n:].partition("/")
                children[name] = children.get(name, False) or bool(sep)
        return list(children.items())

    def _delete(self, key: str) -> None:
        with self._lock:
            self._files.pop(key, None)
            for k in self._under(key):
                del self._files[k]
