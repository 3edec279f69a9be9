"""ActivationDataset for a training loop: no silently wrong answer (bad names, missing masks,
short batches mid-epoch, DataLoader's own batching), sizes, normalization, repeated epochs."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from mi_crow.store import ActivationDataset, ActivationLoader, LocalStore, MemoryStore, Store

D = 4


def make_run(store: Store, run: str, sizes: list[int], first: int = 0, start: int = 0) -> int:
    """Stored batches ``[n, 1, D]`` (``n`` rows each) whose column 0 is a unique row id,
    at indices ``start, start + 1, ...``; returns the next row id."""
    row = first
    for i, n in enumerate(sizes):
        ids = torch.arange(row, row + n, dtype=torch.float32).reshape(n, 1, 1)
        acts = torch.cat([ids, torch.randn(n, 1, D - 1)], dim=-1)
        store.put_detector_metadata(run, start + i, {}, {"L": {"activations": acts}})
        row += n
    return row


def ids(batches: list[torch.Tensor]) -> list[int]:
    return [int(x) for b in batches for x in b[:, 0].tolist()]


def once(seen: list[int], end: int, start: int = 0) -> None:
    counts = Counter(seen)
    assert [r for r, c in counts.items() if c > 1] == []
    assert sorted(counts) == list(range(start, end))


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return LocalStore(tmp_path / "s") if request.param == "local" else MemoryStore()


# ---------------------------------------------------------------------- short batches


SHORT = [5, 6, 3, 6, 2, 6, 3]  # 31 rows; in stored order, 2 workers' shards hold 13 and 18 of them


# torch's own advice when workers outnumber this machine's cores (3 workers on a 2-core runner)
THREE_WORKERS = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


@THREE_WORKERS
@pytest.mark.parametrize("shuffle", [False, True])
def test_only_the_epochs_last_batch_is_short_under_workers(tmp_path: Path, shuffle: bool) -> None:
    store = LocalStore(tmp_path)
    end = make_run(store, "r", SHORT)

    def dataset(**kw: Any) -> ActivationDataset:
        return ActivationDataset(store, "r", "L", batch_size=4, shuffle=shuffle, seed=1, **kw)

    # A plain DataLoader: each worker's shard ends with its own short batch (up to one per worker).
    plain = list(DataLoader(dataset(), batch_size=None, num_workers=2))
    shorts = [b.shape[0] for b in plain if b.shape[0] < 4]
    assert len(shorts) <= 2 and (shuffle or sorted(shorts) == [1, 2])  # 13 and 18 rows
    once(ids(plain), end)
    for workers in (0, 2, 3):
        got = list(ActivationLoader(dataset(), num_workers=workers))
        assert [b.shape[0] for b in got] == [4] * 7 + [3], workers
        once(ids(got), end)
        dropped = list(ActivationLoader(dataset(drop_last=True), num_workers=workers))
        assert [b.shape[0] for b in dropped] == [4] * 7
        assert len(set(ids(dropped))) == 28


@THREE_WORKERS
@pytest.mark.parametrize("stop_after", [1, 4, 7, 8])
def test_merged_short_batches_keep_the_state_exact(tmp_path: Path, stop_after: int) -> None:
    store = LocalStore(tmp_path)
    end = make_run(store, "r", SHORT)

    def loader() -> ActivationLoader:
        ds = ActivationDataset(store, "r", "L", batch_size=4, shuffle=True, seed=2)
        return ActivationLoader(ds, num_workers=3)

    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))
    assert sum(state["rows"].values()) == min(4 * stop_after, end)  # rows handed out, not rows held
    del it
    second = loader()
    second.load_state_dict(state)
    rest = list(second)
    assert all(b.shape[0] == 4 for b in rest[:-1])
    once(ids(head) + ids(rest), end)
    # The dataset in this process, resumed with fewer shards than the state has: each shard is
    # read to its end in turn, and the short ends are merged too.
    alone = ActivationDataset(store, "r", "L", batch_size=4, shuffle=True, seed=2)
    alone.load_state_dict(state)
    tail = list(alone)
    assert all(b.shape[0] == 4 for b in tail[:-1])
    once(ids(head) + ids(tail), end)


def test_dataloader_with_its_own_batching_warns(store: Store) -> None:
    make_run(store, "r", [4, 4])
    ds = ActivationDataset(store, "r", "L", batch_size=4)
    with pytest.warns(UserWarning, match=r"batch_size=None.*ActivationLoader"):
        wrapped = list(DataLoader(ds))
    assert wrapped[0].shape == (1, 4, D)  # what the warning is about
    assert [b.shape for b in DataLoader(ds, batch_size=None)] == [torch.Size([4, D])] * 2  # no warning


# ---------------------------------------------------------------------- repeat


def test_repeat_goes_on_epoch_after_epoch_with_an_exact_state(store: Store) -> None:
    end = make_run(store, "r", [6, 6, 4])  # 16 rows: 4 batches of 4 per epoch

    def dataset() -> ActivationDataset:
        return ActivationDataset(store, "r", "L", batch_size=4, shuffle=True, seed=3, repeat=True)

    ds = dataset()
    it = iter(ds)
    epochs = [ids([next(it) for _ in range(4)]) for _ in range(3)]
    for rows in epochs:
        once(rows, end)
    assert epochs[0] != epochs[1] != epochs[2]  # set_epoch(epoch + 1) between epochs
    assert ds.epoch == 2
    expected = []
    for epoch in range(3):
        single = ActivationDataset(store, "r", "L", batch_size=4, shuffle=True, seed=3)
        single.set_epoch(epoch)
        expected.append(ids(list(single)))
    assert epochs == expected
    head = [next(it) for _ in range(2)]  # epoch 3, half way
    state = ds.state_dict()
    assert state["epoch"] == 3 and state["rows"] == {"0": 8}
    tail = list(itertools.islice(it, 2))
    resumed = dataset()
    resumed.load_state_dict(state)
    stream = iter(resumed)
    rest = list(itertools.islice(stream, 6))  # the rest of epoch 3, then epoch 4
    single = ActivationDataset(store, "r", "L", batch_size=4, shuffle=True, seed=3)
    single.set_epoch(3)
    assert ids(head) + ids(rest[:2]) == ids(list(single)) == ids(head) + ids(tail)
    once(ids(rest[2:]), end)
    assert resumed.state_dict()["epoch"] == 4
    # A batch committed during an epoch is read from the next one on (a fresh snapshot each epoch).
    grown = make_run(store, "r", [4], first=end, start=3)
    more = list(itertools.islice(stream, 5))  # epoch 5: 20 rows
    once(ids(more), grown)
    assert resumed.epoch == 5 and resumed.state_dict()["snapshot"] == {"r": [[0, 4]]}


@pytest.mark.parametrize("workers", [0, 2])
def test_repeat_through_activation_loader(tmp_path: Path, workers: int) -> None:
    store = LocalStore(tmp_path)
    end = make_run(store, "r", SHORT)  # 31 rows: 7 whole batches of 4 and 3 rows per epoch

    def loader(persistent: bool = False) -> ActivationLoader:
        ds = ActivationDataset(store, "r", "L", batch_size=4, shuffle=True, seed=4, repeat=True)
        return ActivationLoader(ds, num_workers=workers, persistent_workers=persistent and workers > 0)

    first = loader(persistent=True)
    it = iter(first)
    got = [next(it) for _ in range(8 + 8 + 3)]
    assert [b.shape[0] for b in got[:16]] == ([4] * 7 + [3]) * 2
    once(ids(got[:8]), end)
    once(ids(got[8:16]), end)
    assert ids(got[:8]) != ids(got[8:16])
    state = first.state_dict()
    assert state["epoch"] == 2 and sum(state["rows"].values()) == 12
    del it
    second = loader()
    second.load_state_dict(state)
    rest = list(itertools.islice(second, 5 + 2))
    once(ids(got[16:]) + ids(rest[:5]), end)
    assert second.state_dict()["epoch"] == 3


def test_repeat_is_refused_under_plain_dataloader_workers(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "w")
    make_run(local, "r", [4, 4])
    ds = ActivationDataset(local, "r", "L", batch_size=4, repeat=True)
    with pytest.raises(ValueError, match=r"repeat=True.*ActivationLoader\(dataset, num_workers=2\)"):
        list(DataLoader(ds, batch_size=None, num_workers=2))
    empty = ActivationDataset(local, "r", "L", batch_size=100, drop_last=True, repeat=True)
    with pytest.raises(ValueError, match="gave rank 0 no batch"):
        next(iter(empty))
    with pytest.raises(ValueError, match="repeat must be a bool"):
        ActivationDataset(local, "r", "L", repeat=1)  # type: ignore[arg-type]
