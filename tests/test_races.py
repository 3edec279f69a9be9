"""Races against the file system: a process swapping store directories for links to the outside,
planted lock files, ``delete_run`` racing an overwrite, and names planted for ``mi-crow-store ls``.

Every test is decided by what happened, never by how fast: loops run a fixed number of store
calls, the attacker runs until told to stop, and anything that could block runs on a daemon
thread joined with a generous guard (a hang is a failure, not a stuck test run).
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch as st
import torch
from click.testing import CliRunner

import proc_workers as pw
import race_workers as rw
from mi_crow.store import CorruptFileError, LocalStore
from mi_crow.store.cli import main as cli_main

LEFTOVER_PREFIXES = (".tmp-", ".stage-", ".trash-")
LOCK_NAME = ".mi-crow-store.lock"

# Store calls made while the attacker swaps (scale up with the environment variable).
RACE_CALLS = int(os.environ.get("MI_CROW_STORE_RACE_CALLS", "3000"))
RACE_SEED = int(os.environ.get("MI_CROW_STORE_RACE_SEED", "20261128"))
# The attacker must have swapped this often for the test to mean anything (it swaps these many
# times before the store calls even begin).
MIN_SWAPS = 10
# Hang guards (seconds): generous, only ever reached when something blocks.
GUARD_S = 60.0
LOOP_GUARD_S = 300.0

# What a store call may raise while an attacker swaps directories under it: a missing entry, a
# refused link or a non-conforming file, refused input (CorruptMetadataError/InvalidJSONError are
# ValueErrors too). Anything else (a bare OSError such as ENOTDIR or ENOTEMPTY, TypeError,
# RecursionError) is a failure.
DOCUMENTED_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, CorruptFileError, ValueError)
# What an overwrite racing delete_run may raise (no damage, no bad input): its run vanished under
# it. delete_run itself raises nothing ("a missing run is not an error", and nothing else is wrong).
DELETE_RACE_ERRORS: dict[str, tuple[type[BaseException], ...]] = {
    "put_detector_metadata": (FileNotFoundError,),
    "delete_run": (),
}

# Store-written data carries STORE / values >= STORE_VALUE; outside sentinels carry OUTSIDE / -666.
STORE = "STORE"
OUTSIDE = "OUTSIDE"
STORE_VALUE = 1000.0
OUTSIDE_VALUE = -666.0
# The key of every per-batch tensor: get_run_batch reads "activations" of the per-batch layout too.
KEY = "activations"

# Directories the attacker swaps (relative to the store and to the outside twin).
ATTACK_TARGETS = [
    "runs",
    "runs/r",
    "runs/r/batch_0",
    "runs/r/batch_0/l",
    "runs/r/detectors",
    "runs/r/detectors/.entries",
    "models",
    "models/m",
]


# ---------------------------------------------------------------------- helpers


def run_guarded(fn: Callable[[], None], guard_s: float = GUARD_S, what: str = "the store calls") -> None:
    """Run ``fn`` on a daemon thread; fail if it has not returned after ``guard_s`` seconds."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(guard_s)
    if thread.is_alive():
        pytest.fail(f"{what} did not return within {guard_s:.0f} s: something blocks")
    if errors:
        raise errors[0]


Record = tuple[Any, ...]


def snapshot(root: Path, *, contents: bool) -> dict[str, Record]:
    """Every path under ``root`` (and ``root``), never following links: type, mode, inode, size,
    mtime and ctime (a file or directory created and removed again changes its directory's), and
    with ``contents`` each file's bytes and each link's target."""
    out: dict[str, Record] = {}

    def record(path: str) -> None:
        s = os.lstat(path)
        rec: Record = (stat.S_IFMT(s.st_mode), s.st_mode, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
        if contents and stat.S_ISREG(s.st_mode):
            with open(path, "rb") as f:
                rec += (f.read(),)
        elif contents and stat.S_ISLNK(s.st_mode):
            rec += (os.readlink(path),)
        out[os.path.relpath(path, root)] = rec

    record(str(root))
    for dirpath, dirnames, filenames in os.walk(root):  # does not descend into links
        for name in dirnames + filenames:
            record(os.path.join(dirpath, name))
    return out


def describe_diff(before: dict[str, Record], after: dict[str, Record]) -> list[str]:
    lines = [f"created: {p}" for p in sorted(after.keys() - before.keys())]
    lines += [f"deleted or moved: {p}" for p in sorted(before.keys() - after.keys())]
    for p in sorted(before.keys() & after.keys()):
        if before[p] != after[p]:
            what = ["type", "mode", "inode", "size", "mtime", "ctime", "contents"]
            changed = [what[k] for k in range(len(before[p])) if before[p][k] != after[p][k]]
            lines.append(f"changed ({', '.join(changed)}): {p}")
    return lines


def leftovers_under(root: Path) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, n), root)
        for d, dirs, files in os.walk(root)
        for n in dirs + files
        if n.startswith(LEFTOVER_PREFIXES)
    )


def outside_tensor_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    st.save_file(tensors, str(path), metadata=metadata)


def write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def build_outside(outside: Path) -> None:
    """A tree laid out like a store (the twin of every attacked directory), holding sentinels
    that carry OUTSIDE, extra entries a listing must never show (batch 7, ``zz-outside-*``), and
    names like gc leftovers that a gc following a link would remove."""
    bad = torch.full((4,), OUTSIDE_VALUE)
    run = outside / "runs/r"
    write_json(run / "meta.json", {"marker": OUTSIDE, "i": -1})
    for b in (0, 7):
        write_json(
            run / f"batch_{b}/metadata.json", {"marker": OUTSIDE, "i": -1, "_tensor_metadata_names": {"l": [KEY]}}
        )
        outside_tensor_file(run / f"batch_{b}/l/activations.safetensors", {"tensor": bad})
        outside_tensor_file(run / f"batch_{b:06d}.safetensors", {"a": bad}, {"mi_crow_store.kind": "dict"})
    outside_tensor_file(run / "extra/t", {"tensor": bad})
    write_json(
        run / "detectors/metadata.json",
        {"batches": [{"marker": OUTSIDE, "i": -1, "_tensor_metadata_names": {"l": [KEY]}}]},
    )
    outside_tensor_file(run / "detectors/l/activations.safetensors", {"batch_0": bad})
    entry = json.dumps({"metadata": {"marker": OUTSIDE, "i": -1}, "tensors": {"l": [KEY]}})
    outside_tensor_file(
        run / "detectors/.entries/000000000000.safetensors", {"l/activations": bad}, {"mi_crow_store.entry": entry}
    )
    write_json(outside / "runs/zz-outside-run/meta.json", {"marker": OUTSIDE})
    for model in ("m", "zz-outside-model"):
        write_json(outside / f"models/{model}/metadata.json", {"marker": OUTSIDE, "i": -1})
        outside_tensor_file(outside / f"models/{model}/model.safetensors", {"w": bad}, {"format": "pt"})
    # Names a gc that followed a link would take for its own leftovers.
    for d in [outside, *(outside / t for t in ATTACK_TARGETS), run / "batch_7", run / "extra"]:
        (d / ".tmp-x").write_bytes(b"sentinel: not a leftover of this store")
    for name in (".stage-old", ".trash-old"):
        (run / name / "l").mkdir(parents=True)
        (run / name / "l/activations.safetensors").write_bytes(b"sentinel")
    (outside / "runs/.trash-old").mkdir()
    (outside / "runs/.trash-old/f").write_bytes(b"sentinel")
    os.utime(outside / "runs/r/meta.json", ns=(1_000_000_000, 1_000_000_000))  # an mtime nothing else has


# ---------------------------------------------------------------------- test 1: the attacker


class ForeignData(Exception):
    """A read returned data the store did not write (an outside sentinel)."""


def store_tensor(i: int) -> torch.Tensor:
    return torch.full((4,), STORE_VALUE + i)


def check_tensor(t: Any, what: str, i: int | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or bool((t < STORE_VALUE).any()):
        raise ForeignData(f"{what}: {t!r} is not a tensor this store wrote")
    if i is not None and not bool((t == STORE_VALUE + i).all()):
        raise ForeignData(f"{what}: holds {t.unique().tolist()[:4]}, but its metadata says version {i}")


def check_meta(meta: Any, what: str) -> int:
    if not isinstance(meta, dict) or meta.get("marker") != STORE or not isinstance(meta.get("i"), int):
        raise ForeignData(f"{what}: {meta!r} is not metadata this store wrote")
    return int(meta["i"])


def op_put_run_metadata(s: LocalStore, i: int) -> None:
    s.put_run_metadata("r", {"marker": STORE, "i": i})


def op_get_run_metadata(s: LocalStore, i: int) -> None:
    meta = s.get_run_metadata("r")
    if meta:
        check_meta(meta, "get_run_metadata")


def op_put_detector_metadata(s: LocalStore, i: int) -> None:
    s.put_detector_metadata("r", 0, {"marker": STORE, "i": i}, {"l": {KEY: store_tensor(i)}})


def op_put_detector_metadata_1(s: LocalStore, i: int) -> None:
    s.put_detector_metadata("r", 1, {"marker": STORE, "i": i}, {"l": {KEY: store_tensor(i)}})


def op_get_detector_metadata(s: LocalStore, i: int) -> None:
    meta, tensors = s.get_detector_metadata("r", 0)
    if meta or tensors:
        v = check_meta(meta, "get_detector_metadata")
        if sorted(tensors) != ["l"] or sorted(tensors["l"]) != [KEY]:
            raise ForeignData(f"get_detector_metadata: layers/keys {tensors!r}")
        check_tensor(tensors["l"][KEY], "get_detector_metadata", v)


def op_get_by_layer_by_key(s: LocalStore, i: int) -> None:
    check_tensor(s.get_detector_metadata_by_layer_by_key("r", 0, "l", KEY), "get_detector_metadata_by_layer_by_key")


def op_put_run_batch(s: LocalStore, i: int) -> None:
    s.put_run_batch("r", 0, {"a": store_tensor(i)})


def check_run_batch(batch: Any, what: str) -> None:
    items = batch.items() if isinstance(batch, dict) else enumerate(batch)
    if not batch:
        raise ForeignData(f"{what}: empty batch {batch!r}; the store never wrote one")
    for name, t in items:
        check_tensor(t, f"{what}[{name!r}]")


def op_get_run_batch(s: LocalStore, i: int) -> None:
    check_run_batch(s.get_run_batch("r", 0), "get_run_batch")


def op_list_run_batches(s: LocalStore, i: int) -> None:
    listed = s.list_run_batches("r")
    if not set(listed) <= {0, 1}:
        raise ForeignData(f"list_run_batches lists {listed}: batch 7 exists only outside the store")


def op_iter_run_batches(s: LocalStore, i: int) -> None:
    for batch in s.iter_run_batches("r"):
        check_run_batch(batch, "iter_run_batches")


def op_put_run_detector_metadata(s: LocalStore, i: int) -> None:
    s.put_run_detector_metadata("r", {"marker": STORE, "i": i}, {"l": {KEY: store_tensor(i)}})


def op_iter_run_detector_metadata(s: LocalStore, i: int) -> None:
    for meta, tensors in s.iter_run_detector_metadata("r"):
        v = check_meta(meta, "iter_run_detector_metadata")
        check_tensor(tensors.get("l", {}).get(KEY), "iter_run_detector_metadata", v)


def op_put_model(s: LocalStore, i: int) -> None:
    s.put_model("m", {"w": store_tensor(i)}, {"marker": STORE, "i": i})


def op_get_model(s: LocalStore, i: int) -> None:
    tensors, meta = s.get_model("m")
    v = check_meta(meta, "get_model")
    if sorted(tensors) != ["w"]:
        raise ForeignData(f"get_model: tensors {sorted(tensors)}")
    check_tensor(tensors["w"], "get_model", v)


def op_list_runs(s: LocalStore, i: int) -> None:
    runs = s.list_runs()
    if not set(runs) <= {"r"}:
        raise ForeignData(f"list_runs lists {runs}: only run 'r' is in the store")


def op_list_models(s: LocalStore, i: int) -> None:
    models = s.list_models()
    if not set(models) <= {"m"}:
        raise ForeignData(f"list_models lists {models}: only model 'm' is in the store")


def op_put_tensor(s: LocalStore, i: int) -> None:
    s.put_tensor("runs/r/extra/t", store_tensor(i))


def op_get_tensor(s: LocalStore, i: int) -> None:
    check_tensor(s.get_tensor("runs/r/extra/t"), "get_tensor")


def op_gc(s: LocalStore, i: int) -> None:
    s.gc()


def op_check(s: LocalStore, i: int) -> None:
    problems = s.check()
    if not isinstance(problems, list):
        raise ForeignData(f"check() returned {problems!r}")


def op_delete_model(s: LocalStore, i: int) -> None:
    s.delete_model("m")


def op_delete_run(s: LocalStore, i: int) -> None:
    s.delete_run("r")


# One cycle: writes first (so the attacked directories exist most of the time), reads, then deletes.
STORE_OPS: list[Callable[[LocalStore, int], None]] = [
    op_put_run_metadata,
    op_put_detector_metadata,
    op_put_run_batch,
    op_put_run_detector_metadata,
    op_put_model,
    op_put_tensor,
    op_put_detector_metadata_1,
    op_get_run_metadata,
    op_get_detector_metadata,
    op_get_by_layer_by_key,
    op_get_run_batch,
    op_list_run_batches,
    op_iter_run_batches,
    op_iter_run_detector_metadata,
    op_get_model,
    op_list_runs,
    op_list_models,
    op_get_tensor,
    op_put_detector_metadata,
    op_get_detector_metadata,
    op_gc,
    op_check,
    op_delete_model,
    op_delete_run,
]


@dataclass
class LoopResult:
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    first_violation: int | None = None
    outside_first_changed: str | None = None
    calls: int = 0


def store_loop(store: LocalStore, outside: Path, calls: int, result: LoopResult) -> None:
    """Make ``calls`` store calls, cycling through ``STORE_OPS``; record every outcome."""
    quick = snapshot(outside, contents=False)
    for i in range(calls):
        op = STORE_OPS[i % len(STORE_OPS)]
        name = op.__name__.removeprefix("op_")
        try:
            op(store, i)
            outcome = "ok"
        except ForeignData as e:
            outcome = "FOREIGN DATA"
            result.violations.append(f"call {i} ({name}): {e}")
        except DOCUMENTED_ERRORS as e:
            outcome = type(e).__name__
        except Exception as e:
            outcome = f"UNDOCUMENTED {type(e).__name__}"
            result.violations.append(f"call {i} ({name}): undocumented {type(e).__name__}: {e}")
        result.outcomes[(name, outcome)] += 1
        result.calls = i + 1
        if result.violations and result.first_violation is None:
            result.first_violation = i
        if result.outside_first_changed is None and snapshot(outside, contents=False) != quick:
            changes = describe_diff(quick, snapshot(outside, contents=False))
            result.outside_first_changed = f"call {i} ({name}): {changes[:3]}"


def wait_for_log(log: str, line: str, proc: Any) -> None:
    """Wait until the attacker logged ``line`` (it logs each of its first swaps)."""
    deadline = time.monotonic() + GUARD_S  # a hang guard only
    while line not in pw.read_log(log):
        if not proc.is_alive():
            pytest.fail(f"the attacker exited ({proc.exitcode}) before logging {line!r}: {pw.read_log(log)[-3:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the attacker did not log {line!r} within {GUARD_S:.0f} s: {pw.read_log(log)[-3:]}")
        time.sleep(0.005)


def seed_store(store: LocalStore) -> None:
    """Write every entry once, so every attacked directory exists when the attacker starts."""
    for op in STORE_OPS[:7]:
        op(store, 0)


def test_symlink_swapping_attacker_touches_nothing_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    build_outside(outside)
    before = snapshot(outside, contents=True)
    store_root = tmp_path / "s"
    store = LocalStore(store_root)
    seed_store(store)

    log, stop = str(tmp_path / "attacker.log"), str(tmp_path / "stop")
    proc = pw.context().Process(
        target=rw.symlink_attacker,
        args=(str(store_root), str(outside), ATTACK_TARGETS, log, stop, 50_000_000, RACE_SEED),
        daemon=True,
    )
    proc.start()
    result = LoopResult()
    try:
        wait_for_log(log, f"swaps {MIN_SWAPS}", proc)
        run_guarded(lambda: store_loop(store, outside, RACE_CALLS, result), LOOP_GUARD_S, "the store loop")
    finally:
        Path(stop).touch()
        proc.join(GUARD_S)
        if proc.is_alive():  # pragma: no cover - the attacker ignored the stop file
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
    assert proc.exitcode == 0, f"the attacker failed ({proc.exitcode}): {pw.read_log(log)[-3:]}"
    done = pw.read_log(log)[-1].split()
    assert done[0] == "done", pw.read_log(log)[-3:]
    swaps, attempts = int(done[1]), int(done[2])

    after = snapshot(outside, contents=True)
    new_leftovers = [p for p in after.keys() - before.keys() if Path(p).name.startswith(LEFTOVER_PREFIXES)]
    summary = (
        f"{result.calls} store calls, attacker: {swaps} swaps in {attempts} attempts; "
        f"outcomes: {dict(sorted(result.outcomes.items()))}"
    )
    failures: list[str] = []
    if new_leftovers:
        failures.append(f"temp/stage/trash names appeared outside the store: {sorted(new_leftovers)}")
    if after != before:
        failures.append(
            f"the outside tree changed (first seen after {result.outside_first_changed}): "
            + "; ".join(describe_diff(before, after)[:20])
        )
    if result.violations:
        failures.append(
            f"{len(result.violations)} bad call(s), the first at call {result.first_violation}: "
            + " | ".join(result.violations[:8])
        )
    print(summary)  # shown with -s: how hard the attacker pushed, and what the store answered
    assert not failures, "\n".join([*failures, summary])
    assert result.calls == RACE_CALLS
    assert swaps >= MIN_SWAPS, summary


# ---------------------------------------------------------------------- test 2: planted lock file


def failing_writes(store: LocalStore) -> list[tuple[str, Callable[[], object]]]:
    t = {"l": {"k": torch.ones(2)}}
    return [
        ("put_run_metadata", lambda: store.put_run_metadata("r", {"v": 1})),
        ("put_detector_metadata", lambda: store.put_detector_metadata("r", 0, {}, t)),
        ("put_run_batch", lambda: store.put_run_batch("r", 0, [torch.ones(2)])),
        ("put_run_detector_metadata", lambda: store.put_run_detector_metadata("r", {}, t)),
        ("put_model", lambda: store.put_model("m", {"w": torch.ones(2)}, {})),
        ("put_tensor", lambda: store.put_tensor("datasets/x", torch.ones(2))),
        ("delete_run", lambda: store.delete_run("r")),
    ]


@pytest.mark.parametrize("plant", ["link-to-absent-outside", "dangling-link", "link-to-existing-outside", "fifo"])
def test_planted_lock_symlink_creates_nothing_outside(plant: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"sentinel")
    base = tmp_path / "s"
    base.mkdir()
    lock = base / LOCK_NAME
    if plant == "link-to-absent-outside":
        lock.symlink_to(outside / "lockfile")
    elif plant == "dangling-link":
        lock.symlink_to(tmp_path / "nowhere" / "lockfile")
    elif plant == "link-to-existing-outside":
        (outside / "lockfile").write_bytes(b"not the store's lock")
        lock.symlink_to(outside / "lockfile")
    else:
        os.mkfifo(lock)
    before = snapshot(outside, contents=True)
    store = LocalStore(base)
    outcomes: dict[str, str] = {}

    def attempt_all() -> None:
        for name, call in failing_writes(store):
            try:
                call()
                outcomes[name] = "returned"
            except CorruptFileError as e:
                outcomes[name] = "CorruptFileError" if LOCK_NAME in str(e) else f"CorruptFileError not naming it: {e}"
            except Exception as e:
                outcomes[name] = f"{type(e).__name__}: {e}"
        try:
            store.gc()
            outcomes["gc"] = "returned"
        except CorruptFileError:
            outcomes["gc"] = "CorruptFileError"
        except Exception as e:
            outcomes["gc"] = f"{type(e).__name__}: {e}"
        outcomes["list_runs"] = repr(store.list_runs())
        outcomes["list_models"] = repr(store.list_models())

    run_guarded(attempt_all, GUARD_S, f"writes with a planted {plant} lock")
    assert not (outside / "lockfile").exists() or plant == "link-to-existing-outside"
    assert not (tmp_path / "nowhere").exists()
    assert snapshot(outside, contents=True) == before, describe_diff(before, snapshot(outside, contents=True))
    # Every write refuses the lock (delete_run of a missing run is a no-op: it may return).
    expected = {name: "CorruptFileError" for name, _ in failing_writes(store)}
    assert outcomes["delete_run"] in {"returned", "CorruptFileError"}, outcomes
    expected["delete_run"] = outcomes["delete_run"]
    assert outcomes["gc"] in {"returned", "CorruptFileError"}, outcomes
    expected["gc"] = outcomes["gc"]
    expected["list_runs"] = expected["list_models"] = "[]"  # a failed write on a new entry leaves none behind
    assert outcomes == expected, outcomes
    assert leftovers_under(base) == [], leftovers_under(base)


# ---------------------------------------------------------------------- test 3: delete_run vs overwrite

OVERWRITE_ROUNDS = int(os.environ.get("MI_CROW_STORE_DELETE_RACE_ROUNDS", "150"))
BATCHES = 4


def batch_of(v: int) -> dict[str, dict[str, torch.Tensor]]:
    return {f"l{j}": {"k": torch.full((256,), v, dtype=torch.int64), "m": torch.full((3,), v)} for j in range(2)}


def test_delete_run_racing_overwrite(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    run_dir = tmp_path / "s/runs/r"
    start = threading.Barrier(2)
    writer_done = threading.Event()
    errors: list[tuple[str, BaseException]] = []
    deletes_racing = 0

    def writer() -> None:
        try:
            start.wait()
            for rnd in range(OVERWRITE_ROUNDS):
                for b in range(BATCHES):
                    v = rnd * BATCHES + b + 1
                    try:
                        store.put_detector_metadata("r", b, {"v": v, "b": b}, batch_of(v))
                    except Exception as e:
                        errors.append(("put_detector_metadata", e))
        finally:
            writer_done.set()

    def deleter() -> None:
        nonlocal deletes_racing
        start.wait()
        for _ in range(OVERWRITE_ROUNDS * BATCHES):
            # Each delete waits for the run to be there again (or for the writer to be done),
            # so that it meets a write rather than a missing run: decided by events, not time.
            while not run_dir.exists() and not writer_done.is_set():
                time.sleep(0)
            if not writer_done.is_set():
                deletes_racing += 1
            try:
                store.delete_run("r")
            except Exception as e:
                errors.append(("delete_run", e))

    threads = [threading.Thread(target=f, daemon=True) for f in (writer, deleter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LOOP_GUARD_S)
        assert not t.is_alive(), "a writer or deleter did not finish: something blocks"
    kinds = Counter(f"{who}: {type(e).__name__}" for who, e in errors)
    bad = [f"{who}: {type(e).__name__}: {e}" for who, e in errors if not isinstance(e, DELETE_RACE_ERRORS[who])]
    assert bad == [], f"undocumented errors ({deletes_racing} deletes met a write; all errors {dict(kinds)}): {bad[:5]}"
    left = leftovers_under(tmp_path / "s")
    assert left == [], f"leftovers after {deletes_racing} deletes met a write (errors {dict(kinds)}): {left}"
    # The run is absent, or each of its batches reads back as exactly one version.
    for i in store.list_run_batches("r"):
        meta, tensors = store.get_detector_metadata("r", i)
        assert meta.get("b") == i, (i, meta)
        v = meta["v"]
        assert sorted(tensors) == ["l0", "l1"], (i, sorted(tensors))
        for layer, keys in tensors.items():
            assert sorted(keys) == ["k", "m"], (i, layer, sorted(keys))
            assert all(bool((t == v).all()) for t in keys.values()), (i, layer, v)
    problems = store.check(["r"])
    assert problems == [], problems


# ---------------------------------------------------------------------- test 4: ls and planted names


def test_cli_ls_does_not_follow_planted_names(tmp_path: Path) -> None:
    base = tmp_path / "s"
    store = LocalStore(base)
    store.put_detector_metadata("r", 0, {}, {"l": {"k": torch.ones(2)}})
    meta = base / "runs/r/batch_0/metadata.json"
    meta.write_text(json.dumps({"_tensor_metadata_names": {"../../../../outside": ["secret"]}}))
    secret = tmp_path / "outside/secret.safetensors"  # where base/runs/r/batch_0/../../../../outside leads
    outside_tensor_file(secret, {"tensor": torch.zeros(13, 17, dtype=torch.float64)})
    assert (base / "runs/r/batch_0/../../../../outside/secret.safetensors").resolve() == secret.resolve()
    before = snapshot(tmp_path / "outside", contents=True)

    result = CliRunner().invoke(cli_main, ["ls", str(base)])
    out = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"ls crashed with {result.exception!r}:\n{out}"
    )
    assert "Traceback" not in out, out
    assert not re.search(r"13,\s*17|float64|1768|1\.7 KiB", out), f"ls printed the secret's header:\n{out}"
    assert result.exit_code != 0 or re.search(r"damaged|corrupt|unsafe|unreadable|invalid", out, re.I), (
        f"ls neither failed nor marked the batch as damaged:\n{out}"
    )
    assert snapshot(tmp_path / "outside", contents=True) == before
