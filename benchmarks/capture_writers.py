"""Capture from many processes into one run: aggregate throughput of 1, 2 and 4 writers.

    python benchmarks/capture_writers.py [--quick] [--rounds N] [--plot DIR]

Each writer is a real process (spawned once, with its own store and client) capturing with
``ActivationCapture(model, store, run, layers, rank=r, world_size=W)`` into one run; the same total
work is split between the W writers (48 batches of 2 layers x [8, 128, 1024] bf16, 4 MiB a batch,
192 MiB in all; 8 batches with --quick), each taking every W-th. The model does nothing but hand
its input through two ``nn.Identity`` layers, so the time is the capture's own: copying the
activations out, writing the batches, merging each writer's counts into the run's metadata.
Measured on a LocalStore (in a temp dir) and on ObjectStore against one SeaweedFS server (``weed
mini`` on loopback, started and stopped here), rounds in rotating order; the time of one
measurement runs from a common start (CLOCK_MONOTONIC) to the last writer's end. After each, the
run is checked: batches exactly 0..N-1, ``capture.writers`` with W entries whose tokens add up to
``capture.tokens`` = every token captured. Prints a note and skips the object store where
``weed`` or obstore is missing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import torch
from _common import median, object_store_missing, parse_args, print_header, print_table, rotated, work_dir
from torch import nn

MiB = 2**20
SHAPE = (8, 128, 1024)  # one forward's input: [batch, tokens, d], bf16
LAYERS = ["0", "1"]
WRITERS = (1, 2, 4)


def model() -> nn.Module:
    return nn.Sequential(nn.Identity(), nn.Identity())


def open_spec(spec: dict[str, Any]) -> Any:
    """The store a backend's spec names (a LocalStore folder or an ObjectStore URL and settings)."""
    if spec["kind"] == "local":
        from mi_crow.store import LocalStore

        return LocalStore(spec["root"])
    from mi_crow.store.object_store import ObjectStore

    return ObjectStore(spec["url"], config=spec["config"], client_options=spec["options"])


def _writer(conn: Any, wid: int, specs: dict[str, dict[str, Any]]) -> None:
    """A spawned writer: one store per backend; captures what the parent asks for."""
    from mi_crow.store import ActivationCapture

    torch.set_num_threads(1)
    stores = {name: open_spec(spec) for name, spec in specs.items()}
    m = model()
    x = torch.randn(*SHAPE).to(torch.bfloat16)
    with torch.inference_mode():
        for store in stores.values():  # warm up: files, connections, the conditional-PUT check
            with ActivationCapture(m, store, f"warm-{wid}", LAYERS):
                m(x)
    conn.send("ready")
    while True:
        try:
            cmd = conn.recv()
        except (EOFError, OSError):
            return
        if cmd is None:
            return
        backend, run, rank, world, count, start_at = cmd
        try:
            while time.monotonic() < start_at:  # CLOCK_MONOTONIC is one clock for all processes
                time.sleep(0.001)
            t0 = time.monotonic()
            with (
                torch.inference_mode(),
                ActivationCapture(m, stores[backend], run, LAYERS, rank=rank, world_size=world),
            ):
                for _ in range(count):
                    m(x)
            conn.send({"start": t0, "end": time.monotonic()})
        except BaseException as e:
            conn.send({"error": f"{type(e).__name__}: {e}"})


@contextmanager
def writers(n: int, specs: dict[str, dict[str, Any]]) -> Iterator[list[Any]]:
    ctx = multiprocessing.get_context("spawn")
    procs: list[tuple[Any, Any]] = []
    try:
        for wid in range(n):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_writer, args=(there, wid, specs), daemon=True)
            proc.start()
            procs.append((here, proc))
        for conn, _ in procs:
            if conn.recv() != "ready":
                raise SystemExit("a writer did not start")
        yield [conn for conn, _ in procs]
    finally:
        for conn, _ in procs:
            with suppress(OSError):
                conn.send(None)
        for _, proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()


def check_run(store: Any, run: str, n: int, world: int) -> None:
    """The run holds batches 0..n-1 and metadata counting every writer's tokens."""
    got = store.list_run_batches(run)
    if got != list(range(n)):
        raise SystemExit(f"run {run}: batches {got}, expected 0..{n - 1}")
    capture = store.get_run_metadata(run).get("capture", {})
    tokens = n * SHAPE[0] * SHAPE[1]
    writers_ = capture.get("writers", {})
    if len(writers_) != world or sum(w.get("tokens", 0) for w in writers_.values()) != tokens:
        raise SystemExit(f"run {run}: capture.writers {writers_}, expected {world} writers of {tokens} tokens")
    if capture.get("tokens") != tokens:
        raise SystemExit(f"run {run}: capture.tokens {capture.get('tokens')}, expected {tokens}")


def extra_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 6; 1 with --quick)")


def main() -> None:
    args = parse_args(__doc__, extra_args)
    n = 8 if args.quick else 48
    rounds = args.rounds or (1 if args.quick else 6)
    command = f"python {shlex.join(sys.argv)}"
    print_header("Capture from 1, 2 and 4 processes into one run")
    print(f"command: {command}")
    t_start = time.perf_counter()
    why = object_store_missing()
    with work_dir(args.dir) as root:
        server_cm: Any = None
        specs: dict[str, dict[str, Any]] = {"LocalStore": {"kind": "local", "root": str(root / "local")}}
        if why is None:
            from mi_crow.store.testing.seaweedfs import SeaweedFS

            server_cm = SeaweedFS(data_dir=root / "seaweedfs")
            server = server_cm.start()
            bucket = server.new_bucket("capture")
            specs["ObjectStore (SeaweedFS)"] = {
                "kind": "s3",
                "url": f"s3://{bucket}/bench",
                "config": server.store_config(),
                "options": server.client_options(),
            }
        else:
            print(f"note: ObjectStore left out: {why}")
        try:
            measure(specs, n, rounds, args.quick)
        finally:
            if server_cm is not None:
                server_cm.stop()
    print(f"\ncommand: {command}  ({time.perf_counter() - t_start:.0f} s)")


def measure(specs: dict[str, dict[str, Any]], n: int, rounds: int, quick: bool) -> None:

    checkers = {name: open_spec(spec) for name, spec in specs.items()}
    batch_bytes = SHAPE[0] * SHAPE[1] * SHAPE[2] * 2 * len(LAYERS)
    total = n * batch_bytes
    print(
        f"{n} batches of {len(LAYERS)} layers x {list(SHAPE)} bf16 ({batch_bytes / MiB:.0f} MiB a batch, "
        f"{total / MiB:.0f} MiB in all) per measurement, split between the writers; {rounds} rounds in rotating order\n"
    )
    cands = [(backend, w) for backend in specs for w in WRITERS]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cands}
    with writers(max(WRITERS), specs) as conns:
        for rep in range(rounds):
            for backend, w in rotated(cands, rep):
                run = f"w{w}-r{rep}"
                start_at = time.monotonic() + 0.5
                for rank in range(w):
                    count = len(range(rank, n, w))  # rank r stores indices r, r + w, ...
                    conns[rank].send((backend, run, rank, w, count, start_at))
                outs = [conns[rank].recv() for rank in range(w)]
                for out in outs:
                    if "error" in out:
                        raise SystemExit(f"{backend}, {w} writers: {out['error']}")
                times[(backend, w)].append(max(o["end"] for o in outs) - min(o["start"] for o in outs))
                check_run(checkers[backend], run, n, w)
    rows = []
    for backend, w in cands:
        ts = times[(backend, w)]
        one = times[(backend, 1)]
        ratios = [a / b for a, b in zip(one, ts, strict=True)]  # throughput w / throughput 1, per round
        mibs = [total / MiB / t for t in ts]
        rows.append(
            [
                f"{backend}, {w} writer{'s' if w > 1 else ''}",
                f"{median(ts):.2f} s",
                median(mibs),
                f"{min(mibs):.0f}-{max(mibs):.0f}",
                median(ratios),
                f"{min(ratios):.2f}-{max(ratios):.2f}",
            ]
        )
    print_table(
        [
            "",
            "median wall time",
            "aggregate MiB/s",
            "MiB/s range",
            "vs 1 writer (throughput)",
            "range over rounds",
        ],
        rows,
    )
    print(
        f"\nmedians of {rounds} rounds; ratios per round (1 writer's time / W writers' time), median and range."
        " Every run checked afterwards: batches 0..N-1, capture.writers of W entries, capture.tokens = all tokens."
        " Each writer runs with torch.set_num_threads(1)."
    )
    if quick:
        print("\n(--quick: small sizes and 1 round; the figures only show that the script runs)")


if __name__ == "__main__":
    main()
