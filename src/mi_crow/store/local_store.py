"""``LocalStore``: the store on a local file system.

Only the byte-level operations live here; the layout and encoding are
:class:`mi_crow.store.LayoutStore`'s. Every path is resolved from a descriptor of ``base_path``
downwards without following links (:mod:`mi_crow.store._fs`), so neither a link planted in the
store nor a process swapping directories for links at any instant can lead a write, read or
delete outside it; every file is written to a temp name and renamed, and whole directories
(a batch, a model) are swapped in atomically.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Callable, TypeVar

from mi_crow.store import _atomic, _fs
from mi_crow.store._backend import Capabilities, GcReport
from mi_crow.store._layout import LayoutStore
from mi_crow.store._tensor_file import Payload
from mi_crow.store.errors import CorruptFileError, InvalidJSONError
from mi_crow.store.limits import MAX_JSON_BYTES

T = TypeVar("T")


def _split(key: str) -> list[str]:
    return key.split("/") if key else []


class _LocalDir:
    """A directory held open by descriptor, so a concurrent swap cannot mix versions.

    Subdirectories (a batch's layers) are opened once, relative to it, never through a link,
    and kept until close. ``moved()`` resolves the key again from ``base_path``.
    """

    def __init__(self, store: LocalStore, key: str, fd: int):
        self._store = store
        self._key = key
        self.path = store._where(key)
        self.fd = fd
        self._subdirs: dict[str, int] = {}

    def _subdir(self, rel: str) -> int:
        fd = self._subdirs.get(rel)
        if fd is None:
            parent, _, name = rel.rpartition("/")
            fd = _fs.open_dir_at(self._subdir(parent) if parent else self.fd, name, os.path.join(self.path, rel))
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
        dir_fd = self._subdir(parent) if parent else self.fd
        # _fs.open_file_at inlined for the common case (this runs once per tensor file of a batch);
        # on any error or a file that is not regular, it runs again to raise the precise error.
        try:
            fd = os.open(name, _fs.FILE_FLAGS, dir_fd=dir_fd)
        except OSError:
            fd = -1
        if fd >= 0:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
        return _fs.open_file_at(dir_fd, name, os.path.join(self.path, rel))

    def list(self, rel: str) -> list[tuple[str, bool]]:
        """The entries of subdirectory ``rel`` (``""``: the directory itself); ``[]`` if missing."""
        try:
            return _fs.scan(self._subdir(rel) if rel else self.fd)
        except FileNotFoundError:
            return []

    def prefetch(self, rels: Sequence[str]) -> None:
        pass  # files are read when opened

    def moved(self) -> bool:
        try:
            fd = _fs.open_path(self._store._base, _split(self._key), directory=True)
        except CorruptFileError:
            return True
        if fd is None:
            return True
        try:
            return _fs.identity(fd) != _fs.identity(self.fd)
        finally:
            os.close(fd)

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
    ``flock`` locks belong to the open file, which all threads of a process share. The lock file
    is opened relative to ``base_path``'s descriptor with ``O_NOFOLLOW`` and must be a regular
    file: a link planted in its place is never followed (nothing is created at its target), a
    FIFO never blocks.
    """

    def __init__(self, base: str):
        self.base = base
        self.path = os.path.join(base, LOCK_NAME)
        self._mutex = threading.Lock()
        self._count = 0
        self._fd = -1
        self._pid = -1

    def _open(self) -> int:
        base_fd = _fs.open_base(self.base, create=True)
        assert base_fd is not None
        try:
            try:
                fd = os.open(
                    LOCK_NAME,
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                    0o666,
                    dir_fd=base_fd,
                )
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENOTDIR):
                    raise _fs._not_a(base_fd, LOCK_NAME, self.path, "regular file") from None
                raise _fs.named(e, self.path) from None
        finally:
            os.close(base_fd)
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise CorruptFileError(self.path, f"is a {_fs.kind(mode)}, not a regular file")
        return fd

    def _current(self) -> bool:
        """Whether our open lock file is still the one at ``base_path`` (the store may have been
        removed and made again). ``base_path`` is trusted; the lock file's own name is not
        followed if it is a link."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        mine = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._mutex:
            if self._pid != os.getpid():  # a forked child must not share (and release) our lock
                self._fd, self._pid, self._count = -1, os.getpid(), 0
            if self._count == 0:
                if self._fd >= 0 and not self._current():
                    os.close(self._fd)
                    self._fd = -1
                if self._fd < 0:
                    self._fd = self._open()
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
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# A write whose directory was removed under it (a concurrent delete_run) starts over this often.
_WRITE_RETRIES = 8


class LocalStore(LayoutStore):
    """Local filesystem implementation of Store interface.

    Crash-safe by construction: a process killed at any instant leaves every entry either
    complete or absent (leftover temp files are ignored and removed by ``gc``). With
    ``durable=True`` files and the directories whose entries changed are also fsync'd, so
    committed entries survive power loss.

    Examples:
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
        allow_nan: bool = True,
    ):
        """Initialize LocalStore.

        Args:
            base_path: Base directory path for the store
            runs_prefix: Prefix for runs directory
            dataset_prefix: Prefix for datasets directory
            model_prefix: Prefix for models directory
            durable: Also fsync files and directories, so committed data survives power
                loss (slower); the default already survives process crashes.
            verify: Check every tensor read against its recorded CRC-32s (its data, its
                header, and the metadata.json written with it).
            mmap: Return tensors of 1 MiB or more memory-mapped, copy-on-write: reading costs
                no copy and touches only the pages used. Writes to such a tensor stay in the
                process; a later overwrite or delete of the entry (by rename) never changes it,
                because the store never truncates or rewrites a file in place. The one exception
                is outside the store's control: if another program truncates the file itself while
                the tensor is in use, the kernel delivers SIGBUS and the reading process dies (as
                with any memory-mapped file, numpy's and safetensors' included). Set False to read
                into process memory instead where that can happen (shared directories that other
                tools write to, network file systems).
            checksums: Record the CRC-32s (data and header) of every tensor file written, for
                ``verify``, ``check()`` and ``mi-crow-store verify``. They are computed on a
                helper thread while the data is written; False saves the memory bandwidth that
                takes (measured in ``benchmarks/write.py``, see ``benchmarks/RESULTS.md``) and
                writes plain safetensors files, whose damage only structural checks then catch.
            allow_nan: Accept NaN and ±Infinity in metadata, written as Python's ``json`` and
                mi_crow 1.0 write them (``NaN``, ``Infinity``); False writes strict JSON and
                refuses them with ``ValueError``.
        """
        super().__init__(
            base_path,
            runs_prefix,
            dataset_prefix,
            model_prefix,
            verify=verify,
            checksums=checksums,
            allow_nan=allow_nan,
        )
        self.durable = durable
        self._mmap_min = MMAP_MIN_BYTES if mmap else None
        self.capabilities = Capabilities(atomic_directories=True, memory_map=mmap)
        self._writers = _WriterLock(self._base)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        del state["_writers"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._writers = _WriterLock(self._base)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.base_path)!r}, durable={self.durable})"

    @property
    def _base(self) -> str:
        return os.fspath(self.base_path)

    # ------------------------------------------------------------------ byte operations

    def _in_parent(self, key: str, op: Callable[[int, str, str], T]) -> T:
        """Run ``op(dir_fd, name, where)`` in the directory of ``key``, made if missing.

        If ``op`` fails, the directories this call made are removed again (a failed write to a
        new run leaves no run behind). If it fails because its directory was removed under it
        (a concurrent ``delete_run``), it starts over: the write then lands after the delete.
        """
        parts = _split(key)
        where = self._where(key)
        for attempt in range(_WRITE_RETRIES):
            # The common case: the directory exists; one openat2, nothing made, nothing to undo.
            fd = _fs.open_path(self._base, parts[:-1], directory=True)
            if fd is not None:
                try:
                    return op(fd, parts[-1], where)
                except FileNotFoundError:
                    # Removed under us (the directory, or one above it, emptied and removed).
                    if attempt + 1 < _WRITE_RETRIES and _fs.unlinked(fd):
                        continue
                    raise
                finally:
                    os.close(fd)
            with _fs.Walk(self._base, parts[:-1], create=True) as w:
                try:
                    return op(w.fd, parts[-1], where)
                except FileNotFoundError:
                    if attempt + 1 < _WRITE_RETRIES and any(_fs.unlinked(fd) for fd in w.fds[1:]):
                        continue
                    w.undo()
                    raise
                except BaseException:
                    w.undo()
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _sync(self, dir_fd: int) -> None:
        if self.durable:
            _atomic.fsync_dir(dir_fd)

    def _create_temp(self, dir_fd: int, payload: Payload, where: str) -> str:
        """A new temp file in ``dir_fd`` holding ``payload``: its name. Removed again if writing fails;
        an ``OSError`` names ``where`` (the file it is written for)."""
        tmp = _atomic.unique_name(_atomic.TMP_PREFIX)
        try:
            _atomic.create_file(dir_fd, tmp, payload, durable=self.durable, where=where)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            if isinstance(e, OSError):
                raise _fs.named(e, where) from None
            raise
        return tmp

    def _replace(self, dir_fd: int, name: str, payload: Payload, where: str) -> None:
        """Write ``payload`` to a temp file in ``dir_fd`` and rename it over ``name``."""
        tmp = self._create_temp(dir_fd, payload, where)
        try:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            if isinstance(e, OSError):
                raise _fs.named(e, where) from None
            raise
        self._sync(dir_fd)

    def _write(self, key: str, payload: Payload) -> None:
        with self._writers.shared():
            self._in_parent(key, lambda dir_fd, name, where: self._replace(dir_fd, name, payload, where))

    def _write_new(self, key: str, payload: Payload) -> bool:
        def op(dir_fd: int, name: str, where: str) -> bool:
            tmp = self._create_temp(dir_fd, payload, where)
            try:
                created = _atomic.rename_noreplace(dir_fd, tmp, name)
            except OSError as e:
                raise _fs.named(e, where) from None
            if created:
                self._sync(dir_fd)
            return created

        with self._writers.shared():
            return self._in_parent(key, op)

    def _update(self, key: str, change: Callable[[bytes | None], bytes]) -> bytes:
        def op(dir_fd: int, name: str, where: str) -> bytes:
            # An exclusive flock on the directory's own descriptor: every _update in this directory
            # waits for it (each call opens its own descriptor, so threads of one process exclude
            # each other too); the kernel releases it when the holder dies, even by SIGKILL; and no
            # lock file is left in the run folder for mi_crow 1.0 or check() to find.
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            try:
                new = bytes(change(_read_small(dir_fd, name, where)))
                self._replace(dir_fd, name, Payload(new), where)
                return new
            finally:
                fcntl.flock(dir_fd, fcntl.LOCK_UN)

        with self._writers.shared():
            return self._in_parent(key, op)

    def _write_dir(self, key: str, files: Mapping[str, Payload]) -> None:
        def op(dir_fd: int, name: str, where: str) -> None:
            stage = _atomic.unique_name(_atomic.STAGE_PREFIX)
            os.mkdir(stage, 0o777, dir_fd=dir_fd)
            try:
                self._fill(dir_fd, stage, files, where)
                old = _atomic.replace_dir(dir_fd, stage, name)
            except BaseException as e:
                with contextlib.suppress(OSError):
                    _fs.rmtree_at(dir_fd, stage)
                if isinstance(e, OSError):
                    raise _fs.named(e, where) from None
                raise
            self._sync(dir_fd)
            if old is not None:
                # The previous version, now unreachable; if removal fails, gc() finds it later.
                with contextlib.suppress(OSError):
                    _fs.rmtree_at(dir_fd, old)

        with self._writers.shared():
            self._in_parent(key, op)

    def _fill(self, dir_fd: int, stage: str, files: Mapping[str, Payload], where: str) -> None:
        """Write ``files`` into the new staging directory ``stage`` of ``dir_fd``."""
        dirs = {"": _fs.open_dir_at(dir_fd, stage, where)}
        try:
            for rel, payload in files.items():
                parent, _, name = rel.rpartition("/")
                if parent not in dirs:
                    for part in _prefixes(parent):  # each missing level, top-down
                        if part not in dirs:
                            above, _, leaf = part.rpartition("/")
                            os.mkdir(leaf, 0o777, dir_fd=dirs[above])
                            dirs[part] = _fs.open_dir_at(dirs[above], leaf, os.path.join(where, part))
                _atomic.create_file(dirs[parent], name, payload, durable=self.durable, where=os.path.join(where, rel))
            if self.durable:
                for fd in dirs.values():
                    _atomic.fsync_dir(fd)
        finally:
            for fd in dirs.values():
                os.close(fd)

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[BinaryIO]:
        fd = _fs.open_path(self._base, _split(key), directory=False)
        if fd is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self._where(key))
        with open(fd, "rb", buffering=0) as f:
            yield f

    @contextlib.contextmanager
    def _open_dir(self, key: str) -> Iterator[_LocalDir]:
        fd = _fs.open_path(self._base, _split(key), directory=True)
        if fd is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self._where(key))
        d = _LocalDir(self, key, fd)
        try:
            yield d
        finally:
            d.close()

    def _list(self, key: str) -> list[tuple[str, bool]]:
        fd = _fs.open_path(self._base, _split(key), directory=True)
        if fd is None:
            return []
        try:
            return _fs.scan(fd)
        finally:
            os.close(fd)

    def _delete(self, key: str) -> None:
        parts = _split(key)
        parent = _fs.open_path(self._base, parts[:-1], directory=True)
        if parent is None:
            return  # nothing to delete: create nothing (not even the lock file)
        name = parts[-1]
        with contextlib.closing(_Fd(parent)) as w:
            try:
                mode = os.stat(name, dir_fd=w.fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                return
            with self._writers.shared():
                if stat.S_ISDIR(mode):
                    # Renamed aside first so that the entry vanishes at once; a link swapped in
                    # meanwhile is renamed (and then unlinked) itself, never followed.
                    aside = _atomic.unique_name(_atomic.TRASH_PREFIX)
                    try:
                        os.rename(name, aside, src_dir_fd=w.fd, dst_dir_fd=w.fd)
                    except FileNotFoundError:
                        return
                    self._sync(w.fd)
                    _fs.rmtree_at(w.fd, aside)
                else:
                    try:
                        os.unlink(name, dir_fd=w.fd)
                    except FileNotFoundError:
                        return
                    except IsADirectoryError:  # swapped for a directory meanwhile: delete that
                        _fs.rmtree_at(w.fd, name)
                    self._sync(w.fd)

    # ------------------------------------------------------------------ maintenance

    def gc(self) -> GcReport:
        """Remove what killed writers left behind: temp files, staging and trash directories.

        Waits until no write of any process is in progress (writers hold a shared lock), so
        it is safe to run while other processes use the store. Committed entries, and files
        that are not the store's (``model.pt`` that mi_crow's trainer saves in a run folder),
        are never touched: leftovers carry reserved names (``.tmp-``, ``.stage-``, ``.trash-``)
        that no entry can have. Links are never followed.

        Returns:
            A :class:`GcReport` with the removed paths and the bytes freed.

        Examples:
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
        base_fd = _fs.open_base(self._base, create=False)
        if base_fd is None:
            return GcReport([], 0)
        try:
            with self._writers.exclusive():
                for dir_fd, rel, entries in _fs.walk_tree(base_fd):
                    for name, _ in entries:
                        if name.startswith(prefixes):
                            freed += _fs.rmtree_at(dir_fd, name, count_bytes=True)
                            removed.append(os.path.join(self._base, rel, name))
        finally:
            os.close(base_fd)
        return GcReport(sorted(removed), freed)


class _Fd:
    """An open descriptor, closed by ``contextlib.closing``."""

    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def _read_small(dir_fd: int, name: str, where: str) -> bytes | None:
    """The bytes of regular file ``name`` of ``dir_fd`` (``None`` if missing), refused with
    ``InvalidJSONError`` before reading if over ``MAX_JSON_BYTES``; never through a link."""
    try:
        fd = _fs.open_file_at(dir_fd, name, where)
    except FileNotFoundError:
        return None
    with open(fd, "rb", buffering=0) as f:
        size = os.fstat(fd).st_size
        if size > MAX_JSON_BYTES:
            raise InvalidJSONError(where, f"{size:,} bytes of JSON; at most {MAX_JSON_BYTES:,} are read")
        return f.read(size)


def _prefixes(rel: str) -> list[str]:
    """``"a/b/c"`` -> ``["a", "a/b", "a/b/c"]``; ``""`` -> ``[]``."""
    parts = _split(rel)
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]
