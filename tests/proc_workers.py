"""Code that runs in real child processes for the crash and concurrency tests.

Children come from a ``forkserver`` that has already imported torch and the store, so each
starts in milliseconds; they report progress by appending lines to a log file with single
``write`` calls (which survive the writer being SIGKILLed at any instant). Timestamps in the
logs are ``time.monotonic()``, which on Linux is one clock for all processes since boot, so the
parent can place its kill relative to what the child did. A child that raises logs an ``error``
line with its traceback, so the test reports it instead of waiting for a line that never comes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from mi_crow.store import LayoutStore, LocalStore

_CTX: Any = None


def context() -> Any:
    """A forkserver context whose server has torch and the store preloaded."""
    global _CTX
    if _CTX is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "mi_crow.store", "proc_workers"])
        _CTX = ctx
    return _CTX


def s3_root(url: str, config: dict[str, Any], client_options: dict[str, Any]) -> str:
    """A ``root`` naming an ObjectStore (for the workers below, which take a string)."""
    return json.dumps({"url": url, "config": config, "client_options": client_options})


def open_root(root: str) -> LayoutStore:
    """The store a worker's ``root`` names: a LocalStore's folder, or an ObjectStore (``s3_root``)."""
    if root.startswith("{"):
        from mi_crow.store.object_store import ObjectStore

        spec = json.loads(root)
        return ObjectStore(spec["url"], config=spec["config"], client_options=spec["client_options"])
    return LocalStore(root)


def log_line(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def read_log(path: str) -> list[str]:
    try:
        with open(path) as f:
            return [line for line in f.read().split("\n") if line]
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------- crash writers


def batch_tensors(v: int, layers: int = 3, n: int = 64 * 1024) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of version ``v`` is filled with ``v``: a mix of versions is visible."""
    return {
        f"l{j}": {"activations": torch.full((n,), float(v)), "attention_mask": torch.full((64,), v, dtype=torch.int64)}
        for j in range(layers)
    }


def _op_new_batch(store: LayoutStore, v: int) -> None:
    store.put_detector_metadata("r", v, {"v": v}, batch_tensors(v))


def _op_overwrite(store: LayoutStore, v: int) -> None:
    store.put_detector_metadata("r", 0, {"v": v}, batch_tensors(v))


def _op_run_batch(store: LayoutStore, v: int) -> None:
    store.put_run_batch("r", v % 4, {"a": torch.full((512 * 1024,), float(v)), "v": torch.tensor([v])})


def _op_run_metadata(store: LayoutStore, v: int) -> None:
    store.put_run_metadata("r", {"v": v, "pad": "x" * 200_000})


def _op_append(store: LayoutStore, v: int) -> None:
    store.put_run_detector_metadata("r", {"v": v}, batch_tensors(v, layers=2))


def _op_delete_run(store: LayoutStore, v: int) -> None:
    run = f"d{v}"
    for i in range(3):
        store.put_detector_metadata(run, i, {"v": v}, batch_tensors(v, layers=2))
    store.delete_run(run)


def _op_model(store: LayoutStore, v: int) -> None:
    store.put_model("m", {"w": torch.full((512 * 1024,), float(v)), "b": torch.full((8,), float(v))}, {"v": v})


CRASH_OPS: dict[str, Callable[[LayoutStore, int], None]] = {
    "new_batch": _op_new_batch,
    "overwrite": _op_overwrite,
    "run_batch": _op_run_batch,
    "run_metadata": _op_run_metadata,
    "append": _op_append,
    "delete_run": _op_delete_run,
    "model": _op_model,
}


def log_error(log: str) -> None:
    log_line(log, "error " + json.dumps(traceback.format_exc()))


def crash_writer(op: str, root: str, log: str, first: int) -> None:
    """Run ``op`` with versions first, first+1, ... until killed.

    Logs ``start T`` just before the first call, then ``V T`` after each version ``V`` whose call
    returned, ``T`` being ``time.monotonic()`` at that point.
    """
    try:
        store = open_root(root)
        log_line(log, f"start {time.monotonic()!r}")
        for v in range(first, first + 100_000):
            CRASH_OPS[op](store, v)
            log_line(log, f"{v} {time.monotonic()!r}")
    except BaseException:
        log_error(log)
        raise


def parse_crash_log(lines: list[str]) -> tuple[float | None, list[tuple[int, float]], str | None]:
    """``crash_writer``'s log: (start time, [(version, time it returned)], error traceback)."""
    start, calls, error = None, [], None
    for line in lines:
        head, _, rest = line.partition(" ")
        if head == "start":
            start = float(rest)
        elif head == "error":
            error = json.loads(rest)
        else:
            calls.append((int(head), float(rest)))
    return start, calls, error


# ---------------------------------------------------------------------- concurrent workers


def appender(root: str, writer: int, count: int) -> None:
    store = open_root(root)
    for i in range(count):
        value = writer * 1000 + i
        store.put_run_detector_metadata(
            "shared", {"writer": writer, "i": i}, {"l": {"x": torch.full((1000 + 37 * i,), value, dtype=torch.int64)}}
        )


def batch_writer(root: str, writer: int, count: int) -> None:
    store = open_root(root)
    for i in range(count):
        idx = writer * count + i
        store.put_detector_metadata("shared", idx, {"idx": idx}, batch_tensors(idx, layers=2, n=4096))


def overwriter(root: str, writer: int, count: int) -> None:
    store = open_root(root)
    for i in range(count):
        v = writer * 100_000 + i + 1
        store.put_detector_metadata("shared", 0, {"v": v}, batch_tensors(v, layers=3, n=32 * 1024))


def metadata_writer(root: str, writer: int, count: int) -> None:
    store = open_root(root)
    for i in range(count):
        store.put_run_metadata("shared", {"writer": writer, "i": i, "pad": "y" * 20_000})


def reader(root: str, kind: str, log: str, stop_file: str, hang_guard_s: float = 600.0) -> None:
    """Read continuously until ``stop_file`` exists; log a JSON summary (and any inconsistency).

    Logs ``ready`` after its first read, so the test can start the writers only once the reader is
    reading (however slowly this process was started). The reader always reads at least once and
    then stops at the first check that finds ``stop_file``; ``hang_guard_s`` only ends a reader
    whose test died without creating it, and the summary says which of the two stopped it.
    """
    try:
        store = open_root(root)
        reads: int = 0
        errors: list[str] = []
        seen: set[Any] = set()
        deadline = time.monotonic() + hang_guard_s
        stopped = "stop file"
        while True:
            try:
                if kind == "batch":
                    meta, tensors = store.get_detector_metadata("shared", 0)
                    v = meta["v"]
                    seen.add(v)
                    if len(tensors) != 3:
                        errors.append(f"v={v}: layers {sorted(tensors)}")
                    for layer, keys in tensors.items():
                        for key, t in keys.items():
                            if not bool((t == v).all()):
                                errors.append(f"v={v}: {layer}/{key} holds {t.unique().tolist()[:3]}")
                else:
                    meta = store.get_run_metadata("shared")
                    if meta:
                        seen.add((meta["writer"], meta["i"]))
                        if meta["pad"] != "y" * 20_000:
                            errors.append("torn metadata")
            except Exception as e:  # reported to the test, which fails on any
                errors.append(f"{type(e).__name__}: {e}")
            reads += 1
            if reads == 1:
                log_line(log, "ready")
            if os.path.exists(stop_file):
                break
            if time.monotonic() > deadline:
                stopped = "hang guard"
                break
        summary = {"reads": reads, "errors": errors[:20], "versions": len(seen), "stopped": stopped}
        log_line(log, json.dumps(summary))
    except BaseException:
        log_error(log)
        raise


def entry_order(root: str, log: str) -> None:
    store = open_root(root)
    order = [(m["writer"], m["i"]) for m, _ in store.iter_run_detector_metadata("shared")]
    log_line(log, json.dumps(order))


# ---------------------------------------------------------------------- capture


def capture_model() -> torch.nn.Module:
    torch.manual_seed(0)
    blocks = [torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0) for _ in range(3)]
    return torch.nn.Sequential(*blocks).eval()


def capture_input(i: int) -> torch.Tensor:
    return torch.randn(4, 64, 16, generator=torch.Generator().manual_seed(1000 + i))


def capturer(root: str, log: str, first: int) -> None:
    """Capture batches first, first+1, ... until killed, logging each forward call made."""
    from mi_crow.store import ActivationCapture

    model = capture_model()
    store = open_root(root)
    with ActivationCapture(model, store, "cap", ["0", "2"], dtype=torch.bfloat16) as cap, torch.no_grad():
        for i in range(cap.next_batch, cap.next_batch + 100_000):
            model(capture_input(i))
            log_line(log, str(i))


# ---------------------------------------------------------------------- capture from many processes

RANK_RUN = "ranks"
RANK_LAYERS = ["0", "2"]


def rank_model() -> torch.nn.Module:
    """A model whose weights and inputs are small integers: every activation is an exact integer
    in float32, whatever the BLAS, the thread count or the order of the sums."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_((torch.arange(p.numel()).reshape(p.shape) * (3 + i)) % 7 - 3)
    return model.eval()


def rank_input(g: int) -> torch.Tensor:
    """The input of global batch ``g``: 2 x (1 + g % 5) tokens x 8 features, small integers."""
    seq = 1 + g % 5
    return ((torch.arange(2 * seq * 8).reshape(2, seq, 8) + 7 * g) % 11 - 5).float()


def rank_tokens(g: int) -> int:
    return 2 * (1 + g % 5)


def rank_capturer(root: str, log: str, rank: int, world: int, total: int, from_env: bool) -> None:
    """Capture this rank's share of the global batches ``0..total-1`` into run ``RANK_RUN``.

    Logs ``enter NEXT COMPLETED RANK WORLD`` once the capture is entered, then each global batch
    ``g`` after its forward call, and ``done`` after the capture closed. It skips the first
    ``cap.completed`` of its own inputs (its share already stored) and checks that each input goes
    to index ``g``. ``from_env``: rank and world size come from ``RANK``/``WORLD_SIZE``.
    """
    from mi_crow.store import ActivationCapture

    try:
        model = rank_model()
        store = open_root(root)
        kwargs: dict[str, Any] = {}
        if from_env:
            os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
        else:
            kwargs = {"rank": rank, "world_size": world}
        with ActivationCapture(model, store, RANK_RUN, RANK_LAYERS, **kwargs) as cap, torch.no_grad():
            log_line(log, f"enter {cap.next_batch} {cap.completed} {cap.rank} {cap.world_size}")
            for g in range(rank, total, world)[cap.completed :]:
                if cap.next_batch != g:
                    raise AssertionError(f"rank {rank}: input of batch {g} would be stored at {cap.next_batch}")
                model(rank_input(g))
                log_line(log, str(g))
        log_line(log, "done")
    except BaseException:
        log_error(log)
        raise


def dist_capturer(root: str, log: str, rank: int, world: int, total: int, init_file: str) -> None:
    """:func:`rank_capturer` with no rank given, inside an initialized ``torch.distributed`` group
    (gloo, file rendezvous) while ``RANK``/``WORLD_SIZE`` hold values that would be refused: the
    group's rank and size win."""
    import torch.distributed as dist

    from mi_crow.store import ActivationCapture

    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        os.environ["RANK"], os.environ["WORLD_SIZE"] = "not-a-rank", "not-a-size"
        model = rank_model()
        store = open_root(root)
        with ActivationCapture(model, store, RANK_RUN, RANK_LAYERS) as cap, torch.no_grad():
            log_line(log, f"enter {cap.next_batch} {cap.completed} {cap.rank} {cap.world_size}")
            for g in range(rank, total, world)[cap.completed :]:
                model(rank_input(g))
                log_line(log, str(g))
        dist.barrier()
        dist.destroy_process_group()
        log_line(log, "done")
    except BaseException:
        log_error(log)
        raise


def metadata_updater(root: str, writer: int, count: int) -> None:
    """``count`` conditional updates of run ``shared``: a shared counter, and this writer's own list."""
    store = open_root(root)
    for i in range(count):
        store.update_run_metadata(
            "shared", lambda m, i=i: {**m, "count": m.get("count", 0) + 1, f"w{writer}": [*m.get(f"w{writer}", []), i]}
        )


def update_holder(root: str, log: str) -> None:
    """Start an ``update_run_metadata`` of run ``r`` whose update function logs ``inside`` and never
    returns (until this process is killed)."""
    import threading

    store = open_root(root)

    def hold(meta: dict[str, Any]) -> dict[str, Any]:
        log_line(log, "inside " + json.dumps(meta))
        threading.Event().wait()
        return meta

    try:
        store.update_run_metadata("r", hold)
    except BaseException:
        log_error(log)
        raise
