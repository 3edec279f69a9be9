"""A read-through cache of immutable objects on local disk, with a byte budget (LRU).

``ObjectStore(..., cache_dir=...)`` keeps here the objects that are never rewritten (tensor
files in generation folders, see ``_keys.in_generation``), so that later reads of them (the
next epoch of a training run) come from local disk instead of the network.

- One file per object, named by a hash of (endpoint, bucket, full key): ``{40 hex}.safetensors``.
  Nothing else in the directory is touched (it may be shared with other files).
- Inserted atomically: written to a temp file in the directory, then renamed over the name.
- Read back memory-mapped copy-on-write: a tensor is a view of the mapped file (its writes stay
  in the process); the file is checked first to be a complete safetensors file (its size is the
  one its header implies), else it is a miss (and the fetched object replaces it).
- Least recently used first out: a hit sets the file's modification time to now; after each
  insertion the oldest files are removed until the total is within the budget.
- Several processes may share the directory (DataLoader workers, ranks on one node): every step
  tolerates another process's insertion or eviction in between; a file evicted under a reader
  stays readable through its mapping (the store never truncates a cache file in place).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import struct
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

DEFAULT_CACHE_BYTES = 10 << 30
# Temp files older than this were left by a killed process: removed by the next eviction.
_STALE_TEMP_SECONDS = 3600.0
_NAME = re.compile(r"[0-9a-f]{40}\.safetensors")
_TEMP = ".tmp-"


def complete_safetensors(data: Any) -> bool:
    """Whether ``data`` (a buffer) is exactly one whole safetensors file: its size is the header's
    length plus the data section the header describes. Anything unreadable is ``False``."""
    try:
        view = memoryview(data)
        if len(view) < 8:
            return False
        (n,) = struct.unpack_from("<Q", view)
        if n > len(view) - 8:
            return False
        header = json.loads(bytes(view[8 : 8 + n]))
        end = 0
        for name, info in header.items():
            if name != "__metadata__":
                end = max(end, int(info["data_offsets"][1]))
        return bool(8 + n + end == len(view))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, struct.error):
        return False


class DiskCache:
    """The cache directory ``directory`` holding at most ``budget`` bytes of cached objects."""

    @staticmethod
    def check_budget(budget: Any) -> int:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"cache_bytes must be an int >= 1 (a number of bytes), got {budget!r}")
        return budget

    def __init__(self, directory: str | os.PathLike[str], budget: int):
        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise ValueError(f"cache_dir must be a directory path, got {directory!r}")
        self.budget = self.check_budget(budget)
        path = Path(directory)
        if path.exists() and not path.is_dir():
            raise ValueError(f"cache_dir {str(path)!r} exists and is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cache_dir {str(path)!r} cannot be created: {e}") from e
        self.directory = path
        self._warned = False

    def __repr__(self) -> str:
        return f"DiskCache({str(self.directory)!r}, budget={self.budget})"

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "budget": self.budget}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.directory = state["directory"]
        self.budget = state["budget"]
        self._warned = False

    def path(self, ident: str) -> str:
        """The cache file of the object named ``ident``."""
        digest = hashlib.blake2b(ident.encode(), digest_size=20).hexdigest()
        return os.path.join(self.directory, f"{digest}.safetensors")

    def get(self, ident: str) -> memoryview | None:
        """The cached object ``ident`` as a writable private mapping of its file, or ``None`` (a
        miss: absent, evicted meanwhile, damaged or unreadable)."""
        try:
            fd = os.open(self.path(ident), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size < 8:
                return None
            view = memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_COPY))
            if not complete_safetensors(view):
                return None
            now = time.time_ns()
            with contextlib.suppress(OSError):  # recently used: last to be evicted
                os.utime(fd, ns=(now, now))
            return view
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    def put(self, ident: str, data: Any) -> None:
        """Keep ``data`` (a whole object's bytes) as ``ident``, then evict down to the budget.

        Objects larger than the budget, and data that is not a complete safetensors file, are
        not kept. A cache that cannot be written (a full disk) warns once and keeps nothing:
        the read itself has succeeded.
        """
        view = memoryview(data).cast("B")
        if len(view) > self.budget or not complete_safetensors(view):
            return
        final = self.path(ident)
        temp = os.path.join(self.directory, f"{_TEMP}{os.getpid()}-{uuid.uuid4().hex}")
        try:
            os.makedirs(self.directory, exist_ok=True)  # removed meanwhile: made again
            with open(temp, "xb") as f:
                f.write(view)
                now = time.time_ns()
                os.utime(f.fileno(), ns=(now, now))
            os.replace(temp, final)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"cache_dir {str(self.directory)!r}: cannot write to it ({e}); objects are read from the server",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return
        self.evict()

    def files(self) -> list[tuple[int, int, str]]:
        """``(mtime_ns, size, path)`` of every cache file; stale temp files are removed on the way."""
        out = []
        stale = time.time() - _STALE_TEMP_SECONDS
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return []
        for entry in entries:
            try:
                if _NAME.fullmatch(entry.name):
                    st = entry.stat(follow_symlinks=False)
                    out.append((st.st_mtime_ns, st.st_size, entry.path))
                elif entry.name.startswith(_TEMP) and entry.stat(follow_symlinks=False).st_mtime < stale:
                    os.unlink(entry.path)
            except OSError:
                continue  # evicted or renamed by another process meanwhile
        return out

    def evict(self) -> None:
        """Remove the least recently used files until the cache holds at most the budget."""
        files = self.files()
        total = sum(size for _, size, _ in files)
        if total <= self.budget:
            return
        files.sort()
        for _, size, path in files:
            if total <= self.budget:
                break
            with contextlib.suppress(FileNotFoundError):  # another process evicted it first
                os.unlink(path)
            total -= size
