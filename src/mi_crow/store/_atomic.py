"""Atomic file-system primitives for the local backend.

Every file is written under a temp name in its own directory and renamed into place.
Linux's ``renameat2`` gives two stronger renames: ``RENAME_NOREPLACE`` (put-if-absent,
used by run-level appends) and ``RENAME_EXCHANGE`` (swap two directories in one step,
used to replace a whole batch so readers never see a mix of versions). Where the kernel or
file system lacks them, ``os.link`` and a two-step rename are the fallbacks.

Files of 256 KiB or more get their blocks with ``fallocate`` before the data is written:
ext4's delayed allocation otherwise reserves space page by page inside ``write``, which
makes a buffered write of 32 MiB about 1.5x slower on the benchmark machine (see
``benchmarks/RESULTS.md``). A full disk is then reported before any data is copied.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import os
import uuid
from collections.abc import Sequence

from mi_crow.store._tensor_file import Buffer, Payload

TMP_PREFIX = ".tmp-"
STAGE_PREFIX = ".stage-"
TRASH_PREFIX = ".trash-"

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
# Linux caps one write() at 0x7ffff000 bytes; stay below it.
_MAX_WRITE = 1 << 30
# pwritev takes at most IOV_MAX buffers (1024 on Linux) per call.
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (AttributeError, OSError, ValueError):  # pragma: no cover - no sysconf
    _IOV_MAX = 1024

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _renameat2 = getattr(_libc, "renameat2", None)
except OSError:  # pragma: no cover - no libc to load (not Linux)
    _libc = _renameat2 = None
_renameat2_works = _renameat2 is not None

# The raw fallocate(2) (never glibc's posix_fallocate, which emulates it on file systems
# without support by writing every block).
_fallocate = (getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)) if _libc else None
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int
FALLOCATE_MIN = 256 * 1024


def unique_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def write_all(fd: int, parts: Sequence[Buffer], offset: int = 0) -> int:
    """Write the buffers at ``offset`` of ``fd``, in order, in as few ``pwritev`` calls as the
    kernel allows (at most ~1 GiB and ``IOV_MAX`` buffers each, looping over short writes);
    return the byte count."""
    views = [v for v in (memoryview(p).cast("B") for p in parts) if len(v)]
    total = 0
    first = 0  # views[first:] are still to be written
    while first < len(views):
        batch, size = [], 0
        for v in itertools.islice(views, first, first + _IOV_MAX):
            if size and size + len(v) > _MAX_WRITE:
                break
            batch.append(v[: _MAX_WRITE - size])
            size += len(batch[-1])
        done = os.pwritev(fd, batch, offset)
        offset += done
        total += done
        while first < len(views) and done >= len(views[first]):
            done -= len(views[first])
            first += 1
        if done:
            views[first] = views[first][done:]
    return total


def create_file(dir_fd: int, name: str, payload: Payload, *, durable: bool, where: str) -> None:
    """Create file ``name`` in directory ``dir_fd`` (it must not exist) holding ``payload``; fsync it
    if ``durable``. ``where`` names the file in errors.

    A head already known goes out with the data in one vectored write. A head still being
    computed (checksums) is computed while the data is written at its offset, then written
    at the start of the file.
    """
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
    try:
        size = payload.nbytes()
        if size >= FALLOCATE_MIN:
            preallocate(fd, size, where)
        if payload.head_ready():
            write_all(fd, payload.buffers())
        else:
            write_all(fd, payload.data, payload.head_size)
            write_all(fd, [payload.head()])
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def preallocate(fd: int, size: int, path: str) -> None:
    """Allocate ``size`` bytes of blocks for the new file ``fd`` (at ``path``) where the file
    system can (a no-op elsewhere); ``OSError`` (e.g. ``ENOSPC``) if it cannot hold them."""
    if _fallocate is None or _fallocate(fd, 0, 0, size) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EINTR):
        raise OSError(err, os.strerror(err), path)


def fsync_dir(dir_fd: int) -> None:
    """Make the entries of the directory open as ``dir_fd`` (creations, renames) durable."""
    os.fsync(dir_fd)


def _rename2(dir_fd: int, src: str, dst: str, flags: int) -> bool:
    """``renameat2`` within ``dir_fd``; ``False`` if the kernel or file system does not support ``flags``."""
    global _renameat2_works
    if not _renameat2_works or _renameat2 is None:
        return False
    if _renameat2(dir_fd, os.fsencode(src), dir_fd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        _renameat2_works = False
        return False
    raise OSError(err, os.strerror(err), src, None, dst)


def rename_noreplace(dir_fd: int, src: str, dst: str) -> bool:
    """Atomically move file ``src`` to ``dst`` (both in ``dir_fd``) unless ``dst`` exists; ``False`` if
    it did. ``src`` is gone afterwards either way.
    """
    try:
        if _rename2(dir_fd, src, dst, _RENAME_NOREPLACE):
            return True  # src was moved: nothing left to remove
        os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)  # the fallback
        created = True
    except FileExistsError:
        created = False
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(src, dir_fd=dir_fd)
        raise
    with contextlib.suppress(FileNotFoundError):
        os.unlink(src, dir_fd=dir_fd)
    return created


def replace_dir(dir_fd: int, src: str, dst: str) -> str | None:
    """Put directory ``src`` at ``dst`` (both in ``dir_fd``) in one step; return the name the old
    ``dst`` went to, if any.

    If ``dst`` is absent, a plain rename. Otherwise the two are exchanged atomically
    (``src`` then holds the old version, for the caller to delete). Without
    ``RENAME_EXCHANGE`` the old directory is first renamed aside, leaving a moment in
    which ``dst`` is absent but never mixed.
    """
    try:
        os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return None
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
            raise
    if _rename2(dir_fd, src, dst, _RENAME_EXCHANGE):
        return src
    aside = unique_name(TRASH_PREFIX)
    os.rename(dst, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    try:
        os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(aside, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # put the committed version back
        raise
    return aside
