"""Capture from many processes into one run: rank-strided batch indices, run metadata merged with
``update_run_metadata``, each rank resuming its own share after SIGKILL; on a local store and on
the SeaweedFS server, with real processes.

Nothing here depends on how fast anything runs: writers are killed once the store's own listing
shows enough batches (whatever instant that is, the checks hold), and the remaining timeouts
(``HANG_S``) only end a real hang.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import proc_workers as pw
from hf_models import save_tiny_bert
from mi_crow.store import ActivationCapture, LayoutStore, LocalStore, MemoryStore, Store
from mi_crow.store.capture import resolve_rank
from mi_crow.store.stats import LayerStats
from test_processes import HANG_S, run_all, stop_process, wait_for_log

RUN = pw.RANK_RUN
Backend = tuple[str, Callable[[], LayoutStore]]


@pytest.fixture(scope="module")
def ranks_bucket(seaweedfs: Any) -> str:
    return str(seaweedfs.new_bucket("ranks"))


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """``(root, open)``: the store's name for the workers (``pw.open_root``) and how to open it here."""
    if request.param == "local":
        root = str(tmp_path / "store")
    else:
        server = request.getfixturevalue("seaweedfs")
        bucket = request.getfixturevalue("ranks_bucket")
        root = pw.s3_root(f"s3://{bucket}/{os.urandom(6).hex()}", server.store_config(), server.client_options())
    return root, lambda: pw.open_root(root)


@pytest.fixture
def s3_store(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Open ObjectStores on one fresh prefix of the SeaweedFS server (several clients of one store)."""
    server = request.getfixturevalue("seaweedfs")
    bucket = request.getfixturevalue("ranks_bucket")
    url = f"s3://{bucket}/{os.urandom(6).hex()}"
    from mi_crow.store.object_store import ObjectStore

    def make(**kwargs: Any) -> ObjectStore:
        return ObjectStore(url, config=server.store_config(), client_options=server.client_options(), **kwargs)

    return make


# ---------------------------------------------------------------------- expected contents


def expected(g: int) -> dict[str, torch.Tensor]:
    """What modules "0" and "2" of ``pw.rank_model()`` output for global batch ``g``."""
    model = pw.rank_model()
    with torch.no_grad():
        x = pw.rank_input(g)
        first = model[0](x)
        return {"0": first, "2": model[2](model[1](first))}


def same_values(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert torch.equal(a, b)


def check_batches(store: LayoutStore, indices: list[int]) -> None:
    """Each batch holds exactly what the model produced for its global batch number."""
    for g in indices:
        meta, tensors = store.get_detector_metadata(RUN, g)
        assert meta == {"tokens": pw.rank_tokens(g), "masked": False}, g
        assert sorted(tensors) == pw.RANK_LAYERS, g
        want = expected(g)
        for layer in pw.RANK_LAYERS:
            assert list(tensors[layer]) == ["activations"], (g, layer)
            same_values(tensors[layer]["activations"], want[layer])


def check_complete(store: LayoutStore, total: int, world: int) -> None:
    """Every batch of ``0..total-1`` present exactly once with its values; the run's metadata has
    each writer's counts, and their sums."""
    assert store.list_run_batches(RUN) == list(range(total))
    check_batches(store, list(range(total)))
    capture = store.get_run_metadata(RUN)["capture"]
    assert capture["world_size"] == world
    assert list(capture["writers"]) == [str(r) for r in range(world)]
    for r in range(world):
        mine = range(r, total, world)
        writer = capture["writers"][str(r)]
        assert sorted(writer) == ["batches", "last_batch", "masked", "stats", "tokens", "updated"]
        assert (writer["batches"], writer["tokens"], writer["last_batch"], writer["masked"]) == (
            len(mine),
            sum(pw.rank_tokens(g) for g in mine),
            mine[-1],
            False,  # the model is called on float tensors: no mask
        ), r
        check_stats(writer["stats"], mine)
    assert capture["batches"] == total
    assert capture["tokens"] == sum(pw.rank_tokens(g) for g in range(total))
    assert capture["last_batch"] == total - 1
    assert capture["masked"] is False
    # The statistics merged from every writer's (also those recomputed on resume from the stored
    # batches a killed writer had not counted) are those of every row of the run.
    check_stats(capture["stats"], range(total))
    assert store.get_run_metadata(RUN)["layers"] == pw.RANK_LAYERS


def check_stats(stats: dict[str, Any], batches: Any) -> None:
    """``stats`` (stored form) are count, mean, variance and norms of exactly the rows of ``batches``."""
    assert list(stats) == pw.RANK_LAYERS
    for layer in pw.RANK_LAYERS:
        rows = torch.cat([expected(g)[layer].reshape(-1, 4 if layer == "2" else 16) for g in batches]).double()
        got = LayerStats.from_json(stats[layer])
        assert got.count == rows.shape[0] == sum(pw.rank_tokens(g) for g in batches)
        torch.testing.assert_close(got.mean, rows.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.var, rows.var(0, correction=0), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got.norm_sum, float(rows.norm(dim=1).sum()), rtol=1e-12, atol=0.0)
        torch.testing.assert_close(got.sq_norm_sum, float((rows * rows).sum()), rtol=1e-12, atol=0.0)


def enter_line(lines: list[str]) -> tuple[int, int, int, int]:
    """``(next_batch, completed, rank, world_size)`` from a capturer's log (which must have no error)."""
    errors = [json.loads(line[6:]) for line in lines if line.startswith("error ")]
    assert not errors, errors[0]
    entered = [line for line in lines if line.startswith("enter ")]
    assert len(entered) == 1, lines[:3]
    next_batch, completed, rank, world = map(int, entered[0].split()[1:])
    return next_batch, completed, rank, world


def logged_batches(lines: list[str]) -> list[int]:
    return [int(line) for line in lines if line.isdigit()]


# ---------------------------------------------------------------------- update_run_metadata


def test_update_run_metadata_from_four_processes(tmp_path: Path, backend: Backend) -> None:
    root, open_store = backend
    count = 15
    run_all(pw.context(), pw.metadata_updater, [(root, w, count) for w in range(4)])
    meta = open_store().get_run_metadata("shared")
    assert meta["count"] == 4 * count
    assert {w: meta[f"w{w}"] for w in range(4)} == {w: list(range(count)) for w in range(4)}


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_update_run_metadata_checks_before_writing(tmp_path: Path, kind: str) -> None:
    store: LayoutStore = LocalStore(tmp_path / "s") if kind == "local" else MemoryStore()
    store.put_run_metadata("r", {"n": 1})
    seen: list[dict[str, Any]] = []

    def bump(meta: dict[str, Any]) -> dict[str, Any]:
        seen.append(meta)
        return {**meta, "n": meta["n"] + 1}

    assert store.update_run_metadata("r", bump) == {"n": 2}
    assert seen == [{"n": 1}] and store.get_run_metadata("r") == {"n": 2}
    with pytest.raises(TypeError, match="update must be a function"):
        store.update_run_metadata("r", {"n": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must return the new metadata as a dict, returned list"):
        store.update_run_metadata("r", lambda m: [m])  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match=r"meta\['x'\] is a set.*nothing was written"):
        store.update_run_metadata("r", lambda m: {**m, "x": {1}})
    with pytest.raises(ValueError, match="run_id"):
        store.update_run_metadata("../r", bump)
    with pytest.raises(ValueError, match="nothing was written"):
        store.update_run_metadata("new", lambda m: {"x": object()})
    assert store.get_run_metadata("r") == {"n": 2}
    assert store.list_runs() == ["r"]  # the refused update of a new run left no run behind
    assert store.update_run_metadata("fresh", lambda m: {**m, "was": dict(m)}) == {"was": {}}
    if isinstance(store, LocalStore):
        assert sorted(os.listdir(tmp_path / "s/runs/r")) == ["meta.json"]  # no lock file, no temp file
        assert store.check() == []


def _waiting_flock(pid: int, inode: int) -> bool:
    """Whether ``/proc/locks`` shows process ``pid`` waiting for a flock of inode ``inode``."""
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts and "FLOCK" in parts:
                rest = parts[parts.index("->") + 1 :]
                if int(rest[3]) == pid and int(rest[4].split(":")[2]) == inode:
                    return True
    return False


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs /proc/locks")
def test_local_update_waits_for_the_holder_and_a_sigkilled_holder_releases(tmp_path: Path) -> None:
    root = str(tmp_path / "s")
    store = LocalStore(root)
    store.put_run_metadata("r", {"n": 0})
    log = str(tmp_path / "holder")
    holder = pw.context().Process(target=pw.update_holder, args=(root, log))
    holder.start()
    try:
        wait_for_log(holder, log, lambda lines: any(line.startswith("inside") for line in lines), "the lock taken")
        seen: list[dict[str, Any]] = []
        result: list[Any] = []

        def update() -> None:
            result.append(store.update_run_metadata("r", lambda m: seen.append(m) or {**m, "n": m["n"] + 1}))

        waiter = threading.Thread(target=update)
        waiter.start()
        inode = os.stat(tmp_path / "s/runs/r").st_ino
        deadline = time.monotonic() + HANG_S
        while not _waiting_flock(os.getpid(), inode):  # this process now waits for the holder's lock
            assert waiter.is_alive() and time.monotonic() < deadline, "the update did not wait for the lock"
            time.sleep(0.005)
        assert seen == []
        os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
        waiter.join(HANG_S)
        assert not waiter.is_alive()
    finally:
        stop_process(holder)
    assert seen == [{"n": 0}] and result == [{"n": 1}]
    assert store.get_run_metadata("r") == {"n": 1}
    assert sorted(os.listdir(tmp_path / "s/runs/r")) == ["meta.json"]
    fd = os.open(tmp_path / "s/runs/r", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds it any more
    finally:
        os.close(fd)


@pytest.mark.s3
def test_object_store_update_retries_after_losing_a_race(s3_store: Callable[..., Any]) -> None:
    from mi_crow.store.object_store import ObjectStoreError

    store, other = s3_store(), s3_store()
    calls: list[dict[str, Any]] = []

    def racing(value: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def update(meta: dict[str, Any]) -> dict[str, Any]:
            calls.append(meta)
            if len(calls) == 1:
                other.put_run_metadata("r", value)  # another writer lands between our GET and PUT
            return {**meta, "n": meta.get("n", 0) + 1}

        return update

    # The run has no metadata yet: our PUT If-None-Match: * loses to the other's create.
    assert store.update_run_metadata("r", racing({"n": 10, "other": True})) == {"n": 11, "other": True}
    assert calls == [{}, {"n": 10, "other": True}]
    assert store.get_run_metadata("r") == {"n": 11, "other": True}
    # It has: our PUT If-Match loses to the other's overwrite.
    calls.clear()
    assert store.update_run_metadata("r", racing({"n": 20})) == {"n": 21}
    assert calls == [{"n": 11, "other": True}, {"n": 20}]
    assert store.get_run_metadata("r") == {"n": 21}

    # Losing every time: bounded, then an error naming the object and the attempts.
    store.update_attempts, store.update_backoff = 3, (0.001, 0.002)
    tries: list[int] = []

    def always_loses(meta: dict[str, Any]) -> dict[str, Any]:
        tries.append(meta["n"])
        other.put_run_metadata("r", {"n": meta["n"] + 100})
        return {"n": -1}

    with pytest.raises(ObjectStoreError, match=r"/runs/r/meta\.json: .*lost to concurrent writers 3 times.*3 attempts"):
        store.update_run_metadata("r", always_loses)
    assert tries == [21, 121, 221]
    assert store.get_run_metadata("r") == {"n": 321}  # ours was never written

    # single_writer: one plain PUT (the caller promised no other writer; the other's write is lost).
    single = s3_store(single_writer=True)
    calls.clear()
    assert single.update_run_metadata("r", racing({"n": 0})) == {"n": 322}
    assert calls == [{"n": 321}] and single.get_run_metadata("r") == {"n": 322}


def test_base_store_default_is_get_then_put() -> None:
    """A store that subclasses ``Store`` directly gets update_run_metadata built on its own methods."""
    inner = MemoryStore()

    def delegate(name: str) -> Any:
        return lambda self, *args, **kwargs: getattr(inner, name)(*args, **kwargs)

    ThirdParty = type("ThirdParty", (Store,), {name: delegate(name) for name in Store.__abstractmethods__})
    store = ThirdParty()
    store.put_run_metadata("r", {"nested": {"n": 1}})

    def bump(meta: dict[str, Any]) -> dict[str, Any]:
        meta["nested"]["n"] += 1  # a copy: the store's own value is untouched until it is put
        return meta

    assert store.update_run_metadata("r", bump) == {"nested": {"n": 2}}
    assert inner.get_run_metadata("r") == {"nested": {"n": 2}}
    assert store.update_run_metadata("new", lambda m: {**m, "was": m}) == {"was": {}}
    with pytest.raises(ValueError, match="returned NoneType"):
        store.update_run_metadata("r", lambda m: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="update must be a function"):
        store.update_run_metadata("r", None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- many capturing processes


def test_four_processes_capture_into_one_run(tmp_path: Path, backend: Backend) -> None:
    root, open_store = backend
    total, world = 30, 4
    logs = [str(tmp_path / f"rank-{r}") for r in range(world)]
    # Ranks 1 and 3 take their rank from RANK/WORLD_SIZE, as under torchrun; 0 and 2 are told.
    run_all(pw.context(), pw.rank_capturer, [(root, logs[r], r, world, total, r % 2 == 1) for r in range(world)])
    for r, log in enumerate(logs):
        lines = pw.read_log(log)
        assert enter_line(lines) == (r, 0, r, world)
        assert logged_batches(lines) == list(range(r, total, world))
        assert lines[-1] == "done"
    store = open_store()
    check_complete(store, total, world)
    assert store.check() == []


def test_sigkill_every_writer_mid_capture_then_resume(tmp_path: Path, backend: Backend) -> None:
    root, open_store = backend
    total, world = (320 if root.startswith("/") else 120), 4
    kill_at = total // 8
    ctx = pw.context()
    store = open_store()
    logs = [str(tmp_path / f"first-{r}") for r in range(world)]
    procs = [ctx.Process(target=pw.rank_capturer, args=(root, logs[r], r, world, total, False)) for r in range(world)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + HANG_S
        # Kill once the store lists kill_at batches (or every writer is done), whenever that is.
        while len(store.list_run_batches(RUN)) < kill_at and any(p.exitcode is None for p in procs):
            assert time.monotonic() < deadline, "hang: the writers stored too few batches"
            time.sleep(0.002)
        for p in procs:
            if p.exitcode is None:
                os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
        for p in procs:
            p.join(HANG_S)
    finally:
        for p in procs:
            stop_process(p)
    for r, log in enumerate(logs):
        lines = pw.read_log(log)
        if lines:  # a writer killed before it entered the capture logged nothing
            assert enter_line(lines) == (r, 0, r, world)
    # What survived: every listed batch complete and right; each rank's batches a prefix of its share.
    listed = store.list_run_batches(RUN)
    assert len(listed) >= kill_at and set(listed) <= set(range(total))
    check_batches(store, listed)
    survived = {}
    for r in range(world):
        own = [g for g in listed if g % world == r]
        assert own == list(range(r, total, world))[: len(own)], (r, own)
        survived[r] = len(own)

    # Every writer started again: each continues its own share and the run ends complete.
    logs = [str(tmp_path / f"again-{r}") for r in range(world)]
    run_all(ctx, pw.rank_capturer, [(root, logs[r], r, world, total, r % 2 == 0) for r in range(world)])
    for r, log in enumerate(logs):
        lines = pw.read_log(log)
        next_batch, completed, rank, size = enter_line(lines)
        assert (completed, next_batch, rank, size) == (survived[r], r + survived[r] * world, r, world)
        assert logged_batches(lines) == list(range(r, total, world))[completed:]
        assert lines[-1] == "done"
    check_complete(store, total, world)
    assert store.check() == []


def test_ranks_from_an_initialized_torch_distributed_group(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    total, world = 10, 2
    logs = [str(tmp_path / f"dist-{r}") for r in range(world)]
    init = str(tmp_path / "rendezvous")
    run_all(pw.context(), pw.dist_capturer, [(root, logs[r], r, world, total, init) for r in range(world)])
    for r, log in enumerate(logs):
        lines = pw.read_log(log)
        assert enter_line(lines) == (r, 0, r, world)  # the group's rank, not RANK="not-a-rank"
        assert logged_batches(lines) == list(range(r, total, world))
    check_complete(LocalStore(root), total, world)


# ---------------------------------------------------------------------- ranks and their checks


def test_rank_and_world_size_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_rank() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    assert resolve_rank() == (0, 1)  # only when both are set
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_rank() == (2, 3)
    assert resolve_rank(0, 1) == (0, 1)  # arguments win
    model = pw.rank_model()
    store = MemoryStore()
    with ActivationCapture(model, store, "env", ["0"]) as cap, torch.no_grad():
        assert (cap.rank, cap.world_size, cap.next_batch, cap.completed) == (2, 3, 2, 0)
        model(pw.rank_input(0))
        model(pw.rank_input(1))
    assert store.list_run_batches("env") == [2, 5]
    writers = store.get_run_metadata("env")["capture"]["writers"]
    assert writers["2"]["batches"] == 2 and writers["2"]["last_batch"] == 5
    for rank, world, message in (
        ("x", "3", "the environment variable RANK='x' must be an integer >= 0"),
        ("-1", "3", "RANK='-1' must be an integer >= 0"),
        ("1.0", "3", "RANK='1.0' must be an integer"),
        ("0", "0", "the environment variable WORLD_SIZE='0' must be an integer >= 1"),
        ("0", "four", "WORLD_SIZE='four'"),
        ("3", "3", "RANK='3' must be less than WORLD_SIZE='3'"),
    ):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(ValueError, match=re.escape(message)):
            ActivationCapture(model, store, "bad", ["0"])
    assert store.list_runs() == ["env"]


def test_rank_arguments_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model, store = pw.rank_model(), MemoryStore()
    for kwargs, message in (
        ({"rank": 4, "world_size": 4}, "rank must be in 0..3 for world_size 4, got 4"),
        ({"rank": -1, "world_size": 2}, "rank must be in 0..1"),
        ({"rank": 0, "world_size": 0}, "world_size must be >= 1, got 0"),
        ({"rank": "1", "world_size": 2}, "rank must be an int, got str '1'"),
        ({"rank": 0, "world_size": True}, "world_size must be an int, got bool True"),
        ({"rank": 1}, "rank must be in 0..0 for world_size 1, got 1"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            ActivationCapture(model, store, "r", ["0"], **kwargs)
    with ActivationCapture(model, store, "r", ["0"], rank=1, world_size=3) as cap:
        with pytest.raises(ValueError, match="batch index 5 belongs to rank 2 of 3, not to this capture's rank 1"):
            cap.next_batch = 5
        with pytest.raises(ValueError, match="next_batch must be an int >= 0"):
            cap.next_batch = -2
        cap.next_batch = 7  # a later index of this rank
        with torch.no_grad():
            model(pw.rank_input(7))
        assert cap.next_batch == 10
    assert store.list_run_batches("r") == [7]
    assert store.get_run_metadata("r")["capture"]["writers"]["1"]["last_batch"] == 7


def test_a_run_of_another_world_size_is_refused(tmp_path: Path) -> None:
    model, store = pw.rank_model(), LocalStore(tmp_path / "s")
    with ActivationCapture(model, store, "r", ["0"], rank=1, world_size=2), torch.no_grad():
        model(pw.rank_input(1))
    before = store.get_run_metadata("r")
    for rank, world in ((0, 3), (0, 1)):
        with pytest.raises(
            ValueError, match=f"run 'r' was captured with world_size 2 and this capture has world_size {world}"
        ):
            ActivationCapture(model, store, "r", ["0"], rank=rank, world_size=world).__enter__()
    assert store.get_run_metadata("r") == before and store.list_run_batches("r") == [1]
    with ActivationCapture(model, store, "r", ["0"], rank=0, world_size=2) as cap, torch.no_grad():  # the same size
        model(pw.rank_input(0))
    assert cap.completed == 0 and store.list_run_batches("r") == [0, 1]
    capture = store.get_run_metadata("r")["capture"]
    assert (capture["batches"], capture["tokens"]) == (2, pw.rank_tokens(0) + pw.rank_tokens(1))
    # A run whose metadata says world size 2 but that holds no batch yet can be started afresh.
    store.put_run_metadata("empty", {"capture": {"world_size": 2, "writers": {}}})
    with ActivationCapture(model, store, "empty", ["0"], rank=0, world_size=3):
        pass
    assert store.get_run_metadata("empty")["capture"]["world_size"] == 3


def test_a_run_captured_before_ranks_reads_as_writer_zero(tmp_path: Path) -> None:
    model, store = pw.rank_model(), LocalStore(tmp_path / "s")
    for g in range(3):  # three batches; the metadata (as the previous version wrote it) counts two
        store.put_detector_metadata("old", g, {"tokens": pw.rank_tokens(g)}, {"0": {"activations": torch.ones(1)}})
    old_capture = {"key": "activations", "batches": 2, "tokens": pw.rank_tokens(0) + pw.rank_tokens(1), "last_batch": 1}
    store.put_run_metadata("old", {"dataset": "toy", "capture": {**old_capture, "note": "kept"}})
    with pytest.raises(ValueError, match="captured with world_size 1 and this capture has world_size 2"):
        ActivationCapture(model, store, "old", ["0"], rank=0, world_size=2).__enter__()
    with ActivationCapture(model, store, "old", ["0"]) as cap, torch.no_grad():
        assert (cap.completed, cap.next_batch, cap.batches) == (3, 3, 3)  # batch 2 counted from its own metadata
        model(pw.rank_input(3))
    meta = store.get_run_metadata("old")
    assert meta["dataset"] == "toy" and meta["capture"]["note"] == "kept"
    writer = meta["capture"]["writers"]["0"]
    assert (writer["batches"], writer["tokens"], writer["last_batch"]) == (4, sum(map(pw.rank_tokens, range(4))), 3)
    assert (meta["capture"]["batches"], meta["capture"]["world_size"]) == (4, 1)


# ---------------------------------------------------------------------- the command line


def test_cli_ranks_lay_out_the_run_as_one_process_does(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    save_tiny_bert(tmp_path / "model", layers=2, digits=9)
    texts = tmp_path / "texts.txt"
    # Texts of different lengths (padding differs batch to batch); 9 texts in batches of 2: 5 batches.
    texts.write_text("\n".join("text number " + " ".join(str(j) for j in range(i % 4 + 1)) for i in range(9)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["HF_HUB_OFFLINE"] = "1"

    def args(store: Path, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mi_crow.store",
            "capture",
            "--model",
            str(tmp_path / "model"),
            "--layers",
            "encoder.layer.0,encoder.layer.1",
            "--texts",
            str(texts),
            "--run",
            "cli",
            "--store",
            str(store),
            "--batch-size",
            "2",
            "--max-length",
            "8",
            *extra,
        ]

    one = subprocess.run(args(tmp_path / "one"), capture_output=True, text=True, env=env, check=False)
    assert one.returncode == 0, one.stderr
    # Two processes at once: rank 0 told by flags, rank 1 by RANK/WORLD_SIZE (as torchrun sets them).
    procs = [
        subprocess.Popen(
            args(tmp_path / "two", "--rank", "0", "--world-size", "2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        ),
        subprocess.Popen(
            args(tmp_path / "two"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "RANK": "1", "WORLD_SIZE": "2"},
        ),
    ]
    outs = [p.communicate(timeout=HANG_S) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    assert "captured run 'cli' (rank 0 of 2): 3 batch(es)" in outs[0][0]
    assert "captured run 'cli' (rank 1 of 2): 2 batch(es)" in outs[1][0]
    assert re.search(r"^read back encoder\.layer\.1\b.* 3 batch\(es\)\s+ok$", outs[0][0], re.MULTILINE), outs[0][0]
    single, multi = LocalStore(tmp_path / "one"), LocalStore(tmp_path / "two")
    assert single.list_run_batches("cli") == multi.list_run_batches("cli") == [0, 1, 2, 3, 4]
    for g in range(5):
        meta_one, tensors_one = single.get_detector_metadata("cli", g)
        meta_two, tensors_two = multi.get_detector_metadata("cli", g)
        assert meta_one == meta_two
        assert {k: sorted(v) for k, v in tensors_one.items()} == {k: sorted(v) for k, v in tensors_two.items()}
        for layer, keys in tensors_one.items():
            for key, t in keys.items():
                same_values(tensors_two[layer][key], t)
    capture_one = single.get_run_metadata("cli")["capture"]
    capture_two = multi.get_run_metadata("cli")["capture"]
    assert (
        (capture_two["batches"], capture_two["tokens"])
        == (capture_one["batches"], capture_one["tokens"])
        == (
            5,
            sum(single.get_detector_metadata("cli", g)[0]["tokens"] for g in range(5)),
        )
    )
    writers = capture_two["writers"]
    assert (writers["0"]["batches"], writers["1"]["batches"]) == (3, 2)
    assert writers["0"]["tokens"] + writers["1"]["tokens"] == capture_two["tokens"]
    # Resume: a rank whose share is stored has nothing left to do.
    again = subprocess.run(
        args(tmp_path / "two", "--rank", "1", "--world-size", "2"), capture_output=True, text=True, env=env, check=False
    )
    assert again.returncode == 0, again.stderr
    assert "captured run 'cli' (rank 1 of 2): 0 batch(es), 0 text(s), 0 tokens" in again.stdout, again.stdout
    # Refused with a usage error before anything is written.
    for extra, extra_env, message in (
        (("--rank", "0", "--world-size", "3"), {}, "and this capture has --world-size 3"),
        (("--rank", "2", "--world-size", "2"), {}, "rank must be in 0..1 for world_size 2, got 2"),
        ((), {"RANK": "one", "WORLD_SIZE": "2"}, "the environment variable RANK='one' must be an integer >= 0"),
        (("--overwrite", "--world-size", "2", "--rank", "0"), {}, "--overwrite deletes the run"),
    ):
        bad = subprocess.run(
            args(tmp_path / "two", *extra), capture_output=True, text=True, env={**env, **extra_env}, check=False
        )
        assert bad.returncode == 2, (extra, bad.stdout, bad.stderr)
        assert message in " ".join(bad.stderr.split()), (extra, bad.stderr)
    assert multi.list_run_batches("cli") == [0, 1, 2, 3, 4]
