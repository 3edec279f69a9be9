"""ActivationDataset and ActivationLoader: exact resume under workers and ranks, epochs reaching
persistent workers, snapshots of runs that are still growing, bounded read-ahead."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from mi_crow.store import ActivationDataset, ActivationLoader, LocalStore, MemoryStore, Store

D = 4


def make_run(store: Store, run: str, batches: int, rows: int = 12, first: int = 0) -> int:
    """``batches`` stored batches ``[rows // 3, 3, D]`` whose column 0 is a unique row id."""
    row = first
    for i in range(batches):
        ids = torch.arange(row, row + rows, dtype=torch.float32).reshape(rows // 3, 3, 1)
        acts = torch.cat([ids, torch.full((rows // 3, 3, D - 1), float(i))], dim=-1)
        store.put_detector_metadata(run, first // rows + i, {}, {"L": {"activations": acts}})
        row += rows
    return row


def ids(batches: list[torch.Tensor]) -> list[int]:
    return [int(x) for b in batches for x in b[:, 0].tolist()]


def once(seen: list[int], end: int, start: int = 0) -> None:
    counts = Counter(seen)
    assert [r for r, c in counts.items() if c > 1] == []
    assert sorted(counts) == list(range(start, end))


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "s")


def dataset(store: Store, **kwargs: Any) -> ActivationDataset:
    kwargs = {"batch_size": 5, "shuffle": True, "seed": 3, "shuffle_buffer_bytes": 600, **kwargs}
    return ActivationDataset(store, "r", "L", **kwargs)


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("stop_after", [1, 7])
def test_loader_state_is_exact_under_workers(
    store: LocalStore, persistent: bool, shuffle: bool, stop_after: int
) -> None:
    end = make_run(store, "r", 10)

    def loader() -> ActivationLoader:
        ds = dataset(store, shuffle=shuffle)
        ds.set_epoch(1)
        return ActivationLoader(ds, num_workers=2, persistent_workers=persistent)

    full = ids(list(loader()))
    once(full, end)
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    assert state["epoch"] == 1 and state["shards"] == 2
    assert sum(state["rows"].values()) == sum(b.shape[0] for b in head)
    del it
    second = loader()
    second.load_state_dict(state)
    rest = ids(list(second))
    once(ids(head) + rest, end)
    # Each shard continues exactly where it stopped: its rows come in the uninterrupted order.
    for shard in (0, 1):
        alone = ActivationDataset(store, "r", "L", batch_size=5, shuffle=shuffle, seed=3, shuffle_buffer_bytes=600)
        alone.load_state_dict({**state, "rows": {"0": 0, "1": 0}})
        whole = [b for b in alone._iterate(1, alone._chunks(1, {"r": list(range(10))}), 2, {shard: 0}, 5, False)]
        mine = set(ids(whole))
        assert [r for r in ids(head) + rest if r in mine] == ids(whole)
    assert ids(list(second)) == full  # the next iteration is the whole epoch again


def test_persistent_workers_follow_set_epoch(store: LocalStore) -> None:
    end = make_run(store, "r", 8)
    ds = dataset(store)
    persistent = ActivationLoader(ds, num_workers=2, persistent_workers=True)
    for epoch in range(3):
        persistent.set_epoch(epoch)
        fresh = dataset(store)
        fresh.set_epoch(epoch)
        expected = ids(list(DataLoader(fresh, batch_size=None, num_workers=2)))
        got = ids(list(persistent))
        once(got, end)
        assert got == expected, f"epoch {epoch}"
    assert ids(list(persistent)) == expected  # without set_epoch: the same epoch again


def test_plain_dataloader_workers_follow_set_epoch_and_say_state_is_unknown(store: LocalStore) -> None:
    end = make_run(store, "r", 6)
    ds = dataset(store)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    orders = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        orders.append(ids(list(loader)))
        once(orders[-1], end)
    assert orders[0] != orders[1]
    with pytest.raises(RuntimeError, match="ActivationLoader"):
        ds.state_dict()


def test_two_ranks_two_workers_then_fewer_ranks_with_a_fixed_global_batch(store: LocalStore) -> None:
    end = make_run(store, "r", 16)

    def rank_loader(rank: int, world: int, batch: int) -> ActivationLoader:
        ds = dataset(store, rank=rank, world_size=world, batch_size=batch)
        ds.set_epoch(4)
        return ActivationLoader(ds, num_workers=2)

    # An uninterrupted epoch: every row exactly once across 2 ranks x 2 workers.
    once([r for rank in range(2) for r in ids(list(rank_loader(rank, 2, 5)))], end)
    # Stop both ranks mid-epoch, then resume on one rank with twice the batch size.
    head: list[int] = []
    states = []
    for rank, steps in ((0, 3), (1, 5)):
        loader = rank_loader(rank, 2, 5)
        it = iter(loader)
        head += ids([next(it) for _ in range(steps)])
        states.append(loader.state_dict())
        del it
    assert sorted(int(s) for s in states[0]["rows"]) == [0, 1] and sorted(int(s) for s in states[1]["rows"]) == [2, 3]
    # The same ranks resume from their own states exactly.
    again = []
    for rank in range(2):
        loader = rank_loader(rank, 2, 5)
        loader.load_state_dict(states[rank])
        again += ids(list(loader))
    once(head + again, end)
    # One rank cannot resume from one rank's state: it needs every shard's position.
    single = rank_loader(0, 1, 10)
    single.load_state_dict(states[0])
    with pytest.raises(ValueError, match=r"no position for shards \[2, 3\] of 4.*merge_state_dicts"):
        list(single)
    alone = dataset(store, batch_size=10)
    alone.load_state_dict(states[0])
    with pytest.raises(ValueError, match=r"no position for shards \[2, 3\] of 4"):
        list(alone)  # iterated in this process: the dataset says it itself
    merged = ActivationDataset.merge_state_dicts(states)
    assert merged["rows"] == {**states[0]["rows"], **states[1]["rows"]}
    for world, workers in ((1, 2), (1, 0), (4, 1)):
        rest = []
        for rank in range(world):
            ds = dataset(store, rank=rank, world_size=world, batch_size=10 * 2 // world)
            ds.load_state_dict(merged)
            rest += ids(list(ActivationLoader(ds, num_workers=workers)))
        once(head + rest, end)
    with pytest.raises(ValueError, match="disagree on shard 0"):
        ActivationDataset.merge_state_dicts([states[0], {**states[0], "rows": {"0": 1, "1": 0}}])
    with pytest.raises(ValueError, match=r"differ in \['epoch'\]"):
        ActivationDataset.merge_state_dicts([states[0], {**states[1], "epoch": 5}])


def test_an_epoch_reads_the_snapshot_taken_when_it_began(store: LocalStore) -> None:
    end = make_run(store, "r", 4)
    ds = dataset(store)
    ds.set_epoch(0)
    persistent = ActivationLoader(ds, num_workers=2, persistent_workers=True)
    grown = make_run(store, "r", 3, first=end)  # committed after the epoch began
    once(ids(list(ds)), end)
    once(ids(list(persistent)), end)
    assert ds.state_dict()["snapshot"] == {"r": [[0, 4]]}
    persistent.set_epoch(1)
    once(ids(list(persistent)), grown)
    ds.set_epoch(1)
    once(ids(list(ds)), grown)
    # Without set_epoch, an iteration takes the epoch's snapshot when it starts.
    fresh = dataset(store)
    it = iter(fresh)
    later = make_run(store, "r", 2, first=grown)
    once(ids(list(it)), grown)
    assert fresh.snapshot() == {"r": [[0, 9]]}
    # A snapshot handed to every rank (for ranks without torch.distributed).
    ds.set_epoch(2, snapshot={"r": [[0, 2], [5, 6]]})
    assert sorted(ids(list(ds))) == list(range(0, 24)) + list(range(60, 72))
    for bad, fragment in (
        ({"other": [[0, 1]]}, "must map each of the runs"),
        ({"r": [[3, 1]]}, "invalid batch range"),
        ({"r": [[0, 2], [1, 3]]}, "invalid batch range"),
    ):
        with pytest.raises(ValueError, match=fragment):
            ds.set_epoch(3, snapshot=bad)
    assert later == grown + 24


def test_a_state_from_the_snapshot_resumes_a_grown_run_exactly(store: LocalStore) -> None:
    end = make_run(store, "r", 6)
    ds = dataset(store)
    it = iter(ds)
    head = ids([next(it) for _ in range(4)])
    state = ds.state_dict()
    del it
    make_run(store, "r", 3, first=end)  # the run grows before the resume
    resumed = dataset(store)
    resumed.load_state_dict(state)
    once(head + ids(list(resumed)), end)


def test_bad_states_are_refused(store: LocalStore) -> None:
    make_run(store, "r", 3)
    ds = dataset(store)
    good = ds.state_dict()
    for bad, fragment in (
        ({**good, "epoch": -1}, "invalid epoch"),
        ({**good, "shards": 0}, "invalid shard count"),
        ({**good, "shards": 2, "rows": {"5": 1}}, "invalid position '5'"),
        ({**good, "shards": 2, "rows": {"0": -1}}, "invalid position '0'"),
        ({**good, "group": 0}, "invalid group"),
        ({**good, "snapshot": {"r": "x"}}, "invalid batch range"),
        ({**good, "key": "other"}, r"other settings: \['key'\]"),
    ):
        with pytest.raises(ValueError, match=fragment):
            dataset(store).load_state_dict(bad)
    with pytest.raises(TypeError, match="needs an ActivationDataset"):
        ActivationLoader(torch.utils.data.TensorDataset(torch.ones(2)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="takes no batch_size="):
        ActivationLoader(ds, batch_size=4)
    with pytest.raises(ValueError, match="read_ahead"):
        dataset(store, read_ahead=-1)


class CountingStore(MemoryStore):
    """Counts tensor reads in flight at once (from the dataset's fetching threads)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0
        self.reads = 0

    def get_detector_metadata_by_layer_by_key(
        self, run_id: str, batch_index: int, layer: str, key: str
    ) -> torch.Tensor:
        with self.lock:
            self.in_flight += 1
            self.reads += 1
            self.most = max(self.most, self.in_flight)
        try:
            return super().get_detector_metadata_by_layer_by_key(run_id, batch_index, layer, key)
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.mark.parametrize("read_ahead", [0, 1, 3])
def test_read_ahead_is_bounded(read_ahead: int) -> None:
    store = CountingStore()
    end = make_run(store, "r", 20)
    ds = ActivationDataset(store, "r", "L", batch_size=12, read_ahead=read_ahead, prefetch=0)
    it = iter(ds)
    first = next(it)
    # Reading in the caller (prefetch=0): after one batch, at most read_ahead more were started.
    assert store.reads <= 1 + read_ahead
    once(ids([first, *it]), end)
    assert store.most <= max(1, read_ahead)


def test_shuffle_windows_grow_to_the_budget(store: LocalStore) -> None:
    """The first windows of a shard take 1/8, 1/4, 1/2 of shuffle_buffer_bytes, then all of it:
    the first batch comes after one eighth of a window is read."""
    make_run(store, "r", 40)  # stored batches of 12 rows x 4 float32 = 192 bytes
    ds = ActivationDataset(store, "r", "L", batch_size=1000, shuffle=True, seed=0, shuffle_buffer_bytes=8 * 192)
    chunks = ds._chunks(0, {"r": list(range(40))})
    windows = [sorted({int(x) // 12 for x in block[:, 0].tolist()}) for block in ds._blocks(0, chunks, 0, 1, 0, 1000)]
    assert [len(w) for w in windows] == [1, 2, 4, 8, 8, 8, 8, 1]
    assert sorted(c for w in windows for c in w) == list(range(40))


def test_a_buffer_sent_to_another_process_is_never_reused() -> None:
    """DataLoader's queue feeder moves a batch's storage to shared memory in place; once the
    batch is let go, the pool must not hand that memory out again (the receiver maps it)."""
    from mi_crow.store.activation_dataset import _BufferPool

    pool = _BufferPool(4)
    first = pool.take((8, 4), torch.float32)
    view = first[0:]  # what the dataset yields
    assert pool.take((8, 4), torch.float32) is not first  # held by the consumer
    view.untyped_storage().share_memory_()  # as the feeder does when it pickles the batch
    del view
    again = pool.take((8, 4), torch.float32)
    assert again is not first and not again.is_shared()
    assert all(buf is not first for buf, _ in pool.buffers)
    del again
    assert pool.take((8, 4), torch.float32).data_ptr() != first.data_ptr()
