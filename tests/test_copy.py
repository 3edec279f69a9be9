"""``copy_store`` and ``mi-crow-store copy``: every kind of entry copied exactly, verified, resumable
(after a SIGKILL too), damaged sources refused."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result

from mi_crow.store import CopyReport, LayoutStore, LocalStore, MemoryStore, _keys, copy_store
from mi_crow.store._copy import CopyConflictError
from mi_crow.store.cli import EXIT_DAMAGED, EXIT_USAGE
from mi_crow.store.errors import CorruptFileError
from mi_crow.store.testing import all_dtypes, sample_tensor
from test_cli import invoke  # the same in-process runner, with its no-traceback checks

# ---------------------------------------------------------------------------------------------- helpers


def make(kind: str, root: Path) -> LayoutStore:
    return LocalStore(root) if kind == "local" else MemoryStore()


def populate(store: LayoutStore) -> None:
    """Every kind of entry, every dtype, the corner cases of each."""
    dtypes = all_dtypes()
    store.put_run_metadata("alpha", {"model": "m", "nan": float("nan"), "neg0": -0.0, "n": [1, 2.5, None]})
    store.put_detector_metadata(
        "alpha",
        0,
        {"i": 0, "inf": float("inf")},
        {
            "L0": {
                f"t_{str(d).removeprefix('torch.')}": sample_tensor(d, (3, 2), seed=n) for n, d in enumerate(dtypes)
            },
            "model.layers.1": {"activations": sample_tensor(torch.bfloat16, (4, 8)), "empty": torch.zeros(0, 3)},
        },
    )
    store.put_detector_metadata("alpha", 1, {}, {})  # an empty batch is an entry too
    store.put_detector_metadata("alpha", 2, {"i": 2}, {"L0": {"activations": sample_tensor(torch.float16, (2, 5))}})
    # Run batches: a list of every dtype (at index 2, which has a per-batch directory as well), a dict
    # whose names look like a list's, an empty list, a scalar, a large index.
    store.put_run_batch("alpha", 2, [sample_tensor(d, (4,), seed=n) for n, d in enumerate(dtypes)])
    store.put_run_batch("alpha", 7, {"item_0": torch.ones(2), "x": sample_tensor(torch.int8, (0, 3))})
    store.put_run_batch("alpha", 8, [])
    store.put_run_batch("alpha", 1_000_000, {"scalar": torch.tensor(3.5)})
    for k in range(4):
        store.put_run_detector_metadata(
            "alpha", {"step": k}, {"L0": {"top": torch.arange(k)}, "L1": {"v": sample_tensor(torch.float32, (k, 2))}}
        )
    store.put_run_detector_metadata("alpha", {"last": True}, {})
    # A run without metadata: only a run batch.
    store.put_run_batch("beta", 0, {"a": sample_tensor(torch.complex64, (2, 2))})
    store.put_model(
        "sae", {"W": sample_tensor(torch.float32, (4, 8)), "b": sample_tensor(torch.bfloat16, (8,))}, {"d": 8}
    )
    store.put_model("empty-model", {}, {})


ENTRIES = 13 + 1 + 2  # alpha: meta, 3 batches, 4 run batches, 5 appends; beta: 1 run batch; 2 models


def _bits(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    return str(t.dtype), tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensors(tensors: dict[Any, torch.Tensor]) -> dict[Any, tuple[str, tuple[int, ...], bytes]]:
    return {name: _bits(t) for name, t in tensors.items()}


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def contents(store: LayoutStore) -> dict[str, Any]:
    """Everything the store holds, as comparable values (every tensor's dtype, shape and bytes)."""
    runs: dict[str, Any] = {}
    for run in store.list_runs():
        listing = set(store._list(store._run_dir(run)))
        entries: dict[tuple[str, int], Any] = {}
        for name, is_dir in listing:
            i = _keys.batch_index(name, is_dir)
            if i is None:
                continue
            if is_dir:
                meta, tm = store.get_detector_metadata(run, i)
                entries["dir", i] = (_json(meta), {layer: _tensors(t) for layer, t in tm.items()})
            else:
                batch = store.get_run_batch(run, i)
                entries["file", i] = (
                    type(batch).__name__,
                    _tensors(dict(enumerate(batch)) if isinstance(batch, list) else batch),
                )
        has_meta = (_keys.RUN_METADATA_FILE, False) in listing
        runs[run] = {
            "meta": _json(store.get_run_metadata(run)) if has_meta else None,
            "batches": dict(sorted(entries.items())),
            "appends": [
                (_json(m), {layer: _tensors(t) for layer, t in tm.items()})
                for m, tm in store.iter_run_detector_metadata(run)
            ],
        }
    models = {}
    for model in store.list_models():
        tensors, meta = store.get_model(model)
        models[model] = (_json(meta), _tensors(tensors))
    return {"runs": runs, "models": models}


def tensor_bytes(c: dict[str, Any]) -> int:
    """The tensor bytes in ``contents(...)``."""
    total = 0
    for run in c["runs"].values():
        for kind, (_, tensors) in run["batches"].items():
            layers = tensors.values() if kind[0] == "dir" else [tensors]
            total += sum(len(bits[2]) for layer in layers for bits in layer.values())
        total += sum(len(bits[2]) for _, tm in run["appends"] for layer in tm.values() for bits in layer.values())
    total += sum(len(bits[2]) for _, tensors in c["models"].values() for bits in tensors.values())
    return total


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------- exact copies


PAIRS = [("local", "memory"), ("memory", "local"), ("local", "local"), ("memory", "memory")]


@pytest.mark.parametrize(("src_kind", "dst_kind"), PAIRS)
def test_every_kind_of_entry_round_trips_exactly(tmp_path: Path, src_kind: str, dst_kind: str) -> None:
    src, dst = make(src_kind, tmp_path / "src"), make(dst_kind, tmp_path / "dst")
    populate(src)
    expected = contents(src)
    lines: list[str] = []
    report = copy_store(src, dst, progress=lines.append)
    assert contents(dst) == expected
    assert report == CopyReport(copied=ENTRIES, skipped=0, bytes_copied=tensor_bytes(expected))
    assert [line.split(":")[0] for line in lines] == ["run 'alpha'", "run 'beta'", "models"]
    assert lines[0].startswith("run 'alpha': 13 entries copied (")
    assert lines[0].endswith("), 0 already present")
    assert isinstance(dst.get_run_batch("alpha", 2), list) and isinstance(dst.get_run_batch("alpha", 7), dict)
    assert dst.get_run_batch("alpha", 8) == []
    assert [m for m, _ in dst.iter_run_detector_metadata("alpha")][-1] == {"last": True}
    if isinstance(dst, LocalStore):
        assert dst.check() == []
    # Again: everything is there, equal, and skipped.
    again = copy_store(src, dst)
    assert again == CopyReport(copied=0, skipped=ENTRIES, bytes_copied=0)
    assert contents(dst) == expected


def test_the_callers_stores_are_not_changed(tmp_path: Path) -> None:
    src, dst = LocalStore(tmp_path / "src"), LocalStore(tmp_path / "dst")
    populate(src)
    copy_store(src, dst)
    assert src.verify_reads is False and dst.verify_reads is False


def test_runs_filter_and_no_models(tmp_path: Path) -> None:
    src = MemoryStore()
    populate(src)
    dst = MemoryStore()
    report = copy_store(src, dst, runs=["beta"], models=False)
    assert report.copied == 1 and dst.list_runs() == ["beta"] and dst.list_models() == []
    assert contents(dst)["runs"]["beta"] == contents(src)["runs"]["beta"]
    assert copy_store(src, dst, runs=[], models=True).copied == 2  # the models only
    assert dst.list_runs() == ["beta"] and dst.list_models() == ["empty-model", "sae"]
    assert copy_store(src, dst, runs=["beta", "beta"], models=False) == CopyReport(0, 1, 0)


@pytest.mark.parametrize("runs", [["nosuch"], ["alpha", "nosuch"], ["../x"], ["a/b"]])
def test_unknown_or_invalid_run_copies_nothing(runs: list[str]) -> None:
    src, dst = MemoryStore(), MemoryStore()
    populate(src)
    with pytest.raises(ValueError, match=r"nosuch|run_id"):
        copy_store(src, dst, runs=runs)
    assert dst.list_runs() == [] and dst.list_models() == []
    with pytest.raises(ValueError, match="sequence of run ids"):
        copy_store(src, dst, runs="alpha")


def test_only_layout_stores_are_copied() -> None:
    with pytest.raises(TypeError, match="LayoutStore"):
        copy_store(object(), MemoryStore())  # type: ignore[arg-type]


def test_run_metadata_is_written_last() -> None:
    class Recording(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.puts: list[tuple[str, str]] = []

        def put_run_metadata(self, run_id: str, meta: dict[str, Any]) -> str:
            self.puts.append((run_id, "meta"))
            return super().put_run_metadata(run_id, meta)

        def put_detector_metadata(self, run_id: str, batch_index: int, *args: Any) -> str:
            self.puts.append((run_id, "batch"))
            return super().put_detector_metadata(run_id, batch_index, *args)

        def put_run_batch(self, run_id: str, batch_index: int, tensors: Any) -> str:
            self.puts.append((run_id, "run batch"))
            return super().put_run_batch(run_id, batch_index, tensors)

        def put_run_detector_metadata(self, run_id: str, *args: Any) -> str:
            self.puts.append((run_id, "append"))
            return super().put_run_detector_metadata(run_id, *args)

    src, dst = MemoryStore(), Recording()
    populate(src)
    copy_store(src, dst)
    alpha = [what for run, what in dst.puts if run == "alpha"]
    assert alpha[-1] == "meta" and alpha.count("meta") == 1 and len(alpha) == 13
    assert [what for run, what in dst.puts if run == "beta"] == ["run batch"]


def test_files_that_are_not_the_stores_are_not_copied(tmp_path: Path) -> None:
    src = LocalStore(tmp_path / "src")
    populate(src)
    run_dir = src._run_key("alpha")
    (run_dir / "model.pt").write_bytes(b"trainer's checkpoint")  # what mi_crow's SaeTrainer saves there
    (run_dir / "history.json").write_text("{}")
    (run_dir / "snapshots").mkdir()
    (run_dir / "snapshots" / "step_1.pt").write_bytes(b"x")
    (tmp_path / "src" / "datasets").mkdir()
    (tmp_path / "src" / "datasets" / "d.txt").write_text("x")
    dst = LocalStore(tmp_path / "dst")
    assert copy_store(src, dst).copied == ENTRIES
    copied = {p.relative_to(tmp_path / "dst").as_posix() for p in (tmp_path / "dst").rglob("*")}
    assert not {"runs/alpha/model.pt", "runs/alpha/history.json", "runs/alpha/snapshots", "datasets"} & copied
    assert contents(dst) == contents(src)


def test_a_batch_directory_without_metadata_is_not_copied(tmp_path: Path) -> None:
    src = LocalStore(tmp_path / "src")
    src.put_run_batch("r", 0, [torch.ones(2)])
    (tmp_path / "src/runs/r/batch_5/L").mkdir(parents=True)  # no metadata.json: the store reads it as absent
    lines: list[str] = []
    dst = MemoryStore()
    assert copy_store(src, dst, progress=lines.append).copied == 1
    assert dst.list_run_batches("r") == [0]
    assert any("batch_5" in line and "not copied" in line for line in lines)


# ---------------------------------------------------------------------------------------------- resuming


def test_entries_already_at_the_destination_are_skipped(tmp_path: Path) -> None:
    src = LocalStore(tmp_path / "src")
    populate(src)
    dst = LocalStore(tmp_path / "dst")
    assert copy_store(src, dst, runs=["alpha"], models=False).copied == 13
    report = copy_store(src, dst)
    assert (report.copied, report.skipped) == (3, 13)
    assert contents(dst) == contents(src)


def test_a_partly_copied_run_is_completed(tmp_path: Path) -> None:
    src = MemoryStore()
    populate(src)
    dst = LocalStore(tmp_path / "dst")
    # What an interrupted copy leaves: some batches and the first two appends, no run metadata yet.
    dst.put_detector_metadata("alpha", 0, *src.get_detector_metadata("alpha", 0))
    dst.put_run_batch("alpha", 7, src.get_run_batch("alpha", 7))
    for m, tm in list(src.iter_run_detector_metadata("alpha"))[:2]:
        dst.put_run_detector_metadata("alpha", m, tm)
    report = copy_store(src, dst)
    assert (report.copied, report.skipped) == (ENTRIES - 4, 4)
    assert contents(dst) == contents(src)
    assert dst.check() == []


def test_different_entries_are_replaced_by_the_sources(tmp_path: Path) -> None:
    src = MemoryStore()
    populate(src)
    dst = LocalStore(tmp_path / "dst")
    dst.put_run_metadata("alpha", {"model": "other"})
    dst.put_detector_metadata("alpha", 0, {"i": 0}, {"L0": {"t_float32": torch.zeros(3, 2)}})  # same names, other bits
    dst.put_detector_metadata("alpha", 2, {"i": 2, "extra": 1}, src.get_detector_metadata("alpha", 2)[1])  # metadata
    dst.put_run_batch("alpha", 7, [torch.ones(2)])  # a list where the source has a dict
    dst.put_run_batch("alpha", 8, {"x": torch.ones(1)})
    dst.put_model("sae", {"W": sample_tensor(torch.float32, (4, 8)).to(torch.float64)}, {"d": 8})  # other dtype
    dst.put_run_batch("gamma", 0, [torch.ones(1)])  # only the destination has it: kept
    dst.put_run_batch("alpha", 99, [torch.ones(1)])
    report = copy_store(src, dst)
    assert (report.copied, report.skipped) == (ENTRIES, 0)
    got = contents(dst)
    assert got["runs"]["gamma"]["batches"] == {("file", 0): ("list", _tensors({0: torch.ones(1)}))}
    del got["runs"]["gamma"], got["runs"]["alpha"]["batches"]["file", 99]
    assert got == contents(src)
    assert dst.check() == []


def test_damaged_entries_at_the_destination_are_rewritten(tmp_path: Path) -> None:
    src = MemoryStore()
    populate(src)
    dst = LocalStore(tmp_path / "dst")
    copy_store(src, dst)
    flip_last_byte(tmp_path / "dst/runs/alpha/batch_0/L0/t_int32.safetensors")
    (tmp_path / "dst/runs/alpha/batch_000007.safetensors").write_bytes(b"\x01\x02")
    flip_last_byte(tmp_path / "dst/models/sae/model.safetensors")
    assert len(dst.check()) == 3
    report = copy_store(src, dst)
    assert (report.copied, report.skipped) == (3, ENTRIES - 3)
    assert dst.check() == [] and contents(dst) == contents(src)


def test_appends_are_only_ever_extended() -> None:
    src = MemoryStore()
    for k in range(5):
        src.put_run_detector_metadata("r", {"k": k}, {"L": {"t": torch.arange(k)}})
    # The destination holds a longer log whose first five entries are the source's: nothing to do.
    longer = MemoryStore()
    copy_store(src, longer)
    longer.put_run_detector_metadata("r", {"k": "theirs"}, {})
    assert copy_store(src, longer) == CopyReport(0, 5, 0)
    assert [m["k"] for m, _ in longer.iter_run_detector_metadata("r")] == [0, 1, 2, 3, 4, "theirs"]
    # A log that differs at entry 1: refused, nothing appended, no metadata written.
    src.put_run_metadata("r", {"done": True})
    other = MemoryStore()
    other.put_run_detector_metadata("r", {"k": 0}, {"L": {"t": torch.arange(0)}})
    other.put_run_detector_metadata("r", {"k": 1}, {"L": {"t": torch.arange(1) + 7}})
    with pytest.raises(CopyConflictError, match="append 1 differs") as e:
        copy_store(src, other)
    assert isinstance(e.value, OSError) and e.value.path == "memory://runs/r/detectors"
    assert len(list(other.iter_run_detector_metadata("r"))) == 2 and other.get_run_metadata("r") == {}


def test_an_unreadable_append_at_the_destination_is_a_conflict(tmp_path: Path) -> None:
    src = MemoryStore()
    for k in range(3):
        src.put_run_detector_metadata("r", {"k": k}, {"L": {"t": torch.ones(4) * k}})
    dst = LocalStore(tmp_path / "dst")
    copy_store(src, dst)
    flip_last_byte(tmp_path / "dst/runs/r/detectors/.entries/000000000001.safetensors")
    with pytest.raises(CopyConflictError, match="cannot be read"):
        copy_store(src, dst)


def test_a_destination_that_reads_back_otherwise_fails_the_copy() -> None:
    class Lossy(MemoryStore):
        def put_run_batch(self, run_id: str, batch_index: int, tensors: Any) -> str:
            return super().put_run_batch(run_id, batch_index, {k: t.half() for k, t in tensors.items()})

        def put_run_detector_metadata(self, run_id: str, metadata: dict[str, Any], tensor_metadata: Any) -> str:
            return super().put_run_detector_metadata(run_id, {**metadata, "oops": 1}, tensor_metadata)

    src = MemoryStore()
    src.put_run_batch("r", 0, {"x": torch.ones(2)})
    with pytest.raises(CorruptFileError, match=r"batch_000000.safetensors.*differs.*float16") as e:
        copy_store(src, Lossy())
    assert e.value.path == "memory://runs/r/batch_000000.safetensors"
    src = MemoryStore()
    src.put_run_detector_metadata("r", {}, {})
    with pytest.raises(CorruptFileError, match="append 0, read back after copying"):
        copy_store(src, Lossy())


def test_a_damaged_source_file_stops_the_copy_and_is_named(tmp_path: Path) -> None:
    src = LocalStore(tmp_path / "src")  # reads without verify: the copy verifies anyway
    for i in range(3):
        src.put_detector_metadata("r", i, {"i": i}, {"L": {"a": torch.randn(64), "b": torch.randn(8)}})
    damaged = tmp_path / "src/runs/r/batch_1/L/a.safetensors"
    flip_last_byte(damaged)  # the last byte of the tensor data: only the checksum sees it
    assert src.get_detector_metadata("r", 1)[0] == {"i": 1}
    dst = LocalStore(tmp_path / "dst")
    with pytest.raises(CorruptFileError, match="checksum mismatch") as e:
        copy_store(src, dst)
    assert e.value.path == str(damaged)
    assert dst.list_run_batches("r") == [0]  # batch 0 was copied; nothing at all of batch 1
    assert not (tmp_path / "dst/runs/r/batch_1").exists()
    # Through the command line: exit 1, one line naming the file.
    result = invoke("copy", str(tmp_path / "src"), str(tmp_path / "dst2"))
    assert result.exit_code == EXIT_DAMAGED
    assert error_line(result).startswith(f"Error: corrupt or non-conforming stored file {damaged}: checksum mismatch")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mi_crow.store", *args], capture_output=True, text=True, check=False, timeout=600
    )


def _read_line(fd: int) -> str:
    """One line from ``fd``, read a byte at a time: nothing after it leaves the pipe."""
    line = b""
    while not line.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return line.decode()


def test_a_copy_killed_at_any_point_resumes_to_an_exact_copy(tmp_path: Path) -> None:
    """SIGKILL the real command as soon as it reports its first run, then run it again to the end.

    No timing: the kill follows the first progress line, and the command cannot finish meanwhile
    however slowly the kill comes, because its progress goes into a pipe of one page that nobody
    reads after that line (it blocks once ~70 more lines are written; the source has 200 runs).
    """
    src_root, dst_root = tmp_path / "src", tmp_path / "dst"
    src = LocalStore(src_root)
    runs = 200
    for r in range(runs):
        run = f"r{r:03d}"
        src.put_detector_metadata(run, 0, {"r": r}, {"L": {"a": sample_tensor(torch.float32, (16, 256), seed=r)}})
        src.put_run_batch(run, 1, [sample_tensor(torch.bfloat16, (32, 256), seed=r)])
        src.put_run_detector_metadata(run, {"n": r}, {"L": {"top": torch.arange(r)}})
        src.put_run_metadata(run, {"run": r})
    src.put_model("sae", {"w": sample_tensor(torch.float32, (256, 256))})
    read_fd, write_fd = os.pipe()
    try:
        fcntl.fcntl(read_fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
        proc = subprocess.Popen(
            [sys.executable, "-m", "mi_crow.store", "copy", str(src_root), str(dst_root)],
            stdout=write_fd,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(write_fd)
        write_fd = -1
        try:
            first = _read_line(read_fd)  # the copy has finished its first run, and goes on
        finally:
            proc.kill()
            _, stderr = proc.communicate()
        assert first.startswith("run 'r000': 4 entries copied"), first + stderr
        assert proc.returncode == -signal.SIGKILL
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    dst = LocalStore(dst_root)
    expected = contents(src)
    interrupted = contents(dst)
    assert interrupted["runs"]["r000"] == expected["runs"]["r000"]
    assert len(interrupted["runs"]) < runs and interrupted["models"] == {}
    # Every run the destination shows with its metadata is complete.
    for run, held in interrupted["runs"].items():
        if held["meta"] is not None:
            assert held == expected["runs"][run]
    finished = run_cli("copy", str(src_root), str(dst_root))
    assert finished.returncode == 0, finished.stdout + finished.stderr
    m = re.fullmatch(
        r"copied (\d+) entr(?:y|ies) \(.*\), (\d+) already present, from .*", finished.stdout.splitlines()[-1]
    )
    assert m is not None, finished.stdout
    copied, skipped = int(m.group(1)), int(m.group(2))
    assert copied + skipped == 4 * runs + 1 and skipped >= 4
    assert contents(dst) == expected
    assert dst.check() == []


# ---------------------------------------------------------------------------------------------- the command


def error_line(result: Result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


def test_copy_command_copies_and_resumes(tmp_path: Path) -> None:
    src = LocalStore(tmp_path / "src")
    populate(src)
    dst = tmp_path / "dst"
    result = invoke("copy", str(tmp_path / "src"), str(dst))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == ["run 'alpha'", "run 'beta'", "models"]
    assert lines[-1].startswith(f"copied {ENTRIES} entries (") and lines[-1].endswith(
        f"), 0 already present, from {tmp_path / 'src'} to {dst}"
    )
    assert contents(LocalStore(dst)) == contents(src)
    again = invoke("copy", str(tmp_path / "src"), str(dst))
    assert again.exit_code == 0
    assert (
        again.stdout.splitlines()[-1]
        == f"copied 0 entries (0 B), {ENTRIES} already present, from {tmp_path / 'src'} to {dst}"
    )


def test_copy_command_run_and_no_models(tmp_path: Path) -> None:
    populate(LocalStore(tmp_path / "src"))
    result = invoke("copy", str(tmp_path / "src"), str(tmp_path / "dst"), "--run", "beta", "--no-models")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:-1] == ["run 'beta': 1 entry copied (32 B), 0 already present"]
    dst = LocalStore(tmp_path / "dst")
    assert dst.list_runs() == ["beta"] and dst.list_models() == []


@pytest.mark.parametrize("command", ["ls", "copy"])
def test_copy_command_unknown_run_is_refused_as_ls_refuses_it(tmp_path: Path, command: str) -> None:
    populate(LocalStore(tmp_path / "src"))
    args = [command, str(tmp_path / "src"), *([str(tmp_path / "dst")] if command == "copy" else [])]
    result = invoke(*args, "--run", "nosuch")
    assert result.exit_code == EXIT_USAGE
    assert error_line(result) == f"Error: no run 'nosuch' in {tmp_path / 'src'}; its runs are: alpha, beta"
    assert not (tmp_path / "dst").exists()
    bad = invoke(*args, "--run", "../x")
    assert bad.exit_code == EXIT_USAGE and "--run" in error_line(bad)


def test_copy_command_refuses_bad_folders(tmp_path: Path) -> None:
    populate(LocalStore(tmp_path / "src"))
    src = str(tmp_path / "src")
    missing = invoke("copy", str(tmp_path / "nosuch"), str(tmp_path / "dst"))
    assert missing.exit_code == EXIT_USAGE and "does not exist" in missing.output
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not a store")
    not_a_store = invoke("copy", str(tmp_path / "plain"), str(tmp_path / "dst"))
    assert not_a_store.exit_code == EXIT_USAGE and "is not a mi-crow-store store" in error_line(not_a_store)
    into_other = invoke("copy", src, str(tmp_path / "plain"))
    assert into_other.exit_code == EXIT_USAGE
    assert f"{tmp_path / 'plain'} is not empty and not a mi-crow-store store" in error_line(into_other)
    for same in (src, str(tmp_path / "src" / "runs" / "backup"), str(tmp_path)):
        refused = invoke("copy", src, same)
        assert refused.exit_code == EXIT_USAGE and "same folder, or one lies inside the other" in error_line(refused)
    (tmp_path / "file").write_text("x")
    assert invoke("copy", src, str(tmp_path / "file")).exit_code == EXIT_USAGE
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["notes.txt"]
    # An empty folder, or an existing store, is a fine destination.
    (tmp_path / "empty").mkdir()
    assert invoke("copy", src, str(tmp_path / "empty")).exit_code == 0
    assert invoke("copy", src, str(tmp_path / "empty"), "--run", "alpha").exit_code == 0


def test_copy_command_with_other_prefixes(tmp_path: Path) -> None:
    src = LocalStore(tmp_path / "src", runs_prefix="my/runs", model_prefix="my-models")
    src.put_run_batch("r", 3, {"x": torch.zeros(2, dtype=torch.int16)})
    src.put_model("m", {"w": torch.ones(2)})
    opts = ("--runs-prefix", "my/runs", "--model-prefix", "my-models")
    result = invoke("copy", str(tmp_path / "src"), str(tmp_path / "dst"), *opts)
    assert result.exit_code == 0, result.output
    dst = LocalStore(tmp_path / "dst", runs_prefix="my/runs", model_prefix="my-models")
    assert contents(dst) == contents(src)
    assert (tmp_path / "dst/my/runs/r/batch_000003.safetensors").is_file()


def test_copy_command_takes_urls(tmp_path: Path) -> None:
    populate(LocalStore(tmp_path / "src"))
    into_memory = invoke("copy", str(tmp_path / "src"), "memory://")
    assert into_memory.exit_code == 0, into_memory.output
    assert into_memory.stdout.splitlines()[-1].endswith(f"0 already present, from {tmp_path / 'src'} to memory://")
    from_memory = invoke("copy", "memory://", str(tmp_path / "dst"))
    assert from_memory.exit_code == 0 and from_memory.stdout.splitlines()[-1].startswith("copied 0 entries (0 B), 0")
    from_file_url = invoke("copy", f"file://{tmp_path / 'src'}", str(tmp_path / "dst"), "--run", "beta")
    assert from_file_url.exit_code == 0, from_file_url.output
    assert LocalStore(tmp_path / "dst").list_runs() == ["beta"]
    for args in (("gs://bucket/x", str(tmp_path / "dst")), (str(tmp_path / "src"), "gs://bucket/x")):
        refused = invoke("copy", *args)
        assert refused.exit_code == EXIT_USAGE
        assert "no store serves the URL scheme 'gs'" in error_line(refused)


@pytest.mark.s3
def test_copy_to_a_bucket_and_back(tmp_path: Path, seaweedfs: Any) -> None:
    """The how-to's round trip on a real S3 server: a local store to a bucket, verified there,
    copied back to another folder, equal to the original bit for bit."""
    from mi_crow.store.object_store import ObjectStore

    src = LocalStore(tmp_path / "src")
    populate(src)
    url = f"s3://{seaweedfs.new_bucket('copy')}/captures/run-set"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(seaweedfs.env(), NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mi_crow.store", *args], capture_output=True, text=True, env=env, timeout=600
        )

    up = cli("copy", str(tmp_path / "src"), url)
    assert up.returncode == 0, up.stdout + up.stderr
    assert up.stdout.splitlines()[-1].startswith(f"copied {ENTRIES} entries (")
    bucket = ObjectStore(url, config=seaweedfs.store_config(), client_options=seaweedfs.client_options())
    assert contents(bucket) == contents(src)
    checked = cli("verify", url)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.splitlines()[-1] == "ok: all runs and models verified (2 run(s), 2 model(s))"
    listed = cli("ls", url, "--tensors")  # reads the headers of tensor files in generation folders
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert listed.stdout.splitlines()[-1] == cli("ls", str(tmp_path / "src"), "--tensors").stdout.splitlines()[-1]
    assert "DAMAGED" not in listed.stdout and "t_bfloat16" in listed.stdout
    again = cli("copy", str(tmp_path / "src"), url)
    assert again.returncode == 0 and f"0 entries (0 B), {ENTRIES} already present" in again.stdout.splitlines()[-1]
    down = cli("copy", url, str(tmp_path / "back"))
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [line for line in up.stdout.splitlines() + down.stdout.splitlines() if line.startswith("note:")]
    back = LocalStore(tmp_path / "back")
    assert contents(back) == contents(src) and back.check() == []
    collected = cli("gc", url, "--grace", "3600")
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert collected.stdout.splitlines()[-1].startswith("0 leftover(s) removed")
