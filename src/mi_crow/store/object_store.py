"""``ObjectStore``: the same store on S3-compatible object storage, through obstore.

The layout is the local store's (``docs/format.md``): a local store uploaded to a bucket with
a plain recursive copy is readable here, and the keys users see are mi_crow 1.0's where one
object can hold an entry (``meta.json``, ``batch_{i}/metadata.json``, ``batch_{i:06d}.safetensors``,
the append log). What S3 lacks (rename, directories) is replaced by a commit object: a batch's
or a model's tensor files go to a new generation folder ``.g{gen}/`` and its ``metadata.json``,
written last, names it (``_commit.CommitObject``). Appends claim their number with
``If-None-Match: *``. Needs ``pip install 'mi-crow-store[s3]'`` (obstore).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import math
import os
import re
import threading
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO, ContextManager, cast

from mi_crow.store import _keys, _multipart
from mi_crow.store._backend import Capabilities, GcReport, ObjectInfo, ObjectReplaced
from mi_crow.store._cache import DEFAULT_CACHE_BYTES, DiskCache
from mi_crow.store._commit import read_generation
from mi_crow.store._layout import LayoutStore
from mi_crow.store._names import check_name
from mi_crow.store._tensor_file import PREFETCH, Payload
from mi_crow.store.errors import StoreError

try:
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError
    from obstore.store import S3Store

    from mi_crow.store import _s3_proxy  # imports obstore
except ImportError as e:  # pragma: no cover - the s3 extra is installed wherever this is tested
    raise ImportError("ObjectStore needs obstore: pip install 'mi-crow-store[s3]' (it installs obstore==0.12.1)") from e

# Objects at least this large go up as multipart uploads, in parts of PART_SIZE sent in parallel
# straight from the tensors' memory; smaller ones in one PUT.
MULTIPART_MIN = 16 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
# Tensors at least this large come back as views of the bytes one ranged GET returned (no copy);
# the bytes of the file's first GET are then fetched again, at most 1/64 of the tensor.
BORROW_MIN = 4 * 1024 * 1024
# Up to this many folders of a one-level listing are checked for objects with a LIST each (in
# parallel); more are checked with one recursive listing.
_CONFIRM_ONE_BY_ONE = 32
# Objects written when a store first writes, to check that the server honours conditional PUT.
_PROBE_DIR = ".mi-crow-store"

_probed: dict[tuple[str, str, str], bool] = {}
_probe_lock = threading.Lock()

# obstore cannot be used in a process forked from one that used it (measured with 0.12.1: the
# child hangs, even with a fresh client, and the parent can crash). In such a process every
# obstore call of every store goes to a helper process instead (_s3_proxy), which DataLoader's
# forked workers then use. "Used": a store of this process made a client, or obstore's runtime
# threads run (anyone's use of obstore), or the process itself forwards its calls.
_used_in_pid: int | None = None
_forked_after_use = False
_fork_needs_helper = False
_stores: weakref.WeakSet[ObjectStore] = weakref.WeakSet()
# What a forked child inherited of its parent's clients and pools: kept, never dropped, since
# finalizing an obstore client in the child can hang as using it does.
_inherited: list[Any] = []


def _obstore_running() -> bool:
    """Whether obstore's runtime (tokio) has threads in this process (Linux; ``False`` elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm", "rb") as f:
                if f.read().startswith(b"tokio"):
                    return True
        except OSError:
            continue  # a thread that just ended
    return False


def _before_fork() -> None:
    global _fork_needs_helper
    _fork_needs_helper = _forked_after_use or _used_in_pid is not None or _obstore_running()


def _after_fork_in_child() -> None:
    global _forked_after_use, _probe_lock
    _forked_after_use = _fork_needs_helper
    _probe_lock = threading.Lock()  # another thread may have held it at the fork
    for store in list(_stores):
        store._after_fork()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


class ObjectStoreError(StoreError, OSError):
    """A request to the object store failed (after the client's retries), or the server lacks
    something the store needs. Names the object's URL."""


def _parse_url(url: str) -> tuple[str, str]:
    m = re.fullmatch(r"s3://([^/]+)/?(.*)", url)
    if m is None:
        raise ValueError(f"an ObjectStore URL is s3://bucket/prefix, got {url!r}")
    bucket, prefix = m.group(1), m.group(2).strip("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"invalid bucket name {bucket!r} in {url!r} (3-63 of a-z, 0-9, '.', '-')")
    if prefix:
        for part in prefix.split("/"):
            check_name(part, f"component of the prefix in {url!r}")
    return bucket, prefix


class _ObjectFile(io.RawIOBase):
    """One version of an object, read by ranged GETs pinned to its ETag.

    The first GET brings its first ``PREFETCH`` bytes and its size (small objects: all of
    them, then available as :attr:`whole`); later reads fetch only what they ask for, with
    ``If-Match`` so that a concurrent overwrite raises instead of mixing two versions.
    """

    def __init__(self, store: ObjectStore, key: str, head: memoryview, size: int, etag: str | None):
        super().__init__()
        self._store = store
        self._key = key
        self._head = head
        self._size = size
        self._etag = etag
        self._pos = 0
        self.whole: memoryview | None = head if len(head) == size else None

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        # Let go of the bytes (tensors that borrow them keep them alive on their own).
        self._head = memoryview(b"")
        self.whole = None
        super().close()

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def _range(self, start: int, end: int) -> memoryview:
        options: dict[str, Any] = {"range": (start, end)}
        if self._etag is not None:
            options["if_match"] = self._etag
        try:
            got = memoryview(self._store._call(obstore.get, self._key, options=options).bytes())
        except PreconditionError:
            raise ObjectReplaced(f"{self._store._where(self._key)} was replaced while being read") from None
        if len(got) != end - start:
            raise ObjectReplaced(f"{self._store._where(self._key)} changed size while being read")
        return got

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = min(len(view), self._size - self._pos)
        if n <= 0:
            return 0
        start, end = self._pos, self._pos + n
        done = 0
        if start < len(self._head):
            done = min(end, len(self._head)) - start
            view[:done] = self._head[start : start + done]
        if done < n:
            view[done:n] = self._range(start + done, end)
        self._pos = end
        return n

    def borrow_range(self, start: int, end: int) -> memoryview | None:
        """The bytes ``start..end`` as a buffer no one else holds (a view for a tensor), or ``None``
        when copying is as good (small ranges, or ranges already read)."""
        if end - start < BORROW_MIN or end <= len(self._head):
            return None
        return self._range(start, end)


class ObjectStore(LayoutStore):
    """A :class:`Store` on S3-compatible object storage (AWS S3, MinIO, SeaweedFS, R2...).

    Everything ``LocalStore`` offers (models, run-level appends, ``check``, ``gc``) with the
    same layout; see ``docs/format.md`` for how a multi-file entry is committed. Safe with many
    writing processes on many machines without locks: appends claim their number with a
    conditional PUT, concurrent writes of one batch leave one of them whole, and readers racing
    an overwrite see the old entry or the new one. The first write of a store checks once per
    process that the server honours conditional PUT (``If-None-Match: *``) and refuses to write
    if it does not.

    ``base_path`` only names the URL (the ``Store`` contract types it as a ``Path``): code that
    writes files under it itself, such as mi_crow 1.0's ``SaeTrainer`` or its dataset saving,
    needs a ``LocalStore``.

    Works in DataLoader workers however they are started. obstore itself hangs in a process
    forked after it was used (DataLoader's default on Linux, once the script has read from a
    store): there the store sends its requests to one helper process per forked process
    (started on first use with a fresh interpreter, without torch; it exits with that process).
    Spawned workers receive the store pickled, without its connections.

    With ``cache_dir``, objects that are never rewritten (a batch's or model's tensor files, in
    their generation folders) are kept on local disk after their first read, up to
    ``cache_bytes``, least recently used first out; later reads (the next epoch of an
    :class:`~mi_crow.store.ActivationDataset`) map them from there. Run metadata, commits,
    appends and files at mi_crow's own paths are always read from the server.

    Examples:
        >>> from mi_crow.store import ObjectStore
        >>> store = ObjectStore("s3://my-bucket/activations")  # doctest: +SKIP
        >>> store.put_run_metadata("run-1", {"model": "gpt2"})  # doctest: +SKIP
        'runs/run-1/meta.json'
    """

    capabilities = Capabilities(atomic_directories=False, listing_is_recursive=True)

    def __init__(
        self,
        base_path: str,
        runs_prefix: str = "runs",
        dataset_prefix: str = "datasets",
        model_prefix: str = "models",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        allow_http: bool | None = None,
        config: Mapping[str, Any] | None = None,
        client_options: Mapping[str, Any] | None = None,
        retry_config: Mapping[str, Any] | None = None,
        single_writer: bool = False,
        max_concurrency: int = 16,
        verify: bool = False,
        checksums: bool = True,
        allow_nan: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        """Open the store at the URL ``base_path``; nothing is requested from the server until first used.

        Args:
            base_path: The store's URL, ``s3://bucket`` or ``s3://bucket/prefix`` (the ``Store``
                contract's name for where a store is); nothing is written outside the prefix.
            runs_prefix: As for ``LocalStore``, under the URL's prefix.
            dataset_prefix: As for ``LocalStore``.
            model_prefix: As for ``LocalStore``, under the URL's prefix.
            endpoint: The server's URL (e.g. ``http://127.0.0.1:8333``); default: ``AWS_ENDPOINT_URL``
                or AWS itself.
            region: Default: ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.
            access_key_id: Default: ``AWS_ACCESS_KEY_ID`` (or the other sources obstore knows).
            secret_access_key: Default: ``AWS_SECRET_ACCESS_KEY``.
            session_token: Default: ``AWS_SESSION_TOKEN``.
            allow_http: Allow ``http://`` endpoints (default: ``AWS_ALLOW_HTTP``).
            config: Further obstore ``S3Config`` settings (``virtual_hosted_style_request``...);
                the arguments above take precedence.
            client_options: obstore client options (``timeout``, ``connect_timeout``...).
            retry_config: obstore's retry settings (``max_retries``, ``backoff``, ``retry_timeout``).
                Server errors and timeouts are retried with exponential backoff (obstore's default:
                10 retries within 3 minutes); what still fails raises :class:`ObjectStoreError`
                (an ``OSError``) naming the object.
            single_writer: Skip the conditional-PUT check and claim appends with a HEAD, then a PUT,
                for servers without conditional PUT. Safe only while one process writes.
            max_concurrency: Requests in flight for one call (parallel parts, a batch's objects).
            verify: As for ``LocalStore``.
            checksums: As for ``LocalStore``.
            allow_nan: As for ``LocalStore``.
            cache_dir: A local directory (created if missing) to keep immutable objects in after
                their first read: a batch's and a model's tensor files. Processes on one machine
                (DataLoader workers, ranks) may share it. Default: no cache.
            cache_bytes: The cache's budget in bytes (default 10 GiB): after each insertion the
                least recently read files are removed until the cache holds at most this much.
                Objects larger than the budget are not cached.

        Raises:
            ValueError: For a bad URL, ``max_concurrency``, ``cache_dir`` (not a directory, or
                one that cannot be created) or ``cache_bytes`` (not an int >= 1).
        """
        if not isinstance(base_path, str):
            raise ValueError(f"base_path must be a URL string s3://bucket/prefix, got {type(base_path).__name__}")
        bucket, prefix = _parse_url(base_path)
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
        cache = DiskCache(cache_dir, cache_bytes) if cache_dir is not None else None
        if cache is None:
            DiskCache.check_budget(cache_bytes)
        super().__init__(
            Path(f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"),
            runs_prefix,
            dataset_prefix,
            model_prefix,
            verify=verify,
            checksums=checksums,
            allow_nan=allow_nan,
        )
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.single_writer = single_writer
        self.max_concurrency = max_concurrency
        settings: dict[str, Any] = dict(config or {})
        for name, value in (
            ("endpoint", endpoint),
            ("region", region),
            ("access_key_id", access_key_id),
            ("secret_access_key", secret_access_key),
            ("session_token", session_token),
        ):
            if value is not None:
                settings[name] = value
        options = dict(client_options or {})
        if allow_http is not None:
            options["allow_http"] = allow_http
        self._config = settings
        self._client_options = options
        self._retry_config = dict(retry_config) if retry_config is not None else None
        self._cache = cache
        self._client_obj: S3Store | None = None
        self._pool_obj: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        _stores.add(self)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_client_obj"] = None
        state["_pool_obj"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()
        _stores.add(self)

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    # ------------------------------------------------------------------ client

    def _after_fork(self) -> None:
        """In a forked child: a lock, a pool and no client of its own (the parent's pool has no
        threads here; its client is kept but never used: the helper process makes the calls)."""
        _inherited.extend(obj for obj in (self._client_obj, self._pool_obj) if obj is not None)
        self._client_obj = None
        self._pool_obj = None
        self._lock = threading.Lock()

    def _helper_config(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "config": self._config,
            "client_options": self._client_options,
            "retry_config": self._retry_config,
        }

    def _invoke(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(client, *args, **kwargs)`` for an obstore function ``fn``: every request of the
        store goes through here. In a process forked after obstore was used, the helper process
        makes it (:mod:`mi_crow.store._s3_proxy`) and the result has the same shape."""
        if _forked_after_use:
            return _s3_proxy.call(self._helper_config(), fn.__name__, args, kwargs)
        return fn(self._client, *args, **kwargs)

    @property
    def _client(self) -> S3Store:
        global _used_in_pid
        with self._lock:
            if self._client_obj is None:
                kwargs: dict[str, Any] = dict(self._config)
                if self._client_options:
                    kwargs["client_options"] = self._client_options
                if self._retry_config is not None:
                    kwargs["retry_config"] = self._retry_config
                self._client_obj = S3Store(self.bucket, **kwargs)
                _used_in_pid = os.getpid()
            return self._client_obj

    @property
    def _pool(self) -> ThreadPoolExecutor:
        # A forked child starts a pool of its own (_after_fork drops the parent's, which has no threads there).
        with self._lock:
            if self._pool_obj is None:
                self._pool_obj = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="mi-crow-store-s3")
            return self._pool_obj

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def _rel(self, full: str, base: str) -> str:
        start = len(base) + 1 if base else 0
        return full[start:]

    def _where(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    def _endpoint(self) -> str:
        """The server's URL, as the client resolves it (``"aws"`` for AWS itself)."""
        return str(
            self._config.get("endpoint")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or "aws"
        )

    @contextlib.contextmanager
    def _errors(self, key: str, *, empty_without_bucket: bool = False) -> Iterator[None]:
        """obstore's errors inside the block as :class:`ObjectStoreError` naming ``key`` (after
        obstore's own retries); ``AlreadyExistsError``/``PreconditionError`` pass, the callers'
        answers. ``empty_without_bucket``: a listing of a bucket that does not exist yet (the first
        PUT creates it) ends the block quietly: the store is empty, as a LocalStore whose folder
        does not exist."""
        try:
            yield
        except (AlreadyExistsError, PreconditionError):
            raise
        except obstore.exceptions.BaseError as e:
            if not (empty_without_bucket and _no_bucket(e)):
                raise ObjectStoreError(f"{self._where(key)}: {_first_line(e)}") from e

    def _call(self, fn: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        """``fn(client, full key, ...)``: a missing object as ``FileNotFoundError`` naming it, other
        errors as :meth:`_errors` says."""
        try:
            with self._errors(key):
                return self._invoke(fn, self._full(key), *args, **kwargs)
        except FileNotFoundError:
            raise FileNotFoundError(f"no object {self._where(key)}") from None

    # ------------------------------------------------------------------ writes

    def _check_conditional_put(self) -> None:
        """Once per process and server: refuse to write where ``If-None-Match: *`` is not honoured."""
        if self.single_writer:
            return
        endpoint = self._endpoint()
        # Per server and bucket, and per client setting: a client told not to use conditional PUT
        # (config or AWS_CONDITIONAL_PUT) is checked on its own.
        setting = str(self._config.get("conditional_put") or os.environ.get("AWS_CONDITIONAL_PUT") or "")
        ident = (endpoint, self.bucket, setting)
        with _probe_lock:
            if _probed.get(ident):
                return
            key = f"{_PROBE_DIR}/probe-{uuid.uuid4().hex}"
            try:
                self._call(obstore.put, key, b"1", mode="create")
                try:
                    self._call(obstore.put, key, b"2", mode="create")
                    honoured = False
                except AlreadyExistsError:
                    honoured = True
            except (ObjectStoreError, NotImplementedError) as e:  # NotImplementedError: AWS_CONDITIONAL_PUT=disabled
                raise ObjectStoreError(
                    f"{self.url}: the server refused a conditional PUT (If-None-Match: *), which concurrent writers "
                    f"need: {_first_line(e)}. For a single writing process pass single_writer=True."
                ) from e
            finally:
                with contextlib.suppress(OSError):
                    self._call(obstore.delete, key)
            if not honoured:
                raise ObjectStoreError(
                    f"{self.url}: the server does not honour conditional PUT (If-None-Match: * overwrote an "
                    "existing object), so concurrent writers could lose data; refusing to write. For a single "
                    "writing process pass single_writer=True."
                )
            _probed[ident] = True

    def _put(self, key: str, payload: Payload, *, create: bool = False) -> None:
        nbytes = payload.nbytes()
        if not create and nbytes >= MULTIPART_MIN:
            # Parts are cut from the tensors' own memory (head first: it is ready once the CRCs are).
            buffers = [memoryview(b).cast("B") for b in payload.buffers()]
            self._call(
                obstore.put,
                key,
                iter(buffers),
                use_multipart=True,
                chunk_size=PART_SIZE,
                max_concurrency=self.max_concurrency,
            )
            return
        data = b"".join(memoryview(b).cast("B") for b in payload.buffers())
        self._call(obstore.put, key, data, mode="create" if create else None, use_multipart=False)

    def _write(self, key: str, payload: Payload) -> None:
        self._check_conditional_put()
        self._put(key, payload)

    def _write_new(self, key: str, payload: Payload) -> bool:
        self._check_conditional_put()
        if self.single_writer:
            if self._exists(key):
                return False
            self._put(key, payload)
            return True
        try:
            self._put(key, payload, create=True)
        except AlreadyExistsError:
            return False
        return True

    def _write_many(self, files: Mapping[str, Payload]) -> None:
        if len(files) <= 1:
            for key, payload in files.items():
                self._write(key, payload)
            return
        self._check_conditional_put()
        futures = [self._pool.submit(self._put, key, payload) for key, payload in files.items()]
        # Every upload has ended before this returns, also when one failed: none reads the
        # caller's tensors afterwards (the payload contract).
        concurrent.futures.wait(futures)
        for f in futures:
            f.result()

    # A conditional update (update_run_metadata) that lost to another writer is tried again after a
    # random pause of up to first x 2^attempt seconds (at most the second value), this often in all.
    update_attempts = 40
    update_backoff = (0.02, 2.0)

    def _update(self, key: str, change: Any) -> bytes:
        """GET ``key`` (its bytes and ETag), ``change`` them, PUT the result with ``If-Match`` on
        that ETag (``If-None-Match: *`` when absent); when another writer won (412, or the object
        now exists), read again and retry after a jittered exponential backoff, at most
        :attr:`update_attempts` times, then :class:`ObjectStoreError`. ``single_writer``: one
        plain PUT."""
        import random
        import time

        from mi_crow.store.errors import InvalidJSONError
        from mi_crow.store.limits import MAX_JSON_BYTES

        self._check_conditional_put()
        first, most = self.update_backoff
        attempts = 1 if self.single_writer else self.update_attempts
        for attempt in range(attempts):
            try:
                got = self._call(obstore.get, key)
            except FileNotFoundError:
                old, etag = None, None
            else:
                size = int(got.meta["size"])
                if size > MAX_JSON_BYTES:  # refused before its bytes are read
                    raise InvalidJSONError(
                        self._where(key), f"{size:,} bytes of JSON; at most {MAX_JSON_BYTES:,} are read"
                    )
                old, etag = bytes(got.bytes()), got.meta.get("e_tag")
            new = bytes(change(old))
            if self.single_writer:
                self._call(obstore.put, key, new, use_multipart=False)
                return new
            if old is not None and not etag:
                raise ObjectStoreError(
                    f"{self._where(key)}: the server sent no ETag, which a conditional update needs; "
                    "for a single writing process pass single_writer=True"
                )
            mode = {"e_tag": etag} if old is not None else "create"
            try:
                self._call(obstore.put, key, new, mode=mode, use_multipart=False)
                return new
            except (PreconditionError, AlreadyExistsError):
                if attempt + 1 < attempts:
                    time.sleep(random.uniform(0, min(most, first * 2**attempt)))
        raise ObjectStoreError(
            f"{self._where(key)}: the update lost to concurrent writers {attempts} times in a row "
            f"({attempts} attempts); try again"
        )

    # ------------------------------------------------------------------ reads

    def _open(self, key: str) -> ContextManager[BinaryIO]:
        # The file object itself is the context manager: closing it lets go of its buffers (a
        # generator-based one would hold them until the caller's whole block ends).
        return cast(ContextManager[BinaryIO], self._open_object(key))

    def _open_object(self, key: str) -> _ObjectFile:
        cached = self._cached(key)
        if cached is not None:
            return _ObjectFile(self, key, cached, len(cached), None)
        try:
            got = self._call(obstore.get, key, options={"range": (0, PREFETCH)})
        except ObjectStoreError as e:
            if "416" not in str(e):
                raise
            got = self._call(obstore.get, key)  # an empty object: no byte range is satisfiable
        head = memoryview(got.bytes())
        meta = got.meta
        return _ObjectFile(self, key, head, int(meta["size"]), meta.get("e_tag"))

    def _open_whole(self, key: str) -> ContextManager[BinaryIO]:
        data, etag = self._get_whole(key)
        return cast(ContextManager[BinaryIO], _ObjectFile(self, key, data, len(data), etag))

    def _get_whole(self, key: str) -> tuple[memoryview, str | None]:
        """The whole object ``key`` and its ETag: from the cache where it may be (an immutable
        object), else with one GET (then kept in the cache)."""
        cached = self._cached(key)
        if cached is not None:
            return cached, None
        got = self._call(obstore.get, key)
        data = memoryview(got.bytes())
        if self._cache is not None and _cacheable(key):
            self._cache.put(self._cache_ident(key), data)
        return data, got.meta.get("e_tag")

    def _cached(self, key: str) -> memoryview | None:
        """``key`` from the cache: ``None`` without a cache, for a mutable object, or on a miss."""
        if self._cache is None or not _cacheable(key):
            return None
        return self._cache.get(self._cache_ident(key))

    def _cache_ident(self, key: str) -> str:
        return f"{self._endpoint()}\n{self.bucket}\n{self._full(key)}"

    def _exists(self, key: str) -> bool:
        try:
            self._call(obstore.head, key)
        except FileNotFoundError:
            return False
        return True

    def _read_many(self, keys: Sequence[str]) -> dict[str, bytes | memoryview]:
        def fetch(key: str) -> memoryview | None:
            try:
                return self._get_whole(key)[0]
            except FileNotFoundError:
                return None

        futures = {key: self._pool.submit(fetch, key) for key in keys}
        return {key: data for key, f in futures.items() if (data := f.result()) is not None}

    def _reader_of(self, key: str, data: bytes | memoryview) -> BinaryIO:
        view = memoryview(data)
        return cast(BinaryIO, _ObjectFile(self, key, view, len(view), None))

    # ------------------------------------------------------------------ listing and deleting

    def _list(self, key: str) -> list[tuple[str, bool]]:
        full = self._full(key)
        listed = None
        with self._errors(key, empty_without_bucket=True):
            listed = self._invoke(obstore.list_with_delimiter, full or None)
        if listed is None:
            return []
        # An emptied folder can also list as a 0-byte object named like the folder (SeaweedFS).
        out = [(name, False) for o in listed["objects"] if (name := self._rel(o["path"], full))]
        prefixes = [self._rel(p.rstrip("/"), full) for p in listed["common_prefixes"]]
        # A folder whose last object was deleted can still show up for a while (SeaweedFS):
        # a folder counts only while something is in it.
        if len(prefixes) > _CONFIRM_ONE_BY_ONE:
            # Many folders (a run's batches): one paginated recursive listing costs a request per
            # 1,000 objects instead of a request per folder.
            holding = {info.key.split("/", 1)[0] for info in self._list_tree(key) if "/" in info.key}
            out += [(name, True) for name in prefixes if name in holding]
        elif prefixes:
            nonempty = self._pool.map(lambda name: self._has_objects(_keys.join(key, name)), prefixes)
            out += [(name, True) for name, keep in zip(prefixes, nonempty, strict=True) if keep]
        return out

    def _has_objects(self, key: str) -> bool:
        with self._errors(key, empty_without_bucket=True):
            for chunk in self._invoke(obstore.list, self._full(key), chunk_size=1):
                if chunk:
                    return True
        return False

    def _list_tree(self, key: str, *, after: str | None = None) -> Iterator[ObjectInfo]:
        full = self._full(key)
        offset = None if not after else _keys.join(full, start) if (start := _start_after(after)) else None
        with self._errors(key, empty_without_bucket=True):
            for chunk in self._invoke(obstore.list, full or None, offset=offset, chunk_size=1000):
                for o in chunk:
                    rel = self._rel(o["path"], full)
                    if after is None or rel > after:  # code-point order is UTF-8 byte order
                        yield ObjectInfo(rel, int(o["size"]), o.get("last_modified"))

    def _delete(self, key: str) -> None:
        keys = [key] + [_keys.join(key, info.key) for info in self._list_tree(key)]
        # Commit objects first: a reader then finds each entry absent, never half of it.
        commits = {_keys.METADATA_FILE, _keys.RUN_METADATA_FILE}
        self._delete_keys(key, [k for k in keys if k.rsplit("/", 1)[-1] in commits])
        self._delete_keys(key, [k for k in keys if k.rsplit("/", 1)[-1] not in commits])
        # A writer that uploaded its tensor files before the listing above may have committed
        # since: its commit names files just deleted. Delete such commits too (the delete then
        # comes after that write); an entry written wholly after the listing stays, complete.
        deleted = {k.rsplit("/", 1)[0] + "/" for k in keys if _in_generation_folder(k)}
        for info in self._list_tree(key):
            k = _keys.join(key, info.key)
            if k.rsplit("/", 1)[-1] != _keys.METADATA_FILE:
                continue
            try:
                gen = read_generation(self._read_json_file(k), self._where(k))
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                gen = None
            folder = f"{k.rsplit('/', 1)[0]}/{_keys.generation_dir(gen)}/" if gen else None
            if folder is not None and any(d.startswith(folder) for d in deleted):
                self._delete_keys(key, [k])

    def _delete_keys(self, key: str, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys a request
            chunk = [self._full(k) for k in keys[i : i + 1000]]
            with self._errors(key), contextlib.suppress(FileNotFoundError):
                self._invoke(obstore.delete, chunk)

    # ------------------------------------------------------------------ mi_crow's local paths

    def _run_key(self, run_id: str) -> Path:
        raise NotImplementedError(
            f"{self.url} is object storage: there is no local folder for run {run_id!r}. mi_crow 1.0's SaeTrainer "
            "saves files into the run folder itself and needs a LocalStore."
        )

    _run_batch_key = _run_key  # type: ignore[assignment]
    _run_metadata_key = _run_key

    # ------------------------------------------------------------------ maintenance

    def gc(self, *, grace_seconds: float = 3600.0) -> GcReport:
        """Remove objects no committed entry references: older generations of a batch or model
        (replaced by a newer commit), generations a killed writer never committed, and tensor
        files at mi_crow's paths that a newer generation replaced.

        Only objects older than ``grace_seconds`` are removed, so a write in progress (tensor
        files uploaded, commit not yet written) is left alone: the grace period must exceed the
        longest write. Run metadata, run batches, appends, and files that are not the store's
        are never touched. Safe while other processes read and write.

        Also aborts the multipart uploads under the prefix that a killed writer never completed
        and that were started before the grace period (their parts are invisible but stored).
        That needs the credentials as options or ``AWS_*`` variables (obstore cannot list
        uploads; gc signs those two requests itself); with credentials from elsewhere (an
        instance profile) incomplete uploads are left to the bucket's lifecycle rules. Their
        bytes are not counted in ``bytes_freed``.

        Returns:
            A :class:`GcReport` with the removed objects' URLs and their bytes.
        """
        if (
            isinstance(grace_seconds, bool)
            or not isinstance(grace_seconds, (int, float))
            or not math.isfinite(grace_seconds)
            or not 0 <= grace_seconds <= 10 * 365 * 86400
        ):
            raise ValueError(f"grace_seconds must be a number of seconds from 0 to ten years, got {grace_seconds!r}")
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=grace_seconds)
        notes: list[str] = []
        removed: list[str] = []
        freed = 0
        for entries in (
            self._entry_folders(self.runs_prefix, depth=2),
            self._entry_folders(self.model_prefix, depth=1),
        ):
            for folder, objects in entries:
                for info in self._garbage(folder, objects):
                    if info.modified is None or info.modified > cutoff:
                        continue  # too young (or of unknown age): may be a write in progress
                    key = _keys.join(folder, info.key)
                    self._delete_keys(key, [key])  # errors as ObjectStoreError naming it, as elsewhere
                    removed.append(self._where(key))
                    freed += info.size
        # Multipart uploads a killed writer never completed (invisible to listings, still stored),
        # under the runs and models folders only: nothing else under the prefix is the store's.
        signer = _multipart.Signer.from_settings(self.bucket, self._config, self._client_options)
        if signer is None:
            notes.append("incomplete multipart uploads not checked: no credentials given as options or AWS_* variables")
        else:
            roots = {self._full(p) + "/" if self._full(p) else "" for p in (self.runs_prefix, self.model_prefix)}
            try:
                for root in sorted(roots):
                    for upload in signer.uploads(root):
                        if upload.initiated is None or upload.initiated > cutoff:
                            continue
                        if root == "" and upload.key.split("/", 1)[0] in self._foreign_top_names():
                            continue
                        if signer.abort(upload):
                            removed.append(f"s3://{self.bucket}/{upload.key} (incomplete upload {upload.upload_id})")
            except OSError as e:
                notes.append(f"incomplete multipart uploads not checked: {e}")
        return GcReport(sorted(removed), freed, notes)

    def _foreign_top_names(self) -> set[str]:
        """With both prefixes empty, the top-level names under the root that are not entries of the
        store (the dataset folder, the probe folder)."""
        return {self.dataset_prefix.split("/")[0], _PROBE_DIR} - {""}

    def _entry_folders(self, prefix: str, depth: int) -> Iterator[tuple[str, list[ObjectInfo]]]:
        """``(folder, objects in it)`` for every batch folder (``depth=2``: run/batch_i) or model
        folder (``depth=1``) under ``prefix``, from one recursive listing."""
        others = self._top_names(prefix)
        current: str | None = None
        objects: list[ObjectInfo] = []
        for info in self._list_tree(prefix):
            parts = info.key.split("/")
            if len(parts) <= depth or parts[0] in others:
                continue
            if depth == 2 and _keys.batch_index(parts[1], True) is None:
                continue
            folder = _keys.join(prefix, "/".join(parts[:depth]))
            if folder != current:
                if current is not None:
                    yield current, objects
                current, objects = folder, []
            objects.append(ObjectInfo("/".join(parts[depth:]), info.size, info.modified))
        if current is not None:
            yield current, objects

    def _garbage(self, folder: str, objects: list[ObjectInfo]) -> list[ObjectInfo]:
        names = {o.key for o in objects}
        generation: str | None = None
        committed = _keys.METADATA_FILE in names
        if committed:
            commit = f"{folder}/{_keys.METADATA_FILE}"
            try:
                generation = read_generation(self._read_json_file(commit), self._where(commit))
            except FileNotFoundError:
                committed = False  # deleted meanwhile
            except (OSError, ValueError, RecursionError):
                return []  # a damaged commit: which files it names is unknown; check() reports it
        current = _keys.generation_dir(generation) if generation else None
        out = []
        for o in objects:
            top = o.key.split("/", 1)[0]
            if _keys.generation_of(top) is not None:
                if top != current:
                    out.append(o)  # another generation: older, or never committed
            elif current is not None and o.key != _keys.METADATA_FILE and o.key.endswith(_keys.SUFFIX):
                out.append(o)  # a tensor file at mi_crow's path, replaced by a generation
        return out


def _in_generation_folder(key: str) -> bool:
    return any(_keys.generation_of(part) is not None for part in key.split("/"))


def _cacheable(key: str) -> bool:
    """Whether ``key`` is never rewritten: a tensor file in a generation folder (written once under
    a name never used again); everything else may be overwritten."""
    return key.endswith(_keys.SUFFIX) and _in_generation_folder(key)


def _start_after(after: str) -> str | None:
    """A start-after key for listing the keys greater than ``after`` on any server.

    S3's start-after is a plain key, but SeaweedFS also skips the keys inside a folder whose name
    is exactly the start-after key. So the listing starts after ``after`` less its last
    character (the caller drops what is not greater than ``after``): the keys a server may skip
    then all start with that shorter key and ``/``, which sorts before ``after``'s last character
    when that is above ``/``; otherwise no start-after at all (``None``: list from the start).
    """
    start = after[:-1]
    if not start or start.endswith("/") or after[-1] <= "/":
        return None
    return start


def _no_bucket(e: BaseException) -> bool:
    """Whether a request failed because the bucket does not exist (yet)."""
    return "NoSuchBucket" in str(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
