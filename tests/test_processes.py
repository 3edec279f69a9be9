"""Real processes: writers SIGKILLed at seeded random instants, concurrent writers and readers.

Each crash trial starts a writer that repeats one operation with increasing versions, kills it
with SIGKILL after a random delay, and checks the store: every listed entry reads back
complete and consistent with exactly one version, every call that had returned is still
there, and the store takes new writes. ``gc`` then removes exactly the leftovers.

Nothing here assumes how long anything takes: kill delays are multiples of the operation's
duration measured from the writer's own log in the same run, the concurrency tests start their
writers once the readers have logged a first read, and the timeouts that remain (``HANG_S``,
``join``) only fire on a real hang.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import proc_workers as pw
from mi_crow.store import LayoutStore, LocalStore
from mi_crow.store._keys import GENERATION_FIELD, METADATA_FILE, generation_dir
from mi_crow.store.testing.store_tests import assert_same

TRIALS = int(os.environ.get("MI_CROW_STORE_CRASH_TRIALS", "8"))
SEED = int(os.environ.get("MI_CROW_STORE_CRASH_SEED", "20261128"))
# Kill delays are drawn uniformly from [0, KILL_SPAN x the measured duration of one call], from the
# writer's "start" (the kill may land inside the first call) or, in every other trial, from its first
# returned call (at least one call is done): about KILL_SPAN / 2 calls complete on average, and the
# kill lands at a uniformly random point of some call.
KILL_SPAN = 4.0
HANG_S = 300.0  # only a child that is stuck (or a machine that is not running it at all) reaches this


Backend = tuple[str, Callable[[], LayoutStore]]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """``(root, open)``: a store's name for the workers (``pw.open_root``), and how to open it here.

    Every test below runs on a local store and on an ObjectStore on the session's SeaweedFS server.
    """
    if request.param == "local":
        root = str(tmp_path / "store")
    else:
        server = request.getfixturevalue("seaweedfs")
        bucket = request.getfixturevalue("process_bucket")
        url = f"s3://{bucket}/{tmp_path.name}-{os.urandom(4).hex()}"
        root = pw.s3_root(url, server.store_config(), server.client_options())
    return root, lambda: pw.open_root(root)


@pytest.fixture(scope="module")
def process_bucket(seaweedfs: object) -> str:
    return seaweedfs.new_bucket("procs")  # type: ignore[attr-defined]


def wait_for_log(proc: object, log: str, ready: Callable[[list[str]], bool], what: str) -> list[str]:
    """Poll ``log`` until ``ready(lines)``; fail at once if the child exits first (with its log)."""
    deadline = time.monotonic() + HANG_S
    while True:
        lines = pw.read_log(log)
        if ready(lines):
            return lines
        code = proc.exitcode  # type: ignore[attr-defined]
        if code is not None:
            lines = pw.read_log(log)
            if ready(lines):
                return lines
            raise AssertionError(f"child exited with {code} before {what}; its log ends: {lines[-3:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"hang: no {what} within {HANG_S:.0f} s; log ends: {lines[-3:]}")
        time.sleep(0.002)


def stop_process(proc: object) -> None:
    """SIGKILL a child that is still running (after a failed check), so no test leaves one behind."""
    if proc.exitcode is None:  # type: ignore[attr-defined]
        proc.kill()  # type: ignore[attr-defined]
        proc.join(HANG_S)  # type: ignore[attr-defined]


def consistent(tensors: dict[str, dict[str, torch.Tensor]], v: int, layers: int) -> None:
    assert sorted(tensors) == [f"l{j}" for j in range(layers)], (v, sorted(tensors))
    for layer, keys in tensors.items():
        assert sorted(keys) == ["activations", "attention_mask"], (v, layer, sorted(keys))
        for key, t in keys.items():
            assert bool((t == v).all()), f"version {v}: {layer}/{key} holds {t.unique().tolist()[:4]}"


def check_after_crash(op: str, store: LayoutStore, done: list[int], started: list[int]) -> None:
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


def call_durations(start: float | None, calls: list[tuple[int, float]]) -> list[float]:
    """Seconds each logged call took: from the start line, then from the previous call's return."""
    stamps = ([] if start is None else [start]) + [t for _, t in calls]
    return [b - a for a, b in itertools.pairwise(stamps)]


def object_leftovers(store: LayoutStore) -> list[str]:
    """Objects of an ObjectStore that no commit references (what gc must remove), found from the
    listing and the commits themselves: every object of a batch or model folder must be its
    metadata.json or lie in the generation that metadata.json names."""
    out = []
    folders: dict[str, list[str]] = {}
    for info in store._list_tree(""):
        parts = info.key.split("/")
        depth = 3 if parts[0] == store.runs_prefix else 2
        if parts[0] in (store.runs_prefix, store.model_prefix) and len(parts) > depth:
            if parts[0] == store.runs_prefix and not parts[2].startswith("batch_"):
                continue
            folders.setdefault("/".join(parts[:depth]), []).append("/".join(parts[depth:]))
    for folder, names in folders.items():
        gen = None
        if METADATA_FILE in names:
            gen = json.loads(store._read_json_file(f"{folder}/{METADATA_FILE}")).get(GENERATION_FIELD)
        for name in names:
            if name != METADATA_FILE and (gen is None or not name.startswith(generation_dir(gen) + "/")):
                out.append(f"{folder}/{name}")
    return sorted(out)


@pytest.mark.parametrize("op", sorted(pw.CRASH_OPS))
def test_sigkill_at_random_instants(op: str, tmp_path: Path, backend: Backend) -> None:
    ctx = pw.context()
    root_name, open_store = backend
    root = Path(root_name)
    store = open_store()
    if op == "overwrite":
        store.put_detector_metadata("r", 0, {"v": 0}, pw.batch_tensors(0))
    if op == "model":
        store.put_model("m", {"w": torch.zeros(1), "b": torch.zeros(1)}, {"v": 0})
    rng = random.Random(f"{SEED}-{op}")
    done: list[int] = []
    started: list[int] = []
    durations: list[float] = []  # of every call logged so far in this test: this machine, this load
    trials: list[str] = []  # one line per trial, for the messages of failed checks
    for trial in range(TRIALS):
        log = str(tmp_path / f"log-{trial}")
        first = trial * 10_000 + 1
        started.append(first)
        # Even trials (and any trial before a duration was measured) count from the first returned
        # call, odd ones from the start; so both "killed inside the first call" and "killed after
        # several calls" happen, and every even trial has at least one call done.
        after_first = trial % 2 == 0 or not durations
        proc = ctx.Process(target=pw.crash_writer, args=(op, root_name, log, first))
        proc.start()
        try:
            if after_first:
                lines = wait_for_log(proc, log, lambda ls: len(ls) >= 2, "first returned call")
            else:
                lines = wait_for_log(proc, log, lambda ls: len(ls) >= 1, "start line")
            begin, calls, error = pw.parse_crash_log(lines)
            assert error is None and begin is not None, (lines, error)
            # The median of all calls measured so far; in the first trial, its first call.
            call_s = statistics.median(durations) if durations else calls[0][1] - begin
            origin = calls[0][1] if after_first else begin
            delay = rng.uniform(0, KILL_SPAN * call_s)
            time.sleep(max(0.0, origin + delay - time.monotonic()))
            lines = pw.read_log(log)
            assert proc.exitcode is None, f"writer exited with {proc.exitcode} before the kill: {lines[-3:]}"
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(HANG_S)
            assert proc.exitcode == -signal.SIGKILL, proc.exitcode
        finally:
            stop_process(proc)
        begin, calls, error = pw.parse_crash_log(pw.read_log(log))
        assert error is None, error
        durations += call_durations(begin, calls)
        trials.append(
            f"trial {trial}: from {'first call' if after_first else 'start'}, call {call_s * 1e3:.1f} ms,"
            f" kill after {delay * 1e3:.1f} ms, {len(calls)} calls done"
        )
        print(op, trials[-1])  # shown with the failure of any later check, or with -s
        if after_first:
            assert calls, trials[-1]
        done += [v for v, _ in calls]
        check_after_crash(op, store, done, started)
    # Every even trial waited for a returned call, so the checks above covered calls that had
    # returned before the kill; this only fails if that waiting is broken.
    assert done, f"no call completed in any trial: {trials}"
    # The store takes new writes after all those crashes, and they read back.
    pw.CRASH_OPS[op](store, 999_999)
    check_after_crash(op, store, [*done, 999_999], [*started, 999_999])
    # gc removes exactly the leftovers; what remains is the committed data, intact.
    if isinstance(store, LocalStore):
        before, leftovers = total_bytes(root), leftover_bytes(root)
        report = open_store().gc()
        assert report.bytes_freed == leftovers
        assert total_bytes(root) == before - leftovers
        assert leftover_bytes(root) == 0
    else:
        leftovers_s3 = object_leftovers(store)
        report = store.gc(grace_seconds=0)  # type: ignore[attr-defined]
        assert sorted(report.removed) == [store._where(k) for k in leftovers_s3]
        assert object_leftovers(store) == []
    assert store.check() == []
    check_after_crash(op, store, [*done, 999_999], [*started, 999_999])


def run_all(ctx: object, target: object, args_list: list[tuple[object, ...]]) -> None:
    procs = [ctx.Process(target=target, args=args) for args in args_list]  # type: ignore[attr-defined]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(HANG_S)  # a hang guard: a slow machine only makes this wait longer
            assert p.exitcode == 0, f"{target} exited with {p.exitcode}"
    finally:
        for p in procs:
            if p.pid is not None:
                stop_process(p)


class Readers:
    """``pw.reader`` children that are known to be reading once the ``with`` block starts.

    They are stopped (stop file, then join) when the block ends, also when it fails, and each
    one's JSON summary is in ``summaries`` afterwards.
    """

    def __init__(self, ctx: object, root: str, kind: str, tmp_path: Path, count: int) -> None:
        self.stop = str(tmp_path / f"stop-{kind}")
        self.logs = [str(tmp_path / f"reader-{kind}-{k}") for k in range(count)]
        self.procs = [ctx.Process(target=pw.reader, args=(root, kind, log, self.stop)) for log in self.logs]  # type: ignore[attr-defined]
        self.summaries: list[dict[str, object]] = []

    def __enter__(self) -> Readers:
        for r in self.procs:
            r.start()
        try:
            for r, log in zip(self.procs, self.logs, strict=True):
                wait_for_log(r, log, lambda ls: "ready" in ls, "first read")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        Path(self.stop).touch()
        try:
            for r, log in zip(self.procs, self.logs, strict=True):
                r.join(HANG_S)
                lines = pw.read_log(log)
                assert r.exitcode == 0, f"reader exited with {r.exitcode}; log ends: {lines[-3:]}"
                self.summaries.append(json.loads(lines[-1]))
        finally:
            for r in self.procs:
                stop_process(r)

    def check(self) -> None:
        """No reader saw an inconsistent entry, and each read until the writers were done."""
        assert len(self.summaries) == len(self.procs)
        for summary in self.summaries:
            assert summary["errors"] == []
            assert summary["stopped"] == "stop file"
            assert summary["reads"] > 0  # type: ignore[operator]


def test_concurrent_appenders_lose_nothing(tmp_path: Path, backend: Backend) -> None:
    ctx = pw.context()
    root, open_store = backend
    writers, count = 4, 20
    run_all(ctx, pw.appender, [(root, w, count) for w in range(writers)])
    store = open_store()
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


def test_concurrent_batch_writers_all_present(tmp_path: Path, backend: Backend) -> None:
    ctx = pw.context()
    root, open_store = backend
    run_all(ctx, pw.batch_writer, [(root, w, 10) for w in range(4)])
    store = open_store()
    assert store.list_run_batches("shared") == list(range(40))
    for i in range(40):
        meta, tensors = store.get_detector_metadata("shared", i)
        assert meta == {"idx": i}
        consistent(tensors, i, 2)


def test_readers_never_see_a_mix_while_processes_overwrite(
    tmp_path: Path, backend: tuple[str, Callable[[], LayoutStore]]
) -> None:
    ctx = pw.context()
    root, open_store = backend
    open_store().put_detector_metadata("shared", 0, {"v": 0}, pw.batch_tensors(0, layers=3, n=32 * 1024))
    with Readers(ctx, root, "batch", tmp_path, 2) as readers:
        run_all(ctx, pw.overwriter, [(root, w, 60) for w in range(2)])
    readers.check()
    meta, tensors = open_store().get_detector_metadata("shared", 0)
    assert meta["v"] in {59 + 1, 100_000 + 59 + 1}  # the last write of one of the writers
    consistent(tensors, meta["v"], 3)


def test_concurrent_run_metadata_last_writer_wins_never_torn(
    tmp_path: Path, backend: tuple[str, Callable[[], LayoutStore]]
) -> None:
    ctx = pw.context()
    root, open_store = backend
    with Readers(ctx, root, "metadata", tmp_path, 1) as readers:
        run_all(ctx, pw.metadata_writer, [(root, w, 40) for w in range(4)])
    readers.check()
    final = open_store().get_run_metadata("shared")
    assert final["i"] == 39 and final["pad"] == "y" * 20_000
