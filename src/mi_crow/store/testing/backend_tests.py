"""The backend conformance tests: the byte-level operations of a ``LayoutStore`` backend, called directly.

:class:`~mi_crow.store.testing.StoreTests` checks what users see; these tests check the
operations of :mod:`mi_crow.store._backend` that a backend supplies (``_write``, ``_write_new``,
``_write_many``, ``_open``, ``_read_many``, ``_reader_of``, ``_list``, ``_list_tree``,
``_delete``, ``_update``, ``_write_dir``, ``_open_dir``) on keys such as ``"a/b.bin"``, so that a broken
operation fails a test that names it. Subclass :class:`BackendTests` and implement
``make_backend`` (or override the ``backend`` fixture)::

    from mi_crow.store.testing import BackendTests

    class TestMyBackend(BackendTests):
        def make_backend(self, tmp_path):
            return MyStore(tmp_path / "store")

Tests of optional operations run only where the backend's
:class:`~mi_crow.store.Capabilities` declare them (``_list_tree``: ``listing_is_recursive``;
``_write_dir``/``_open_dir``: ``atomic_directories``) and are skipped elsewhere. Names starting
with ``.`` are reserved for a backend's own bookkeeping (no validated name starts with one): a
listing of the store's root may show them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import pytest
import torch

from mi_crow.store._backend import Capabilities, ObjectInfo, ObjectReplaced
from mi_crow.store._layout import LayoutStore
from mi_crow.store._tensor_file import Buffer, Payload, tensor_bytes

__all__ = ["BackendTests"]

LARGE = 20 * 1024 * 1024
"""The size of the large payload: above the 16 MiB from which ``ObjectStore`` uploads in parts."""

MANY = 1100
"""How many objects the pagination test writes: more than one 1,000-key page of S3 listings."""


def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _read(backend: LayoutStore, key: str) -> bytes:
    """The whole content of ``key``, read as the layout code reads: size first, then exactly that."""
    with backend._open(key) as f:
        return _read_file(f)


def _read_file(f: BinaryIO) -> bytes:
    size = f.seek(0, 2)
    f.seek(0)
    data = f.read(size)
    assert len(data) == size, f"read({size}) returned {len(data)} bytes"
    assert f.read(1) == b"", "a read at the end returned bytes"
    return data


def _readinto(f: BinaryIO, buf: Any) -> int:
    return int(f.readinto(buf))  # type: ignore[attr-defined]  # BinaryIO's stub lacks it


def _entries(listed: list[tuple[str, bool]]) -> set[tuple[str, bool]]:
    """A listing as a set, after checking it names nothing twice."""
    names = [name for name, _ in listed]
    assert len(names) == len(set(names)), f"a listing names an entry twice: {sorted(names)}"
    return set(listed)


def _visible(listed: list[tuple[str, bool]]) -> set[tuple[str, bool]]:
    """A listing without the backend's own names (those starting with ``.``)."""
    return {entry for entry in _entries(listed) if not entry[0].startswith(".")}


def _missing(backend: LayoutStore, key: str) -> bool:
    try:
        with backend._open(key):
            return False
    except FileNotFoundError:
        return True


def _utf8_order(keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode("utf-8"))


class BackendTests:
    """The byte-level protocol every backend must implement. Subclasses implement ``make_backend``
    (or override the ``backend`` fixture)."""

    def make_backend(self, tmp_path: Path) -> LayoutStore:
        """A fresh, empty backend for one test; ``tmp_path`` is the test's own empty directory.
        Override the ``backend`` fixture instead where the backend needs other fixtures (a server)."""
        raise NotImplementedError

    @pytest.fixture
    def backend(self, tmp_path: Path) -> LayoutStore:
        return self.make_backend(tmp_path)

    # ------------------------------------------------------------------ capabilities

    def test_capabilities(self, backend: LayoutStore) -> None:
        caps = backend.capabilities
        assert isinstance(caps, Capabilities)
        for field in dataclasses.fields(caps):
            assert isinstance(getattr(caps, field.name), bool), field.name

    # ------------------------------------------------------------------ _write and _open

    @pytest.mark.parametrize("size", [1, 3000, 300_000])
    def test_write_then_open_reads_exact_bytes(self, backend: LayoutStore, size: int) -> None:
        data = _data(size, size)
        backend._write("a/b.bin", Payload(data))
        with backend._open("a/b.bin") as f:
            assert f.seek(0, 2) == size
            assert f.read(10) == b""  # at the end
            assert f.seek(0) == 0
            assert f.read(10) == data[:10]
            assert f.read(20) == data[10:30]  # from where the last read ended
            middle = size // 2
            assert f.seek(middle) == middle
            buf = bytearray(min(500, size - middle))
            assert _readinto(f, buf) == len(buf)
            assert bytes(buf) == data[middle : middle + len(buf)]
            f.seek(max(0, size - 5))
            assert f.read(100) == data[-5:]  # a read past the end is short
            f.seek(0)
            assert f.read() == data
        assert _read(backend, "a/b.bin") == data

    def test_readinto_across_the_first_read(self, backend: LayoutStore) -> None:
        """A read that begins in the bytes a backend fetched first and ends beyond them."""
        data = _data(200_000, 7)
        backend._write("a/b.bin", Payload(data))
        with backend._open("a/b.bin") as f:
            for start in (0, 60_000, 65_536, 150_000):
                f.seek(start)
                view = memoryview(bytearray(20_000))
                n = _readinto(f, view)
                assert n == min(20_000, len(data) - start)
                assert bytes(view[:n]) == data[start : start + n]

    def test_write_makes_parents(self, backend: LayoutStore) -> None:
        backend._write("deep/er/still/x.bin", Payload(b"x"))
        assert _read(backend, "deep/er/still/x.bin") == b"x"

    def test_overwrite_replaces(self, backend: LayoutStore) -> None:
        backend._write("a/b.bin", Payload(_data(5000, 1)))
        backend._write("a/b.bin", Payload(b"short"))
        assert _read(backend, "a/b.bin") == b"short"  # no tail of the longer version
        backend._write("a/b.bin", Payload(_data(5000, 2)))
        assert _read(backend, "a/b.bin") == _data(5000, 2)

    def test_payload_head_and_data_in_order(self, backend: LayoutStore) -> None:
        """A payload is its head, then its data buffers; the head may only be known late."""
        tensor = torch.arange(16, dtype=torch.float32)
        data: list[Buffer] = [b"abc", memoryview(b"defg"), bytearray(b"h"), tensor_bytes(tensor)]
        expected = b"HEAD" + b"abcdefgh" + tensor.numpy().tobytes()
        backend._write("p/early.bin", Payload(b"HEAD", data))
        backend._write("p/late.bin", Payload(None, data, head_size=4, finish=lambda: b"HEAD"))
        assert backend._write_new("p/new.bin", Payload(None, data, head_size=4, finish=lambda: b"HEAD"))
        backend._write_many(
            {
                "p/many-1.bin": Payload(None, data, head_size=4, finish=lambda: b"HEAD"),
                "p/many-2.bin": Payload(b"HEAD", data),
            }
        )
        for key in ("p/early.bin", "p/late.bin", "p/new.bin", "p/many-1.bin", "p/many-2.bin"):
            assert _read(backend, key) == expected, key

    def test_open_missing_raises_file_not_found(self, backend: LayoutStore) -> None:
        for key in ("missing.bin", "nope/deeper/z.bin"):
            with pytest.raises(FileNotFoundError), backend._open(key):
                pass
        backend._write("x/y.bin", Payload(b"y"))
        with pytest.raises(FileNotFoundError), backend._open("x/missing.bin"):
            pass

    def test_concurrent_overwrites_read_whole_versions(self, backend: LayoutStore) -> None:
        """A reader racing overwrites sees one whole version, or ``ObjectReplaced`` (read again)."""
        versions = [bytes([i]) * 100_000 + bytes([i]) * i for i in range(4)]
        backend._write("race/v.bin", Payload(versions[0]))
        done = threading.Event()

        def overwrite(seed: int) -> None:
            try:
                for n in range(12):
                    backend._write("race/v.bin", Payload(versions[(seed + n) % len(versions)]))
            finally:
                done.set()

        reads = 0
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(overwrite, seed) for seed in (1, 2)]
            while not done.is_set() or reads < 3:
                try:
                    got = _read(backend, "race/v.bin")
                except ObjectReplaced:
                    continue
                assert got in versions, f"read {len(got)} bytes that are no version written"
                reads += 1
            for future in futures:
                future.result()

    # ------------------------------------------------------------------ _write_new

    def test_write_new_once(self, backend: LayoutStore) -> None:
        assert backend._write_new("n/k.bin", Payload(b"first")) is True
        assert backend._write_new("n/k.bin", Payload(b"second")) is False
        assert _read(backend, "n/k.bin") == b"first"
        backend._write("n/k.bin", Payload(b"third"))
        assert backend._write_new("n/k.bin", Payload(b"fourth")) is False
        assert _read(backend, "n/k.bin") == b"third"

    def test_write_new_concurrent_exactly_one_wins(self, backend: LayoutStore) -> None:
        barrier = threading.Barrier(8, timeout=60)

        def claim(i: int) -> bool:
            barrier.wait()
            return backend._write_new("race/k.bin", Payload(f"writer {i}".encode()))

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(claim, range(8)))
        assert results.count(True) == 1, results
        assert _read(backend, "race/k.bin") == f"writer {results.index(True)}".encode()

    # ------------------------------------------------------------------ _update

    def test_update_creates_then_replaces(self, backend: LayoutStore) -> None:
        seen: list[bytes | None] = []

        def change(old: bytes | None) -> bytes:
            seen.append(old)
            return b"1" if old is None else old + b"+"

        assert backend._update("u/k.json", change) == b"1"
        assert backend._update("u/k.json", change) == b"1+"
        assert seen == [None, b"1"]
        assert _read(backend, "u/k.json") == b"1+"
        backend._write("u/k.json", Payload(b"written"))
        assert backend._update("u/k.json", change) == b"written+"

    def test_update_that_raises_writes_nothing(self, backend: LayoutStore) -> None:
        def fail(old: bytes | None) -> bytes:
            raise RuntimeError(f"refused {old!r}")

        backend._write("u/k.json", Payload(b"before"))
        with pytest.raises(RuntimeError, match="refused b'before'"):
            backend._update("u/k.json", fail)
        assert _read(backend, "u/k.json") == b"before"
        with pytest.raises(RuntimeError, match="refused None"):
            backend._update("u/new.json", fail)
        assert _missing(backend, "u/new.json")

    def test_update_concurrent_loses_no_update(self, backend: LayoutStore) -> None:
        """8 threads x 10 increments of one counter: 80, each thread's own list complete."""

        def add(writer: int, i: int) -> Any:
            def change(old: bytes | None) -> bytes:
                doc: dict[str, Any] = {"n": 0} if old is None else json.loads(old)
                doc["n"] += 1
                doc.setdefault(str(writer), []).append(i)
                return json.dumps(doc).encode()

            return change

        def run(writer: int) -> None:
            for i in range(10):
                backend._update("u/counter.json", add(writer, i))

        with ThreadPoolExecutor(8) as pool:
            for future in [pool.submit(run, w) for w in range(8)]:
                future.result()
        doc = json.loads(_read(backend, "u/counter.json"))
        assert doc["n"] == 80
        assert {w: doc[str(w)] for w in range(8)} == {w: list(range(10)) for w in range(8)}

    # ------------------------------------------------------------------ _write_many

    def test_write_many_writes_all(self, backend: LayoutStore) -> None:
        files = {f"m/{d}/f{i}.bin": _data(100 + i, i) for d in ("x", "y") for i in range(4)}
        backend._write_many({key: Payload(data) for key, data in files.items()})
        backend._write_many({})
        backend._write_many({"m/one.bin": Payload(b"one")})
        for key, data in files.items():
            assert _read(backend, key) == data, key
        assert _read(backend, "m/one.bin") == b"one"

    # ------------------------------------------------------------------ _read_many and _reader_of

    def test_read_many_exact_or_left_out(self, backend: LayoutStore) -> None:
        """``_read_many`` is a hint: it may return nothing, but what it returns is exact."""
        files = {"r/a.bin": _data(3000, 1), "r/empty.bin": b"", "r/c/d.bin": _data(300_000, 2)}
        for key, data in files.items():
            backend._write(key, Payload(data))
        got = backend._read_many([*files, "r/missing.bin", "nope/x.bin"])
        assert set(got) <= set(files), sorted(got)
        for key, value in got.items():
            assert bytes(value) == files[key], key
        assert backend._read_many([]) == {}

    def test_reader_of_reads_the_contents(self, backend: LayoutStore) -> None:
        files = {"r/a.bin": _data(3000, 1), "r/empty.bin": b"", "r/c/d.bin": _data(300_000, 2)}
        for key, data in files.items():
            backend._write(key, Payload(data))
        got = backend._read_many(list(files))
        for key, data in files.items():
            contents: bytes | memoryview = got.get(key, data)  # what _read_many returned, else the bytes
            f = backend._reader_of(key, contents)
            try:
                assert _read_file(f) == data, key
                f.seek(len(data) // 2)
                assert f.read(10) == data[len(data) // 2 : len(data) // 2 + 10]
            finally:
                f.close()

    # ------------------------------------------------------------------ _list

    def test_list_direct_children(self, backend: LayoutStore) -> None:
        for key in ("d/x.bin", "d/y.bin", "d/sub/z.bin", "d/sub/deep/w.bin", "dx.bin", "d2/q.bin"):
            backend._write(key, Payload(key.encode()))
        assert _entries(backend._list("d")) == {("x.bin", False), ("y.bin", False), ("sub", True)}
        assert _entries(backend._list("d/sub")) == {("z.bin", False), ("deep", True)}
        assert _entries(backend._list("d/sub/deep")) == {("w.bin", False)}
        assert _visible(backend._list("")) == {("d", True), ("dx.bin", False), ("d2", True)}
        assert backend._list("missing") == []
        assert backend._list("d/missing") == []
        assert backend._list("d/sub/deep/w") == []  # a prefix of a name is no folder

    def test_list_of_a_fresh_store(self, backend: LayoutStore) -> None:
        assert _visible(backend._list("")) == set()
        assert backend._list("runs") == []

    def test_list_hides_a_deleted_folder(self, backend: LayoutStore) -> None:
        """A folder whose objects were deleted is not listed in its parent (SeaweedFS keeps listing
        such a prefix for a while: an object store must filter it out)."""
        for key in ("e/keep.bin", "e/gone/x.bin", "e/gone/sub/y.bin"):
            backend._write(key, Payload(b"x"))
        backend._delete("e/gone")
        assert _entries(backend._list("e")) == {("keep.bin", False)}

    def test_list_hides_a_folder_whose_only_object_was_deleted(self, backend: LayoutStore) -> None:
        backend._write("e/keep.bin", Payload(b"x"))
        backend._write("e/single/only.bin", Payload(b"x"))
        backend._delete("e/single/only.bin")
        assert _missing(backend, "e/single/only.bin")
        if not backend.capabilities.atomic_directories:
            # Without directories a folder is only the common prefix of the keys in it.
            assert _entries(backend._list("e")) == {("keep.bin", False)}

    def test_list_of_a_deleted_folder_is_empty(self, backend: LayoutStore) -> None:
        for key in ("e/keep.bin", "e/gone/x.bin", "e/gone/sub/y.bin", "e/single/only.bin"):
            backend._write(key, Payload(b"x"))
        backend._delete("e/gone")
        backend._delete("e/single/only.bin")
        for key in ("e/gone", "e/gone/sub", "e/single"):
            listed = backend._list(key)
            assert listed == [], f"_list({key!r}) = {listed!r} after its objects were deleted"

    # ------------------------------------------------------------------ _list_tree

    def _has_recursive_listing(self, backend: LayoutStore) -> bool:
        """Whether to test ``_list_tree``; a backend that declares no recursive listing must refuse it."""
        if backend.capabilities.listing_is_recursive:
            return True
        with pytest.raises(NotImplementedError):
            list(backend._list_tree(""))
        return False

    def test_list_tree_every_key_in_key_order(self, backend: LayoutStore) -> None:
        if not self._has_recursive_listing(backend):
            return
        files = {
            "a.bin": b"abc",
            "b/c.bin": b"12345",
            "b/d.bin": b"",
            "b/e/f.bin": b"f",
            "ba.bin": b"ba",
            "c": b"c" * 70_000,
            "é.bin": b"e",
        }
        for rel, data in files.items():
            backend._write(f"t/{rel}", Payload(data))
        for key in ("tx.bin", "t2/q.bin", "s.bin"):  # beside the tree, not in it
            backend._write(key, Payload(b"out"))
        listed = list(backend._list_tree("t"))
        for info in listed:
            assert isinstance(info, ObjectInfo)
            assert info.modified is None or isinstance(info.modified, datetime)
        assert [info.key for info in listed] == _utf8_order(files)
        assert {info.key: info.size for info in listed} == {rel: len(data) for rel, data in files.items()}
        whole = [info.key for info in backend._list_tree("")]
        assert [key for key in whole if key.startswith("t/")] == [f"t/{rel}" for rel in _utf8_order(files)]
        assert {"tx.bin", "t2/q.bin", "s.bin"} <= set(whole)
        assert list(backend._list_tree("missing")) == []
        assert [info.key for info in backend._list_tree("t/b")] == ["c.bin", "d.bin", "e/f.bin"]

    def test_list_tree_after(self, backend: LayoutStore) -> None:
        if not self._has_recursive_listing(backend):
            return
        rels = ["a.bin", "b/c.bin", "b/d.bin", "ba.bin", "c"]
        for rel in rels:
            backend._write(f"t/{rel}", Payload(b"x"))
        for after in ("a.bin", "b/c.bin", "b/cc", "b/z", "ba", "ba.bin", "c", "d", "", "0"):
            got = [info.key for info in backend._list_tree("t", after=after)]
            want = [rel for rel in rels if rel.encode() > after.encode()]
            assert got == want, f"_list_tree('t', after={after!r}) = {got!r}"

    def test_list_tree_after_a_folder_name(self, backend: LayoutStore) -> None:
        """``after`` naming a folder: the keys in it are greater than its name and are listed."""
        if not self._has_recursive_listing(backend):
            return
        rels = ["a.bin", "b/c.bin", "b/q/d.bin", "ba.bin", "c"]
        for rel in rels:
            backend._write(f"t/{rel}", Payload(b"x"))
        for after in ("b", "b/q"):
            got = [info.key for info in backend._list_tree("t", after=after)]
            want = [rel for rel in rels if rel.encode() > after.encode()]
            assert got == want, f"_list_tree('t', after={after!r}) = {got!r}"

    def test_list_tree_paginates(self, backend: LayoutStore) -> None:
        if not self._has_recursive_listing(backend):
            return
        keys = [f"k{i:04d}.bin" for i in range(MANY)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda rel: backend._write(f"many/{rel}", Payload(b"x")), keys))
        assert [info.key for info in backend._list_tree("many")] == keys
        assert [info.key for info in backend._list_tree("many", after="k0999.bin")] == keys[1000:]
        assert [info.key for info in backend._list_tree("many", after="k0001.bin")] == keys[2:]
        assert len(_entries(backend._list("many"))) == MANY
        backend._delete("many")  # more keys than one delete request takes
        assert list(backend._list_tree("many")) == []
        assert _missing(backend, "many/k0000.bin") and _missing(backend, f"many/k{MANY - 1:04d}.bin")
        assert ("many", True) not in _entries(backend._list(""))

    # ------------------------------------------------------------------ _delete

    def test_delete_tree_and_key(self, backend: LayoutStore) -> None:
        for key in ("r/x/a.bin", "r/x/b/c.bin", "r/xy.bin", "r/x2/d.bin", "r/y.bin"):
            backend._write(key, Payload(key.encode()))
        backend._delete("r/x")
        assert _missing(backend, "r/x/a.bin") and _missing(backend, "r/x/b/c.bin")
        for key in ("r/xy.bin", "r/x2/d.bin", "r/y.bin"):  # names that merely begin like it stay
            assert _read(backend, key) == key.encode()
        assert _entries(backend._list("r")) == {("xy.bin", False), ("x2", True), ("y.bin", False)}
        backend._delete("r/y.bin")
        assert _missing(backend, "r/y.bin")
        assert _entries(backend._list("r")) == {("xy.bin", False), ("x2", True)}
        assert _read(backend, "r/xy.bin") == b"r/xy.bin"

    def test_delete_missing_is_a_no_op(self, backend: LayoutStore) -> None:
        backend._delete("nope")
        backend._delete("nope/deeper/x.bin")
        backend._write("r/y.bin", Payload(b"y"))
        backend._delete("r/y.bin")
        backend._delete("r/y.bin")
        backend._delete("r/z")
        assert _missing(backend, "r/y.bin")
        assert _visible(backend._list("")) <= {("r", True)}

    # ------------------------------------------------------------------ _write_dir and _open_dir

    def _has_atomic_directories(self, backend: LayoutStore) -> bool:
        """Whether to test ``_write_dir``/``_open_dir``; a backend that declares no atomic directories
        must refuse them."""
        if backend.capabilities.atomic_directories:
            return True
        with pytest.raises(NotImplementedError):
            backend._write_dir("d", {"f": Payload(b"x")})
        with pytest.raises(NotImplementedError):
            backend._open_dir("d")
        assert backend._list("d") == []
        return False

    _DIR: ClassVar[dict[str, bytes]] = {
        "metadata.json": b'{"a": 1}',
        "layer/a.safetensors": _data(3000, 3),
        "layer/sub/b.bin": _data(70_000, 4),
        "empty.bin": b"",
    }

    def test_write_dir_then_open_dir(self, backend: LayoutStore) -> None:
        if not self._has_atomic_directories(backend):
            return
        backend._write_dir("w/entry", {rel: Payload(data) for rel, data in self._DIR.items()})
        with backend._open_dir("w/entry") as d:
            d.prefetch(list(self._DIR))
            for rel, data in self._DIR.items():
                with d.open(rel) as f:
                    assert _read_file(f) == data, rel
                head, rest = d.read_head(rel, 16)
                if rest is None:
                    assert bytes(head) == data, rel  # the whole file
                else:
                    with rest:
                        assert bytes(head) == data[:16], rel
                        assert _read_file(rest) == data, rel
            top = {("metadata.json", False), ("layer", True), ("empty.bin", False)}
            assert _entries(d.list("")) == top
            assert _entries(d.list("layer")) == {("a.safetensors", False), ("sub", True)}
            assert _entries(d.list("layer/sub")) == {("b.bin", False)}
            assert d.list("missing") == []
            assert not d.moved()
            with pytest.raises(FileNotFoundError):
                d.open("missing.bin")
        assert _entries(backend._list("w/entry")) == top
        assert _entries(backend._list("w")) == {("entry", True)}
        for rel, data in self._DIR.items():  # its files are keys like any other
            assert _read(backend, f"w/entry/{rel}") == data

    def test_write_dir_replaces_the_whole_directory(self, backend: LayoutStore) -> None:
        if not self._has_atomic_directories(backend):
            return
        backend._write_dir("w/entry", {rel: Payload(data) for rel, data in self._DIR.items()})
        with backend._open_dir("w/entry") as old:
            backend._write_dir("w/entry", {"metadata.json": Payload(b"{}"), "other.bin": Payload(b"o")})
            # A reader of the old directory sees the old files, or finds them gone and the directory moved.
            try:
                with old.open("layer/a.safetensors") as f:
                    assert _read_file(f) == self._DIR["layer/a.safetensors"]
            except FileNotFoundError:
                assert old.moved()
        with backend._open_dir("w/entry") as d:
            assert _entries(d.list("")) == {("metadata.json", False), ("other.bin", False)}
            with d.open("metadata.json") as f:
                assert f.read() == b"{}"
            with pytest.raises(FileNotFoundError):
                d.open("layer/a.safetensors")
        assert _missing(backend, "w/entry/layer/a.safetensors")

    def test_open_dir_missing_and_deleted(self, backend: LayoutStore) -> None:
        if not self._has_atomic_directories(backend):
            return
        with pytest.raises(FileNotFoundError), backend._open_dir("w/entry"):
            pass
        backend._write_dir("w/deep/entry", {"metadata.json": Payload(b"{}")})
        backend._delete("w/deep/entry")
        with pytest.raises(FileNotFoundError), backend._open_dir("w/deep/entry"):
            pass
        assert backend._list("w/deep") == []

    # ------------------------------------------------------------------ sizes

    def test_empty_payloads_round_trip(self, backend: LayoutStore) -> None:
        backend._write("z/empty.bin", Payload(b""))
        with backend._open("z/empty.bin") as f:
            assert f.seek(0, 2) == 0
            f.seek(0)
            assert f.read() == b""
            assert f.read(10) == b""
            assert _readinto(f, bytearray(10)) == 0
        assert backend._write_new("z/new.bin", Payload(b"")) is True
        assert backend._write_new("z/new.bin", Payload(b"x")) is False
        backend._write_many({"z/m1.bin": Payload(b""), "z/m2.bin": Payload(b"", [b""])})
        for key in ("z/empty.bin", "z/new.bin", "z/m1.bin", "z/m2.bin"):
            assert _read(backend, key) == b"", key
        for key, data in backend._read_many(["z/empty.bin", "z/m1.bin"]).items():
            assert bytes(data) == b"", key
        assert ("empty.bin", False) in _entries(backend._list("z"))

    def test_large_payload_round_trips(self, backend: LayoutStore) -> None:
        head, body = b"H" * 128, os.urandom(LARGE)
        expected = head + body
        backend._write("big/a.bin", Payload(head, [memoryview(body)]))
        with backend._open("big/a.bin") as f:
            assert f.seek(0, 2) == len(expected)
            f.seek(17 << 20)
            assert f.read(1 << 20) == expected[17 << 20 : 18 << 20]
            f.seek(60_000)
            buf = bytearray(1 << 20)
            assert _readinto(f, buf) == len(buf)
            assert buf == expected[60_000 : 60_000 + len(buf)]
        assert _read(backend, "big/a.bin") == expected
        for key, data in backend._read_many(["big/a.bin"]).items():
            assert bytes(data) == expected, key
        backend._write("big/a.bin", Payload(b"small now"))
        assert _read(backend, "big/a.bin") == b"small now"

    def test_large_payload_write_new_and_write_many(self, backend: LayoutStore) -> None:
        body = os.urandom(LARGE)
        assert backend._write_new("big/new.bin", Payload(b"N", [body])) is True
        backend._write_many({"big/m1.bin": Payload(b"1", [body]), "big/m2.bin": Payload(b"2")})
        assert _read(backend, "big/new.bin") == b"N" + body
        assert _read(backend, "big/m1.bin") == b"1" + body
        assert _read(backend, "big/m2.bin") == b"2"

    # ------------------------------------------------------------------ pickling

    def test_pickled_copy_reads_what_the_original_wrote(self, backend: LayoutStore) -> None:
        backend._write("p/x.bin", Payload(b"before"))
        assert _read(backend, "p/x.bin") == b"before"  # the original has been used (clients, pools)
        copy = pickle.loads(pickle.dumps(backend))
        assert type(copy) is type(backend)
        assert copy.capabilities == backend.capabilities
        assert _read(copy, "p/x.bin") == b"before"
        copy._write("p/y.bin", Payload(b"from the copy"))
        assert _read(copy, "p/y.bin") == b"from the copy"
        assert _entries(copy._list("p")) == {("x.bin", False), ("y.bin", False)}
        assert _read(backend, "p/x.bin") == b"before"  # the original still works
