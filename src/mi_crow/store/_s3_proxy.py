"""obstore calls made by a helper process, for a process forked after obstore was used.

obstore 0.12.1 cannot be used in a process forked from one that used it: its runtime's threads
are not copied by ``fork``, and the child hangs (even with a fresh client). DataLoader forks its
workers by default on Linux, usually after the training script has read the run's metadata. In
such a process ``ObjectStore`` sends each obstore call to one helper process instead, started on
first use with a fresh interpreter (``subprocess``, not multiprocessing's spawn, which would
import the user's ``__main__``) and shared by every store and thread of that process.

Protocol, over a Unix socket (the helper's stdin): frames of a 12-byte prefix (the JSON header's
length as u32, the payload's as u64, little endian), the JSON header, then the payload's raw
bytes (a PUT's data, a GET's object); no pickle. A payload of at least ``INLINE_MAX`` bytes
travels instead as a memory file (memfd) passed with the frame (``SCM_RIGHTS``) that the
receiver maps: the helper streams a large GET's body straight into it, so the object is copied
no more often than a direct ``obstore.get(...).bytes()`` copies it. Requests carry an id and the
responses name it, so calls from many threads are in flight at once; the helper runs each on a
thread of its own, with one client per configuration it was sent. A listing comes back as one
frame per chunk. Errors come back as their type's name and message and are raised again as the
same type (``FileNotFoundError``, obstore's exceptions, a few built-ins).

The helper exits when its end of the socket reaches end of file: when the process that started
it exits or is killed (the kernel closes its end), or closes it. A process forked from one that
has a helper closes its copy of the socket at once and starts its own helper when it needs one.

This module imports only the standard library and obstore, and the helper runs it as a script
(``runpy.run_path``): starting a helper imports neither torch nor the package.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import itertools
import json
import mmap
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import obstore
import obstore.exceptions

# The obstore functions the helper runs, by name.
OPS = ("get", "head", "put", "list", "list_with_delimiter", "delete")

_PREFIX = struct.Struct("<IQ")  # header length, payload length
_PAYLOAD = {"$payload": 1}  # stands for the frame's payload among a request's arguments
_IOV_MAX = 512
# Payloads of at least this many bytes travel as a memory file (memfd) passed with the frame,
# which the receiver maps: one copy less than through the socket, and no copy at all for an
# object the helper downloads straight into it. Smaller ones travel in the frame.
INLINE_MAX = 1 << 20
_HAVE_MEMFD = hasattr(os, "memfd_create") and hasattr(socket, "recv_fds")
_SOCKET_BUFFER = 4 << 20
_STREAM_CHUNK = 64 << 10  # a large GET is copied into its memory file as it arrives (larger chunks: one more copy)
_BUILTIN_ERRORS: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (
        ValueError,
        TypeError,
        KeyError,
        NotImplementedError,
        RuntimeError,
        OSError,
        PermissionError,
        TimeoutError,
        ConnectionError,
        IsADirectoryError,
        NotADirectoryError,
        FileExistsError,
    )
}
# Run as a script: drop the current directory from the path (files there must not shadow the
# standard library), find obstore where the parent found it if the path lacks it.
_BOOT = (
    "import sys; del sys.path[0]; sys.path.append(sys.argv[2]); import runpy; "
    "runpy.run_path(sys.argv[1], run_name='__main__')"
)


# ---------------------------------------------------------------------- frames


def _encode(value: Any) -> Any:
    """``value`` as JSON can carry it (tuples, datetimes and timedeltas tagged)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"the obstore helper process takes dicts with str keys only, got {value!r}")
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, timedelta):
        return {"$timedelta": value.total_seconds()}
    raise TypeError(f"cannot send a {type(value).__name__} to the obstore helper process: {value!r}")


def _decode(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        if "$tuple" in obj:
            return tuple(obj["$tuple"])
        if "$datetime" in obj:
            return datetime.fromisoformat(obj["$datetime"])
        if "$timedelta" in obj:
            return timedelta(seconds=obj["$timedelta"])
    return obj


def _sendmsg_all(sock: socket.socket, buffers: Sequence[Any], fds: Sequence[int] = ()) -> None:
    views = [v for b in buffers if len(v := memoryview(b).cast("B"))]
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while views:
        n = sock.sendmsg(views[:_IOV_MAX], ancillary)
        ancillary = []  # the descriptors went with the first byte
        while n:
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0] = views[0][n:]
                n = 0


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    done = 0
    while done < len(view):
        n = sock.recv_into(view[done:])
        if n == 0:
            raise EOFError("the other end of the socket closed")
        done += n


def _write_fd(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        view = view[os.write(fd, view) :]


def _memfd(buffers: Sequence[Any], name: str) -> int:
    """A memory file holding the bytes of ``buffers``, one after another."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        for b in buffers:
            _write_fd(fd, b)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _map(fd: int, size: int) -> memoryview:
    """The memory file ``fd`` mapped copy-on-write: its pages, no copy; writes stay in this process."""
    return memoryview(mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE))


def send_frame(
    sock: socket.socket, header: dict[str, Any], payload: Sequence[Any] = (), *, fd: int | None = None, size: int = 0
) -> None:
    """Write one frame: ``header`` as JSON, then the bytes of ``payload`` (buffers, one after another),
    or, with ``fd``, a memory file holding ``size`` bytes, passed along instead (large payloads)."""
    if fd is None:
        size = sum(memoryview(b).nbytes for b in payload)
        if size >= INLINE_MAX and _HAVE_MEMFD:
            fd = _memfd(payload, "mi-crow-store-put")
            try:
                return send_frame(sock, header, fd=fd, size=size)
            finally:
                os.close(fd)
    else:
        header = {**header, "$fd": 1}
        payload = ()
    head = json.dumps(_encode(header), separators=(",", ":")).encode()
    _sendmsg_all(sock, [_PREFIX.pack(len(head), size), head, *payload], () if fd is None else (fd,))


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], memoryview | None]:
    """Read one frame; ``EOFError`` at the end of the socket. A payload comes back as a writable
    buffer of its own (a memory file's private mapping for large ones)."""
    prefix = bytearray(_PREFIX.size)
    got, fds, _, _ = socket.recv_fds(sock, _PREFIX.size, 1)  # a descriptor comes with a frame's first byte
    try:
        if not got:
            raise EOFError("the other end of the socket closed")
        prefix[: len(got)] = got
        _recv_into(sock, memoryview(prefix)[len(got) :])
        head_len, size = _PREFIX.unpack(prefix)
        head = bytearray(head_len)
        _recv_into(sock, memoryview(head))
        header = json.loads(head, object_hook=_decode)
        payload = None
        if header.pop("$fd", None):
            if not fds:
                raise EOFError("a frame announced a memory file and none came")
            payload = _map(fds[0], size)
        elif size:
            payload = memoryview(bytearray(size))
            _recv_into(sock, payload)
    finally:
        for fd in fds:
            os.close(fd)
    return header, payload


def _grow_buffers(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):  # capped by the system's limit
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)


def describe_error(e: BaseException) -> dict[str, str]:
    """An exception as a response carries it: kind, type name, message."""
    if isinstance(e, FileNotFoundError):
        kind = "missing"
    elif isinstance(e, obstore.exceptions.BaseError):
        kind = "obstore"
    else:
        kind = "builtin"
    return {"kind": kind, "type": type(e).__name__, "message": str(e)}


def rebuild_error(error: dict[str, str]) -> BaseException:
    """The exception :func:`describe_error` described, as the same type where it is known."""
    kind, name, message = error["kind"], error["type"], error["message"]
    if kind == "missing":
        return FileNotFoundError(message)
    if kind == "obstore":
        cls = getattr(obstore.exceptions, name, None)
        if isinstance(cls, type) and issubclass(cls, obstore.exceptions.BaseError):
            return cls(message)
    elif name in _BUILTIN_ERRORS:
        return _BUILTIN_ERRORS[name](message)
    return obstore.exceptions.GenericError(f"{name} in the obstore helper process: {message}")


# ---------------------------------------------------------------------- the client side


class GetResult:
    """What ``ObjectStore`` uses of obstore's ``GetResult``: ``bytes()``, ``meta`` and ``range``."""

    def __init__(self, meta: dict[str, Any], range_: tuple[int, int], data: memoryview | None):
        self.meta = meta
        self.range = range_
        self._data = data

    def bytes(self) -> memoryview | bytes:
        """The object's bytes: a writable buffer this result alone holds."""
        return self._data if self._data is not None else b""


class Helper:
    """One helper process and the socket to it, for the process that started it."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        obstore_dir = os.path.dirname(os.path.dirname(os.path.abspath(obstore.__file__)))
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, os.path.abspath(__file__), obstore_dir],
                stdin=theirs.fileno(),  # the helper's stdin is its end of the socket
                close_fds=True,
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._sock = mine
        _grow_buffers(mine)
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, queue.SimpleQueue[tuple[dict[str, Any], memoryview | None]]] = {}
        self._configs: dict[str, int] = {}
        self.failure: str | None = None
        self._reader = threading.Thread(target=self._read_loop, name="mi-crow-store-s3-helper", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _dead(self) -> obstore.exceptions.GenericError:
        return obstore.exceptions.GenericError(f"the obstore helper process (pid {self.pid}) stopped: {self.failure}")

    def _read_loop(self) -> None:
        try:
            while True:
                header, payload = recv_frame(self._sock)
                with self._lock:
                    waiting = self._pending.get(header["id"])
                    if waiting is not None and "chunk" not in header:
                        del self._pending[header["id"]]
                if waiting is not None:  # else: a listing given up on (its frames are dropped)
                    waiting.put((header, payload))
        except BaseException as e:  # the helper exited or the pipe broke: every waiting call fails
            code = self.proc.poll()
            self.failure = f"it exited with status {code}" if code is not None else f"{type(e).__name__}: {e}"
            with self._lock:
                waiting_all = list(self._pending.values())
                self._pending.clear()
            for waiting in waiting_all:
                waiting.put(({"id": 0, "error": describe_error(self._dead())}, None))

    def _send(self, config: dict[str, Any], header: dict[str, Any], payload: Sequence[Any] = ()) -> None:
        spec = json.dumps(_encode(config), sort_keys=True)
        try:
            with self._write_lock:  # the configuration goes first, in the same order on the pipe
                if self.failure is not None:
                    raise self._dead()
                cfg = self._configs.get(spec)
                if cfg is None:
                    cfg = self._configs[spec] = len(self._configs) + 1
                    send_frame(self._sock, {"op": "config", "cfg": cfg, "spec": config})
                send_frame(self._sock, {**header, "cfg": cfg}, payload)
        except OSError as e:  # BrokenPipeError: the helper is gone
            self.failure = self.failure or f"{type(e).__name__}: {e}"
            raise self._dead() from None

    def _request(
        self, config: dict[str, Any], op: str, args: Sequence[Any], kwargs: dict[str, Any], payload: Sequence[Any]
    ) -> tuple[int, queue.SimpleQueue[tuple[dict[str, Any], memoryview | None]]]:
        waiting: queue.SimpleQueue[tuple[dict[str, Any], memoryview | None]] = queue.SimpleQueue()
        with self._lock:
            rid = next(self._ids)
            self._pending[rid] = waiting
        try:
            self._send(config, {"id": rid, "op": op, "args": list(args), "kwargs": kwargs}, payload)
        except BaseException:
            with self._lock:
                self._pending.pop(rid, None)
            raise
        return rid, waiting

    def call(self, config: dict[str, Any], op: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """``obstore.<op>(client of config, *args, **kwargs)`` in the helper, with the result in
        the shape obstore gives it (a listing: an iterator of chunks, read as it is consumed)."""
        if op not in OPS:
            raise ValueError(f"the obstore helper process runs {OPS}, not {op!r}")
        payload: list[Any] = []
        if op == "put":  # the data travels as the frame's payload
            path, data, *rest = args
            try:
                payload = [memoryview(data)]
            except TypeError:  # an iterator of buffers (a multipart upload): sent as one payload
                payload = [memoryview(b) for b in data]
            args = (path, _PAYLOAD, *rest)
        if op == "list":
            return self._listing(config, args, kwargs)
        _, waiting = self._request(config, op, args, kwargs, payload)
        header, data = waiting.get()
        if "error" in header:
            raise rebuild_error(header["error"])
        result = header["result"]
        if op == "get":
            return GetResult(result["meta"], (result["range"][0], result["range"][1]), data)
        return result

    def _listing(self, config: dict[str, Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Iterator[list[Any]]:
        rid, waiting = self._request(config, "list", args, kwargs, ())
        finished = False
        try:
            while True:
                header, _ = waiting.get()
                if "error" in header:
                    finished = True
                    raise rebuild_error(header["error"])
                if "chunk" not in header:
                    finished = True
                    return
                yield header["chunk"]
        finally:
            if not finished:  # given up on: the helper stops listing, later chunks are dropped
                with self._lock:
                    self._pending.pop(rid, None)
                with contextlib.suppress(obstore.exceptions.GenericError):
                    self._send(config, {"id": rid, "op": "cancel"})

    def close(self) -> None:
        """Close the socket (the helper exits) and reap it; in the process that started it."""
        if self.owner != os.getpid():
            return
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def forget_after_fork(self) -> None:
        """In a forked child: close the inherited end of the socket (never shut it down: it is the
        parent's connection), so that the helper still exits with the process that started it."""
        self._sock.close()


_helper: Helper | None = None
_helper_lock = threading.Lock()
_inherited: list[Helper] = []  # kept, never finalized in a child (their Popen is not the child's)


def helper() -> Helper:
    """This process's helper, started on first use (again if the last one stopped)."""
    global _helper
    with _helper_lock:
        if _helper is None or _helper.failure is not None:
            if _helper is not None:
                _helper.close()
            _helper = Helper()
        return _helper


def helper_pid() -> int | None:
    """The pid of this process's helper; ``None`` if it has none."""
    h = _helper
    return h.pid if h is not None and h.owner == os.getpid() else None


def call(config: dict[str, Any], op: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """:meth:`Helper.call` on this process's helper."""
    return helper().call(config, op, args, kwargs)


def _after_fork_in_child() -> None:
    global _helper, _helper_lock
    _helper_lock = threading.Lock()
    if _helper is not None:
        _helper.forget_after_fork()
        _inherited.append(_helper)
        _helper = None


def _at_exit() -> None:
    h = _helper
    if h is not None:
        h.close()


# ---------------------------------------------------------------------- the helper side


class _Server:
    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._specs: dict[int, dict[str, Any]] = {}
        self._clients: dict[int, Any] = {}
        self._cancelled: set[int] = set()

    def reply(
        self, header: dict[str, Any], payload: Sequence[Any] = (), *, fd: int | None = None, size: int = 0
    ) -> None:
        with self._write_lock:
            send_frame(self._sock, header, payload, fd=fd, size=size)

    def client(self, cfg: int) -> Any:
        from obstore.store import S3Store

        with self._lock:
            client = self._clients.get(cfg)
            if client is None:
                spec = self._specs[cfg]
                kwargs = dict(spec.get("config") or {})
                if spec.get("client_options"):
                    kwargs["client_options"] = spec["client_options"]
                if spec.get("retry_config") is not None:
                    kwargs["retry_config"] = spec["retry_config"]
                client = self._clients[cfg] = S3Store(spec["bucket"], **kwargs)
            return client

    def dispatch(self, header: dict[str, Any], payload: memoryview | None) -> None:
        op = header["op"]
        if op == "config":
            with self._lock:
                self._specs[header["cfg"]] = header["spec"]
        elif op == "cancel":
            with self._lock:
                self._cancelled.add(header["id"])
        else:
            threading.Thread(target=self.run, args=(header, payload), daemon=True).start()

    def run(self, header: dict[str, Any], payload: memoryview | None) -> None:
        rid = header["id"]
        try:
            op = header["op"]
            if op not in OPS:
                raise ValueError(f"unknown operation {op!r}")
            fn = getattr(obstore, op)
            args = [(payload if payload is not None else b"") if a == _PAYLOAD else a for a in header["args"]]
            client = self.client(header["cfg"])
            if op == "list":
                for chunk in fn(client, *args, **header["kwargs"]):
                    with self._lock:
                        if rid in self._cancelled:
                            self._cancelled.discard(rid)
                            return
                    self.reply({"id": rid, "chunk": chunk})
                self.reply({"id": rid, "result": None})
            elif op == "get":
                self.get(rid, fn(client, *args, **header["kwargs"]))
            else:
                self.reply({"id": rid, "result": fn(client, *args, **header["kwargs"])})
        except BaseException as e:  # sent back, raised again in the caller as the same type
            with contextlib.suppress(OSError):
                self.reply({"id": rid, "error": describe_error(e)})

    def get(self, rid: int, got: Any) -> None:
        """Send a GET's object: downloaded straight into a memory file the caller maps when large."""
        result = {"meta": got.meta, "range": list(got.range)}
        start, end = got.range
        if end - start < INLINE_MAX or not _HAVE_MEMFD:
            self.reply({"id": rid, "result": result}, [got.bytes()])
            return
        fd = _memfd((), "mi-crow-store-get")
        try:
            for chunk in got.stream(min_chunk_size=_STREAM_CHUNK):
                _write_fd(fd, chunk)
            size = os.lseek(fd, 0, os.SEEK_CUR)
            if size != end - start:
                raise obstore.exceptions.GenericError(f"the body had {size} bytes, {end - start} were announced")
            self.reply({"id": rid, "result": result}, fd=fd, size=size)
        finally:
            os.close(fd)


def _watch_parent(parent: int) -> None:
    # Backstop for the end of the pipe: a helper whose parent died exits even if something else
    # still held the pipe open.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def serve() -> None:
    """The helper's main loop: requests from stdin, responses to stdout, until stdin ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    sock = socket.socket(fileno=os.dup(0))
    # The protocol owns the socket; anything a library prints goes to stderr.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    _grow_buffers(sock)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    server = _Server(sock)
    try:
        while True:
            header, payload = recv_frame(sock)
            server.dispatch(header, payload)
    except EOFError:
        pass
    os._exit(0)  # in-flight calls are for a process that is gone


if __name__ == "__main__":
    serve()
else:
    os.register_at_fork(after_in_child=_after_fork_in_child)
    atexit.register(_at_exit)
