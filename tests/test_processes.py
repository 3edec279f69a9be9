"""Real processes: writers SIGKILLed at seeded random instants, concurrent writers and readers.

Each crash trial starts a writer that repeats one operation with increasing versions, kills it
with SIGKILL after a random delay, and checks the store: every listed entry reads back
complete and consistent with exactly one version, every call that had returned is still
there, and the store takes new writes. ``gc`` then removes exactly the leftovers.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import proc_workers as pw
from mi_crow.store import LocalStore
from mi_crow.store.testing.store_tests import assert_same

TRIALS = int(os.environ.get("MI_CROW_STORE_CRASH_TRIALS", "8"))
SEED = int(os.environ.get("MI_CROW_STORE_CRASH_SEED", "20261128"))


def consistent(tensors: dict[str, dict[str, torch.Tensor]], v: int, layers: int) -> None:
    assert sorted(tensors) == [f"l{j}" for j in range(layers)], (v, sorted(tensors))
    for layer, keys in tensors.items():
        assert sorted(keys) == ["activations", "attention_mask"], (v, layer, sorted(keys))
        for key, t in keys.items():
            assert bool((t == v).all()), f"version {v}: {layer}/{key} holds {t.unique().tolist()[:4]}"


def check_after_crash(op: str, store: LocalStore, done: list[int], started: list[int]) -> None:
    """``done``: versions whose call returned; ``started``: the first version of each trial."""
    last = max(done, default=0)
    if op == "new_batch":
        listed = store.list_run_batches("r")
        for i in listed:
            meta, tensors = store.get_detector_metadata("r", i)
            assert meta == {"v": i}
            consistent(tensors, i, 3)
        assert set(done) <= set(listed)
    elif op == "overwrite":
        meta, tensors = store.get_detector_metadata("r", 0)
        assert meta["v"] >= last
        consistent(tensors, meta["v"], 3)
    elif op == "run_batch":
        newest: dict[int, int] = {}
        for v in done:
            newest[v % 4] = max(newest.get(v % 4, 0), v)
        listed = store.list_run_batches("r")
        assert set(newest) <= set(listed)
        for i in listed:
            batch = store.get_run_batch("r", i)
            assert isinstance(batch, dict)
            v = int(batch["v"].item())
            assert v % 4 == i and v >= newest.get(i, 0)
            assert bool((batch["a"] == v).all())
    elif op == "run_metadata":
        meta = store.get_run_metadata("r")
        assert meta["v"] >= last and meta["pad"] == "x" * 200_000
    elif op == "append":
        entries = list(store.iter_run_detector_metadata("r"))
        versions = [m["v"] for m, _ in entries]
        assert versions == sorted(versions)
        assert set(done) <= set(versions)
        in_flight = {max([v for v in done if s <= v < s + 10_000], default=s - 1) + 1 for s in started}
        assert set(versions) - set(done) <= in_flight
        for meta, tensors in entries:
            consistent(tensors, meta["v"], 2)
    elif op == "delete_run":
        for run in store.list_runs():
            v = int(run[1:])
            assert v not in done, f"run {run} was deleted but is back"
            for i in store.list_run_batches(run):
                meta, tensors = store.get_detector_metadata(run, i)
                assert meta == {"v": v}
                consistent(tensors, v, 2)
    elif op == "model":
        tensors, meta = store.get_model("m")
        assert meta["v"] >= last
        assert all(bool((t == meta["v"]).all()) for t in tensors.values())
    else:  # pragma: no cover
        raise AssertionError(op)


def total_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def leftover_bytes(root: Path) -> int:
    total = 0
    for p in root.rglob("*"):
        if p.is_file() and any(part.startswith((".tmp-", ".stage-", ".trash-")) for part in p.relative_to(root).parts):
            total += p.stat().st_size
    return total


@pytest.mark.parametrize("op", sorted(pw.CRASH_OPS))
def test_sigkill_at_random_instants(op: str, tmp_path: Path) -> None:
    ctx = pw.context()
    root = tmp_path / "store"
    store = LocalStore(root)
    if op == "overwrite":
        store.put_detector_metadata("r", 0, {"v": 0}, pw.batch_tensors(0))
    if op == "model":
        store.put_model("m", {"w": torch.zeros(1), "b": torch.zeros(1)}, {"v": 0})
    rng = random.Random(f"{SEED}-{op}")
    done: list[int] = []
    started: list[int] = []
    for trial in range(TRIALS):
        log = str(tmp_path / f"log-{trial}")
        first = trial * 10_000 + 1
        started.append(first)
        proc = ctx.Process(target=pw.crash_writer, args=(op, str(root), log, first))
        proc.start()
        deadline = time.monotonic() + 60
        while not pw.read_log(log) and time.monotonic() < deadline:
            time.sleep(0.002)
        assert pw.read_log(log), "writer did not start"
        time.sleep(rng.uniform(0, 0.08))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        done += [int(line) for line in pw.read_log(log)[1:]]
        check_after_crash(op, store, done, started)
    assert done, "no call completed in any trial; the delays are too short to test anything"
    # The store takes new writes after all those crashes, and they read back.
    pw.CRASH_OPS[op](store, 999_999)
    check_after_crash(op, store, [*done, 999_999], [*started, 999_999])
    # gc removes exactly the leftovers; what remains is the committed data, intact.
    before, leftovers = total_bytes(root), leftover_bytes(root)
    report = LocalStore(root).gc()
    assert report.bytes_freed == leftovers
    assert total_bytes(root) == before - leftovers
    assert leftover_bytes(root) == 0
    assert store.check() == []
    check_after_crash(op, store, [*done, 999_999], [*started, 999_999])


def run_all(ctx: object, target: object, args_list: list[tuple[object, ...]]) -> None:
    procs = [ctx.Process(target=target, args=args) for args in args_list]  # type: ignore[attr-defined]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, f"{target} exited with {p.exitcode}"


def test_concurrent_appenders_lose_nothing(tmp_path: Path) -> None:
    ctx = pw.context()
    root = str(tmp_path / "store")
    writers, count = 4, 20
    run_all(ctx, pw.appender, [(root, w, count) for w in range(writers)])
    store = LocalStore(root)
    entries = list(store.iter_run_detector_metadata("shared"))
    keys = [(m["writer"], m["i"]) for m, _ in entries]
    assert sorted(keys) == [(w, i) for w in range(writers) for i in range(count)]
    for meta, tensors in entries:
        i = meta["i"]
        assert_same(tensors["l"]["x"], torch.full((1000 + 37 * i,), meta["writer"] * 1000 + i, dtype=torch.int64))
    for w in range(writers):  # each writer's appends keep its call order
        assert [i for ww, i in keys if ww == w] == list(range(count))
    # Readers in other processes agree on one total order.
    logs = [str(tmp_path / f"order-{k}") for k in range(2)]
    run_all(ctx, pw.entry_order, [(root, log) for log in logs])
    orders = [json.loads(pw.read_log(log)[0]) for log in logs]
    assert orders[0] == orders[1] == [list(k) for k in keys]
    assert store.check() == []


def test_concurrent_batch_writers_all_present(tmp_path: Path) -> None:
    ctx = pw.context()
    root = str(tmp_path / "store")
    run_all(ctx, pw.batch_writer, [(root, w, 10) for w in range(4)])
    store = LocalStore(root)
    assert store.list_run_batches("shared") == list(range(40))
    for i in range(40):
        meta, tensors = store.get_detector_metadata("shared", i)
        assert meta == {"idx": i}
        consistent(tensors, i, 2)


def test_readers_never_see_a_mix_while_processes_overwrite(tmp_path: Path) -> None:
    ctx = pw.context()
    root = str(tmp_path / "store")
    LocalStore(root).put_detector_metadata("shared", 0, {"v": 0}, pw.batch_tensors(0, layers=3, n=32 * 1024))
    stop = str(tmp_path / "stop")
    logs = [str(tmp_path / f"reader-{k}") for k in range(2)]
    readers = [ctx.Process(target=pw.reader, args=(root, "batch", log, stop)) for log in logs]
    for r in readers:
        r.start()
    run_all(ctx, pw.overwriter, [(root, w, 60) for w in range(2)])
    Path(stop).touch()
    for r in readers:
        r.join(60)
        assert r.exitcode == 0
    for log in logs:
        summary = json.loads(pw.read_log(log)[0])
        assert summary["errors"] == []
        assert summary["reads"] > 0
    meta, tensors = LocalStore(root).get_detector_metadata("shared", 0)
    assert meta["v"] in {59 + 1, 100_000 + 59 + 1}  # the last write of one of the writers
    consistent(tensors, meta["v"], 3)


def test_concurrent_run_metadata_last_writer_wins_never_torn(tmp_path: Path) -> None:
    ctx = pw.context()
    root = str(tmp_path / "store")
    stop = str(tmp_path / "stop")
    log = str(tmp_path / "reader")
    reader = ctx.Process(target=pw.reader, args=(root, "metadata", log, stop))
    reader.start()
    run_all(ctx, pw.metadata_writer, [(root, w, 40) for w in range(4)])
    Path(stop).touch()
    reader.join(60)
    summary = json.loads(pw.read_log(log)[0])
    assert summary["errors"] == []
    final = LocalStore(root).get_run_metadata("shared")
    assert final["i"] == 39 and final["pad"] == "y" * 20_000
