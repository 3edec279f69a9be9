"""LocalStore on disk: exact files, exact bytes, atomic replacement, links, damage, durability."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

from mi_crow.store import CorruptFileError, LocalStore
from mi_crow.store import _atomic as atomic
from mi_crow.store._tensor_file import DTYPE_TO_CODE
from mi_crow.store.testing import all_dtypes, sample_tensor
from mi_crow.store.testing.store_tests import assert_same


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "s")


def test_layout_on_disk(store: LocalStore) -> None:
    store.put_run_metadata("r", {"ü": "✓"})
    store.put_detector_metadata(
        "r", 3, {"m": 1}, {"L": {"activations": torch.ones(2), "attention_mask": torch.ones(2)}}
    )
    store.put_run_batch("r", 7, [torch.ones(1)])
    store.put_run_detector_metadata("r", {"s": 0}, {"L": {"k": torch.ones(1)}})
    store.put_model("sae", {"w": torch.ones(1)}, {"d": 1})
    store.put_tensor("datasets/x.safetensors", torch.ones(1))
    assert files_under(store.base_path) == [
        ".mi-crow-store.lock",
        "datasets/x.safetensors",
        "models/sae/metadata.json",
        "models/sae/model.safetensors",
        "runs/r/batch_000007.safetensors",
        "runs/r/batch_3/L/activations.safetensors",
        "runs/r/batch_3/L/attention_mask.safetensors",
        "runs/r/batch_3/metadata.json",
        "runs/r/detectors/.entries/000000000000.safetensors",
        "runs/r/meta.json",
    ]
    assert (store.base_path / "runs/r/meta.json").read_text("utf-8") == '{\n  "ü": "✓"\n}'
    assert json.loads((store.base_path / "runs/r/batch_3/metadata.json").read_text("utf-8")) == {
        "m": 1,
        "_tensor_metadata_names": {"L": ["activations", "attention_mask"]},
    }


def test_custom_prefixes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, runs_prefix="exp/acts", model_prefix="saes")
    assert store.put_run_metadata("r", {}) == "exp/acts/r/meta.json"
    assert store.put_model("m", {"w": torch.ones(1)}) == "saes/m"
    assert (tmp_path / "exp/acts/r/meta.json").is_file() and (tmp_path / "saes/m/model.safetensors").is_file()
    for bad in ("/abs", "../up", "a/../b", ".hidden", "a//b", "x" * 1100):
        with pytest.raises(ValueError, match="runs_prefix"):
            LocalStore(tmp_path, runs_prefix=bad)


def test_empty_prefixes_put_runs_and_models_at_the_top(tmp_path: Path) -> None:
    """mi_crow 1.0 accepts empty prefixes; runs (or models) then live directly under base_path."""
    store = LocalStore(tmp_path, runs_prefix="", dataset_prefix="")
    assert store.put_run_metadata("r", {"a": 1}) == "r/meta.json"
    store.put_detector_metadata("r", 0, {}, {"l": {"k": torch.ones(2)}})
    store.put_model("m", {"w": torch.ones(1)})
    assert (tmp_path / "r/meta.json").is_file() and (tmp_path / "r/batch_0/l/k.safetensors").is_file()
    assert store.list_runs() == ["r"]  # models/ is the model prefix, not a run
    assert store.list_models() == ["m"] and store.check() == []
    assert store._run_key("r") == tmp_path / "r"
    models_at_top = LocalStore(tmp_path / "t", model_prefix="")
    models_at_top.put_model("m", {"w": torch.ones(1)})
    models_at_top.put_run_metadata("r", {})
    assert models_at_top.list_models() == ["m"] and models_at_top.list_runs() == ["r"]


def test_default_base_path_is_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = LocalStore()
    assert store.base_path == Path("")
    store.put_run_metadata("r", {"a": 1})
    assert (tmp_path / "runs/r/meta.json").is_file()
    assert store.get_run_metadata("r") == {"a": 1}


def expected_tensor_file(t: torch.Tensor, metadata_json: bytes) -> bytes:
    """The exact bytes of a per-batch tensor file, built independently of the store: a safetensors
    file whose ``__metadata__`` holds the CRC-32 of the batch's metadata.json, of the data, and of
    the header's interpreted values (``[sorted metadata items, [[name, dtype, shape, begin, end]]]``)."""
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    code = DTYPE_TO_CODE[t.dtype]
    meta = {
        "mi_crow_store.metadata_crc32": f"{zlib.crc32(metadata_json):08x}",
        "mi_crow_store.crc32": json.dumps({"tensor": f"{zlib.crc32(data):08x}"}, separators=(",", ":")),
    }
    canon = json.dumps([sorted(meta.items()), [["tensor", code, list(t.shape), 0, len(data)]]], separators=(",", ":"))
    meta["mi_crow_store.header_crc32"] = f"{zlib.crc32(canon.encode()):08x}"
    entry = {"dtype": code, "shape": list(t.shape), "data_offsets": [0, len(data)]}
    head = json.dumps({"__metadata__": meta, "tensor": entry}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


@pytest.mark.parametrize("dtype", all_dtypes(), ids=str)
def test_single_tensor_files_have_the_pinned_layout_and_load_with_safetensors(
    store: LocalStore, dtype: torch.dtype
) -> None:
    for i, shape in enumerate([(), (0,), (3, 5), (2, 1, 4)]):
        t = sample_tensor(dtype, shape, i)
        store.put_detector_metadata("r", i, {}, {"l": {"k": t}})
        path = store.base_path / f"runs/r/batch_{i}/l/k.safetensors"
        metadata_json = (store.base_path / f"runs/r/batch_{i}/metadata.json").read_bytes()
        assert path.read_bytes() == expected_tensor_file(t, metadata_json)
        assert_same(st.load_file(path)["tensor"], t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_large_tensor_checksum_computed_while_writing(store: LocalStore, dtype: torch.dtype) -> None:
    """Above 4 MiB the CRC runs on a helper thread and the header is written after the data."""
    t = sample_tensor(dtype, (6 << 20,), 7)  # 6-48 MiB
    store.put_detector_metadata("r", 0, {}, {"l": {"k": t}})
    path = store.base_path / "runs/r/batch_0/l/k.safetensors"
    metadata_json = (store.base_path / "runs/r/batch_0/metadata.json").read_bytes()
    assert path.read_bytes() == expected_tensor_file(t, metadata_json)
    assert store.check() == []


@pytest.mark.parametrize("dtype", all_dtypes(), ids=str)
def test_without_checksums_files_are_exactly_safetensors_save(tmp_path: Path, dtype: torch.dtype) -> None:
    store = LocalStore(tmp_path / "s", checksums=False, verify=True)
    for i, shape in enumerate([(), (0,), (3, 5), (512, 1024)]):  # the last is written with fallocate
        t = sample_tensor(dtype, shape, i)
        store.put_detector_metadata("r", i, {}, {"l": {"k": t}})
        path = store.base_path / f"runs/r/batch_{i}/l/k.safetensors"
        assert path.read_bytes() == st.save({"tensor": t})
        assert_same(store.get_detector_metadata_by_layer_by_key("r", i, "l", "k"), t)
    assert store.check() == []


def test_multi_tensor_files_load_with_safetensors(store: LocalStore) -> None:
    d = {n: sample_tensor(dt, (3, 2), i) for i, (n, dt) in enumerate(zip("abcdef", all_dtypes()[:6], strict=True))}
    store.put_run_batch("r", 0, d)
    path = store.base_path / "runs/r/batch_000000.safetensors"
    loaded = st.load_file(path)
    for n, t in d.items():
        assert_same(loaded[n], t)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["mi_crow_store.kind"] == "dict"
        assert sorted(json.loads(f.metadata()["mi_crow_store.crc32"])) == list("abcdef")
    store.put_run_detector_metadata("r", {"x": 1}, {"l": d})
    entry = store.base_path / "runs/r/detectors/.entries/000000000000.safetensors"
    assert sorted(st.load_file(entry)) == [f"l/{n}" for n in "abcdef"]


def test_no_temp_files_remain(store: LocalStore) -> None:
    for v in range(3):
        store.put_detector_metadata("r", 0, {"v": v}, {"l": {"k": torch.full((4,), v)}})
        store.put_run_metadata("r", {"v": v})
        store.put_model("m", {"w": torch.ones(1)})
    store.put_run_detector_metadata("r", {}, {})
    store.delete_run("r")
    store.delete_model("m")
    leftovers = [p for p in store.base_path.rglob("*") if p.name.startswith((".tmp-", ".stage-", ".trash-"))]
    assert leftovers == []
    assert files_under(store.base_path) == [".mi-crow-store.lock"]


def test_leftovers_of_killed_writers_are_invisible(store: LocalStore) -> None:
    store.put_detector_metadata("r", 0, {"v": 1}, {"l": {"k": torch.ones(1)}})
    run = store.base_path / "runs/r"
    (run / ".tmp-0123").write_bytes(b"partial")
    (run / ".stage-abcd" / "l").mkdir(parents=True)
    (run / ".stage-abcd/l/k.safetensors").write_bytes(b"half a tensor")
    (run / ".trash-ffff").mkdir()
    (store.base_path / "runs/.trash-0000").mkdir()
    (run / "detectors/.entries").mkdir(parents=True)
    (run / "detectors/.entries/.tmp-99").write_bytes(b"x")
    assert store.list_runs() == ["r"]
    assert store.list_run_batches("r") == [0]
    assert list(store.iter_run_detector_metadata("r")) == []
    store.put_run_detector_metadata("r", {"i": 0}, {})
    assert [m for m, _ in store.iter_run_detector_metadata("r")] == [{"i": 0}]
    assert store.get_detector_metadata("r", 0)[0] == {"v": 1}


def test_failed_write_leaves_earlier_state(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.put_detector_metadata("r", 0, {"v": 1}, {"a": {"k": torch.ones(2)}, "b": {"k": torch.ones(2)}})
    store.put_model("m", {"w": torch.ones(1)}, {"v": 1})
    before = {p: (store.base_path / p).read_bytes() for p in files_under(store.base_path)}
    real = atomic.create_file
    calls = 0

    def failing(dir_fd: int, name: str, parts: object, *, durable: bool, where: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(28, "No space left on device (simulated)")
        real(dir_fd, name, parts, durable=durable, where=where)  # type: ignore[arg-type]

    monkeypatch.setattr(atomic, "create_file", failing)
    for attempt in (
        lambda: store.put_detector_metadata("r", 0, {"v": 2}, {"a": {"k": torch.zeros(2)}, "b": {"k": torch.zeros(2)}}),
        lambda: store.put_model("m", {"w": torch.zeros(1)}, {"v": 2}),
        lambda: store.put_run_metadata("r", {"v": 2}),
    ):
        calls = 1  # the next file written fails
        with pytest.raises(OSError, match="simulated"):
            attempt()
    monkeypatch.undo()
    assert {p: (store.base_path / p).read_bytes() for p in files_under(store.base_path)} == before
    assert [p.name for p in store.base_path.rglob(".*")] == [".mi-crow-store.lock"]


def test_symlink_planted_in_store_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "meta.json").write_text('{"secret": 1}')
    (outside / "batch_0").mkdir()
    (outside / "batch_0/metadata.json").write_text('{"_tensor_metadata_names": {}}')
    store = LocalStore(tmp_path / "s")
    (tmp_path / "s/runs").mkdir(parents=True)
    (tmp_path / "s/runs/evil").symlink_to(outside)
    t = {"l": {"k": torch.ones(1)}}
    for call in (
        lambda: store.put_run_metadata("evil", {}),
        lambda: store.get_run_metadata("evil"),
        lambda: store.put_detector_metadata("evil", 1, {}, t),
        lambda: store.get_detector_metadata("evil", 0),
        lambda: store.put_run_batch("evil", 0, []),
        lambda: store.get_run_batch("evil", 0),
        lambda: store.list_run_batches("evil"),
        lambda: store.put_run_detector_metadata("evil", {}, t),
        lambda: list(store.iter_run_detector_metadata("evil")),
    ):
        with pytest.raises(CorruptFileError, match=r"runs/evil: is a symbolic link"):
            call()
    assert store.list_runs() == []  # a link is not a run
    problems = store.check(["evil"])
    assert problems and all("symbolic link" in p.problem for p in problems)
    store.delete_run("evil")  # removes the link itself, never what it points to
    assert not (tmp_path / "s/runs/evil").exists() and not (tmp_path / "s/runs/evil").is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["batch_0", "meta.json"]
    assert (outside / "meta.json").read_text() == '{"secret": 1}'


def test_symlink_pointing_inside_the_store_is_not_followed_either(store: LocalStore) -> None:
    store.put_run_metadata("real", {"v": 1})
    (store.base_path / "runs/alias").symlink_to(store.base_path / "runs/real")
    with pytest.raises(CorruptFileError, match="symbolic link"):
        store.get_run_metadata("alias")
    with pytest.raises(CorruptFileError, match="symbolic link"):
        store.put_run_metadata("alias", {"v": 2})
    assert store.get_run_metadata("real") == {"v": 1} and store.list_runs() == ["real"]


def test_symlink_inside_an_entry_is_refused(store: LocalStore, tmp_path: Path) -> None:
    store.put_detector_metadata("r", 0, {}, {"l": {"k": torch.ones(1)}})
    secret = tmp_path / "secret.safetensors"
    st.save_file({"tensor": torch.full((1,), 42.0)}, secret)
    target = store.base_path / "runs/r/batch_0/l/k.safetensors"
    target.unlink()
    target.symlink_to(secret)
    with pytest.raises(CorruptFileError, match="symbolic link"):
        store.get_detector_metadata("r", 0)
    with pytest.raises(CorruptFileError, match="symbolic link"):
        store.get_detector_metadata_by_layer_by_key("r", 0, "l", "k")
    assert [p.path for p in store.check()] == [str(target)]


def test_damaged_files_raise_naming_the_file(store: LocalStore) -> None:
    store.put_detector_metadata("r", 0, {}, {"l": {"k": torch.ones(1000)}})
    path = store.base_path / "runs/r/batch_0/l/k.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptFileError, match=r"k\.safetensors: truncated"):
        store.get_detector_metadata("r", 0)
    with pytest.raises(OSError, match=r"k\.safetensors"):
        store.get_detector_metadata_by_layer_by_key("r", 0, "l", "k")
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(OSError, match="not valid JSON"):
        store.get_detector_metadata_by_layer_by_key("r", 0, "l", "k")
    path.write_bytes(b"\x01")
    with pytest.raises(OSError, match="shorter than"):
        store.get_detector_metadata_by_layer_by_key("r", 0, "l", "k")
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"listed in its batch's metadata\.json but missing"):
        store.get_detector_metadata("r", 0)
    meta = store.base_path / "runs/r/batch_0/metadata.json"
    meta.write_text("{broken")
    with pytest.raises(json.JSONDecodeError, match=r"batch_0/metadata\.json"):
        store.get_detector_metadata("r", 0)
    meta.write_text("{}")
    with pytest.raises(ValueError, match="_tensor_metadata_names"):
        store.get_detector_metadata("r", 0)
    meta.write_text('{"_tensor_metadata_names": {"../../x": ["k"]}}')
    with pytest.raises(ValueError, match="unsafe name"):
        store.get_detector_metadata("r", 0)
    (store.base_path / "runs/r/meta.json").write_text("[1,")
    with pytest.raises(json.JSONDecodeError, match=r"runs/r/meta\.json"):
        store.get_run_metadata("r")


def test_durable_mode_fsyncs_files_and_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    LocalStore(tmp_path / "fast").put_detector_metadata("r", 0, {}, {"l": {"k": torch.ones(1)}})
    assert synced == []
    durable = LocalStore(tmp_path / "d", durable=True)
    durable.put_detector_metadata("r", 0, {}, {"l": {"k": torch.ones(1)}})
    run = str(tmp_path / "d/runs/r")
    assert any(p.endswith("k.safetensors") for p in synced)
    assert any(p.endswith("metadata.json") for p in synced)
    assert run in synced  # the directory whose entry (batch_0) appeared
    synced.clear()
    durable.put_run_metadata("r", {})
    assert synced[-1] == run and any(p.endswith(".tmp-" + p.split(".tmp-")[-1]) for p in synced[:-1])


def test_readers_never_see_a_mix_during_overwrites(store: LocalStore) -> None:
    """Thread-level check; tests/test_processes.py does the same with real processes."""

    def version(v: int) -> dict[str, dict[str, torch.Tensor]]:
        return {f"l{j}": {"a": torch.full((256,), v), "b": torch.full((3,), v)} for j in range(4)}

    store.put_detector_metadata("r", 0, {"v": 0}, version(0))
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for v in range(1, 150):
                store.put_detector_metadata("r", 0, {"v": v}, version(v))
        except BaseException as e:  # surfaced below
            errors.append(e)
        finally:
            stop.set()

    seen = set()
    writer = threading.Thread(target=write)
    writer.start()
    while not stop.is_set():
        meta, tensors = store.get_detector_metadata("r", 0)
        v = meta["v"]
        seen.add(v)
        assert sorted(tensors) == [f"l{j}" for j in range(4)]
        for keys in tensors.values():
            assert all(bool((t == v).all()) for t in keys.values()), f"mixed versions around {v}"
    writer.join()
    assert not errors
    assert len(seen) > 1


def test_hostile_names_touch_nothing_outside_base_path(tmp_path: Path) -> None:
    """Every public method with every hostile name: ValueError, and the file system is unchanged."""
    from mi_crow.store.testing import HOSTILE_NAMES

    base = tmp_path / "a" / "b" / "store"
    store = LocalStore(base)
    store.put_detector_metadata("r", 0, {}, {"l": {"k": torch.ones(1)}})
    canaries = [tmp_path / "a" / "x", tmp_path / "a" / "b" / "x", tmp_path / "x", Path("/tmp/x")]
    for c in canaries[:3]:
        c.mkdir(parents=True, exist_ok=True)
        (c / "meta.json").write_text("{}")
    snapshot = sorted(str(p) for p in tmp_path.rglob("*"))
    t = {"l": {"k": torch.ones(1)}}
    for name in HOSTILE_NAMES:
        for call in (
            lambda: store.put_run_metadata(name, {}),
            lambda: store.put_detector_metadata(name, 0, {}, t),
            lambda: store.put_run_batch(name, 0, [torch.ones(1)]),
            lambda: store.put_run_detector_metadata(name, {}, t),
            lambda: store.put_model(name, {"w": torch.ones(1)}),
            lambda: store.delete_run(name),
            lambda: store.delete_model(name),
            lambda: store.get_run_metadata(name),
        ):
            with pytest.raises(ValueError):
                call()
    for key in ["", "..", "../x", "a/../../b", "/tmp/x", "a\\b", "a/\x00", ".hidden/t", "a//b", "a/./b", 3, None]:
        with pytest.raises(ValueError):
            store.put_tensor(key, torch.ones(1))  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            store.get_tensor(key)  # type: ignore[arg-type]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == snapshot
    assert all((c / "meta.json").read_text() == "{}" for c in canaries[:3])


def test_large_tensors_are_memory_mapped_copy_on_write(tmp_path: Path) -> None:
    t = sample_tensor(torch.float32, (1024, 512))  # 2 MiB
    store = LocalStore(tmp_path)
    store.put_detector_metadata("r", 0, {}, {"l": {"k": t, "small": torch.ones(4)}})
    path = tmp_path / "runs/r/batch_0/l/k.safetensors"
    before = path.read_bytes()
    got = store.get_detector_metadata_by_layer_by_key("r", 0, "l", "k")
    maps = Path("/proc/self/maps").read_text()
    assert str(path) in maps  # mapped, not copied
    got.mul_(2)
    assert path.read_bytes() == before  # private: the caller's writes never reach the file
    unmapped = LocalStore(tmp_path, mmap=False).get_detector_metadata_by_layer_by_key("r", 0, "l", "k")
    assert_same(unmapped, t)
    with pytest.raises(OSError, match="truncated"):
        path.write_bytes(before[:-4096])
        store.get_detector_metadata_by_layer_by_key("r", 0, "l", "k")  # checked before mapping: no SIGBUS


def test_writer_lock_follows_a_recreated_store(tmp_path: Path) -> None:
    """A store folder deleted and made again: writers lock the new lock file, the one gc uses."""
    import shutil

    store = LocalStore(tmp_path / "s")
    store.put_run_metadata("r", {})
    shutil.rmtree(tmp_path / "s")
    store.put_run_metadata("r", {"again": True})
    lock = tmp_path / "s" / ".mi-crow-store.lock"
    assert lock.is_file()
    with store._writers.shared():
        fd = store._writers._fd
        assert os.fstat(fd).st_ino == lock.stat().st_ino
    assert store.get_run_metadata("r") == {"again": True}


def test_overwrite_without_rename_exchange(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback for file systems without RENAME_EXCHANGE: correct, and on failure the old
    version is put back instead of being left as trash."""
    monkeypatch.setattr(atomic, "_renameat2_works", False)
    store.put_detector_metadata("r", 0, {"v": 1}, {"l": {"k": torch.ones(2)}})
    store.put_detector_metadata("r", 0, {"v": 2}, {"l": {"k": torch.zeros(2)}})
    assert store.get_detector_metadata("r", 0)[0] == {"v": 2}
    real_rename = os.rename
    stage_renames = []

    def failing(src: str, dst: str, **dir_fds: int) -> None:
        if os.path.basename(src).startswith(".stage-"):
            stage_renames.append(src)
            if len(stage_renames) == 2:  # the first fails by itself (ENOTEMPTY); then the old is moved aside
                raise OSError(5, "Input/output error (simulated)")
        real_rename(src, dst, **dir_fds)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="simulated"):
        store.put_detector_metadata("r", 0, {"v": 3}, {"l": {"k": torch.full((2,), 3.0)}})
    monkeypatch.undo()
    meta, tensors = store.get_detector_metadata("r", 0)
    assert meta == {"v": 2} and torch.equal(tensors["l"]["k"], torch.zeros(2))
    assert [p.name for p in (store.base_path / "runs" / "r").iterdir()] == ["batch_0"]
    assert len(stage_renames) == 2


def test_write_all_survives_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwritev

    def at_most_3_bytes(fd: int, buffers: list[memoryview], offset: int) -> int:
        first = next(b for b in buffers if len(b))
        return real(fd, [first[:3]], offset)

    monkeypatch.setattr(os, "pwritev", at_most_3_bytes)
    parts = [b"abcde", b"", bytearray(b"fghij"), memoryview(b"klmnopq"), torch.arange(4, dtype=torch.int8).numpy().data]
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        assert atomic.write_all(fd, parts, offset=2) == 21
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"\0\0abcdefghijklmnopq\x00\x01\x02\x03"


def test_large_files_are_preallocated_and_exact(store: LocalStore) -> None:
    t = torch.arange(512 * 1024, dtype=torch.float32)  # 2 MiB: above atomic.FALLOCATE_MIN
    store.put_detector_metadata("r", 0, {}, {"l": {"k": t}})
    path = store.base_path / "runs/r/batch_0/l/k.safetensors"
    header = path.read_bytes()[: 8 + int.from_bytes(path.read_bytes()[:8], "little")]
    assert path.stat().st_size == len(header) + t.numel() * 4  # preallocation adds no bytes
    assert torch.equal(st.load_file(path)["tensor"], t)
    assert torch.equal(store.get_detector_metadata_by_layer_by_key("r", 0, "l", "k"), t)


def test_preallocate_reports_real_errors_and_skips_unsupported(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(OSError) as e:
        atomic.preallocate(987654, 1 << 20, str(tmp_path / "f"))  # not an open descriptor
    assert e.value.errno == errno.EBADF and e.value.filename == str(tmp_path / "f")

    def unsupported(fd: int, mode: int, offset: int, size: int) -> int:
        ctypes.set_errno(errno.EOPNOTSUPP)  # what a file system without fallocate answers
        return -1

    monkeypatch.setattr(atomic, "_fallocate", unsupported)
    t = torch.arange(1 << 20, dtype=torch.int16)
    store.put_detector_metadata("r", 0, {}, {"l": {"k": t}})
    assert torch.equal(store.get_detector_metadata_by_layer_by_key("r", 0, "l", "k"), t)


FSIZE_CHILD = r"""
import resource, signal, sys, torch
from mi_crow.store import CorruptFileError, LocalStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
store = LocalStore(sys.argv[1])
store.put_detector_metadata("r", 0, {"v": 1}, {"l": {"k": torch.ones(10)}})
def written() -> int:  # bytes this process passed to write calls
    return int(next(line for line in open("/proc/self/io") if line.startswith("wchar")).split()[1])
before = written()
try:
    store.put_detector_metadata("r", 0, {"v": 2}, {"l": {"k": torch.ones(1 << 20)}})  # 4 MiB
except OSError as e:
    print(e.errno, written() - before)
"""


def test_a_file_too_large_fails_before_writing_and_leaves_the_old_entry(tmp_path: Path) -> None:
    """The file-size limit (like a full disk) is hit by the preallocation, before any data."""
    out = subprocess.run(
        [sys.executable, "-c", FSIZE_CHILD, str(tmp_path / "s")], capture_output=True, text=True, check=True
    )
    code, wrote = out.stdout.split()
    assert int(code) == errno.EFBIG
    assert int(wrote) < 4096  # no tensor data was copied before the error
    store = LocalStore(tmp_path / "s")
    meta, tensors = store.get_detector_metadata("r", 0)
    assert meta["v"] == 1 and torch.equal(tensors["l"]["k"], torch.ones(10))
    assert files_under(tmp_path / "s") == [
        ".mi-crow-store.lock",
        "runs/r/batch_0/l/k.safetensors",
        "runs/r/batch_0/metadata.json",
    ]


def test_list_run_batches_takes_only_names_the_store_writes(store: LocalStore) -> None:
    store.put_detector_metadata("r", 7, {}, {"l": {"k": torch.ones(1)}})
    store.put_run_batch("r", 1_000_000, [torch.ones(1)])  # batch_1000000.safetensors (7 digits)
    run = store.base_path / "runs" / "r"
    for d in ("batch_0", "batch_12", "batch_01", "batch_\u0663", "batch_", "batch_-1", "batch_1x", "xbatch_3"):
        (run / d).mkdir()
    for f in (
        "batch_000005.safetensors",
        "batch_0000006.safetensors",
        "batch_00004.safetensors",
        "batch_00000\u0663.safetensors",
        "batch_000008.json",
        "batch_9",
    ):
        (run / f).write_bytes(b"")
    assert store.list_run_batches("r") == [0, 5, 7, 12, 1_000_000]


def test_appends_without_renameat2_use_link(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The put-if-absent fallback (``link``, then unlink the temp file) claims each number once."""
    monkeypatch.setattr(atomic, "_renameat2_works", False)
    for i in range(3):
        store.put_run_detector_metadata("r", {"i": i}, {"l": {"k": torch.full((2,), float(i))}})
    store._append_next.clear()  # another process's view: it must find the taken numbers
    store.put_run_detector_metadata("r", {"i": 3}, {})
    assert [m["i"] for m, _ in store.iter_run_detector_metadata("r")] == [0, 1, 2, 3]
    entries = sorted(p.name for p in (store.base_path / "runs/r/detectors/.entries").iterdir())
    assert entries == [f"{n:012d}.safetensors" for n in range(4)]


def test_without_openat2_paths_are_walked_one_component_at_a_time(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernels without openat2 (or a seccomp filter refusing it): the same results, the same refusals."""
    from mi_crow.store import _fs

    monkeypatch.setattr(_fs, "_syscall", None)
    t = torch.arange(6.0)
    store.put_detector_metadata("r", 0, {"v": 1}, {"l": {"k": t}})
    assert torch.equal(store.get_detector_metadata_by_layer_by_key("r", 0, "l", "k"), t)
    assert store.get_detector_metadata("r", 0)[0] == {"v": 1} and store.list_run_batches("r") == [0]
    assert store.get_run_metadata("missing") == {}
    (tmp_path / "outside").mkdir()
    (store.base_path / "runs/evil").symlink_to(tmp_path / "outside")
    with pytest.raises(CorruptFileError, match=r"runs/evil: is a symbolic link"):
        store.get_run_metadata("evil")
    store.delete_run("r")
    assert store.list_runs() == []
