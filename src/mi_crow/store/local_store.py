"""``LocalStore``: the store on a local file system.

Only the byte-level operations live here; the layout and encoding are
:class:`mi_crow.store.LayoutStore`'s. Every path is checked to resolve inside
``base_path`` (a symbolic link planted in the store cannot lead writes, reads or deletes
outside it), every file is written to a temp name and renamed, and whole directories
(a batch, a model) are swapped in atomically.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mi_crow.store import _atomic
from mi_crow.store._layout import LayoutStore
from mi_crow.store._tensor_file import Payload


def _is_at(path: str, fd: int) -> bool:
    """Whether ``path`` still names the file or directory open as ``fd`` (not replaced or removed)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _make_subdir(path: str, made: set[str]) -> None:
    """``mkdir`` ``path`` and its missing parents inside a new staging directory, recording
    each in ``made`` (which holds the staging directory itself)."""
    if path not in made:
        _make_subdir(os.path.dirname(path), made)
        os.mkdir(path)
        made.add(path)


class _LocalDir:
    """A directory held open by descriptor, so a concurrent swap cannot mix versions.

    Subdirectories (a batch's layers) are opened once, relative to it, and kept until close.
    """

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._subdirs: dict[str, int] = {}

    def _subdir(self, rel: str) -> int:
        fd = self._subdirs.get(rel)
        if fd is None:
            parent, _, name = rel.rpartition("/")
            fd = os.open(
                name,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=self._subdir(parent) if parent else self.fd,
            )
            self._subdirs[rel] = fd
        return fd

    def open(self, rel: str) -> BinaryIO:
        return open(self._open_fd(rel), "rb", buffering=0, closefd=True)  # a context manager that closes it

    def read_head(self, rel: str, n: int) -> tuple[bytes, BinaryIO | None]:
        fd = self._open_fd(rel)
        try:
            head = os.read(fd, n)
        except BaseException:
            os.close(fd)
            raise
        if len(head) < n:  # the whole file
            os.close(fd)
            return head, None
        return head, open(fd, "rb", buffering=0, closefd=True)

    def _open_fd(self, rel: str) -> int:
        parent, _, name = rel.rpartition("/")
        try:
            dir_fd = self._subdir(parent) if parent else self.fd
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ValueError(
                    f"{os.path.join(self.path, rel)} is or passes through a symbolic link; "
                    "entries written by the store never contain links, so it is not followed"
                ) from None
            raise

    def moved(self) -> bool:
        return not _is_at(self.path, self.fd)

    def close(self) -> None:
        for fd in self._subdirs.values():
            os.close(fd)
        os.close(self.fd)


LOCK_NAME = ".mi-crow-store.lock"
MMAP_MIN_BYTES = 1 << 20


class _WriterLock:
    """A shared ``flock`` held by this process while any of its threads writes; ``gc`` takes it
    exclusively, so it never removes the temp file of a write in progress.

    Writers never exclude each other (the lock is shared); the per-process count exists because
    ``flock`` locks belong to the open file, which all threads of a process share.
    """

    def __init__(self, base_path: Path):
        self.path = os.path.join(base_path, LOCK_NAME)
        self._mutex = threading.Lock()
        self._count = 0
        self._fd = -1
        self._pid = -1

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._mutex:
            if self._pid != os.getpid():  # a forked child must not share (and release) our lock
                self._fd, self._pid, self._count = -1, os.getpid(), 0
            if self._count == 0:
                if self._fd >= 0 and not _is_at(self.path, self._fd):
                    os.close(self._fd)  # the store was removed and made again: lock the new file
                    self._fd = -1
                if self._fd < 0:
                    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
                fcntl.flock(self._fd, fcntl.LOCK_SH)
            self._count += 1
        try:
            yield
        finally:
            with self._mutex:
                self._count -= 1
                if self._count == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


@dataclass(frozen=True)
class GcReport:
    """What ``LocalStore.gc`` removed: leftover paths and the bytes they held."""

    removed: list[str]
    bytes_freed: int


def _tree_size(path: str) -> int:
    if not os.path.isdir(path) or os.path.islink(path):
        return os.lstat(path).st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


class LocalStore(LayoutStore):
    """Local filesystem implementation of Store interface.

    Crash-safe by construction: a process killed at any instant leaves every entry either
    complete or absent (leftover temp files are ignored and removed by ``gc``). With
    ``durable=True`` files and the directories whose entries changed are also fsync'd, so
    committed entries survive power loss.

    Example:
        >>> import tempfile, torch
        >>> from mi_crow.store import LocalStore
        >>> store = LocalStore(tempfile.mkdtemp())
        >>> store.put_run_metadata("run-1", {"model": "gpt2"})
        'runs/run-1/meta.json'
        >>> store.get_run_metadata("run-1")
        {'model': 'gpt2'}
    """

    def __init__(
        self,
        base_path: Path | str = "",
        runs_prefix: str = "runs",
        dataset_prefix: str = "datasets",
        model_prefix: str = "models",
        *,
        durable: bool = False,
        verify: bool = False,
        mmap: bool = True,
        checksums: bool = True,
    ):
        """Initialize LocalStore.

        Args:
            base_path: Base directory path for the store
            runs_prefix: Prefix for runs directory
            dataset_prefix: Prefix for datasets directory
            model_prefix: Prefix for models directory
            durable: Also fsync files and directories, so committed data survives power
                loss (slower); the default already survives process crashes.
            verify: Check every tensor read against its recorded CRC-32.
            mmap: Return tensors of 1 MiB or more memory-mapped, copy-on-write: reading costs
                no copy and touches only the pages used. Writes to such a tensor stay in the
                process; a later overwrite of the entry (by rename) never changes it. Set
                False to always read into process memory (e.g. on network file systems, where
                another host truncating a file under a mapping would crash the reader).
            checksums: Record the CRC-32 of every tensor written, for ``verify``, ``check()``
                and ``mi-crow-store verify``. It is computed on a helper thread while the data
                is written; False saves the memory bandwidth it takes (large writes were
                1.16-1.19x faster on a 2-core VM, see ``benchmarks/RESULTS.md``) and writes plain
                safetensors files, whose damage only ``verify``'s structural checks then catch.
        """
        super().__init__(base_path, runs_prefix, dataset_prefix, model_prefix, verify=verify, checksums=checksums)
        self.durable = durable
        self._mmap_min = MMAP_MIN_BYTES if mmap else None
        self._writers = _WriterLock(self.base_path)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        del state["_writers"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._writers = _WriterLock(self.base_path)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.base_path)!r}, durable={self.durable})"

    # ------------------------------------------------------------------ paths

    def _path(self, key: str, *, create_parent: bool = False) -> str:
        """The file-system path of ``key``, after checking it resolves inside ``base_path``.

        Keys are built from validated names (no ``..``, no empty parts), so a path none of
        whose parts below ``base_path`` is a symbolic link is inside it: one ``lstat`` per
        part decides that. Only when a part is a link is the path resolved and compared.
        With ``create_parent``, missing parent directories are made.
        """
        path = os.path.join(self.base_path, key)
        parts = key.split("/")
        cur = os.fspath(self.base_path)
        for depth, part in enumerate(parts):
            cur = os.path.join(cur, part)
            try:
                mode = os.lstat(cur).st_mode
            except (FileNotFoundError, NotADirectoryError):
                # Nothing below here exists, so nothing below here is a link.
                if create_parent and depth < len(parts) - 1:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                return path
            if stat.S_ISLNK(mode):
                return self._resolved_path(key, path, create_parent)
        return path

    def _resolved_path(self, key: str, path: str, create_parent: bool) -> str:
        """``_path`` for a key that passes through a symbolic link: allowed only inside the store."""
        base = os.path.realpath(self.base_path)
        real = os.path.realpath(path)
        if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
            raise ValueError(
                f"{key!r} resolves to {real}, outside the store's base_path {base}: "
                "a symbolic link inside the store points outside it"
            )
        if create_parent:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def _sync_dir(self, path: str) -> None:
        if self.durable:
            _atomic.fsync_dir(path)

    # ------------------------------------------------------------------ byte operations

    def _write(self, key: str, payload: Payload) -> None:
        with self._writers.shared():
            self._write_locked(key, payload)

    def _write_locked(self, key: str, payload: Payload) -> None:
        path = self._path(key, create_parent=True)
        parent = os.path.dirname(path)
        tmp = os.path.join(parent, _atomic.unique_name(_atomic.TMP_PREFIX))
        try:
            _atomic.create_file(tmp, payload, durable=self.durable)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._sync_dir(parent)

    def _write_new(self, key: str, payload: Payload) -> bool:
        with self._writers.shared():
            return self._write_new_locked(key, payload)

    def _write_new_locked(self, key: str, payload: Payload) -> bool:
        path = self._path(key, create_parent=True)
        parent = os.path.dirname(path)
        tmp = os.path.join(parent, _atomic.unique_name(_atomic.TMP_PREFIX))
        try:
            _atomic.create_file(tmp, payload, durable=self.durable)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        created = _atomic.rename_noreplace(tmp, path)
        if created:
            self._sync_dir(parent)
        return created

    def _write_dir(self, key: str, files: Mapping[str, Payload]) -> None:
        with self._writers.shared():
            self._write_dir_locked(key, files)

    def _write_dir_locked(self, key: str, files: Mapping[str, Payload]) -> None:
        path = self._path(key, create_parent=True)
        parent = os.path.dirname(path)
        stage = os.path.join(parent, _atomic.unique_name(_atomic.STAGE_PREFIX))
        os.mkdir(stage)
        try:
            subdirs = {stage}
            for rel, payload in files.items():
                target = os.path.join(stage, rel)
                sub = os.path.dirname(target)
                _make_subdir(sub, subdirs)
                _atomic.create_file(target, payload, durable=self.durable)
            if self.durable:
                for sub in subdirs:
                    _atomic.fsync_dir(sub)
            old = _atomic.replace_dir(stage, path)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        self._sync_dir(parent)
        if old is not None:
            # The previous version, now unreachable; if removal fails, gc() finds it later.
            shutil.rmtree(old, ignore_errors=True)

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[BinaryIO]:
        with open(self._path(key), "rb", buffering=0) as f:
            yield f

    @contextlib.contextmanager
    def _open_dir(self, key: str) -> Iterator[_LocalDir]:
        path = self._path(key)
        try:
            d = _LocalDir(path)
        except NotADirectoryError:
            raise FileNotFoundError(errno.ENOENT, "not a directory", path) from None
        try:
            yield d
        finally:
            d.close()

    def _list(self, key: str) -> list[tuple[str, bool]]:
        try:
            with os.scandir(self._path(key)) as it:
                return [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _delete(self, key: str) -> None:
        with self._writers.shared():
            self._delete_locked(key)

    def _delete_locked(self, key: str) -> None:
        path = self._path(key)
        parent = os.path.dirname(path)
        if os.path.isdir(path) and not os.path.islink(path):
            aside = os.path.join(parent, _atomic.unique_name(_atomic.TRASH_PREFIX))
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return
            self._sync_dir(parent)
            shutil.rmtree(aside)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            self._sync_dir(parent)

    # ------------------------------------------------------------------ maintenance

    def gc(self) -> GcReport:
        """Remove what killed writers left behind: temp files, staging and trash directories.

        Waits until no write of any process is in progress (writers hold a shared lock), so
        it is safe to run while other processes use the store. Committed entries are never
        touched: leftovers carry reserved names (``.tmp-``, ``.stage-``, ``.trash-``) that no
        entry can have.

        Returns:
            A :class:`GcReport` with the removed paths and the bytes freed.

        Example:
            >>> import tempfile, torch
            >>> from mi_crow.store import LocalStore
            >>> store = LocalStore(tempfile.mkdtemp())
            >>> _ = store.put_run_batch("r", 0, [torch.ones(3)])
            >>> store.gc().removed
            []
        """
        removed: list[str] = []
        freed = 0
        prefixes = (_atomic.TMP_PREFIX, _atomic.STAGE_PREFIX, _atomic.TRASH_PREFIX)
        base = str(self.base_path)
        if not os.path.isdir(base):
            return GcReport([], 0)
        with self._writers.exclusive():
            for root, dirs, files in os.walk(base):
                for name in [d for d in dirs if d.startswith(prefixes)]:
                    path = os.path.join(root, name)
                    freed += _tree_size(path)
                    shutil.rmtree(path)
                    removed.append(path)
                    dirs.remove(name)
                for name in files:
                    if name.startswith(prefixes):
                        path = os.path.join(root, name)
                        freed += os.lstat(path).st_size
                        os.unlink(path)
                        removed.append(path)
        return GcReport(sorted(removed), freed)
