"""ObjectStore in processes forked after obstore was used (DataLoader's default on Linux).

obstore 0.12.1 hangs in such a process; the store sends its requests to a helper process there
(``mi_crow.store._s3_proxy``). Real processes (``os.fork``, DataLoader's forked workers, a
spawned pool) and the real SeaweedFS server.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import select
import signal
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import obstore
import pytest
import torch
from torch.utils.data import DataLoader

from mi_crow.store import ActivationDataset, _s3_proxy
from mi_crow.store.object_store import ObjectStore
from mi_crow.store.testing.seaweedfs import SeaweedFS

pytestmark = pytest.mark.s3

D = 6
SIZES = [(2, 5), (3, 4), (1, 7), (4, 3), (2, 6), (3, 3)]  # [B, T] of each batch: 62 rows


def make_store(server: SeaweedFS, url: str, **options: Any) -> ObjectStore:
    return ObjectStore(url, config=server.store_config(), client_options=server.client_options(), **options)


@pytest.fixture(scope="module")
def bucket(seaweedfs: SeaweedFS) -> str:
    return seaweedfs.new_bucket("fork")  # one bucket, a fresh prefix per test


@pytest.fixture
def s3_url(bucket: str) -> str:
    return f"s3://{bucket}/{uuid.uuid4().hex}"


def row_values(ids: torch.Tensor) -> torch.Tensor:
    """The row whose id is ``i``: ``[i, 10i + 1, ..., 10i + D - 1]`` (exact in float32)."""
    ids = ids.to(torch.float32).reshape(-1, 1)
    return torch.cat([ids, ids * 10 + torch.arange(1, D, dtype=torch.float32)], dim=1)


def write_run(store: ObjectStore, run: str, sizes: list[tuple[int, int]] = SIZES) -> int:
    """Batches ``[B, T, D]`` of rows with unique ids (``row_values``); returns the number of rows."""
    row = 0
    for i, (b, t) in enumerate(sizes):
        acts = row_values(torch.arange(row, row + b * t)).reshape(b, t, D)
        store.put_detector_metadata(run, i, {"rows": b * t}, {"L": {"activations": acts}})
        row += b * t
    store.put_run_metadata(run, {"rows": row})
    return row


def assert_every_row_once(rows: torch.Tensor, total: int) -> None:
    assert rows.shape == (total, D)
    assert sorted(int(i) for i in rows[:, 0].tolist()) == list(range(total))
    assert torch.equal(rows, row_values(rows[:, 0]))


def in_forked_child(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in an ``os.fork()`` child; what it returned (JSON), or the test fails with the
    child's traceback. The child never returns into pytest."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            # As DataLoader's workers do: torch's OpenMP threads do not survive fork either.
            torch.set_num_threads(1)
            try:
                out = json.dumps({"ok": fn()})
            except BaseException:
                out = json.dumps({"error": traceback.format_exc()})
            with os.fdopen(w, "w") as f:
                f.write(out)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    got = json.loads(text)
    if "error" in got:
        pytest.fail(f"in the forked child:\n{got['error']}")
    return got["ok"]


# ---------------------------------------------------------------------- DataLoader


@pytest.mark.parametrize("shuffle", [False, True])
def test_dataloader_workers_forked_after_the_store_was_used(seaweedfs: SeaweedFS, s3_url: str, shuffle: bool) -> None:
    store = make_store(seaweedfs, s3_url)
    total = write_run(store, "r")
    # What a training script does before starting its loader: list and read the run.
    assert store.list_runs() == ["r"] and store.list_run_batches("r") == list(range(len(SIZES)))
    assert store.get_run_metadata("r") == {"rows": total}
    first = store.get_detector_metadata_by_layer_by_key("r", 0, "L", "activations")
    assert torch.equal(first.reshape(-1, D), row_values(torch.arange(10)))
    assert multiprocessing.get_start_method() == "fork"  # DataLoader's default context here
    ds = ActivationDataset(store, "r", "L", batch_size=7, shuffle=shuffle, seed=3)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    rows = torch.cat(list(loader))
    assert_every_row_once(rows, total)
    assert_every_row_once(torch.cat(list(loader)), total)  # a second epoch, new workers
    assert store.get_run_metadata("r") == {"rows": total}  # the parent's own client still works


# ---------------------------------------------------------------------- os.fork


def test_a_forked_child_reads_writes_and_lists(seaweedfs: SeaweedFS, s3_url: str) -> None:
    store = make_store(seaweedfs, s3_url, max_concurrency=4)
    total = write_run(store, "r")
    big = torch.arange(5 * 2**20, dtype=torch.float32)  # 20 MiB: a multipart upload, a memfd each way
    store.put_run_batch("r", 100, [big, torch.ones(3)])
    assert store.list_run_batches("r") == [*range(len(SIZES)), 100]

    def child() -> dict[str, Any]:
        out: dict[str, Any] = {"helper": _s3_proxy.helper_pid()}  # none yet
        out["meta"] = store.get_run_metadata("r")
        out["batch0"] = store.get_detector_metadata("r", 0)[0]
        got = store.get_run_batch("r", 100)
        assert isinstance(got, list)
        out["big"] = bool(torch.equal(got[0], big)) and got[1].tolist() == [1.0, 1.0, 1.0]
        with ThreadPoolExecutor(8) as pool:  # calls from many threads in flight at once
            parts = list(
                pool.map(lambda i: store.get_detector_metadata_by_layer_by_key("r", i, "L", "activations"), range(6))
            )
        rows = torch.cat([p.reshape(-1, D) for p in parts])
        out["rows"] = bool(torch.equal(rows, row_values(torch.arange(total))))
        # Writes: a batch of many files (the store's thread pool), a large run batch, appends, metadata.
        store.put_detector_metadata(
            "w", 0, {"by": "child"}, {f"l{j}": {"k": torch.full((4,), float(j))} for j in range(6)}
        )
        store.put_run_batch("w", 1, {"x": big * 2})
        for n in range(3):
            store.put_run_detector_metadata("w", {"n": n}, {"l": {"k": torch.tensor([n])}})
        store.put_run_metadata("w", {"from": "child"})
        out["listed"] = [store.list_runs(), store.list_run_batches("w")]
        out["appends"] = [m["n"] for m, _ in store.iter_run_detector_metadata("w")]
        listing = store._invoke(obstore.list, store._full("runs/w/detectors"), chunk_size=2)
        chunks = [next(listing)]
        out["meanwhile"] = store.get_run_metadata("w")  # answered while the listing is in flight
        chunks += list(listing)
        out["chunks"] = [[o["path"].rsplit("/", 1)[-1] for o in chunk] for chunk in chunks]
        out["stopped"] = next(iter(store._invoke(obstore.list, store._full("runs"), chunk_size=1)))[0]["size"] > 0
        out["helper_after"] = _s3_proxy.helper_pid()
        store.delete_run("r")
        out["after_delete"] = store.list_runs()
        return out

    got = in_forked_child(child)
    assert got["helper"] is None and isinstance(got["helper_after"], int) and got["helper_after"] != os.getpid()
    assert got["meta"] == {"rows": total} and got["batch0"] == {"rows": 10}
    assert got["big"] and got["rows"]
    assert got["listed"] == [["r", "w"], [0, 1]]
    assert got["appends"] == [0, 1, 2]
    assert [len(c) for c in got["chunks"]] == [2, 1]  # a listing of several chunks, in order
    assert got["meanwhile"] == {"from": "child"} and got["stopped"]  # a listing given up on after one chunk
    assert got["after_delete"] == ["w"]
    # What the child wrote, read by the parent directly.
    assert store.list_runs() == ["w"] and store.get_run_metadata("w") == {"from": "child"}
    meta, tensors = store.get_detector_metadata("w", 0)
    assert meta == {"by": "child"} and sorted(tensors) == [f"l{j}" for j in range(6)]
    assert all(torch.equal(tensors[f"l{j}"]["k"], torch.full((4,), float(j))) for j in range(6))
    assert torch.equal(store.get_run_batch("w", 1)["x"], big * 2)  # type: ignore[call-overload]
    assert [m["n"] for m, _ in store.iter_run_detector_metadata("w")] == [0, 1, 2]
    assert _s3_proxy.helper_pid() is None  # the parent calls obstore itself


def test_errors_keep_their_types_in_a_forked_child(seaweedfs: SeaweedFS, s3_url: str) -> None:
    store = make_store(seaweedfs, s3_url)
    store.put_run_metadata("r", {"a": 1})
    denied = make_store(seaweedfs, s3_url, secret_access_key="not-the-key")
    etag = obstore.head(seaweedfs.client(s3_url.split("/")[2]), store._full("runs/r/meta.json"))["e_tag"]

    def outcome(call: Callable[[], Any]) -> list[str]:
        try:
            call()
        except Exception as e:
            return [type(e).__name__, str(e)]
        return ["no error", ""]

    def attempts() -> dict[str, list[str]]:
        key = "runs/r/meta.json"
        return {
            "missing tensor": outcome(lambda: store.get_detector_metadata_by_layer_by_key("r", 3, "L", "k")),
            "missing object": outcome(lambda: store._call(obstore.get, "runs/r/nothing.json")),
            "put if absent": outcome(lambda: store._call(obstore.put, key, b"{}", mode="create")),
            "stale etag": outcome(lambda: store._call(obstore.put, key, b"{}", mode={"e_tag": '"0"'})),
            "denied": outcome(lambda: denied.get_run_metadata("r")),
            "range": outcome(lambda: store._call(obstore.get, key, options={"range": (2, 5)}).bytes()),
            "fresh etag": outcome(lambda: store._call(obstore.head, key)["e_tag"] == etag or 1 / 0),
        }

    parent = attempts()
    child = in_forked_child(attempts)
    assert (
        {k: v[0] for k, v in child.items()}
        == {k: v[0] for k, v in parent.items()}
        == {
            "missing tensor": "FileNotFoundError",
            "missing object": "FileNotFoundError",
            "put if absent": "AlreadyExistsError",
            "stale etag": "PreconditionError",
            "denied": "ObjectStoreError",
            "range": "no error",
            "fresh etag": "no error",
        }
    )
    for name in ("missing tensor", "missing object"):  # the store's own messages: the same
        assert child[name][1] == parent[name][1]
    assert f"{s3_url}/runs/r/meta.json" in child["denied"][1]
    assert child["denied"][1].split(":")[:3] == parent["denied"][1].split(":")[:3]


# ---------------------------------------------------------------------- the helper's lifetime


def _proc_state(pid: int) -> str | None:
    """The process's state letter from /proc (``Z``: exited, not yet reaped); ``None`` if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _wait_exit(pidfd: int) -> None:
    """Block until the process of ``pidfd`` has exited (pytest-timeout guards the wait)."""
    select.select([pidfd], [], [])


@pytest.fixture
def holding() -> Iterator[list[int]]:
    """Pids to SIGKILL at the end whatever happened (processes a test keeps blocked)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux 5.3)")
def test_a_killed_child_leaves_no_helper_behind(seaweedfs: SeaweedFS, s3_url: str, holding: list[int]) -> None:
    store = make_store(seaweedfs, s3_url)
    store.put_run_metadata("r", {"a": 1})
    report_r, report_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: start a helper, fork a grandchild that starts its own, then block
        try:
            torch.set_num_threads(1)
            os.close(report_r)
            os.close(hold_w)
            assert store.get_run_metadata("r") == {"a": 1}
            who = "child"
            if os.fork() == 0:
                who = "grandchild"
                assert store.get_run_metadata("r") == {"a": 1}
            os.write(report_w, f"{who} {os.getpid()} {_s3_proxy.helper_pid()}\n".encode())
            os.read(hold_r, 1)  # until killed
        finally:
            os._exit(0)
    holding.append(pid)
    os.close(report_w)
    os.close(hold_r)
    reports: dict[str, tuple[int, int]] = {}
    with os.fdopen(report_r) as f:
        for _ in range(2):
            who, proc, helper_pid = f.readline().split()
            reports[who] = (int(proc), int(helper_pid))
            holding.append(int(proc))
    (child, child_helper), (grandchild, grandchild_helper) = reports["child"], reports["grandchild"]
    assert child == pid and len({child_helper, grandchild_helper, child, grandchild}) == 4
    for helper in (child_helper, grandchild_helper):
        assert _proc_state(helper) not in (None, "Z")
        assert "_s3_proxy.py" in Path(f"/proc/{helper}/cmdline").read_bytes().decode()
        maps = Path(f"/proc/{helper}/maps").read_text()
        assert "libtorch" not in maps and "_obstore" in maps  # a fresh interpreter with obstore only
    pidfds = {p: os.pidfd_open(p) for p in (child_helper, grandchild_helper, grandchild)}
    try:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        _wait_exit(pidfds[child_helper])  # its helper exits: the grandchild closed its copy of the socket
        assert _proc_state(child_helper) in (None, "Z")
        assert _proc_state(grandchild_helper) not in (None, "Z")  # the grandchild still runs
        os.kill(grandchild, signal.SIGKILL)
        _wait_exit(pidfds[grandchild])
        _wait_exit(pidfds[grandchild_helper])
        assert _proc_state(grandchild_helper) in (None, "Z")
    finally:
        for fd in pidfds.values():
            os.close(fd)
        os.close(hold_w)


def test_the_helper_exits_with_a_child_that_exits(seaweedfs: SeaweedFS, s3_url: str) -> None:
    store = make_store(seaweedfs, s3_url)
    store.put_run_metadata("r", {"a": 1})

    def child() -> int | None:
        assert store.get_run_metadata("r") == {"a": 1}
        return _s3_proxy.helper_pid()

    helper = in_forked_child(child)  # the child ended with os._exit
    assert isinstance(helper, int)
    try:
        pidfd = os.pidfd_open(helper)
    except ProcessLookupError:
        return  # already gone
    try:
        _wait_exit(pidfd)
    finally:
        os.close(pidfd)
    assert _proc_state(helper) in (None, "Z")


# ---------------------------------------------------------------------- spawned workers


def _rows_in_worker(ds: ActivationDataset) -> list[list[float]]:
    return torch.cat(list(ds)).tolist()


def test_the_dataset_and_store_pickle_into_a_spawned_worker(seaweedfs: SeaweedFS, s3_url: str, tmp_path: Path) -> None:
    store = make_store(seaweedfs, s3_url, cache_dir=tmp_path / "cache")
    total = write_run(store, "r")
    assert store.list_run_batches("r") == list(range(len(SIZES)))
    ds = ActivationDataset(store, "r", "L", batch_size=5, shuffle=True, seed=1)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        rows = pool.apply(_rows_in_worker, (ds,))
    assert_every_row_once(torch.tensor(rows), total)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == len(SIZES)  # the worker filled the cache
