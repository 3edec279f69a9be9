"""Descriptor-relative file-system access below one trusted directory (``base_path``).

Nothing here re-walks a path string: a path is resolved from a descriptor of ``base_path``
downwards, one component at a time, each opened with ``O_NOFOLLOW`` (directories also with
``O_DIRECTORY``), and every create, rename, remove and listing is done relative to the
descriptor of its directory (``openat``, ``mkdirat``, ``renameat2``, ``unlinkat``,
``fdopendir``). So a process that swaps a directory inside the store for a symbolic link, at any
instant, can make a call fail but never lead it outside ``base_path``: a link is never followed,
whether it points inside or outside the store (``base_path`` itself may be one: the user chose
it). Files are opened with ``O_NONBLOCK`` and must be regular files, so a FIFO or a device planted
in the store is refused at once instead of blocking the reader.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import platform
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from mi_crow.store.errors import CorruptFileError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

# openat2(2) (Linux 5.6+): resolves a whole relative path below a directory descriptor in one call,
# refusing every symbolic link (RESOLVE_NO_SYMLINKS) and any escape (RESOLVE_BENEATH). It is only a
# fast path: on any refusal the component-by-component walk runs, to name the offending component.
_SYS_OPENAT2 = 437  # the same number on every Linux architecture (added after the syscall table merge)
_RESOLVE_BENEATH_NO_LINKS = 0x08 | 0x04 | 0x02  # RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_syscall: Any = None
if platform.system() == "Linux":
    try:
        _syscall = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).syscall
        _syscall.restype = ctypes.c_long
    except (OSError, AttributeError):  # pragma: no cover - no libc
        _syscall = None


def _openat2(dir_fd: int, path: str, flags: int) -> int | None:
    """``openat2(dir_fd, path, flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``: the descriptor, or
    ``None`` if the kernel lacks the call or refused the path for any other reason than a missing
    component (the caller then walks component by component, which explains the refusal).

    Raises:
        FileNotFoundError: If a component is missing.
    """
    global _syscall
    if _syscall is None:
        return None
    how = _OpenHow(flags, 0, _RESOLVE_BENEATH_NO_LINKS)
    fd = int(_syscall(_SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)))
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err == errno.ENOENT:  # final: something on the way is missing
        raise FileNotFoundError(err, os.strerror(err), path)
    if err in (errno.ENOSYS, errno.EPERM):  # no openat2 here (or a seccomp filter refuses it)
        _syscall = None
    return None


# How often a tree removal rescans a directory that writers keep filling (delete racing a write).
_RMTREE_ROUNDS = 64


def kind(mode: int) -> str:
    """What an ``st_mode`` is, in words, for error messages."""
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "regular file" if stat.S_ISREG(mode) else f"file of mode {mode:o}"


def _link_error(where: str) -> CorruptFileError:
    return CorruptFileError(
        where, "is a symbolic link; the store never writes links and never follows one below base_path"
    )


def _not_a(dir_fd: int, name: str, where: str, wanted: str) -> OSError:
    """The error for ``name`` (in ``dir_fd``) not being a ``wanted``: a link, a FIFO, ..."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:  # removed meanwhile
        return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), where)
    if stat.S_ISLNK(mode):
        return _link_error(where)
    return CorruptFileError(where, f"is a {kind(mode)}, not a {wanted}")


def named(e: OSError, where: str) -> OSError:
    """``e`` (raised by a call on a name relative to a descriptor) naming ``where`` instead."""
    if isinstance(e, CorruptFileError):
        return e
    return type(e)(e.errno, e.strerror, where)


def open_dir_at(dir_fd: int, name: str, where: str) -> int:
    """Open directory ``name`` of ``dir_fd`` without following a link.

    Raises:
        FileNotFoundError: If it does not exist.
        CorruptFileError: If it is a symbolic link or not a directory.
    """
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), where) from None
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            raise _not_a(dir_fd, name, where, "directory") from None
        raise named(e, where) from None


def open_file_at(dir_fd: int, name: str, where: str | Callable[[], str]) -> int:
    """Open regular file ``name`` of ``dir_fd`` for reading, without following a link or blocking.

    ``where`` names the file in errors (a callable is called only then: this runs once per file read).

    Raises:
        FileNotFoundError: If it does not exist.
        CorruptFileError: If it is a symbolic link, a FIFO, a device, a directory or a socket.
    """
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        path = where if isinstance(where, str) else where()
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from None
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.ENODEV, errno.EISDIR):
            raise _not_a(dir_fd, name, path, "regular file") from None
        raise named(e, path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CorruptFileError(
                where if isinstance(where, str) else where(), f"is a {kind(mode)}, not a regular file"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_base(base: str, *, create: bool) -> int | None:
    """Open ``base_path`` (following a link there: it is the user's choice); ``None`` if it does not
    exist and ``create`` is false."""
    if create:
        os.makedirs(base or ".", exist_ok=True)
    try:
        return os.open(base or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        if create:
            raise
        return None


class Walk:
    """The directories from ``base_path`` down to ``parts``, held open by descriptor.

    ``fds[0]`` is ``base_path``, ``fds[i]`` the directory ``parts[:i]``; ``fd`` is the last one.
    With ``create``, missing directories are made (``mkdirat``) and remembered, so that a write
    that fails can remove what it made (:meth:`undo`) and leave no empty run behind.
    """

    def __init__(self, base: str, parts: Sequence[str], *, create: bool):
        self.base = base
        self.parts = list(parts)
        self.fds: list[int] = []
        self.made: list[int] = []  # indices into parts of the directories this walk created
        try:
            self._open(create)
        except BaseException:
            self.close()
            raise

    def where(self, depth: int | None = None) -> str:
        return os.path.join(self.base, *self.parts[:depth])

    def _open(self, create: bool) -> None:
        fd = open_base(self.base, create=create)
        if fd is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.base)
        self.fds.append(fd)
        for i, name in enumerate(self.parts):
            where = self.where(i + 1)
            try:
                fd = open_dir_at(fd, name, where)
            except FileNotFoundError:
                if not create:
                    raise
                # Made here (or by a concurrent writer: EEXIST), then opened like any other: a link
                # swapped in between the two is refused by O_NOFOLLOW, never followed.
                try:
                    os.mkdir(name, 0o777, dir_fd=fd)
                    self.made.append(i)
                except FileExistsError:
                    pass
                except OSError as e:
                    raise named(e, where) from None
                fd = open_dir_at(fd, name, where)
            self.fds.append(fd)

    @property
    def fd(self) -> int:
        return self.fds[-1]

    def undo(self) -> None:
        """Remove the directories this walk created, deepest first, where they are still empty."""
        for i in reversed(self.made):
            with contextlib.suppress(OSError):
                os.rmdir(self.parts[i], dir_fd=self.fds[i])
        self.made = []

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> Walk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_path(base: str, parts: Sequence[str], *, directory: bool) -> int | None:
    """Open the directory (or, with ``directory=False``, the regular file) ``parts`` below
    ``base_path`` without following any link; ``None`` if it or a directory on the way is missing.

    One ``openat2`` where the kernel has it; otherwise, and to explain any refusal, one ``openat``
    per component.

    Raises:
        CorruptFileError: If a component is a symbolic link or not a directory, or the file is not
            a regular file.
    """
    base_fd = open_base(base, create=False)
    if base_fd is None:
        return None
    try:
        if parts:
            try:
                fd = _openat2(base_fd, "/".join(parts), DIR_FLAGS if directory else FILE_FLAGS)
            except FileNotFoundError:
                return None
        else:
            fd = os.dup(base_fd)
        if fd is None:
            return _open_by_walking(base, parts, directory)
        if not directory:
            try:
                mode = os.fstat(fd).st_mode
                if not stat.S_ISREG(mode):
                    raise CorruptFileError(os.path.join(base, *parts), f"is a {kind(mode)}, not a regular file")
            except BaseException:
                os.close(fd)
                raise
        return fd
    finally:
        os.close(base_fd)


def _open_by_walking(base: str, parts: Sequence[str], directory: bool) -> int | None:
    """:func:`open_path` one component at a time (a :class:`Walk`): where ``openat2`` is missing,
    and to name the component that ``openat2`` refused."""
    try:
        with Walk(base, parts if directory else parts[:-1], create=False) as w:
            if directory:
                return w.fds.pop()  # kept open: Walk.close closes the others
            return open_file_at(w.fd, parts[-1], os.path.join(base, *parts))
    except FileNotFoundError:
        return None


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def unlinked(fd: int) -> bool:
    """Whether the directory open as ``fd`` was removed (a removed directory has no links left)."""
    return os.fstat(fd).st_nlink == 0


def rmtree_at(dir_fd: int, name: str, *, count_bytes: bool = False) -> int:
    """Remove ``name`` of ``dir_fd`` and everything below it, never following a link; return the
    bytes of the files removed (with ``count_bytes``; else 0, and no ``stat`` per file). A link is
    removed itself, never its target. Entries that vanish meanwhile (another remover) are skipped;
    entries that writers add meanwhile are removed too.

    Iterative (a hostile tree of any depth raises no ``RecursionError``); it holds one
    descriptor per level of the tree.

    Raises:
        OSError: If a directory stays non-empty through many rescans, removal is not permitted,
            or the tree is deeper than the process may open descriptors.
    """
    freed = 0
    # A frame per entry being removed: [parent fd, name, is a directory (None: unknown),
    #                                   its fd or -1, children left or None, rescans].
    stack: list[list[Any]] = [[dir_fd, name, None, -1, None, 0]]
    try:
        while stack:
            frame = stack[-1]
            parent, entry, is_dir, fd, children, rounds = frame
            if fd < 0:
                if is_dir is None or (count_bytes and not is_dir):
                    try:
                        st = os.stat(entry, dir_fd=parent, follow_symlinks=False)
                    except FileNotFoundError:
                        stack.pop()
                        continue
                    is_dir = stat.S_ISDIR(st.st_mode)
                    size = 0 if is_dir else st.st_size
                else:
                    size = 0
                if not is_dir:
                    try:
                        os.unlink(entry, dir_fd=parent)
                        freed += size
                        stack.pop()
                    except FileNotFoundError:
                        stack.pop()
                    except IsADirectoryError:  # swapped for a directory meanwhile
                        frame[2] = True
                    continue
                try:
                    fd = frame[3] = os.open(entry, DIR_FLAGS, dir_fd=parent)
                except FileNotFoundError:
                    stack.pop()
                    continue
                except OSError as e:
                    if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    frame[2] = False  # swapped for a link or file meanwhile: remove that entry itself
                    continue
            if children is None:
                children = frame[4] = scan(fd)
            if children:
                child, child_is_dir = children.pop()
                stack.append([fd, child, child_is_dir, -1, None, 0])
                continue
            os.close(fd)
            frame[3] = -1
            try:
                os.rmdir(entry, dir_fd=parent)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if rounds + 1 >= _RMTREE_ROUNDS:
                    raise OSError(
                        errno.ENOTEMPTY, "directory kept being refilled while it was removed", entry
                    ) from None
                frame[4], frame[5] = None, rounds + 1  # a writer added an entry meanwhile: scan again
                continue
            stack.pop()
    finally:
        for frame in stack:
            if frame[3] >= 0:
                os.close(frame[3])
    return freed


def scan(fd: int) -> list[tuple[str, bool]]:
    """``(name, is_dir)`` of the entries of the directory open as ``fd`` (links count as files)."""
    with os.scandir(fd) as it:
        return [(e.name, e.is_dir(follow_symlinks=False)) for e in it]


def walk_tree(fd: int) -> Iterator[tuple[int, str, list[tuple[str, bool]]]]:
    """Yield ``(dir_fd, rel_path, entries)`` for the directory ``fd`` and every directory below it,
    top-down, never following a link. The caller may remove entries before they are descended
    into (a directory that cannot be opened any more is skipped). Iterative, like
    :func:`rmtree_at`."""
    entries = scan(fd)
    yield fd, "", entries
    stack: list[tuple[int, str, list[str]]] = [(fd, "", [n for n, is_dir in reversed(entries) if is_dir])]
    try:
        while stack:
            dir_fd, rel, todo = stack[-1]
            if not todo:
                stack.pop()
                if dir_fd != fd:
                    os.close(dir_fd)
                continue
            name = todo.pop()
            try:
                sub = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
            except OSError:  # removed by the caller or meanwhile, or swapped for a link
                continue
            sub_rel = f"{rel}/{name}" if rel else name
            try:
                sub_entries = scan(sub)
            except OSError:
                os.close(sub)
                continue
            stack.append((sub, sub_rel, [n for n, is_dir in reversed(sub_entries) if is_dir]))
            yield sub, sub_rel, sub_entries
    finally:
        for dir_fd, _, _ in stack:
            if dir_fd != fd:
                os.close(dir_fd)
