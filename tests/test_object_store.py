"""ObjectStore on a real SeaweedFS server (started by the session fixture in conftest.py)."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import obstore
import pytest
import torch

from mi_crow.store import InvalidJSONError, LocalStore, _multipart, open_store
from mi_crow.store.object_store import ObjectStore, ObjectStoreError
from mi_crow.store.testing import StoreTests
from mi_crow.store.testing.seaweedfs import SeaweedFS
from mi_crow.store.testing.store_tests import assert_same

pytestmark = pytest.mark.s3


def make_store(server: SeaweedFS, url: str, **options: Any) -> ObjectStore:
    return ObjectStore(url, config=server.store_config(), client_options=server.client_options(), **options)


@pytest.fixture(scope="session")
def shared_bucket(seaweedfs: SeaweedFS) -> str:
    # One bucket for the tests that need no bucket of their own: SeaweedFS gives every bucket its
    # own volumes, and a few hundred fresh buckets exhaust the volumes `weed mini` starts with
    # (PUTs then fail with 500).
    return seaweedfs.new_bucket("shared")


@pytest.fixture
def s3_url(shared_bucket: str) -> str:
    """A fresh prefix in the shared bucket."""
    return f"s3://{shared_bucket}/{uuid.uuid4().hex}"


class TestObjectStore(StoreTests):
    @pytest.fixture
    def store(self, seaweedfs: SeaweedFS, s3_url: str) -> ObjectStore:
        return make_store(seaweedfs, s3_url)


class TestObjectStoreDeepPrefix(StoreTests):
    @pytest.fixture
    def store(self, seaweedfs: SeaweedFS, s3_url: str) -> ObjectStore:
        return make_store(seaweedfs, f"{s3_url}/a/b", verify=True)


def test_store_at_the_bucket_root(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    store = make_store(seaweedfs, f"s3://{s3_bucket}")
    assert store.list_runs() == []  # the bucket does not exist yet: an empty store
    store.put_detector_metadata("r", 0, {"m": 1}, {"l": {"k": torch.ones(3)}})
    store.put_model("m", {"w": torch.zeros(2)})
    assert store.list_runs() == ["r"] and store.list_models() == ["m"]
    keys = sorted(o["path"] for chunk in obstore.list(seaweedfs.client(s3_bucket)) for o in chunk)
    assert keys[0].startswith("models/m/.g") and keys[-1] == "runs/r/batch_0/metadata.json"


# ---------------------------------------------------------------------- layout


def _keys_of(server: SeaweedFS, url: str) -> list[str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    found = [o["path"] for chunk in obstore.list(server.client(bucket), prefix or None) for o in chunk]
    return sorted(k.removeprefix(prefix + "/") for k in found)


def test_keys_are_mi_crows_and_nothing_lands_outside_the_prefix(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    s3_url = f"s3://{s3_bucket}/p"  # a bucket of its own: every key in it is this test's
    store = make_store(seaweedfs, s3_url)
    store.put_run_metadata("r", {"model": "gpt2"})
    store.put_detector_metadata("r", 0, {"tokens": 8}, {"layer.0": {"activations": torch.ones(2, 3)}})
    store.put_run_batch("r", 1, [torch.zeros(2)])
    store.put_run_detector_metadata("r", {"step": 0}, {"l": {"x": torch.ones(1)}})
    store.put_model("sae", {"W": torch.ones(2)}, {"d": 2})
    keys = _keys_of(seaweedfs, s3_url)
    gen_dirs = {k.split("/")[3] for k in keys if k.startswith("runs/r/batch_0/.g")}
    assert len(gen_dirs) == 1
    (gen,) = gen_dirs
    model_gen = next(k.split("/")[2] for k in keys if k.startswith("models/sae/.g"))
    assert keys == sorted(
        [
            ".mi-crow-store/" + k.split("/", 1)[1] for k in keys if k.startswith(".mi-crow-store/")
        ]  # the conditional-PUT probe removes its object; SeaweedFS lists none
        + [
            "models/sae/metadata.json",
            f"models/sae/{model_gen}/model.safetensors",
            "runs/r/batch_0/metadata.json",
            f"runs/r/batch_0/{gen}/layer.0/activations.safetensors",
            "runs/r/batch_000001.safetensors",
            "runs/r/detectors/.entries/000000000000.safetensors",
            "runs/r/meta.json",
        ]
    )
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    client = seaweedfs.client(bucket)
    everything = [o["path"] for chunk in obstore.list(client) for o in chunk]
    assert all(k.startswith(prefix + "/") for k in everything if not k.startswith(".mi-crow-store/"))
    commit = json.loads(bytes(obstore.get(client, f"{prefix}/runs/r/batch_0/metadata.json").bytes()))
    assert commit == {
        "tokens": 8,
        "_tensor_metadata_names": {"layer.0": ["activations"]},
        "mi_crow_store.generation": gen.removeprefix(".g"),
    }
    assert json.loads(bytes(obstore.get(client, f"{prefix}/runs/r/meta.json").bytes())) == {"model": "gpt2"}


def test_a_local_store_copied_to_a_bucket_reads_back(tmp_path: Path, seaweedfs: SeaweedFS, s3_url: str) -> None:
    local = LocalStore(tmp_path / "local")
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    local.put_run_metadata("r", {"model": "m"})
    local.put_detector_metadata("r", 0, {"tokens": 3}, {"l": {"activations": t, "mask": t > 3}})
    local.put_run_batch("r", 1, {"x": t})
    for step in range(3):
        local.put_run_detector_metadata("r", {"step": step}, {"l": {"top": torch.arange(step)}})
    local.put_model("sae", {"W": t}, {"d": 4})
    # A plain recursive upload, as `aws s3 cp --recursive` or `rclone copy` would do.
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    client = seaweedfs.client(bucket)
    root = tmp_path / "local"
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".lock")):
        obstore.put(client, f"{prefix}/{path.relative_to(root).as_posix()}", path.read_bytes())
    store = make_store(seaweedfs, s3_url, verify=True)
    assert store.list_runs() == ["r"] and store.list_run_batches("r") == [0, 1]
    assert store.get_run_metadata("r") == {"model": "m"}
    meta, tensors = store.get_detector_metadata("r", 0)
    assert meta == {"tokens": 3}
    assert_same(tensors["l"]["activations"], t)
    assert_same(tensors["l"]["mask"], t > 3)
    assert_same(store.get_detector_metadata_by_layer_by_key("r", 0, "l", "mask"), t > 3)
    assert_same(store.get_run_batch("r", 1)["x"], t)  # type: ignore[call-overload]
    assert [m["step"] for m, _ in store.iter_run_detector_metadata("r")] == [0, 1, 2]
    assert_same(store.get_model("sae")[0]["W"], t)
    assert store.check() == []
    # Overwritten through the ObjectStore: a generation replaces mi_crow's paths, which gc collects.
    store.put_detector_metadata("r", 0, {"tokens": 4}, {"l": {"activations": t + 1}})
    assert store.get_detector_metadata("r", 0)[0] == {"tokens": 4}
    removed = store.gc(grace_seconds=0).removed
    assert sorted(removed) == [f"{s3_url}/runs/r/batch_0/l/{k}.safetensors" for k in ("activations", "mask")]
    assert store.check() == []
    assert_same(store.get_detector_metadata("r", 0)[1]["l"]["activations"], t + 1)


def test_an_uncommitted_batch_is_absent_and_gc_removes_it_after_the_grace(seaweedfs: SeaweedFS, s3_url: str) -> None:
    store = make_store(seaweedfs, s3_url)
    store.put_detector_metadata("r", 0, {}, {"l": {"k": torch.ones(2)}})
    store.put_detector_metadata("r", 1, {}, {"l": {"k": torch.ones(2)}})
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    client = seaweedfs.client(bucket)
    obstore.delete(client, f"{prefix}/runs/r/batch_1/metadata.json")  # as if killed before the commit
    assert store.list_run_batches("r") == [0]
    assert store.get_detector_metadata("r", 1) == ({}, {})
    assert store.check() == []
    assert store.gc(grace_seconds=3600).removed == []  # too young: could be a write in progress
    (removed,) = store.gc(grace_seconds=0).removed
    assert removed.startswith(f"{s3_url}/runs/r/batch_1/.g") and removed.endswith("/l/k.safetensors")
    assert store.get_detector_metadata("r", 0)[1]["l"]["k"].tolist() == [1.0, 1.0]


def test_a_deleted_run_does_not_come_back_in_listings(seaweedfs: SeaweedFS, s3_url: str) -> None:
    store = make_store(seaweedfs, s3_url)
    for i in range(3):
        store.put_detector_metadata("r", i, {}, {"l": {"k": torch.ones(1)}})
    store.put_model("m", {"w": torch.ones(1)})
    store.delete_run("r")
    store.delete_model("m")
    # SeaweedFS may still show the emptied folders in delimiter listings for a while.
    assert store.list_runs() == [] and store.list_models() == []
    assert store.list_run_batches("r") == []
    store.put_detector_metadata("r", 5, {}, {"l": {"k": torch.ones(1)}})
    assert store.list_runs() == ["r"] and store.list_run_batches("r") == [5]


def test_listing_pages_past_a_thousand_batches(seaweedfs: SeaweedFS, s3_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store = make_store(seaweedfs, s3_url)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: store.put_run_batch("r", i, [torch.ones(1)]), range(1100)))
    store.put_detector_metadata("r", 2000, {}, {"l": {"k": torch.ones(1)}})
    for step in range(3):
        store.put_run_detector_metadata("r", {"step": step}, {})
    assert store.list_run_batches("r") == [*range(1100), 2000]


def test_longest_names_fit_the_servers_segment_limit(seaweedfs: SeaweedFS, s3_url: str) -> None:
    store = make_store(seaweedfs, s3_url)
    run, layer, key = "r" * 200, "l" * 200, "k" * 200  # the longest names the store accepts
    store.put_detector_metadata(run, 0, {}, {layer: {key: torch.ones(2)}})
    assert store.list_runs() == [run]
    assert store.get_detector_metadata_by_layer_by_key(run, 0, layer, key).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="run_id"):
        store.put_run_metadata("r" * 201, {})


# ---------------------------------------------------------------------- reads


class _CountingGet:
    """Wraps ``obstore.get`` to count the bytes each response carried."""

    def __init__(self) -> None:
        self.received = 0
        self.requests = 0
        self._get = obstore.get

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self._get(*args, **kwargs)
        data = result.bytes()
        self.received += len(data)
        self.requests += 1
        meta = result.meta

        class _Result:
            def bytes(self) -> Any:
                return data

        _Result.meta = meta  # type: ignore[attr-defined]
        return _Result()


def test_reading_one_tensor_transfers_that_tensor_and_its_header(
    seaweedfs: SeaweedFS, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(seaweedfs, s3_url)
    big = torch.randn(8 * 1024 * 1024 // 4)  # 8 MiB
    tensors = {f"l{j}": {"activations": big + j, "mask": torch.ones(1000)} for j in range(8)}
    store.put_detector_metadata("r", 0, {"tokens": 1}, tensors)
    counter = _CountingGet()
    monkeypatch.setattr("mi_crow.store.object_store.obstore.get", counter)
    t = store.get_detector_metadata_by_layer_by_key("r", 0, "l3", "activations")
    assert_same(t, big + 3)
    assert counter.received <= 1.05 * big.numel() * 4, counter.received
    counter.received = 0
    _, back = store.get_detector_metadata("r", 0)
    assert_same(back["l7"]["activations"], big + 7)
    assert counter.received <= 1.05 * 8 * (big.numel() * 4 + 4000)


def test_tensors_read_back_are_writable_and_independent(seaweedfs: SeaweedFS, s3_url: str) -> None:
    store = make_store(seaweedfs, s3_url)
    big = torch.arange(2 * 1024 * 1024, dtype=torch.float32)  # above the size that borrows the GET's buffer
    store.put_run_batch("r", 0, {"a": big, "b": big + 1})
    first = store.get_run_batch("r", 0)
    first["a"] += 1  # type: ignore[call-overload]
    again = store.get_run_batch("r", 0)
    assert_same(again["a"], big)  # type: ignore[call-overload]
    assert_same(first["b"], big + 1)  # type: ignore[call-overload]


def test_a_large_tensor_goes_up_in_parts_and_reads_back(seaweedfs: SeaweedFS, s3_url: str) -> None:
    store = make_store(seaweedfs, s3_url, verify=True)
    big = torch.randn(20 * 1024 * 1024 // 4)  # above MULTIPART_MIN
    store.put_run_batch("r", 0, [big])
    assert_same(store.get_run_batch("r", 0)[0], big)  # type: ignore[index]
    store.put_model("m", {"w": big})
    assert_same(store.get_model("m")[0]["w"], big)
    assert store.check() == []


# ---------------------------------------------------------------------- errors


def test_an_unreachable_server_raises_an_oserror_naming_the_key(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = ObjectStore(
        "s3://nobody/p",
        endpoint=f"http://127.0.0.1:{port}",
        region="us-east-1",
        access_key_id="x",
        secret_access_key="y",
        allow_http=True,
        config={"session_token": ""},
        client_options={"proxy_url": "http://127.0.0.1:9", "proxy_excludes": "127.0.0.1"},
        retry_config={
            "max_retries": 1,
            "retry_timeout": timedelta(seconds=5),
            "backoff": {"init_backoff": timedelta(milliseconds=10), "max_backoff": timedelta(milliseconds=10)},
        },
    )
    with pytest.raises(ObjectStoreError, match=r"s3://nobody/p/runs/r/meta\.json") as info:
        store.get_run_metadata("r")
    assert isinstance(info.value, OSError)
    with pytest.raises(ObjectStoreError, match=r"s3://nobody/p"):
        store.put_run_metadata("r", {})


def test_urls_are_checked(seaweedfs: SeaweedFS) -> None:
    for bad in ["s3://", "s3://B_ad/x", "s3://ok-bucket/../x", "s3://ok-bucket/a/.hidden", "gs://b/x"]:
        with pytest.raises(ValueError):
            ObjectStore(bad)
    with pytest.raises(ValueError, match="max_concurrency"):
        ObjectStore("s3://ok-bucket", max_concurrency=0)


def test_open_store_picks_the_backend(tmp_path: Path, seaweedfs: SeaweedFS, s3_url: str) -> None:
    assert isinstance(open_store(tmp_path / "x"), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}/y"), LocalStore)
    s3 = open_store(s3_url, config=seaweedfs.store_config(), client_options=seaweedfs.client_options())
    assert isinstance(s3, ObjectStore) and s3.url == s3_url
    with pytest.raises(ValueError, match="'gs'"):
        open_store("gs://bucket/x")


def test_pickled_store_reads_in_a_spawned_process(seaweedfs: SeaweedFS, s3_url: str) -> None:
    import multiprocessing

    store = make_store(seaweedfs, s3_url)
    store.put_run_batch("r", 0, [torch.arange(5)])
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        got = pool.apply(_read_first, (store,))
    assert got == [0, 1, 2, 3, 4]


def _read_first(store: ObjectStore) -> list[int]:
    return store.get_run_batch("r", 0)[0].tolist()  # type: ignore[index]


def test_a_forked_child_reads_through_the_helper_not_a_hang(seaweedfs: SeaweedFS, s3_url: str) -> None:
    # More in test_object_store_fork.py (DataLoader's forked workers, errors, the helper's lifetime).
    store = make_store(seaweedfs, s3_url)
    store.put_run_metadata("r", {"a": 1})
    message = _error_in_a_forked_child(lambda: store.get_run_metadata("r") == {"a": 1} or 1 / 0)
    assert message == "no error", message


def _error_in_a_forked_child(call: Any) -> str:
    """Run ``call`` in a forked child; the error it raised, as text ("no error" if none)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what happened through the pipe, never run pytest's teardown
        os.close(r)
        try:
            call()
            os.write(w, b"no error")
        except Exception as e:
            os.write(w, f"{type(e).__name__}: {e}".encode()[:2000])
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    return message


class _IgnoresConditionalPut(http.server.BaseHTTPRequestHandler):
    """A proxy in front of the real server that answers a refused conditional PUT with 200, as a
    server that does not honour ``If-None-Match: *`` would (the request is still signed and checked
    by the real server)."""

    upstream: tuple[str, int] = ("127.0.0.1", 0)

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
            headers = resp.getheaders()
            if self.command == "PUT" and status == 412 and self.headers.get("If-None-Match") == "*":
                status, data, headers = 200, b"", [("ETag", '"00000000000000000000000000000000"')]
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_writes_are_refused_where_conditional_put_is_not_honoured(seaweedfs: SeaweedFS, shared_bucket: str) -> None:
    host, port = seaweedfs.endpoint.removeprefix("http://").split(":")
    handler = type("Handler", (_IgnoresConditionalPut,), {"upstream": (host, int(port))})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        config = {**seaweedfs.store_config(), "endpoint": f"http://127.0.0.1:{proxy.server_address[1]}"}
        config["aws_endpoint_url_s3"] = config["endpoint"]
        url = f"s3://{shared_bucket}/{uuid.uuid4().hex}"
        store = ObjectStore(url, config=config, client_options=seaweedfs.client_options())
        with pytest.raises(ObjectStoreError, match=r"does not honour conditional PUT.*single_writer=True"):
            store.put_run_metadata("r", {"a": 1})
        assert store.list_runs() == []  # refused before anything was written
        single = ObjectStore(url, config=config, client_options=seaweedfs.client_options(), single_writer=True)
        single.put_run_detector_metadata("r", {"i": 0}, {})
        single.put_run_detector_metadata("r", {"i": 1}, {})
        assert [m["i"] for m, _ in single.iter_run_detector_metadata("r")] == [0, 1]
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(30)


def test_gc_aborts_uploads_a_killed_writer_left(seaweedfs: SeaweedFS, s3_url: str) -> None:
    store = make_store(seaweedfs, s3_url)
    store.put_run_batch("r", 0, [torch.ones(3)])
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    client = seaweedfs.client(bucket)
    # A multipart upload started and never completed, as a writer killed mid-upload leaves it.
    writer = obstore.open_writer(client, f"{prefix}/runs/r/batch_000001.safetensors", buffer_size=5 * 1024 * 1024)
    writer.write(b"x" * (6 * 1024 * 1024))
    writer.flush()
    outside = obstore.open_writer(client, "elsewhere/big.bin", buffer_size=5 * 1024 * 1024)
    outside.write(b"y" * (6 * 1024 * 1024))
    outside.flush()
    signer = _multipart.Signer.from_settings(bucket, seaweedfs.store_config(), seaweedfs.client_options())
    assert signer is not None
    ours = [u for u in signer.uploads(f"{prefix}/")]
    assert [u.key for u in ours] == [f"{prefix}/runs/r/batch_000001.safetensors"]
    assert store.gc(grace_seconds=3600).removed == []  # too young: could be a write in progress
    time.sleep(1.1)  # SeaweedFS records the start in whole seconds; gc compares it with "now"
    removed = store.gc(grace_seconds=0).removed
    assert removed == [
        f"s3://{bucket}/{prefix}/runs/r/batch_000001.safetensors (incomplete upload {ours[0].upload_id})"
    ]
    assert list(signer.uploads(f"{prefix}/")) == []
    assert [u.key for u in signer.uploads("elsewhere/")] == ["elsewhere/big.bin"]  # outside the prefix: untouched
    assert store.list_run_batches("r") == [0]


# ---------------------------------------------------------------------- found in review


def test_delete_run_racing_a_writer_leaves_the_batch_whole_or_absent(seaweedfs: SeaweedFS, s3_url: str) -> None:
    deleter = make_store(seaweedfs, s3_url)
    writer = make_store(seaweedfs, s3_url)
    deleter.put_detector_metadata("r", 0, {"v": 1}, {"l": {"k": torch.full((4,), 1.0)}})
    # The writer uploads a new generation's tensor files, and its commit lands only after the
    # deleter listed the run (so it deleted those files) and deleted what it listed.
    held: dict[str, Any] = {}
    real_write = writer._write

    def hold_commit(key: str, payload: Any) -> None:
        if key.endswith("/metadata.json"):
            held["commit"] = (key, bytes(b"".join(memoryview(b).cast("B") for b in payload.buffers())))
        else:
            real_write(key, payload)

    writer._write = hold_commit  # type: ignore[method-assign]
    writer.put_detector_metadata("r", 0, {"v": 2}, {"l": {"k": torch.full((4,), 2.0)}})
    calls = []
    real_delete_keys = deleter._delete_keys

    def delete_then_commit(key: str, keys: Any) -> None:
        real_delete_keys(key, keys)
        calls.append(len(keys))
        if len(calls) == 2:  # the tensor files are gone: now the writer's commit arrives
            commit_key, data = held["commit"]
            obstore.put(deleter._client, deleter._full(commit_key), data)

    deleter._delete_keys = delete_then_commit  # type: ignore[method-assign]
    deleter.delete_run("r")
    assert deleter.list_run_batches("r") == []  # the commit that named deleted files went too
    assert deleter.get_detector_metadata("r", 0) == ({}, {})
    assert deleter.check() == []


def test_gc_leaves_the_files_of_a_damaged_commit(seaweedfs: SeaweedFS, s3_url: str) -> None:
    store = make_store(seaweedfs, s3_url)
    store.put_detector_metadata("r", 0, {"v": 1}, {"l": {"k": torch.ones(4)}})
    store.put_model("m", {"w": torch.ones(2)})
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    client = seaweedfs.client(bucket)
    for commit in ("runs/r/batch_0/metadata.json", "models/m/metadata.json"):
        raw = bytes(obstore.get(client, f"{prefix}/{commit}").bytes())
        obstore.put(client, f"{prefix}/{commit}", raw[: len(raw) // 2])  # truncated
    assert store.gc(grace_seconds=0).removed == []
    problems = {p.path for p in store.check()}
    assert f"{s3_url}/runs/r/batch_0/metadata.json" in problems and f"{s3_url}/models/m/metadata.json" in problems


def test_a_forked_child_writes_in_parallel_through_the_helper(seaweedfs: SeaweedFS, s3_url: str) -> None:
    store = make_store(seaweedfs, s3_url, max_concurrency=2)
    tensors = {f"l{j}": {"k": torch.ones(2)} for j in range(6)}
    store.put_detector_metadata("r", 0, {}, tensors)  # the thread pool has been used: the child gets its own
    message = _error_in_a_forked_child(lambda: store.put_detector_metadata("r", 1, {}, tensors))
    assert message == "no error", message
    assert store.get_detector_metadata("r", 1)[1].keys() == tensors.keys()


def test_files_named_like_batch_do_not_hide_the_batches(seaweedfs: SeaweedFS, s3_url: str) -> None:
    store = make_store(seaweedfs, s3_url)
    store.put_detector_metadata("r", 0, {}, {"l": {"k": torch.ones(1)}})
    store.put_run_batch("r", 1, [torch.ones(1)])
    for name in ("batch-notes.safetensors", "batch.json", "batch0", "batchX", "batch/inner"):
        store.put_tensor(f"runs/r/{name}", torch.zeros(1))
    assert store.list_run_batches("r") == [0, 1]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_appends_from_two_store_objects_read_back_in_call_order(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "local":
        first, second = LocalStore(tmp_path / "s"), LocalStore(tmp_path / "s")
    else:
        url = request.getfixturevalue("s3_url")
        server = request.getfixturevalue("seaweedfs")
        first, second = make_store(server, url), make_store(server, url)
    order = []
    for n, store in enumerate([first, second, second, first, first, second, first]):
        store.put_run_detector_metadata("r", {"call": n}, {})
        order.append(n)
    assert [m["call"] for m, _ in first.iter_run_detector_metadata("r")] == order


def test_metadata_json_over_the_limit_is_refused_unread(
    seaweedfs: SeaweedFS, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(seaweedfs, s3_url)
    store.put_detector_metadata("r", 0, {"pad": "x" * 200_000}, {"l": {"k": torch.ones(1)}})
    monkeypatch.setattr("mi_crow.store._layout.base.MAX_JSON_BYTES", 100_000)
    counter = _CountingGet()
    monkeypatch.setattr("mi_crow.store.object_store.obstore.get", counter)
    with pytest.raises(InvalidJSONError, match="at most 100,000 are read"):
        store.get_detector_metadata("r", 0)
    assert counter.received <= 64 * 1024  # the first ranged GET told the size; the rest was never asked for
    assert store.gc(grace_seconds=0).removed == []  # an unreadable commit: gc leaves its files


def test_a_bucket_downloaded_as_is_reads_as_a_local_store(tmp_path: Path, seaweedfs: SeaweedFS, s3_url: str) -> None:
    store = make_store(seaweedfs, s3_url)
    t = torch.arange(6.0)
    store.put_detector_metadata("r", 0, {"v": 1}, {"l": {"k": t}})
    store.put_detector_metadata("r", 0, {"v": 2}, {"l": {"k": t + 1}})  # two generations, one committed
    store.put_model("m", {"w": t}, {"d": 1})
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    client = seaweedfs.client(bucket)
    root = tmp_path / "downloaded"
    for chunk in obstore.list(client, prefix):  # as `aws s3 cp --recursive s3://... ./downloaded` does
        for o in chunk:
            path = root / o["path"].removeprefix(prefix + "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(bytes(obstore.get(client, o["path"]).bytes()))
    local = LocalStore(root, verify=True)
    meta, tensors = local.get_detector_metadata("r", 0)
    assert meta == {"v": 2}
    assert_same(tensors["l"]["k"], t + 1)
    assert_same(local.get_detector_metadata_by_layer_by_key("r", 0, "l", "k"), t + 1)
    assert_same(local.get_model("m")[0]["w"], t)
    assert local.check() == []


def test_a_listing_of_many_folders_leaves_out_the_emptied_ones(seaweedfs: SeaweedFS, s3_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store = make_store(seaweedfs, s3_url)
    with ThreadPoolExecutor(16) as pool:  # more folders than are checked one by one
        list(pool.map(lambda i: store.put_detector_metadata("r", i, {}, {"l": {"k": torch.ones(1)}}), range(40)))
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    client = seaweedfs.client(bucket)
    for i in range(0, 40, 3):  # empty some batch folders entirely, as a delete does
        keys = [o["path"] for chunk in obstore.list(client, f"{prefix}/runs/r/batch_{i}") for o in chunk]
        obstore.delete(client, keys)
    listed = sorted(int(name.removeprefix("batch_")) for name, is_dir in store._list("runs/r") if is_dir)
    assert listed == [i for i in range(40) if i % 3]
    assert store.list_run_batches("r") == listed
    assert store.check() == []


def test_a_client_without_conditional_put_is_refused_clearly(seaweedfs: SeaweedFS, s3_url: str) -> None:
    config = {**seaweedfs.store_config(), "conditional_put": "disabled"}  # as AWS_CONDITIONAL_PUT=disabled does
    store = ObjectStore(s3_url, config=config, client_options=seaweedfs.client_options())
    with pytest.raises(ObjectStoreError, match=r"refused a conditional PUT.*single_writer=True"):
        store.put_run_metadata("r", {})
    assert store.list_runs() == []
