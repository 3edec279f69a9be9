"""Training reads from object storage: ActivationDataset against the raw client and litdata, on one SeaweedFS server.

    python benchmarks/streaming.py [--quick] [--rounds N] [--raw-concurrency 1,4]
                                   [--dataset-kwargs JSON] [--no-litdata] [--plot DIR]

Starts one SeaweedFS server (``weed mini``) on loopback and writes one run with ``ObjectStore``:
48 batches of one layer, [32, 128, 1024] bf16 (8 MiB, 4,096 rows a batch; 384 MiB in all; 4
batches with --quick). The same rows are written with litdata's ``optimize`` (one row an item,
stored as int16: litdata cannot serialise bf16 tensors) to ``s3://`` on the same server. Then
every candidate reads every row of the layer once per round, in rotating order:

- raw client: ``obstore.get`` of the run's tensor objects (found by listing the run's prefix:
  ``batch_{i}/.g{gen}/layer/activations.safetensors``) with 1 and with 4 objects in flight,
  each object's bytes turned into a tensor with ``torch.frombuffer`` after its safetensors header;
- ours: ``ActivationDataset(store, run, layer, batch_size=4096)``, ``shuffle=False`` and ``True``,
  through ``DataLoader(ds, batch_size=None, num_workers=0)`` and ``num_workers=2``;
- litdata: ``StreamingDataset`` (a new, empty cache directory each round, so it really streams)
  through ``StreamingDataLoader(ds, batch_size=4096, num_workers=0 / 2)``, ``shuffle=False``
  and ``True``.

Every yielded batch is checked: the row count and an exact, order-independent checksum of the
bits (the sum modulo 2**64 of the values' bytes read as uint64, in numpy: single-threaded, about
20 GB/s), compared with the written data's. An epoch's time runs from creating the DataLoader
(workers included) to its last batch; "first batch" is the time to the first one.

Each family runs in its own process (spawned once, commanded over a pipe): obstore cannot be
used in a process forked from one that used it, so the raw client, ours and litdata with 0
workers share one process, ours with 2 workers another (it lists the run before starting its
workers, as a training script reading the run's metadata does; workers are forked, DataLoader's
default, and where that raises they are spawned and the table says so), litdata with 2 workers a
third (its parent never starts obstore; its forked workers do).

litdata: its own pinned copy in ``.venv/peers`` (``./dev bench`` installs it there with
``--no-deps``, so .venv does not move; ``MI_CROW_BENCH_PEERS`` names another folder). Its
storage options name the endpoint and keys; its obstore client options (a module constant,
``litdata.streaming.downloader._OBSTORE_CLIENT_OPTIONS``) get ``allow_http`` so that it can reach
a plain-HTTP endpoint, in every process it runs in. Without litdata its rows are left out.

Prints a note and exits 0 where the ``weed`` binary or obstore is missing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import os
import shlex
import shutil
import struct
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    REPO,
    make_tensor,
    median,
    object_store_missing,
    parse_args,
    print_header,
    print_table,
    rotated,
    work_dir,
)

MiB = 2**20
SHAPE = (32, 128, 1024)
DTYPE = "bfloat16"
BATCH = 4096
RUN, LAYER, KEY = "run", "layer", "activations"
PREFIX = "bench"
LIT_PREFIX = "lit"
WORKERS = 2
# litdata's chunk size: the value of its README's examples (it has no default).
LIT_CHUNK_BYTES = "64MB"
PEERS = Path(os.environ.get("MI_CROW_BENCH_PEERS", REPO / ".venv" / "peers"))
# How long a DataLoader waits for a worker's batch before raising (a hung worker fails the run).
WORKER_TIMEOUT_S = 300

# (check, measured, target, met) for the summary table.
SUMMARY: list[list[Any]] = []
# Epochs that read wrong rows: what the check found.
WRONG: list[str] = []


def checksum(t: torch.Tensor) -> int:
    """The sum modulo 2**64 of ``t``'s bytes read as uint64: exact and independent of row order."""
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    return int(data.view(np.uint64).sum(dtype=np.uint64))


def fingerprints(t: torch.Tensor) -> np.ndarray:
    """The first 8 bytes of each row, as uint64 (unique per row of random data): to tell, where a
    checksum is wrong, which rows were missing, doubled or never written."""
    rows = t.contiguous().view(torch.uint8).numpy().reshape(t.shape[0], -1)
    return rows[:, :8].copy().view(np.uint64).ravel()


def diagnose(got: np.ndarray, expected: np.ndarray) -> str:
    """What a wrong epoch read: rows missing, read twice, or of no stored batch (by stored batch)."""
    rows_per = SHAPE[0] * SHAPE[1]
    order = np.argsort(expected)
    exp_sorted = expected[order]
    values, counts = np.unique(got, return_counts=True)
    pos = np.clip(np.searchsorted(exp_sorted, values), 0, len(exp_sorted) - 1)
    known = exp_sorted[pos] == values
    seen = np.zeros(len(expected), dtype=np.int64)
    seen[order[pos[known]]] = counts[known]
    missing = np.flatnonzero(seen == 0)
    doubled = np.flatnonzero(seen > 1)

    def by_batch(rows: np.ndarray) -> str:
        b, c = np.unique(rows // rows_per, return_counts=True)
        return ", ".join(f"{int(i)}: {int(n)}" for i, n in zip(b[:12], c[:12], strict=True)) + (
            " ..." if len(b) > 12 else ""
        )

    return (
        f"{len(missing)} rows missing (by stored batch: {by_batch(missing)}); {len(doubled)} read more than once"
        f" ({by_batch(doubled)}); {int(counts[~known].sum())} rows of no stored batch"
    )


def add_checks(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], (a[1] + b[1]) % 2**64


def batch_tensor(i: int) -> torch.Tensor:
    """Stored batch ``i`` of the run (the same tensor in every process)."""
    return make_tensor(SHAPE, DTYPE, seed=i)


# ---------------------------------------------------------------------- litdata


def litdata_missing() -> str | None:
    """Why litdata cannot be used here, or None (and its folder is then on sys.path)."""
    if str(PEERS) not in sys.path and PEERS.is_dir():
        sys.path.append(str(PEERS))  # after .venv's own packages: torch and numpy stay .venv's
    try:
        import litdata  # noqa: F401
    except ImportError as e:
        return f"litdata is not importable ({e}); ./dev bench installs it into {PEERS}"
    _litdata_allow_http()
    return None


def _litdata_allow_http() -> None:
    """Let litdata's obstore client reach a plain-HTTP endpoint (it sets client options of its own,
    which replace the AWS_ALLOW_HTTP it would otherwise read)."""
    import litdata.streaming.downloader as downloader

    downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = True


def litdata_rows(i: int) -> Iterator[torch.Tensor]:
    """litdata's items for stored batch ``i``: its rows, each an int16 view of the bf16 values."""
    _litdata_allow_http()  # in optimize's spawned workers too
    for row in batch_tensor(i).reshape(-1, SHAPE[-1]):
        yield row.clone().view(torch.int16)


def _optimize(conn: Any, spec: dict[str, Any], n: int, log: str) -> None:
    """In a fresh (spawned) process: litdata.optimize the run's rows to s3://bucket/lit; sends its seconds."""
    with open(log, "ab") as f:  # litdata prints progress bars and advice: keep them out of the tables
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        litdata_missing()
        import litdata

        t0 = time.perf_counter()
        litdata.optimize(
            fn=litdata_rows,
            inputs=list(range(n)),
            output_dir=f"s3://{spec['bucket']}/{LIT_PREFIX}",
            num_workers=1,  # one writer: the same chunks every run (2 split the items by timing)
            chunk_bytes=LIT_CHUNK_BYTES,
            storage_options=spec["litdata_options"],
            mode="overwrite",
        )
        conn.send({"seconds": time.perf_counter() - t0})
    except BaseException as e:
        conn.send({"error": f"{type(e).__name__}: {e}"})


# ---------------------------------------------------------------------- candidates (in driver processes)


class Driver:
    """The state of one driver process: clients, the run's keys, the litdata settings."""

    def __init__(self, spec: dict[str, Any], kind: str):
        self.spec = spec
        self.kind = kind
        self.root = Path(spec["root"])
        self.context: str | None = None  # the DataLoader workers' start method (None: the default)
        self.context_note = ""
        self.tried_default = False
        self.loaders: dict[bool, Any] = {}  # persistent DataLoaders, by shuffle
        self._store: Any = None
        self._client: Any = None
        if spec["litdata"]:
            litdata_missing()
        warnings.filterwarnings("ignore", message="The given buffer is not writable")

    @property
    def store(self) -> Any:
        if self._store is None:
            from mi_crow.store.object_store import ObjectStore

            s = self.spec
            self._store = ObjectStore(f"s3://{s['bucket']}/{PREFIX}", config=s["config"], client_options=s["options"])
        return self._store

    @property
    def client(self) -> Any:
        if self._client is None:
            from obstore.store import S3Store

            s = self.spec
            self._client = S3Store(s["bucket"], config=s["config"], client_options=s["options"])
        return self._client

    # -- one epoch of each candidate: (seconds, seconds to the first batch, (rows, checksum))

    @staticmethod
    def consume(
        make: Callable[[], Iterable[torch.Tensor]], view: torch.dtype | None = None, cap: float | None = None
    ) -> dict[str, Any]:
        """One epoch of ``make()``'s batches, each checked; stopped after ``cap`` seconds (``stopped``)."""
        t0 = time.perf_counter()
        first = None
        check = (0, 0)
        stopped = False
        prints = []
        loader = make()
        try:
            for b in loader:
                if first is None:
                    first = time.perf_counter() - t0
                if view is not None:
                    b = b.view(view)
                check = add_checks(check, (b.shape[0], checksum(b)))
                prints.append(fingerprints(b))
                if cap is not None and time.perf_counter() - t0 > cap:
                    stopped = True
                    break
        except RuntimeError as e:  # DataLoader(timeout=cap): no batch came from a worker for that long
            if cap is None or "timed out" not in str(e):
                raise
            stopped = True
        seconds = time.perf_counter() - t0
        if stopped:  # its workers are shut down now, untimed
            del loader
            gc.collect()
        out = {"seconds": seconds, "first": first or 0.0, "rows": check[0], "sum": check[1], "stopped": stopped}
        return out | {"cap": cap, "fingerprints": np.concatenate(prints).tobytes() if prints else b""}

    def raw(self, in_flight: int) -> dict[str, Any]:
        import obstore

        keys: list[str] = self.spec["keys"]
        client = self.client

        def fetch(key: str) -> torch.Tensor:
            data = obstore.get(client, key).bytes()
            # safetensors: an 8-byte little-endian header length, the JSON header, the tensors' bytes.
            (n,) = struct.unpack("<Q", memoryview(data)[:8])
            header = json.loads(bytes(memoryview(data)[8 : 8 + n]))
            (entry,) = (v for k, v in header.items() if k != "__metadata__")  # one tensor a file
            if entry["dtype"] != "BF16":
                raise ValueError(f"{key}: dtype {entry['dtype']}, expected BF16")
            start, end = entry["data_offsets"]
            t = torch.frombuffer(data, dtype=torch.bfloat16, offset=8 + n + start, count=(end - start) // 2)
            return t.view(-1, entry["shape"][-1])

        def gen() -> Iterator[torch.Tensor]:
            with ThreadPoolExecutor(in_flight) as pool:
                pending: deque[Future[torch.Tensor]] = deque()
                it = iter(keys)
                for key in it:
                    pending.append(pool.submit(fetch, key))
                    if len(pending) == in_flight:
                        break
                while pending:
                    t = pending.popleft().result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append(pool.submit(fetch, nxt))
                    yield from t.split(BATCH)

        return self.consume(gen)

    def ours(self, shuffle: bool, workers: int, persistent: bool = False) -> dict[str, Any]:
        from torch.utils.data import DataLoader

        from mi_crow.store import ActivationDataset

        def loader() -> DataLoader[torch.Tensor]:
            ds = ActivationDataset(
                self.store, RUN, LAYER, KEY, batch_size=BATCH, shuffle=shuffle, **self.spec["dataset_kwargs"]
            )
            if workers == 0:
                return DataLoader(ds, batch_size=None, num_workers=0)
            return DataLoader(
                ds,
                batch_size=None,
                num_workers=workers,
                multiprocessing_context=self.context,
                persistent_workers=persistent,
                timeout=WORKER_TIMEOUT_S,
            )

        if workers == 0:
            return self.consume(loader)
        # As a training script does: read the run (its batches) before the workers start.
        self.store.list_run_batches(RUN)
        if not persistent:
            return self.first_try(lambda: self.consume(loader))
        if shuffle not in self.loaders:  # started, and one epoch read, once (untimed)

            def warm() -> DataLoader[torch.Tensor]:
                dl = loader()
                self.consume(lambda: dl)
                return dl

            self.loaders[shuffle] = self.first_try(warm)
        dl = self.loaders[shuffle]
        return self.consume(lambda: dl)

    def first_try(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, with workers started the default way the first time; where that raises, with
        spawn from then on (the note says why)."""
        if self.tried_default:
            return fn()
        self.tried_default = True
        try:
            return fn()
        except Exception as e:
            self.context = "spawn"
            why = str(e).strip().splitlines()
            self.context_note = f"{self.spec['start_method']} raised {type(e).__name__}: {why[-1] if why else ''}"[:300]
        # The failed DataLoader's workers are shut down now, not during the next (timed) epoch.
        gc.collect()
        return fn()

    def litdata(self, shuffle: bool, workers: int) -> dict[str, Any]:
        import litdata

        cache = Path(tempfile.mkdtemp(prefix="lit-cache-", dir=self.root))

        def make() -> Iterable[torch.Tensor]:
            ds = litdata.StreamingDataset(
                f"s3://{self.spec['bucket']}/{LIT_PREFIX}",
                cache_dir=str(cache),
                shuffle=shuffle,
                storage_options=self.spec["litdata_options"],
            )
            # A worker that hands no batch for cap seconds stops the epoch (consume() catches it).
            kwargs: dict[str, Any] = {"timeout": self.spec["litdata_cap"]} if workers else {}
            return litdata.StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers, **kwargs)

        try:
            return self.consume(make, view=torch.bfloat16, cap=self.spec["litdata_cap"])
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def run(self, name: str) -> dict[str, Any]:
        fn = CANDIDATES[name][1]
        out = fn(self)
        out["context"] = self.context or self.spec["start_method"]
        out["context_note"] = self.context_note
        return out


# name -> (driver process, one epoch)
CANDIDATES: dict[str, tuple[str, Callable[[Driver], dict[str, Any]]]] = {}


def _candidates(raw_in_flight: list[int], with_litdata: bool, with_persistent: bool) -> None:
    CANDIDATES.clear()
    for k in raw_in_flight:
        CANDIDATES[f"raw obstore.get, {k} in flight"] = ("main", lambda d, k=k: d.raw(k))
    for workers, persistent in [(0, False), (WORKERS, False)] + ([(WORKERS, True)] if with_persistent else []):
        proc = "main" if workers == 0 else "ours-workers"
        for shuffle in (False, True):
            order = "shuffled" if shuffle else "sequential"
            kind = "persistent workers" if persistent else "workers"
            CANDIDATES[f"ours {order}, {workers} {kind}"] = (
                proc,
                lambda d, s=shuffle, w=workers, p=persistent: d.ours(s, w, p),
            )
    if with_litdata:
        for workers in (0, WORKERS):
            proc = "main" if workers == 0 else "litdata-workers"
            for shuffle in (False, True):
                order = "shuffled" if shuffle else "sequential"
                CANDIDATES[f"litdata {order}, {workers} workers"] = (
                    proc,
                    lambda d, s=shuffle, w=workers: d.litdata(s, w),
                )


def _driver_main(conn: Any, spec: dict[str, Any], kind: str) -> None:
    """A spawned driver: runs the parent's commands (a candidate's name) until None."""
    # A spawned process inherits "spawn" as its default start method; a training script started
    # from a shell has the platform's (fork on Linux before Python 3.14), which DataLoader uses.
    multiprocessing.set_start_method(spec["start_method"], force=True)
    _candidates(spec["raw_in_flight"], spec["litdata"], spec["persistent"])
    driver = Driver(spec, kind)
    conn.send("ready")
    while True:
        try:
            cmd = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if cmd is None:
            return
        what, arg = cmd
        if what == "keys":
            spec["keys"] = arg
            continue
        try:
            conn.send(driver.run(arg))
        except BaseException as e:
            conn.send({"error": f"{type(e).__name__}: {e}"})


# ---------------------------------------------------------------------- the parent


def extra_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 6; 1 with --quick)")
    p.add_argument("--batches", type=int, default=None, help="stored batches of 8 MiB (default 48; 4 with --quick)")
    p.add_argument(
        "--raw-concurrency",
        default=None,
        help="objects in flight for the raw client, comma-separated (default: 1 and ActivationDataset's read_ahead)",
    )
    p.add_argument(
        "--dataset-kwargs",
        default="{}",
        help="more ActivationDataset keyword arguments, as JSON (e.g. '{\"prefetch\": 4}')",
    )
    p.add_argument("--no-litdata", action="store_true", help="leave litdata out")
    p.add_argument(
        "--only", default=None, help="run only the readers whose names contain one of these texts, separated by '|'"
    )
    p.add_argument(
        "--litdata-cap",
        type=float,
        default=None,
        help="stop a litdata epoch after this many seconds; its rate is that of what it read (default 60; 2 quick)",
    )


def read_ahead_default() -> int:
    """ActivationDataset's default ``read_ahead`` (objects fetched concurrently), or 1 where it has none."""
    import inspect

    from mi_crow.store import ActivationDataset

    param = inspect.signature(ActivationDataset).parameters.get("read_ahead")
    return int(param.default) if param is not None and isinstance(param.default, int) else 1


def span(lo: float, hi: float) -> str:
    return f"{lo:.0f}-{hi:.0f}" if hi >= 100 else f"{lo:.2f}-{hi:.2f}"


@contextmanager
def started(ctx: Any, spec: dict[str, Any], kinds: list[str]) -> Iterator[dict[str, tuple[Any, Any]]]:
    """One spawned driver process per kind, stopped when the block ends."""
    drivers: dict[str, tuple[Any, Any]] = {}
    try:
        for kind in kinds:
            here, there = ctx.Pipe()
            # Not daemonic: the drivers start DataLoader workers of their own.
            proc = ctx.Process(target=_driver_main, args=(there, spec, kind))
            proc.start()
            drivers[kind] = (here, proc)
        yield drivers
    finally:
        for conn, _ in drivers.values():
            with suppress(OSError):
                conn.send(None)
        for _, proc in drivers.values():
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
                proc.join(10)


def write_run(spec: dict[str, Any], n: int) -> tuple[tuple[int, int], float, list[str], np.ndarray]:
    """Write the run with ObjectStore; (rows, checksum) of what was written, the seconds it took, and
    the object keys of its tensor files (listed: the ``.g{gen}/`` folder each batch's commit names)."""
    import obstore
    from obstore.store import S3Store

    from mi_crow.store.object_store import ObjectStore

    store = ObjectStore(f"s3://{spec['bucket']}/{PREFIX}", config=spec["config"], client_options=spec["options"])
    t0 = time.perf_counter()
    expected = (0, 0)
    prints = []
    for i in range(n):
        t = batch_tensor(i)
        store.put_detector_metadata(RUN, i, {"i": i}, {LAYER: {KEY: t}})
        expected = add_checks(expected, (t.numel() // SHAPE[-1], checksum(t)))
        prints.append(fingerprints(t.reshape(-1, SHAPE[-1])))
    write_s = time.perf_counter() - t0
    client = S3Store(spec["bucket"], config=spec["config"], client_options=spec["options"])
    listed = [o["path"] for chunk in obstore.list(client, f"{PREFIX}/runs/{RUN}/") for o in chunk]
    keys = []
    for i in range(n):
        mine = [k for k in listed if k.startswith(f"{PREFIX}/runs/{RUN}/batch_{i}/.g")]
        mine = [k for k in mine if k.endswith(f"/{LAYER}/{KEY}.safetensors")]
        if len(mine) != 1:
            raise SystemExit(f"expected one tensor object of batch {i}, listed {mine}")
        keys.append(mine[0])
    return expected, write_s, keys, np.concatenate(prints)


def write_litdata(ctx: Any, spec: dict[str, Any], n: int) -> str:
    """litdata.optimize the same rows to the same server, in a fresh process; a line saying how it went."""
    import obstore
    from obstore.store import S3Store

    log = Path(spec["root"]) / "litdata-optimize.log"
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_optimize, args=(there, spec, n, str(log)))  # not daemonic: it has workers
    proc.start()
    got = here.recv() if here.poll(1800) else {"error": "no answer in 30 minutes"}
    proc.join(60)
    if "error" in got:
        raise SystemExit(f"litdata.optimize failed: {got['error']}; its log, {log}:\n{log.read_text()[-4000:]}")
    client = S3Store(spec["bucket"], config=spec["config"], client_options=spec["options"])
    sizes = sorted(o["size"] for c in obstore.list(client, f"{LIT_PREFIX}/") for o in c)
    return (
        f"written by litdata.optimize (one row an item, 1 worker, chunk_bytes={LIT_CHUNK_BYTES!r}) in"
        f" {got['seconds']:.1f} s: {len(sizes)} objects, {sum(sizes) / MiB:.0f} MiB (largest {sizes[-1] / MiB:.1f} MiB)"
    )


def main() -> None:
    args = parse_args(__doc__, extra_args)
    n = args.batches or (4 if args.quick else 48)
    rounds = args.rounds or (1 if args.quick else 6)
    raw_in_flight = [int(x) for x in (args.raw_concurrency or f"1,{read_ahead_default()}").split(",") if x.strip()]
    dataset_kwargs = json.loads(args.dataset_kwargs)
    print_header("Training reads from object storage (SeaweedFS on loopback)")
    why = object_store_missing()
    if why is not None:
        print(f"note: skipped: {why}")
        return
    lit_why = "left out (--no-litdata)" if args.no_litdata else litdata_missing()
    with_litdata = lit_why is None
    import obstore

    from mi_crow.store.testing.seaweedfs import SeaweedFS

    command = f"python {shlex.join(sys.argv)}"
    print(f"command: {command}")
    versions = f"obstore {obstore.__version__}"
    if with_litdata:
        import litdata

        versions += f", litdata {litdata.__version__} (from {PEERS})"
    else:
        print(f"note: litdata {lit_why}")
    print(versions)
    t_start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with work_dir(args.dir) as root, SeaweedFS(data_dir=root / "seaweedfs") as server:
        bucket = server.new_bucket("stream")
        spec: dict[str, Any] = {
            "root": str(root),
            "bucket": bucket,
            "config": server.store_config(),
            "options": server.client_options(),
            "litdata_options": {
                "endpoint_url": server.endpoint,
                "aws_access_key_id": server.access_key,
                "aws_secret_access_key": server.secret_key,
                "region_name": server.region,
            },
            "raw_in_flight": raw_in_flight,
            "litdata": with_litdata,
            "dataset_kwargs": dataset_kwargs,
            "start_method": multiprocessing.get_start_method(),  # this script's: the default one
            "persistent": not args.quick,
            "litdata_cap": args.litdata_cap or (2.0 if args.quick else 60.0),
        }
        print(f"server: weed mini at {server.endpoint}, data in {root}")
        kinds = ["main", "ours-workers"] + (["litdata-workers"] if with_litdata else [])
        # The drivers start (importing torch) while the data is written.
        with started(ctx, spec, kinds) as drivers:
            expected, write_s, keys, expected_prints = write_run(spec, n)
            total_rows = expected[0]
            nbytes = total_rows * SHAPE[-1] * 2
            lit_line = write_litdata(ctx, spec, n) if with_litdata else ""
            # The drivers were started before the keys were known: tell them now.
            for kind, (conn, _) in drivers.items():
                if conn.recv() != "ready":
                    raise SystemExit(f"the {kind} driver did not start")
                conn.send(("keys", keys))
            t_rounds = time.perf_counter()
            _candidates(raw_in_flight, with_litdata, spec["persistent"])
            names = list(CANDIDATES)
            if args.only:
                names = [k for k in names if any(part.strip() in k for part in args.only.split("|"))]
                if not names:
                    raise SystemExit(f"--only {args.only!r} names no reader of {list(CANDIDATES)}")
            print(
                f"{n} batches of one layer, {list(SHAPE)} {DTYPE} ({SHAPE[0] * SHAPE[1]} rows of {SHAPE[-1]}, "
                f"{SHAPE[0] * SHAPE[1] * SHAPE[-1] * 2 / MiB:.0f} MiB an object), {total_rows} rows, "
                f"{nbytes / MiB:.0f} MiB; batch_size {BATCH}; {rounds} rounds in rotating order"
            )
            print(
                f"written by ObjectStore.put_detector_metadata in {write_s:.1f} s ({nbytes / MiB / write_s:.0f} MiB/s)"
            )
            if lit_line:
                print(lit_line)
            print()
            results: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
            for rep in range(rounds):
                t_round = time.perf_counter()
                for name in rotated(names, rep):
                    conn, _ = drivers[CANDIDATES[name][0]]
                    conn.send(("run", name))
                    out = conn.recv()
                    if "error" in out:
                        raise SystemExit(f"{name}: {out['error']}")
                    got = np.frombuffer(out.pop("fingerprints"), dtype=np.uint64)
                    if out["stopped"] and out["rows"] == expected[0]:
                        out["stopped"] = False  # the cap was passed on the epoch's last batch
                    if out["stopped"]:
                        wrong = (
                            out["rows"] > expected[0]
                            or len(np.unique(got)) != len(got)
                            or not np.isin(got, expected_prints).all()
                        )
                    else:
                        wrong = (out["rows"], out["sum"]) != expected
                    if wrong:  # recorded, and the script fails at the end; the other figures still count
                        WRONG.append(
                            f"round {rep + 1}, {name}: {out['rows']} rows, checksum {out['sum']} (expected"
                            f" {expected[0]}, {expected[1]}): {diagnose(got, expected_prints)}"
                        )
                        print(f"WRONG ROWS: {WRONG[-1]}", file=sys.stderr, flush=True)
                    results[name].append(out | {"wrong": wrong})
                print(
                    f"round {rep + 1} of {rounds}: {time.perf_counter() - t_round:.0f} s", file=sys.stderr, flush=True
                )
            phases = f"setup {t_rounds - t_start:.0f} s, rounds {time.perf_counter() - t_rounds:.0f} s"

    report(results, nbytes, total_rows, rounds, raw_in_flight, with_litdata)
    if args.quick:
        print("\n(--quick: small sizes and 1 round; the figures only show that the script runs)")
    print(f"\ncommand: {command}  ({time.perf_counter() - t_start:.0f} s: {phases}, then stopping the server)")
    if WRONG:
        print("\nWRONG ROWS (the figures of these epochs are in the tables all the same):")
        for line in WRONG:
            print(f"- {line}")
        raise SystemExit(1)


def results_cap(results: dict[str, list[dict[str, Any]]]) -> str:
    caps = {o.get("cap") for outs in results.values() for o in outs if o["stopped"]}
    return "/".join(f"{c:g}" for c in sorted(c for c in caps if c is not None))


def report(
    results: dict[str, list[dict[str, Any]]],
    nbytes: int,
    total_rows: int,
    rounds: int,
    raw_in_flight: list[int],
    with_litdata: bool,
) -> None:
    row_bytes = SHAPE[-1] * 2

    def rate(o: dict[str, Any]) -> float:
        """Rows per second of one epoch (or of what a stopped one read)."""
        return float(o["rows"]) / o["seconds"]

    rows = []
    stopped_any = False
    for name, outs in results.items():
        rates = [rate(o) for o in outs]
        mibs = [r * row_bytes / MiB for r in rates]
        after = [
            (o["rows"] - BATCH) * row_bytes / MiB / (o["seconds"] - o["first"])
            for o in outs
            if o["seconds"] > o["first"] and o["rows"] > BATCH
        ]
        stopped = sum(o["stopped"] for o in outs)
        wrong = sum(o["wrong"] for o in outs)
        if wrong:
            name = f"{name} (WRONG rows in {wrong} of {len(outs)} rounds)"
        stopped_any |= bool(stopped)
        epoch = f"{median([o['seconds'] for o in outs]):.2f} s"
        if stopped:
            epoch = f"stopped {stopped} of {len(outs)}: {median([o['rows'] / total_rows for o in outs]):.0%} read"
        rows.append(
            [
                name,
                epoch,
                f"{median(rates) / 1e6:.3f} M",
                median(mibs),
                span(min(mibs), max(mibs)),
                f"{median([o['first'] for o in outs]):.2f} s",
                median(after) if after else "",
            ]
        )
    print_table(
        [
            "reader",
            "median epoch",
            "rows/s",
            "MiB/s",
            "MiB/s range over rounds",
            "first batch",
            "MiB/s after the first batch",
        ],
        rows,
    )
    notes = {o["context_note"] for outs in results.values() for o in outs if o["context_note"]}
    ours_ctx = {o["context"] for n, outs in results.items() if n.startswith("ours") and " 0 " not in n for o in outs}
    print(
        f"\nAll rows checked every round (count and checksum) but where an epoch was stopped. Our {WORKERS} workers"
        f" started with: {', '.join(sorted(ours_ctx))}" + (f" ({'; '.join(sorted(notes))})" if notes else "") + "."
        " litdata's workers: fork (DataLoader's default; its parent process never starts obstore)."
    )
    if stopped_any:
        print(
            f"A litdata epoch that ran past {results_cap(results)} s was stopped there: its rate is that of the rows it"
            " had read (their count and checksums checked as they came); see RESULTS.md for why it is that slow."
        )

    def ratio(a: str, b: str) -> tuple[float, float, float] | None:
        """Per-round throughput ratio a / b (rows per second): median, min, max."""
        if not results.get(a) or not results.get(b):
            return None
        r = [rate(x) / rate(y) if rate(y) else math.inf for x, y in zip(results[a], results[b], strict=True)]
        return median(r), min(r), max(r)

    checks: list[tuple[str, str, str, float | None, bool]] = []  # (a, b, target text, bound, strictly above)
    widest = max(raw_in_flight)
    for k in sorted(raw_in_flight, reverse=True):
        bound, text = (0.8, ">= 0.8x") if k == widest else (None, "")
        checks.append(("ours sequential, 0 workers", f"raw obstore.get, {k} in flight", text, bound, False))
    kinds = ["0 workers", f"{WORKERS} workers", f"{WORKERS} persistent workers"]
    for kind in kinds[1:]:
        checks.append((f"ours sequential, {kind}", f"raw obstore.get, {widest} in flight", "", None, False))
    for kind in kinds:
        checks.append((f"ours shuffled, {kind}", f"ours sequential, {kind}", ">= 0.7x", 0.7, False))
    for kind in kinds[:2]:
        for order in ("sequential", "shuffled"):
            checks.append((f"ours {order}, {kind}", f"litdata {order}, {kind}", "> 1x", 1.0, True))
    ratio_rows = []
    for a, b, text, bound, strict in checks:
        got = ratio(a, b)
        if got is None:
            continue
        m, lo, hi = got
        met = "-" if bound is None else ("yes" if (m > bound if strict else m >= bound) else "NO")
        ratio_rows.append([f"{a} / {b}", m, f"{lo:.2f}-{hi:.2f}", text or "(none set)", met])
        SUMMARY.append(ratio_rows[-1])
    print()
    print_table(["throughput ratio (per round)", "median", "range over rounds", "target", "met"], ratio_rows)
    print(
        f"\nratios: per round, the first reader's rows per second over the second's; median and range over {rounds}"
        " rounds."
    )


if __name__ == "__main__":
    main()
