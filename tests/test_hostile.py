"""Hostile stored files and hostile inputs (issue 10).

Each test plants one defect on disk (a FIFO, a directory or a link where a file belongs, an oversized
or deeply nested JSON file, a tampered safetensors header, an edited metadata.json) or passes one
hostile input, and asserts the exact error the contract names, that the error names the file or
value, that ``check()`` reports damaged files instead of raising, and that refused writes leave the
store exactly as it was.

A read that blocks (a FIFO opened without ``O_NONBLOCK``) is a failure, never a timing
measurement: such reads run on daemon threads, all started together, and a test fails if its read
is still running 60 s after they started.

The new names (``mi_crow.store.errors``, ``mi_crow.store.limits``) are imported inside the tests,
so a missing module fails those tests instead of the collection of this file.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from mi_crow.store import LocalStore, MemoryStore

FIXTURE = Path(__file__).parent / "fixtures" / "mi_crow_1_0_store"
HANG_S = 60.0  # generous: a correct read returns at once; this only bounds a hang
T = torch.arange(6, dtype=torch.float32).reshape(2, 3)
ENTRY_FIELD = "mi_crow_store.entry"
ENTRY_0 = "runs/r/detectors/.entries/000000000000.safetensors"
LOCK = ".mi-crow-store.lock"
DEEP = "[" * 100_000 + "]" * 100_000
BIG_INT = "1" + "0" * 4999  # 5000 digits: more than Python's int parser takes (4300)
STORE_KINDS = ["local", "memory"]


# ---------------------------------------------------------------------------------------------- helpers


def make_store(kind: str, tmp_path: Path, **kwargs: Any) -> LocalStore | MemoryStore:
    if kind == "local":
        return LocalStore(tmp_path / "s", **kwargs)
    return MemoryStore(**kwargs)


def tree(root: Path) -> dict[str, int | None]:
    """Every path under ``root`` (links not followed): size for files, None for directories."""
    out: dict[str, int | None] = {}
    if not os.path.lexists(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = os.lstat(path).st_size
    return out


def snapshot(store: Any) -> tuple[Any, ...]:
    """What a refused call must leave unchanged: the listings, and for a LocalStore every path."""
    files = tree(store.base_path) if isinstance(store, LocalStore) else None
    return store.list_runs(), store.list_models(), files


def assert_names(e: BaseException, path: Path | str) -> None:
    """``e`` is about ``path``: its ``.path`` is ``str(path)`` and its message contains it."""
    assert getattr(e, "path", None) == str(path), (
        f"{type(e).__name__}.path is {getattr(e, 'path', None)!r}, not {str(path)!r}: {e}"
    )
    assert str(path) in str(e), f"the message does not name {path}: {e}"


def checked(store: Any) -> list[Any]:
    """``store.check()``, which must return Problems and never raise."""
    try:
        problems = store.check()
    except Exception as e:  # the defect under test: check() must not raise on damaged data
        pytest.fail(f"check() raised {type(e).__name__} instead of returning a Problem: {e}")
    assert isinstance(problems, list)
    return problems


def assert_reported(problems: list[Any], path: Path | str) -> None:
    assert any(p.path == str(path) for p in problems), f"check() did not report {path}; it returned {problems}"


def huge(n: int) -> str:
    return "n" * n


def read_st(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's parsed header and its data section."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, header: str, data: bytes) -> None:
    head = header.encode("utf-8")
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


class Guarded:
    """A call on a daemon thread, so that a call that blocks forever cannot hang the suite."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:  # reported by the test, never as an unhandled thread exception
            self.error = e

    def start(self) -> Guarded:
        self.thread.start()
        return self

    def finished_by(self, deadline: float) -> bool:
        self.thread.join(max(0.0, deadline - time.monotonic()))
        return not self.thread.is_alive()


def unblock_fifo(path: Path) -> None:
    """Let a reader blocked opening the FIFO ``path`` go on (it then reads end-of-file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no reader has it open, or it is gone
        return
    os.close(fd)


# ---------------------------------------------------------------------------------------------- locations
#
# Every file the store writes, how to write it, and the public reads that open it.

Reader = Callable[[Any, str], object]

READERS: dict[str, Reader] = {
    "get_run_metadata": lambda s, run: s.get_run_metadata(run),
    "get_detector_metadata": lambda s, run: s.get_detector_metadata(run, 0),
    "get_detector_metadata_by_layer_by_key": lambda s, run: s.get_detector_metadata_by_layer_by_key(
        run, 0, "L", "activations"
    ),
    "get_run_batch": lambda s, run: s.get_run_batch(run, 0),
    "get_model": lambda s, run: s.get_model("m"),
    "iter_run_detector_metadata": lambda s, run: list(s.iter_run_detector_metadata(run)),
    "get_tensor": lambda s, run: s.get_tensor("datasets/x.safetensors"),
}


def _put_batch(s: Any) -> None:
    s.put_detector_metadata("r", 0, {"m": 1}, {"L": {"activations": T}})


def _put_model(s: Any) -> None:
    s.put_model("m", {"w": T}, {"d": 1})


def _copy_mi_crow_fixture(s: Any) -> None:
    shutil.copytree(FIXTURE, s.base_path, dirs_exist_ok=True)


@dataclass(frozen=True)
class Loc:
    rel: str  # the file, relative to base_path
    setup: Callable[[Any], object]
    readers: tuple[str, ...]
    run: str = "r"
    checked: bool = True  # covered by check()
    is_json: bool = False
    has_crc: bool = True  # written by this store with checksums (mi_crow 1.0's files have none)

    @property
    def targets(self) -> list[str]:
        return [*self.readers, "check"] if self.checked else list(self.readers)


LOCS: dict[str, Loc] = {
    "meta.json": Loc(
        "runs/r/meta.json", lambda s: s.put_run_metadata("r", {"a": 1}), ("get_run_metadata",), is_json=True
    ),
    "batch-metadata.json": Loc(
        "runs/r/batch_0/metadata.json", _put_batch, ("get_detector_metadata", "get_run_batch"), is_json=True
    ),
    "batch-tensor": Loc(
        "runs/r/batch_0/L/activations.safetensors",
        _put_batch,
        ("get_detector_metadata", "get_detector_metadata_by_layer_by_key", "get_run_batch"),
    ),
    "run-batch": Loc(
        "runs/r/batch_000000.safetensors", lambda s: s.put_run_batch("r", 0, {"x": T}), ("get_run_batch",)
    ),
    "model-metadata.json": Loc("models/m/metadata.json", _put_model, ("get_model",), is_json=True),
    "model.safetensors": Loc("models/m/model.safetensors", _put_model, ("get_model",)),
    "append-entry": Loc(
        ENTRY_0,
        lambda s: s.put_run_detector_metadata("r", {"s": 0}, {"L": {"k": T}}),
        ("iter_run_detector_metadata",),
    ),
    "put_tensor": Loc(
        "datasets/x.safetensors", lambda s: s.put_tensor("datasets/x.safetensors", T), ("get_tensor",), checked=False
    ),
    "mi_crow-1.0-detectors-metadata.json": Loc(
        "runs/legacy-run/detectors/metadata.json",
        _copy_mi_crow_fixture,
        ("iter_run_detector_metadata",),
        run="legacy-run",
        is_json=True,
        has_crc=False,
    ),
    "mi_crow-1.0-detector-tensor": Loc(
        "runs/legacy-run/detectors/sae/top_idx.safetensors",
        _copy_mi_crow_fixture,
        ("iter_run_detector_metadata",),
        run="legacy-run",
        has_crc=False,
    ),
}
JSON_LOCS = [name for name, loc in LOCS.items() if loc.is_json]
TENSOR_LOCS = [name for name, loc in LOCS.items() if not loc.is_json]
CRC_TENSOR_LOCS = [name for name in TENSOR_LOCS if LOCS[name].has_crc]


def placed(tmp_path: Path, loc_name: str, **kwargs: Any) -> tuple[LocalStore, Loc, Path]:
    """A LocalStore at ``tmp_path / "s"`` holding the file of ``loc_name``, and that file's path."""
    loc = LOCS[loc_name]
    store = LocalStore(tmp_path / "s", **kwargs)
    loc.setup(store)
    path = store.base_path / loc.rel
    assert path.is_file(), f"setup did not write {path}"
    return store, loc, path


def read_or_check(store: Any, loc: Loc, target: str) -> Any:
    return checked(store) if target == "check" else READERS[target](store, loc.run)


def expect_error(store: Any, loc: Loc, target: str, path: Path, error: type[BaseException]) -> None:
    """``target`` (a reader) raises ``error`` naming ``path``; or ``check()`` reports ``path``."""
    if target == "check":
        assert_reported(checked(store), path)
        return
    with pytest.raises(error) as info:
        READERS[target](store, loc.run)
    assert_names(info.value, path)


# ---------------------------------------------------------------------------------------------- vocabulary


def test_error_classes_and_limits_are_the_contracts() -> None:
    import mi_crow.store as pkg
    from mi_crow.store import errors, limits

    assert issubclass(errors.CorruptFileError, errors.StoreError) and issubclass(errors.CorruptFileError, OSError)
    assert issubclass(errors.CorruptMetadataError, errors.CorruptFileError)
    assert issubclass(errors.CorruptMetadataError, ValueError)
    assert issubclass(errors.InvalidJSONError, errors.CorruptMetadataError)
    assert issubclass(errors.InvalidJSONError, json.JSONDecodeError)
    for name in ("StoreError", "CorruptFileError", "CorruptMetadataError", "InvalidJSONError"):
        assert getattr(pkg, name) is getattr(errors, name), f"mi_crow.store.{name} is not errors.{name}"
    e = errors.CorruptFileError("/x/runs/r/meta.json", "why")
    assert (e.path, e.reason) == ("/x/runs/r/meta.json", "why") and "/x/runs/r/meta.json" in str(e)
    assert limits.MAX_JSON_BYTES == 100_000_000
    assert limits.MAX_HEADER_BYTES == 100_000_000
    assert limits.MAX_JSON_DEPTH == 200
    assert limits.MAX_BATCH_INDEX == 2**63 - 1
    assert limits.MAX_KEY_BYTES == 1024


# ---------------------------------------------------------------------------------------------- 1. not a regular file
#
# All planted reads start together (module fixture); each test waits for its own read until 60 s
# after the start, so reads that hang cost 60 s in all, not 60 s each.

NOT_A_FILE_KINDS = ["fifo", "directory"]
NOT_A_FILE_CASES = [
    f"{loc_name}|{kind}|{target}"
    for loc_name, loc in LOCS.items()
    for kind in NOT_A_FILE_KINDS
    for target in loc.targets
]


@dataclass
class Planted:
    path: Path
    kind: str
    target: str
    call: Guarded | None = None
    setup_error: BaseException | None = None


@dataclass
class PlantedReads:
    cases: dict[str, Planted] = field(default_factory=dict)
    deadline: float = 0.0


@pytest.fixture(scope="module")
def planted_reads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlantedReads]:
    planted = PlantedReads()
    for case in NOT_A_FILE_CASES:
        loc_name, kind, target = case.split("|")
        loc = LOCS[loc_name]
        store = LocalStore(tmp_path_factory.mktemp("planted") / "s")
        path = store.base_path / loc.rel
        entry = planted.cases[case] = Planted(path, kind, target)
        try:
            loc.setup(store)
            path.unlink()
            if kind == "fifo":
                os.mkfifo(path)
            else:
                path.mkdir()
        except Exception as e:
            entry.setup_error = e
            continue
        entry.call = Guarded(lambda store=store, loc=loc, target=target: read_or_check(store, loc, target))
    for entry in planted.cases.values():
        if entry.call is not None:
            entry.call.start()
    planted.deadline = time.monotonic() + HANG_S
    yield planted
    for entry in planted.cases.values():  # release readers that blocked (their tests failed)
        if entry.kind == "fifo" and entry.call is not None and entry.call.thread.is_alive():
            unblock_fifo(entry.path)


@pytest.mark.parametrize("case", NOT_A_FILE_CASES)
def test_not_a_regular_file_is_refused_at_once(planted_reads: PlantedReads, case: str) -> None:
    from mi_crow.store import errors

    entry = planted_reads.cases[case]
    if entry.setup_error is not None:
        raise entry.setup_error
    assert entry.call is not None
    if not entry.call.finished_by(planted_reads.deadline):
        pytest.fail(f"{entry.target} blocked on the {entry.kind} at {entry.path} (still running {HANG_S:.0f} s later)")
    if entry.target == "check":
        if entry.call.error is not None:
            pytest.fail(f"check() raised {entry.call.error!r} instead of returning a Problem for {entry.path}")
        assert_reported(entry.call.value, entry.path)
        return
    err = entry.call.error
    assert isinstance(err, errors.CorruptFileError), (
        f"{entry.target} over a {entry.kind} at {entry.path} gave {err!r} (returned {entry.call.value!r}), "
        "not a CorruptFileError"
    )
    assert_names(err, entry.path)


# ---------------------------------------------------------------------------------------------- 2. oversized JSON

SPARSE_CASES = [(name, target) for name in JSON_LOCS for target in LOCS[name].targets]


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field_name}:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_growth(fn: Callable[[], object]) -> int:
    """How many bytes more than before the process held at its peak while ``fn`` ran.

    Resident memory (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``): it counts the
    pages a read fills, not address space reserved and never touched. Without that interface,
    tracemalloc's peak of Python allocations instead.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        before = _status_kib("VmRSS")
    except OSError:
        before = None
    if before is None:
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    fn()
    peak = _status_kib("VmHWM")
    assert peak is not None
    return max(0, peak - before) * 1024


@pytest.mark.parametrize(("loc_name", "target"), SPARSE_CASES)
def test_json_over_max_json_bytes_is_refused_unread(tmp_path: Path, loc_name: str, target: str) -> None:
    from mi_crow.store import errors

    store, loc, path = placed(tmp_path, loc_name)
    read_or_check(store, loc, target)  # once on the intact store: the code it runs is paged in
    size = 100_000_000 + 1  # MAX_JSON_BYTES + 1, sparse: it costs no disk
    with open(path, "wb") as f:
        f.seek(size - 1)
        f.write(b"}")
    assert path.stat().st_size == size
    grew = peak_memory_growth(lambda: expect_error(store, loc, target, path, errors.InvalidJSONError))
    assert grew < size // 5, f"{target} took {grew:,} bytes more memory for a {size:,}-byte JSON file it must not read"


@pytest.mark.parametrize(("loc_name", "reader"), [(name, r) for name in JSON_LOCS for r in LOCS[name].readers])
def test_reading_a_small_json_file_allocates_little(tmp_path: Path, loc_name: str, reader: str) -> None:
    """Beyond the contract's letter: ``f.read(MAX_JSON_BYTES + 1)`` makes CPython allocate a 100 MB
    buffer for every JSON file read, however small (a MemoryError where memory is not overcommitted)."""
    store, loc, _ = placed(tmp_path, loc_name)
    READERS[reader](store, loc.run)  # warm: imports and caches are not what is measured
    tracemalloc.start()
    try:
        READERS[reader](store, loc.run)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000, f"{reader} allocated {peak:,} bytes at its peak to read small files"


# ---------------------------------------------------------------------------------------------- 3. huge stop


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize(
    ("indices", "start", "step", "expected"),
    [([0, 1, 2], 0, 1, [0, 1, 2]), ([1, 4, 7], 1, 3, [1, 4, 7]), ([1, 4, 7], 1, 2, [1, 7]), ([], 0, 1, [])],
)
def test_iter_run_batch_range_with_huge_stop_costs_the_stored_batches(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    indices: list[int],
    start: int,
    step: int,
    expected: list[int],
) -> None:
    store = make_store(kind, tmp_path)
    store.put_run_metadata("r", {})
    for i in indices:
        store.put_run_batch("r", i, [torch.tensor([i])])
    calls: list[int] = []
    original = store.get_run_batch

    def counting(run_id: str, batch_index: int) -> Any:
        calls.append(batch_index)
        if len(calls) > 50:
            raise AssertionError(
                f"iter_run_batch_range called get_run_batch {len(calls)} times for {len(indices)} stored batches: "
                "it walks range(start, stop) instead of the stored indices"
            )
        return original(run_id, batch_index)

    monkeypatch.setattr(store, "get_run_batch", counting)
    got = [b[0].item() for b in store.iter_run_batch_range("r", start=start, stop=10**9, step=step)]
    assert got == expected
    assert len(calls) <= 6, f"get_run_batch was called for {calls}"


# ---------------------------------------------------------------------------------------------- 4. verify blind spots


@pytest.mark.parametrize(
    ("loc_name", "target"), [(name, target) for name in CRC_TENSOR_LOCS for target in LOCS[name].targets]
)
def test_dtype_flipped_in_a_header_is_caught(tmp_path: Path, loc_name: str, target: str) -> None:
    from mi_crow.store import errors

    store, loc, path = placed(tmp_path, loc_name)
    raw = path.read_bytes()
    assert raw.count(b'"F32"') == 1
    path.write_bytes(raw.replace(b'"F32"', b'"I32"'))  # same length: offsets and sizes still add up
    verifying = LocalStore(store.base_path, verify=True)
    expect_error(verifying, loc, target, path, errors.CorruptFileError)


def _drop_listed_key(text: str) -> str:
    doc = json.loads(text)
    doc["_tensor_metadata_names"]["L"].remove("b")
    return json.dumps(doc, indent=2)


# name: (setup, file, edit of its text, the verified read)
METADATA_EDITS: dict[str, tuple[Callable[[Any], object], str, Callable[[str], str], str]] = {
    "batch-names-key-removed": (
        lambda s: s.put_detector_metadata("r", 0, {"m": 1}, {"L": {"activations": T, "b": T}}),
        "runs/r/batch_0/metadata.json",
        _drop_listed_key,
        "get_detector_metadata",
    ),
    "batch-value-same-length": (
        _put_batch,
        "runs/r/batch_0/metadata.json",
        lambda text: text.replace('"m": 1', '"m": 2'),
        "get_detector_metadata",
    ),
    "model-value-same-length": (
        _put_model,
        "models/m/metadata.json",
        lambda text: text.replace('"d": 1', '"d": 2'),
        "get_model",
    ),
}


@pytest.mark.parametrize("target", ["check", "verified read"])
@pytest.mark.parametrize("edit", list(METADATA_EDITS))
def test_edited_metadata_json_is_caught(tmp_path: Path, edit: str, target: str) -> None:
    from mi_crow.store import errors

    setup, rel, change, reader = METADATA_EDITS[edit]
    store = LocalStore(tmp_path / "s")
    setup(store)
    path = store.base_path / rel
    text = path.read_text("utf-8")
    edited = change(text)
    assert edited != text
    path.write_text(edited, "utf-8")
    if target == "check":
        assert_reported(checked(store), path)
        return
    with pytest.raises(errors.CorruptFileError) as info:
        READERS[reader](LocalStore(store.base_path, verify=True), "r")
    assert_names(info.value, path)


@pytest.mark.parametrize("target", ["check", "verified read"])
@pytest.mark.parametrize("with_tensors", [True, False], ids=["with-tensors", "without-tensors"])
def test_edited_append_entry_metadata_is_caught(tmp_path: Path, with_tensors: bool, target: str) -> None:
    from mi_crow.store import errors

    store = LocalStore(tmp_path / "s")
    store.put_run_detector_metadata("r", {"tag": "aaaaaaaa"}, {"L": {"k": T}} if with_tensors else {})
    path = store.base_path / ENTRY_0
    raw = path.read_bytes()
    assert raw.count(b"aaaaaaaa") == 1
    path.write_bytes(raw.replace(b"aaaaaaaa", b"bbbbbbbb"))  # same length
    if target == "check":
        assert_reported(checked(store), path)
        return
    with pytest.raises(errors.CorruptFileError) as info:
        list(LocalStore(store.base_path, verify=True).iter_run_detector_metadata("r"))
    assert_names(info.value, path)


JSON_HOSTILE = {"depth-100000": '{"a": ' + DEEP + "}", "5000-digit-int": '{"a": ' + BIG_INT + "}"}

# name: {header field of the file's tensor (or "__metadata__"): raw JSON put there}
HEADER_HOSTILE: dict[str, dict[str, str]] = {
    "depth-100000-shape": {"shape": DEEP},
    "depth-100000-in-metadata": {"__metadata__": '{"x": ' + DEEP + "}"},
    "5000-digit-dimension": {"shape": f"[{BIG_INT}]"},
    "5000-digit-offset": {"data_offsets": f"[0, {BIG_INT}]"},
    "shape-0-by-1e30": {"shape": f"[0, {10**30}]", "data_offsets": "[0, 0]"},
    "shape-0-by-2^62-by-2^62": {"shape": f"[0, {2**62}, {2**62}]", "data_offsets": "[0, 0]"},
    "shape-2^32-by-2^32": {"shape": f"[{2**32}, {2**32}]", "data_offsets": "[0, 0]"},
    "shape-2^63": {"shape": f"[{2**63}]", "data_offsets": f"[0, {4 * 2**63}]"},
}


def hostile_header(header: dict[str, Any], fields: dict[str, str]) -> str:
    name = next(k for k in header if k != "__metadata__")
    for key in fields:
        if key == "__metadata__":
            header["__metadata__"] = "@@__metadata__"
        else:
            header[name][key] = f"@@{key}"
    text = json.dumps(header)
    for key, raw in fields.items():
        text = text.replace(f'"@@{key}"', raw)
    return text


HOSTILE_CASES = [(name, content, t) for name in JSON_LOCS for content in JSON_HOSTILE for t in LOCS[name].targets] + [
    (name, content, t) for name in TENSOR_LOCS for content in HEADER_HOSTILE for t in LOCS[name].targets
]


@pytest.mark.parametrize(("loc_name", "content", "target"), HOSTILE_CASES)
def test_hostile_content_is_a_corrupt_file_error_and_a_problem(
    tmp_path: Path, loc_name: str, content: str, target: str
) -> None:
    from mi_crow.store import errors

    store, loc, path = placed(tmp_path, loc_name)
    if loc.is_json:
        path.write_text(JSON_HOSTILE[content], "utf-8")
        error: type[BaseException] = errors.InvalidJSONError
    else:
        header, data = read_st(path)
        write_st(path, hostile_header(header, HEADER_HOSTILE[content]), data)
        error = errors.CorruptFileError
    expect_error(store, loc, target, path, error)


ENTRY_HOSTILE = {
    "not-json": "not json {",
    "array": "[1, 2]",
    "depth-100000": DEEP,
    "5000-digit-int": BIG_INT,
    "metadata-not-an-object": '{"metadata": [], "tensors": {}}',
    "no-tensors-field": '{"metadata": {}}',
    "unsafe-layer": '{"metadata": {}, "tensors": {"../x": ["k"]}}',
    "unlisted-tensor": '{"metadata": {}, "tensors": {"L": ["nope"]}}',
}


@pytest.mark.parametrize("target", ["iter_run_detector_metadata", "check"])
@pytest.mark.parametrize("content", list(ENTRY_HOSTILE))
def test_hostile_append_entry_field(tmp_path: Path, content: str, target: str) -> None:
    """The entry's JSON itself is damaged (written without checksums, so only parsing can tell)."""
    from mi_crow.store import errors

    store = LocalStore(tmp_path / "s", checksums=False)
    store.put_run_detector_metadata("r", {"s": 0}, {"L": {"k": T}})
    path = store.base_path / ENTRY_0
    header, data = read_st(path)
    assert ENTRY_FIELD in header["__metadata__"]
    header["__metadata__"][ENTRY_FIELD] = ENTRY_HOSTILE[content]
    write_st(path, json.dumps(header), data)
    expect_error(LocalStore(store.base_path), LOCS["append-entry"], target, path, errors.CorruptFileError)


@pytest.mark.parametrize(
    ("loc_name", "where", "target"),
    [(name, where, t) for name, loc in LOCS.items() for where in ("inside", "outside") for t in loc.targets],
)
def test_file_that_is_a_symlink_is_never_followed(tmp_path: Path, loc_name: str, where: str, target: str) -> None:
    from mi_crow.store import errors

    store, loc, path = placed(tmp_path, loc_name)
    dest = (store.base_path if where == "inside" else tmp_path / "outside") / f"copy-{path.name}"
    dest.parent.mkdir(exist_ok=True)
    shutil.copyfile(path, dest)
    content = dest.read_bytes()
    path.unlink()
    path.symlink_to(dest)
    expect_error(store, loc, target, path, errors.CorruptFileError)
    assert dest.read_bytes() == content


def test_run_directory_that_is_a_symlink(tmp_path: Path) -> None:
    from mi_crow.store import errors

    store = LocalStore(tmp_path / "s")
    store.put_run_metadata("r0", {"a": 1})
    outside = tmp_path / "outside"
    shutil.copytree(store.base_path / "runs" / "r0", outside)
    before = tree(outside)
    link = store.base_path / "runs" / "r"
    link.symlink_to(outside, target_is_directory=True)
    assert store.list_runs() == ["r0"]
    with pytest.raises(errors.CorruptFileError) as info:
        store.get_run_metadata("r")
    assert str(link) in str(info.value)
    with pytest.raises(errors.CorruptFileError) as info:
        store.put_run_metadata("r", {"b": 2})
    assert str(link) in str(info.value)
    store.delete_run("r")
    assert not os.path.lexists(link)
    assert tree(outside) == before


# ---------------------------------------------------------------------------------------------- 5. refused writes

KEY_1025 = "/".join(["k" * 200] * 5) + "/" + "k" * 20  # 1025 bytes
KEY_4019 = "/".join(["k" * 200] * 20)  # 4019 bytes of 200-byte components


def _deep_dict(depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(depth):
        out = {"a": out}
    return out


# name: (the call, strings of which the message must contain one)
BAD_WRITES: dict[str, tuple[Callable[[Any], object], tuple[str, ...]]] = {
    "put_run_batch-55MB-tensor-name": (lambda s: s.put_run_batch("r", 0, {huge(55_000_000): T}), ("header", "name")),
    "put_model-55MB-tensor-name": (lambda s: s.put_model("m", {huge(55_000_000): T}), ("header", "name")),
    "put_run_detector_metadata-101MB-metadata": (
        lambda s: s.put_run_detector_metadata("r", {"x": huge(101_000_000)}, {}),
        ("metadata", "header"),
    ),
    "put_run_metadata-101MB": (lambda s: s.put_run_metadata("r", {"x": huge(101_000_000)}), ("meta",)),
    "put_detector_metadata-101MB-metadata": (
        lambda s: s.put_detector_metadata("r", 0, {"x": huge(101_000_000)}, {"L": {"k": T}}),
        ("metadata",),
    ),
    "put_model-101MB-metadata": (lambda s: s.put_model("m", {"w": T}, {"x": huge(101_000_000)}), ("metadata",)),
    "put_detector_metadata-depth-5000-metadata": (
        lambda s: s.put_detector_metadata("r", 0, _deep_dict(5000), {"L": {"k": T}}),
        ("nest", "deep", "depth"),
    ),
    "put_run_metadata-5000-digit-int": (lambda s: s.put_run_metadata("r", {"n": 10**4999}), ("integer", "digit")),
    "put_run_detector_metadata-5000-digit-int": (
        lambda s: s.put_run_detector_metadata("r", {"n": 10**4999}, {}),
        ("integer", "digit"),
    ),
    "layer-named-metadata.json": (
        lambda s: s.put_detector_metadata("r", 0, {}, {"metadata.json": {"k": T}}),
        ("metadata.json",),
    ),
    "put_detector_metadata-index-10**250": (
        lambda s: s.put_detector_metadata("r", 10**250, {}, {"L": {"k": T}}),
        (str(10**250),),
    ),
    "put_detector_metadata-index-2**63": (
        lambda s: s.put_detector_metadata("r", 2**63, {}, {"L": {"k": T}}),
        (str(2**63),),
    ),
    "put_run_batch-index-10**250": (lambda s: s.put_run_batch("r", 10**250, [T]), (str(10**250),)),
    "put_run_batch-index-2**63": (lambda s: s.put_run_batch("r", 2**63, [T]), (str(2**63),)),
    "get_run_batch-index-2**63": (lambda s: s.get_run_batch("r0", 2**63), (str(2**63),)),
    "get_detector_metadata-index-10**250": (lambda s: s.get_detector_metadata("r0", 10**250), (str(10**250),)),
    "put_tensor-1025-byte-key": (lambda s: s.put_tensor(KEY_1025, T), (KEY_1025[:40],)),
    "put_tensor-4019-byte-key-of-200-byte-components": (lambda s: s.put_tensor(KEY_4019, T), (KEY_4019[:40],)),
}


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("case", list(BAD_WRITES))
def test_write_that_could_not_be_read_back_is_refused_before_io(tmp_path: Path, kind: str, case: str) -> None:
    call, needles = BAD_WRITES[case]
    store = make_store(kind, tmp_path)
    store.put_run_metadata("r0", {"a": 1})
    before = snapshot(store)
    with pytest.raises(ValueError) as info:
        call(store)
    message = str(info.value)
    assert len(message) < 10_000, f"the message is {len(message):,} characters long (it should not hold the value)"
    assert any(n in message for n in needles), f"the message names none of {[n[:40] for n in needles]}: {message}"
    assert snapshot(store) == before


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize(
    "key",
    [
        "/".join(["k" * 199] * 4 + ["k" * 200]),  # 1000 bytes, 5 components
        "/".join(["k" * 200] * 5) + "/" + "k" * 19,  # 1024 bytes: MAX_KEY_BYTES exactly
    ],
    ids=["1000-bytes-5-components", "1024-bytes"],
)
def test_accepted_long_key_round_trips(tmp_path: Path, kind: str, key: str) -> None:
    store = make_store(kind, tmp_path)
    store.put_tensor(key, T)
    assert torch.equal(store.get_tensor(key), T)
    if isinstance(store, LocalStore):
        assert (store.base_path / key).is_file()


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("op", ["put_model", "put_run_batch"])
def test_one_megabyte_tensor_name_round_trips(tmp_path: Path, kind: str, op: str) -> None:
    store = make_store(kind, tmp_path)
    tensors = {huge(1_000_000): T, "small": torch.ones(2, dtype=torch.int8)}
    if op == "put_model":
        store.put_model("m", tensors)
        got = store.get_model("m")[0]
    else:
        store.put_run_batch("r", 0, tensors)
        got = store.get_run_batch("r", 0)
    assert_same_tensors(got, tensors)


# ---------------------------------------------------------------------------------------------- 6. entry numbers


def test_appends_after_entry_999999999999_read_back_in_order(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_run_detector_metadata("r", {"i": 0}, {"L": {"k": torch.tensor([0])}})
    store.put_run_detector_metadata("r", {"i": "planted"}, {"L": {"k": torch.tensor([-1])}})
    entries = store.base_path / "runs/r/detectors/.entries"
    shutil.copyfile(entries / "000000000001.safetensors", entries / "999999999999.safetensors")
    (entries / "000000000001.safetensors").unlink()
    fresh = LocalStore(store.base_path)
    for i in (1, 2):
        fresh.put_run_detector_metadata("r", {"i": i}, {"L": {"k": torch.tensor([i])}})
    got = [(m["i"], t["L"]["k"].tolist()) for m, t in LocalStore(store.base_path).iter_run_detector_metadata("r")]
    assert got == [(0, [0]), ("planted", [-1]), (1, [1]), (2, [2])]
    assert checked(LocalStore(store.base_path)) == []


# ---------------------------------------------------------------------------------------------- 7. many tensors

MANY_DTYPES = [
    torch.float32,
    torch.int64,
    torch.bfloat16,
    torch.bool,
    torch.uint8,
    torch.float16,
    torch.int8,
    torch.float64,
    torch.int32,
    torch.int16,
]


def many_tensors(n: int = 10_000) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(n):
        dtype = MANY_DTYPES[i % len(MANY_DTYPES)]
        shape = (0, 3) if i % 1000 == 7 else (i % 3 + 1,)
        t = torch.arange(math.prod(shape)).reshape(shape) + i % 100
        out[f"t{i}"] = (t % 2).to(torch.bool) if dtype == torch.bool else t.to(dtype)
    return out


def assert_same_tensors(got: Any, want: dict[str, torch.Tensor]) -> None:
    assert isinstance(got, dict) and sorted(got) == sorted(want)
    for name, t in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (t.dtype, t.shape), name[:40]
        assert torch.equal(g, t), name[:40]


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("op", ["put_model", "put_run_batch-dict", "put_run_batch-list", "put_run_detector_metadata"])
def test_ten_thousand_tensors_in_one_file(tmp_path: Path, kind: str, op: str) -> None:
    store = make_store(kind, tmp_path)
    tensors = many_tensors()
    if op == "put_model":
        store.put_model("m", tensors, {"n": len(tensors)})
        got, meta = store.get_model("m")
        assert meta == {"n": len(tensors)}
        assert_same_tensors(got, tensors)
    elif op == "put_run_batch-dict":
        store.put_run_batch("r", 0, tensors)
        assert_same_tensors(store.get_run_batch("r", 0), tensors)
    elif op == "put_run_batch-list":
        as_list = list(tensors.values())
        store.put_run_batch("r", 0, as_list)
        got_list = store.get_run_batch("r", 0)
        assert isinstance(got_list, list) and len(got_list) == len(as_list)
        assert_same_tensors({f"t{i}": t for i, t in enumerate(got_list)}, tensors)
    else:
        layered: dict[str, dict[str, torch.Tensor]] = {}
        for i, (name, t) in enumerate(tensors.items()):
            layered.setdefault(f"L{i % 10}", {})[name] = t
        store.put_run_detector_metadata("r", {"n": len(tensors)}, layered)
        [(meta, got_layers)] = list(store.iter_run_detector_metadata("r"))
        assert meta == {"n": len(tensors)}
        assert sorted(got_layers) == sorted(layered)
        for layer, want in layered.items():
            assert_same_tensors(got_layers[layer], want)
    if isinstance(store, LocalStore):
        assert checked(store) == []


# ---------------------------------------------------------------------------------------------- 8. error vocabulary

# name: (location, the file's new text)
WRONG_SHAPE: dict[str, tuple[str, str]] = {
    "meta.json-array": ("meta.json", "[1, 2]"),
    "meta.json-null": ("meta.json", "null"),
    "meta.json-string": ("meta.json", '"x"'),
    "batch-metadata.json-array": ("batch-metadata.json", "[1, 2]"),
    "batch-metadata.json-without-names": ("batch-metadata.json", '{"m": 1}'),
    "batch-metadata.json-names-not-an-object": ("batch-metadata.json", '{"_tensor_metadata_names": ["L"]}'),
    "batch-metadata.json-keys-not-a-list": ("batch-metadata.json", '{"_tensor_metadata_names": {"L": "activations"}}'),
    "batch-metadata.json-unsafe-layer": ("batch-metadata.json", '{"_tensor_metadata_names": {"..": ["activations"]}}'),
    "batch-metadata.json-unsafe-key": ("batch-metadata.json", '{"_tensor_metadata_names": {"L": ["../../meta"]}}'),
    "model-metadata.json-array": ("model-metadata.json", "[1, 2]"),
    "mi_crow-1.0-batches-not-a-list": ("mi_crow-1.0-detectors-metadata.json", '{"batches": 3}'),
    "mi_crow-1.0-entry-not-an-object": ("mi_crow-1.0-detectors-metadata.json", '{"batches": [1]}'),
}


@pytest.mark.parametrize(
    ("case", "target"), [(case, t) for case, (loc_name, _) in WRONG_SHAPE.items() for t in LOCS[loc_name].targets]
)
def test_json_of_the_wrong_shape_is_corrupt_metadata(tmp_path: Path, case: str, target: str) -> None:
    from mi_crow.store import errors

    loc_name, text = WRONG_SHAPE[case]
    store, loc, path = placed(tmp_path, loc_name)
    path.write_text(text, "utf-8")
    if target == "check":
        assert_reported(checked(store), path)
        return
    with pytest.raises(errors.CorruptMetadataError) as info:
        READERS[target](store, loc.run)
    assert isinstance(info.value, ValueError)
    assert_names(info.value, path)


def _reopen(s: Any, **prefixes: str) -> Any:
    return LocalStore(s.base_path, **prefixes) if isinstance(s, LocalStore) else MemoryStore(**prefixes)


# Every place a name is taken; ``b`` is the bad name.
NAME_SITES: dict[str, Callable[[Any, str], object]] = {
    "put_run_metadata-run_id": lambda s, b: s.put_run_metadata(b, {}),
    "get_run_metadata-run_id": lambda s, b: s.get_run_metadata(b),
    "put_detector_metadata-run_id": lambda s, b: s.put_detector_metadata(b, 0, {}, {"L": {"k": T}}),
    "put_detector_metadata-layer": lambda s, b: s.put_detector_metadata("r", 0, {}, {b: {"k": T}}),
    "put_detector_metadata-key": lambda s, b: s.put_detector_metadata("r", 0, {}, {"L": {b: T}}),
    "get_detector_metadata-run_id": lambda s, b: s.get_detector_metadata(b, 0),
    "get_detector_metadata_by_layer_by_key-run_id": lambda s, b: s.get_detector_metadata_by_layer_by_key(
        b, 0, "L", "k"
    ),
    "get_detector_metadata_by_layer_by_key-layer": lambda s, b: s.get_detector_metadata_by_layer_by_key("r", 0, b, "k"),
    "get_detector_metadata_by_layer_by_key-key": lambda s, b: s.get_detector_metadata_by_layer_by_key("r", 0, "L", b),
    "put_run_batch-run_id": lambda s, b: s.put_run_batch(b, 0, [T]),
    "get_run_batch-run_id": lambda s, b: s.get_run_batch(b, 0),
    "list_run_batches-run_id": lambda s, b: s.list_run_batches(b),
    "iter_run_batches-run_id": lambda s, b: list(s.iter_run_batches(b)),
    "iter_run_batch_range-run_id": lambda s, b: list(s.iter_run_batch_range(b)),
    "delete_run-run_id": lambda s, b: s.delete_run(b),
    "put_run_detector_metadata-run_id": lambda s, b: s.put_run_detector_metadata(b, {}, {"L": {"k": T}}),
    "put_run_detector_metadata-layer": lambda s, b: s.put_run_detector_metadata("r", {}, {b: {"k": T}}),
    "put_run_detector_metadata-key": lambda s, b: s.put_run_detector_metadata("r", {}, {"L": {b: T}}),
    "iter_run_detector_metadata-run_id": lambda s, b: list(s.iter_run_detector_metadata(b)),
    "put_model-model_id": lambda s, b: s.put_model(b, {"w": T}),
    "get_model-model_id": lambda s, b: s.get_model(b),
    "delete_model-model_id": lambda s, b: s.delete_model(b),
    "put_tensor-key": lambda s, b: s.put_tensor(b, T),
    "put_tensor-key-component": lambda s, b: s.put_tensor(f"datasets/{b}/x", T),
    "get_tensor-key": lambda s, b: s.get_tensor(f"datasets/{b}"),
    "check-run_ids": lambda s, b: s.check([b]),
    "runs_prefix": lambda s, b: _reopen(s, runs_prefix=b),
    "runs_prefix-component": lambda s, b: _reopen(s, runs_prefix=f"exp/{b}"),
    "dataset_prefix": lambda s, b: _reopen(s, dataset_prefix=b),
    "model_prefix": lambda s, b: _reopen(s, model_prefix=b),
}


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("bad", ["a\x85b", "\x9f"], ids=["a-U+0085-b", "U+009F"])
@pytest.mark.parametrize("site", list(NAME_SITES))
def test_c1_control_characters_are_refused_as_names(tmp_path: Path, kind: str, bad: str, site: str) -> None:
    store = make_store(kind, tmp_path)
    store.put_run_metadata("r0", {"a": 1})
    before = snapshot(store)
    with pytest.raises(ValueError) as info:
        NAME_SITES[site](store, bad)
    message = str(info.value)
    assert repr(bad) in message or bad in message, f"the message does not name {bad!r}: {message}"
    assert snapshot(store) == before


# Reads and no-op deletes of missing entries: (the call, what it returns, or the error it raises)
MISSING_READS: dict[str, tuple[Callable[[LocalStore], object], Any]] = {
    "get_run_metadata": (lambda s: s.get_run_metadata("r"), {}),
    "get_detector_metadata": (lambda s: s.get_detector_metadata("r", 0), ({}, {})),
    "get_detector_metadata_by_layer_by_key": (
        lambda s: s.get_detector_metadata_by_layer_by_key("r", 0, "L", "k"),
        FileNotFoundError,
    ),
    "get_run_batch": (lambda s: s.get_run_batch("r", 0), FileNotFoundError),
    "list_run_batches": (lambda s: s.list_run_batches("r"), []),
    "iter_run_batches": (lambda s: list(s.iter_run_batches("r")), []),
    "iter_run_batch_range": (lambda s: list(s.iter_run_batch_range("r", stop=10)), []),
    "iter_run_detector_metadata": (lambda s: list(s.iter_run_detector_metadata("r")), []),
    "list_runs": (lambda s: s.list_runs(), []),
    "list_models": (lambda s: s.list_models(), []),
    "get_model": (lambda s: s.get_model("m"), FileNotFoundError),
    "get_tensor": (lambda s: s.get_tensor("datasets/x.safetensors"), FileNotFoundError),
    "check": (lambda s: s.check(), []),
    "check-run_ids": (lambda s: s.check(["r"]), []),
    "delete_run": (lambda s: s.delete_run("r"), None),
    "delete_model": (lambda s: s.delete_model("m"), None),
}


@pytest.mark.parametrize("base_exists", [False, True], ids=["no-base_path", "empty-base_path"])
@pytest.mark.parametrize("call", list(MISSING_READS))
def test_reads_of_missing_entries_create_nothing(tmp_path: Path, base_exists: bool, call: str) -> None:
    fn, expected = MISSING_READS[call]
    base = tmp_path / "s"
    if base_exists:
        base.mkdir()
    store = LocalStore(base)
    if isinstance(expected, type) and issubclass(expected, BaseException):
        with pytest.raises(expected):
            fn(store)
    else:
        assert fn(store) == expected
    assert os.listdir(tmp_path) == (["s"] if base_exists else [])
    if base_exists:
        assert os.listdir(base) == [], f"{call} created {os.listdir(base)} (the lock file is only for writers)"


FAILING_WRITES: dict[str, Callable[[LocalStore], object]] = {
    "put_detector_metadata": lambda s: s.put_detector_metadata("r", 0, {"m": 1}, {"L": {"k": T}}),
    "put_run_metadata": lambda s: s.put_run_metadata("r", {"a": 1}),
    "put_run_batch": lambda s: s.put_run_batch("r", 0, [T]),
    "put_run_detector_metadata": lambda s: s.put_run_detector_metadata("r", {"s": 0}, {"L": {"k": T}}),
    "put_model": lambda s: s.put_model("m", {"w": T}),
}


@pytest.mark.parametrize("write", list(FAILING_WRITES))
def test_write_failing_with_oserror_leaves_no_run_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: str
) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_run_metadata("r0", {"a": 1})
    before = tree(store.base_path)
    calls: list[str] = []

    def no_space(path: str, *args: Any, **kwargs: Any) -> None:
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device (simulated)", path)

    monkeypatch.setattr("mi_crow.store._atomic.create_file", no_space)
    with pytest.raises(OSError) as info:
        FAILING_WRITES[write](store)
    assert calls, "the write did not go through mi_crow.store._atomic.create_file"
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert store.list_runs() == ["r0"]
    assert store.list_models() == []
    assert sorted(os.listdir(store.base_path / "runs")) == ["r0"]
    assert not (store.base_path / "models").exists() or os.listdir(store.base_path / "models") == []
    after = tree(store.base_path)
    after.pop("models", None)
    assert after == before


# ---------------------------------------------------------------------------------------------- 9. mi_crow 1.0


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_int_layer_signatures_read_back_as_str(tmp_path: Path, kind: str) -> None:
    store = make_store(kind, tmp_path)
    store.put_detector_metadata("r", 0, {"m": 1}, {3: {"activations": T}, "x": {"k": T}})  # type: ignore[dict-item]
    meta, tensors = store.get_detector_metadata("r", 0)
    assert meta == {"m": 1}
    assert sorted(tensors) == ["3", "x"] and torch.equal(tensors["3"]["activations"], T)
    assert torch.equal(store.get_detector_metadata_by_layer_by_key("r", 0, 3, "activations"), T)  # type: ignore[arg-type]
    assert torch.equal(store.get_detector_metadata_by_layer_by_key("r", 0, "3", "activations"), T)
    store.put_run_detector_metadata("r", {"s": 0}, {5: {"k": T}})  # type: ignore[dict-item]
    [(entry_meta, entry_tensors)] = list(store.iter_run_detector_metadata("r"))
    assert entry_meta == {"s": 0} and list(entry_tensors) == ["5"] and torch.equal(entry_tensors["5"]["k"], T)
    if isinstance(store, LocalStore):
        assert (store.base_path / "runs/r/batch_0/3/activations.safetensors").is_file()
        doc = json.loads((store.base_path / "runs/r/batch_0/metadata.json").read_text("utf-8"))
        assert doc["_tensor_metadata_names"] == {"3": ["activations"], "x": ["k"]}


BOOL_LAYER_SITES: dict[str, Callable[[Any], object]] = {
    "put_detector_metadata": lambda s: s.put_detector_metadata("r", 0, {}, {True: {"k": T}}),
    "put_run_detector_metadata": lambda s: s.put_run_detector_metadata("r", {}, {False: {"k": T}}),
    "get_detector_metadata_by_layer_by_key": lambda s: s.get_detector_metadata_by_layer_by_key("r", 0, True, "k"),
}


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("site", list(BOOL_LAYER_SITES))
def test_bool_layer_signature_is_refused(tmp_path: Path, kind: str, site: str) -> None:
    store = make_store(kind, tmp_path)
    with pytest.raises(ValueError, match=r"bool|True|False"):
        BOOL_LAYER_SITES[site](store)
    assert store.list_runs() == []


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("site", ["put_detector_metadata", "put_run_detector_metadata"])
def test_int_and_str_layer_of_the_same_name_are_refused(tmp_path: Path, kind: str, site: str) -> None:
    """Beyond the contract's letter: ``{3: a, "3": b}`` would store one and lose the other."""
    store = make_store(kind, tmp_path)
    both = {3: {"k": T}, "3": {"k": T + 1}}
    with pytest.raises(ValueError, match="3"):
        if site == "put_detector_metadata":
            store.put_detector_metadata("r", 0, {}, both)  # type: ignore[arg-type]
        else:
            store.put_run_detector_metadata("r", {}, both)  # type: ignore[arg-type]
    assert store.list_runs() == []


NAN_META = {"loss": float("nan"), "best": float("inf"), "worst": float("-inf")}

# name: (write, read back the metadata, the file that holds it)
NAN_SITES: dict[str, tuple[Callable[[Any], object], Callable[[Any], Any], str]] = {
    "put_run_metadata": (
        lambda s: s.put_run_metadata("r", NAN_META),
        lambda s: s.get_run_metadata("r"),
        "runs/r/meta.json",
    ),
    "put_detector_metadata": (
        lambda s: s.put_detector_metadata("r", 0, NAN_META, {"L": {"k": T}}),
        lambda s: s.get_detector_metadata("r", 0)[0],
        "runs/r/batch_0/metadata.json",
    ),
    "put_run_detector_metadata": (
        lambda s: s.put_run_detector_metadata("r", NAN_META, {"L": {"k": T}}),
        lambda s: next(iter(s.iter_run_detector_metadata("r")))[0],
        ENTRY_0,
    ),
    "put_model": (
        lambda s: s.put_model("m", {"w": T}, NAN_META),
        lambda s: s.get_model("m")[1],
        "models/m/metadata.json",
    ),
}


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("site", list(NAN_SITES))
def test_nan_and_infinity_in_metadata_round_trip_by_default(tmp_path: Path, kind: str, site: str) -> None:
    write, read, rel = NAN_SITES[site]
    store = make_store(kind, tmp_path)
    write(store)
    meta = read(store)
    assert math.isnan(meta["loss"]) and meta["best"] == math.inf and meta["worst"] == -math.inf
    if isinstance(store, LocalStore):
        raw = (store.base_path / rel).read_bytes()
        assert b"NaN" in raw and b"Infinity" in raw and b"-Infinity" in raw
        assert checked(store) == []


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("site", list(NAN_SITES))
def test_nan_is_refused_with_allow_nan_false(tmp_path: Path, kind: str, site: str) -> None:
    write, _, _ = NAN_SITES[site]
    store = make_store(kind, tmp_path, allow_nan=False)
    with pytest.raises(ValueError, match="loss"):
        write(store)
    assert store.list_runs() == [] and store.list_models() == []
    if isinstance(store, LocalStore):
        assert tree(store.base_path) == {}


def test_empty_runs_prefix_puts_runs_at_base_path(tmp_path: Path) -> None:
    base = tmp_path / "s"
    store = LocalStore(base, runs_prefix="", dataset_prefix="")
    store.put_run_metadata("r", {"a": 1})
    store.put_detector_metadata("r", 0, {"m": 1}, {"L": {"k": T}})
    store.put_run_batch("r", 1, [T])
    store.put_run_detector_metadata("r", {"s": 0}, {"L": {"k": T}})
    for rel in ("r/meta.json", "r/batch_0/metadata.json", "r/batch_0/L/k.safetensors", "r/batch_000001.safetensors"):
        assert (base / rel).is_file(), rel
    assert (base / "r/detectors").is_dir()
    reader = LocalStore(base, runs_prefix="")
    assert reader.list_runs() == ["r"]
    assert reader.list_run_batches("r") == [0, 1]
    assert reader.get_run_metadata("r") == {"a": 1}
    assert torch.equal(reader.get_detector_metadata("r", 0)[1]["L"]["k"], T)
    assert torch.equal(reader.get_run_batch("r", 1)[0], T)
    assert [m for m, _ in reader.iter_run_detector_metadata("r")] == [{"s": 0}]
    assert checked(reader) == []
    reader.delete_run("r")
    assert not (base / "r").exists() and reader.list_runs() == []


def test_empty_model_prefix_puts_models_at_base_path(tmp_path: Path) -> None:
    base = tmp_path / "s"
    store = LocalStore(base, model_prefix="")
    store.put_model("m", {"w": T}, {"d": 1})
    assert (base / "m/model.safetensors").is_file() and (base / "m/metadata.json").is_file()
    assert store.list_models() == ["m"]
    tensors, meta = store.get_model("m")
    assert torch.equal(tensors["w"], T) and meta == {"d": 1}
    store.delete_model("m")
    assert not (base / "m").exists() and store.list_models() == []


def test_empty_prefixes_in_memory() -> None:
    store = MemoryStore(runs_prefix="", dataset_prefix="", model_prefix="")
    store.put_run_metadata("r", {"a": 1})
    store.put_run_batch("r", 0, [T])
    assert store.get_run_metadata("r") == {"a": 1} and store.list_run_batches("r") == [0]
    store.put_model("m", {"w": T})
    assert torch.equal(store.get_model("m")[0]["w"], T)


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("prefix", ["runs", "exp/acts", ""])
def test_run_key_helpers_return_mi_crow_paths(tmp_path: Path, kind: str, prefix: str) -> None:
    store = make_store(kind, tmp_path, runs_prefix=prefix)
    run = store.base_path / prefix / "r"
    assert store._run_key("r") == run and isinstance(store._run_key("r"), Path)
    assert store._run_batch_key("r", 3) == run / "batch_3" and isinstance(store._run_batch_key("r", 3), Path)
    assert store._run_metadata_key("r") == run / "meta.json" and isinstance(store._run_metadata_key("r"), Path)


def test_foreign_files_in_a_run_folder(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_run_metadata("r", {"a": 1})
    store.put_detector_metadata("r", 0, {"m": 1}, {"L": {"activations": T}})
    store.put_run_batch("r", 1, [T])
    store.put_run_detector_metadata("r", {"s": 0}, {"L": {"k": T}})
    run = store.base_path / "runs" / "r"
    (run / "model.pt").write_bytes(b"\x80\x02 a pickled SAE")
    (run / "history.json").write_text('{"loss": [1.0, 0.5]}', "utf-8")
    (run / "snapshots").mkdir()
    (run / "snapshots" / "model_epoch_1.pt").write_bytes(b"\x80\x02 epoch 1")
    (run / "batch_5.pt").write_bytes(b"not a batch")
    assert store.list_run_batches("r") == [0, 1]
    assert len(list(store.iter_run_batches("r"))) == 2
    assert checked(store) == []
    before = tree(store.base_path)
    assert store.gc().removed == []
    assert tree(store.base_path) == before
    assert store.list_runs() == ["r"]
    store.delete_run("r")
    assert not os.path.lexists(run) and store.list_runs() == []
