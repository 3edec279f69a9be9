"""ObjectStore's local disk cache (``cache_dir``, ``cache_bytes``) on the real SeaweedFS server.

That a read came from the cache is shown without timing: the object is deleted on the server
(through a separate client) and read again.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import uuid
from pathlib import Path
from typing import Any

import obstore
import pytest
import torch

from mi_crow.store import ActivationDataset
from mi_crow.store._tensor_file import read_all
from mi_crow.store.object_store import ObjectStore
from mi_crow.store.testing.seaweedfs import SeaweedFS
from test_object_store_fork import SIZES, D, assert_every_row_once, make_store, row_values, write_run

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def bucket(seaweedfs: SeaweedFS) -> str:
    return seaweedfs.new_bucket("cache")  # one bucket, a fresh prefix per test


@pytest.fixture
def s3_url(bucket: str) -> str:
    return f"s3://{bucket}/{uuid.uuid4().hex}"


def server_keys(server: SeaweedFS, url: str, under: str = "") -> list[str]:
    """The keys under the store's prefix on the server (relative to it), listed by a separate client."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    base = f"{prefix}/{under}".rstrip("/")
    return sorted(
        o["path"].removeprefix(prefix + "/") for chunk in obstore.list(server.client(bucket), base) for o in chunk
    )


def delete_on_server(server: SeaweedFS, url: str, keys: list[str]) -> None:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    obstore.delete(server.client(bucket), [f"{prefix}/{k}" for k in keys])


def tensor_files(server: SeaweedFS, url: str) -> list[str]:
    return [k for k in server_keys(server, url) if "/.g" in k and k.endswith(".safetensors")]


def cache_files(cache: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in cache.glob("*.safetensors")}


def cached_value(path: Path) -> float:
    """The first element of the tensor a cache file holds (the files are whole safetensors files)."""
    with open(path, "rb") as f:
        tensors, _ = read_all(f, str(path))
    return float(next(iter(tensors.values())).reshape(-1)[0])


# ---------------------------------------------------------------------- hits


def test_a_second_read_comes_from_the_cache(seaweedfs: SeaweedFS, s3_url: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = make_store(seaweedfs, s3_url, cache_dir=cache)
    write_run(store, "r")
    first = store.get_detector_metadata_by_layer_by_key("r", 1, "L", "activations")
    assert len(cache_files(cache)) == 1
    (cached,) = cache_files(cache)
    delete_on_server(seaweedfs, s3_url, tensor_files(seaweedfs, s3_url))
    again = store.get_detector_metadata_by_layer_by_key("r", 1, "L", "activations")
    assert torch.equal(again, first) and torch.equal(again.reshape(-1, D), row_values(torch.arange(10, 22)))
    assert str(cached) in Path("/proc/self/maps").read_text()  # a view of the mapped file
    again.add_(1)  # writable, and private: the cache file is unchanged
    assert torch.equal(store.get_detector_metadata_by_layer_by_key("r", 1, "L", "activations"), first)
    # A batch never read is not in the cache: its tensor file is gone from the server.
    with pytest.raises(FileNotFoundError, match="missing"):
        store.get_detector_metadata_by_layer_by_key("r", 2, "L", "activations")
    # get_detector_metadata (concurrent GETs of a batch's files) uses the cache too.
    meta, tensors = store.get_detector_metadata("r", 1)
    assert meta == {"rows": 12} and torch.equal(tensors["L"]["activations"], first)


def test_later_epochs_of_a_dataset_come_from_the_cache(seaweedfs: SeaweedFS, s3_url: str, tmp_path: Path) -> None:
    store = make_store(seaweedfs, s3_url, cache_dir=tmp_path / "cache")
    total = write_run(store, "r")
    ds = ActivationDataset(store, "r", "L", batch_size=8, shuffle=True, seed=0)
    epoch0 = torch.cat(list(ds))
    assert_every_row_once(epoch0, total)
    delete_on_server(seaweedfs, s3_url, tensor_files(seaweedfs, s3_url))  # commits stay, tensor files go
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        rows = torch.cat(list(ds))
        assert_every_row_once(rows, total)
        assert not torch.equal(rows, epoch0)  # another order: the same rows
    fresh = make_store(seaweedfs, s3_url)  # without the cache the files are gone
    with pytest.raises(FileNotFoundError):
        fresh.get_detector_metadata_by_layer_by_key("r", 0, "L", "activations")


def test_models_are_cached_and_mutable_objects_never(seaweedfs: SeaweedFS, s3_url: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = make_store(seaweedfs, s3_url, cache_dir=cache)
    write_run(store, "r", SIZES[:1])
    store.put_run_batch("r", 5, {"x": torch.ones(3)})  # mi_crow's path: rewritten in place by a put
    store.put_tensor("loose/t.safetensors", torch.ones(2))
    store.put_run_detector_metadata("r", {"n": 0}, {"l": {"k": torch.ones(1)}})
    store.put_model("m", {"w": torch.full((4,), 7.0)}, {"d": 4})
    for _ in range(2):  # every kind of object, twice
        assert store.get_run_metadata("r") == {"rows": 10}
        assert store.get_detector_metadata("r", 0)[0] == {"rows": 10}
        assert store.get_run_batch("r", 5)["x"].tolist() == [1.0, 1.0, 1.0]  # type: ignore[call-overload]
        assert store.get_tensor("loose/t.safetensors").tolist() == [1.0, 1.0]
        assert [m for m, _ in store.iter_run_detector_metadata("r")] == [{"n": 0}]
        assert store.get_model("m")[0]["w"].tolist() == [7.0] * 4
    # Two files cached: the batch's tensor file and the model's, both in generation folders.
    assert sorted(cached_value(p) for p in cache_files(cache)) == [0.0, 7.0]
    assert len(tensor_files(seaweedfs, s3_url)) == 2
    # Mutable objects rewritten on the server read back new, not from the cache.
    other = make_store(seaweedfs, s3_url)
    other.put_run_metadata("r", {"rows": 11})
    other.put_run_batch("r", 5, {"x": torch.zeros(3)})
    other.put_tensor("loose/t.safetensors", torch.zeros(2))
    other.put_detector_metadata("r", 0, {"rows": 3}, {"L": {"activations": torch.full((1, 3, D), 5.0)}})
    other.put_model("m", {"w": torch.full((4,), 8.0)}, {"d": 4})
    assert store.get_run_metadata("r") == {"rows": 11}
    assert store.get_run_batch("r", 5)["x"].tolist() == [0.0, 0.0, 0.0]  # type: ignore[call-overload]
    assert store.get_tensor("loose/t.safetensors").tolist() == [0.0, 0.0]
    meta, tensors = store.get_detector_metadata("r", 0)  # a new commit names a new generation
    assert meta == {"rows": 3} and torch.equal(tensors["L"]["activations"], torch.full((1, 3, D), 5.0))
    assert store.get_model("m")[0]["w"].tolist() == [8.0] * 4


# ---------------------------------------------------------------------- budget


def test_the_budget_holds_and_the_least_recently_used_go_first(
    seaweedfs: SeaweedFS, s3_url: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    writer = make_store(seaweedfs, s3_url)
    for i in range(10):  # ten batches, one tensor file each, of equal size, holding i
        writer.put_detector_metadata("r", i, {}, {"L": {"activations": torch.full((64, D), float(i))}})
    probe = make_store(seaweedfs, s3_url, cache_dir=tmp_path / "probe")
    probe.get_detector_metadata_by_layer_by_key("r", 0, "L", "activations")
    (size,) = cache_files(tmp_path / "probe").values()
    store = make_store(seaweedfs, s3_url, cache_dir=cache, cache_bytes=3 * size + size // 2)  # room for 3

    def read(i: int) -> None:
        t = store.get_detector_metadata_by_layer_by_key("r", i, "L", "activations")
        assert torch.equal(t, torch.full((64, D), float(i)))

    def cached() -> list[float]:
        files = cache_files(cache)
        assert sum(files.values()) <= store._cache.budget  # type: ignore[union-attr]
        return sorted(cached_value(p) for p in files)

    for i in (0, 1, 2):
        read(i)
    assert cached() == [0.0, 1.0, 2.0]
    read(0)  # a hit: 0 is now the most recently used
    read(3)  # evicts 1, the least recently used
    assert cached() == [0.0, 2.0, 3.0]
    read(4)  # evicts 2
    assert cached() == [0.0, 3.0, 4.0]
    for i in [5, 6, 0, 7, 8, 9, 1, 2, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0]:
        read(i)
        assert len(cached()) == 3
    assert cached() == [0.0, 1.0, 2.0]
    # An object larger than the whole budget is read but not kept.
    tiny = make_store(seaweedfs, s3_url, cache_dir=tmp_path / "tiny", cache_bytes=size - 1)
    assert torch.equal(tiny.get_detector_metadata_by_layer_by_key("r", 5, "L", "activations"), torch.full((64, D), 5.0))
    assert cache_files(tmp_path / "tiny") == {}


# ---------------------------------------------------------------------- damage


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "empty", "longer"])
def test_a_damaged_cache_file_is_a_miss_and_is_replaced(
    seaweedfs: SeaweedFS, s3_url: str, tmp_path: Path, damage: str
) -> None:
    cache = tmp_path / "cache"
    store = make_store(seaweedfs, s3_url, cache_dir=cache)
    write_run(store, "r")
    expected = row_values(torch.arange(10, 22)).reshape(3, 4, D)
    assert torch.equal(store.get_detector_metadata_by_layer_by_key("r", 1, "L", "activations"), expected)
    ((path, size),) = cache_files(cache).items()
    gc.collect()  # no tensor maps the file any more: it may be changed in place
    data = path.read_bytes()
    if damage == "truncated":
        os.truncate(path, size - 5)
    elif damage == "garbage header":
        path.write_bytes(b"\xff" * 16 + data[16:])
    elif damage == "empty":
        os.truncate(path, 0)
    else:
        path.write_bytes(data + b"\0" * 8)
    assert torch.equal(store.get_detector_metadata_by_layer_by_key("r", 1, "L", "activations"), expected)
    assert path.read_bytes() == data  # fetched again, and the cache file replaced
    delete_on_server(seaweedfs, s3_url, tensor_files(seaweedfs, s3_url))
    assert torch.equal(store.get_detector_metadata_by_layer_by_key("r", 1, "L", "activations"), expected)


def test_a_cache_file_removed_by_another_process_is_a_miss(seaweedfs: SeaweedFS, s3_url: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = make_store(seaweedfs, s3_url, cache_dir=cache)
    write_run(store, "r")
    first = store.get_detector_metadata_by_layer_by_key("r", 0, "L", "activations")
    for p in cache_files(cache):
        p.unlink()
    assert torch.equal(store.get_detector_metadata_by_layer_by_key("r", 0, "L", "activations"), first)
    assert len(cache_files(cache)) == 1
    for p in cache_files(cache):
        p.unlink()
    cache.rmdir()  # the whole directory removed: made again on the next insertion
    assert torch.equal(store.get_detector_metadata_by_layer_by_key("r", 0, "L", "activations"), first)
    assert len(cache_files(cache)) == 1


# ---------------------------------------------------------------------- processes


def _read_all_batches(store: ObjectStore, rounds: int) -> list[list[float]]:
    out = []
    for _ in range(rounds):
        for i in range(10):
            t = store.get_detector_metadata_by_layer_by_key("r", i, "L", "activations")
            out.append([float(t.min()), float(t.max())])
    return out


def test_processes_sharing_the_cache_read_right_values(seaweedfs: SeaweedFS, s3_url: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    writer = make_store(seaweedfs, s3_url)
    for i in range(10):
        writer.put_detector_metadata("r", i, {}, {"L": {"activations": torch.full((256, D), float(i))}})
    size = 256 * D * 4
    # Room for about half the files: the processes insert and evict under each other.
    store = make_store(seaweedfs, s3_url, cache_dir=cache, cache_bytes=5 * size + 4096)
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(_read_all_batches, [(store, 4)] * 3)
    expected = [[float(i), float(i)] for i in range(10)] * 4
    assert results == [expected] * 3
    files = cache_files(cache)
    assert 0 < len(files) <= 5 and sum(files.values()) <= 5 * size + 4096
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]  # no temp file left


# ---------------------------------------------------------------------- options


def test_cache_options_are_checked(tmp_path: Path) -> None:
    file = tmp_path / "a-file"
    file.write_text("x")
    bad: list[tuple[dict[str, Any], str]] = [
        ({"cache_dir": file}, "exists and is not a directory"),
        ({"cache_dir": ""}, "cache_dir must be a directory path"),
        ({"cache_dir": 3}, "cache_dir must be a directory path"),
        ({"cache_dir": file / "sub"}, "cannot be created"),
        ({"cache_dir": tmp_path / "c", "cache_bytes": 0}, "cache_bytes must be an int >= 1"),
        ({"cache_dir": tmp_path / "c", "cache_bytes": -5}, "cache_bytes must be an int >= 1"),
        ({"cache_dir": tmp_path / "c", "cache_bytes": True}, "got True"),
        ({"cache_dir": tmp_path / "c", "cache_bytes": 1.5}, "got 1.5"),
        ({"cache_bytes": 0}, "cache_bytes must be an int >= 1"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            ObjectStore("s3://some-bucket/p", **options)
    assert not (tmp_path / "c").exists()
    store = ObjectStore("s3://some-bucket/p", cache_dir=str(tmp_path / "deep" / "cache"), cache_bytes=1 << 20)
    assert (tmp_path / "deep" / "cache").is_dir() and store._cache is not None and store._cache.budget == 1 << 20
    assert ObjectStore("s3://some-bucket/p")._cache is None
