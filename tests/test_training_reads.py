"""StoreDataloader (mi_crow 1.0's loader) and ActivationDataset, on real stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mi_crow.store import ActivationDataset, CorruptFileError, LocalStore, MemoryStore, Store, StoreDataloader

REPO = Path(__file__).resolve().parent.parent
MI_CROW_REF = Path(os.environ.get("MI_CROW_REF_PATH", REPO / ".venv" / "mi-crow-ref"))
D = 6


def make_run(store: Store, run: str, sizes: list[tuple[int, int]], first_id: int = 0, pad: bool = False) -> int:
    """Batches of activations [B, T, D] whose column 0 is a unique row id; returns the next id."""
    row = first_id
    for i, (b, t) in enumerate(sizes):
        ids = torch.arange(row, row + b * t, dtype=torch.float32).reshape(b, t, 1)
        acts = torch.cat([ids, torch.randn(b, t, D - 1)], dim=-1)
        mask = torch.ones(b, t, dtype=torch.int64)
        if pad:
            mask[:, t - 1 - (i % 2) :] = 0  # the last one or two positions are padding
        store.put_detector_metadata(run, i, {}, {"L": {"activations": acts, "attention_mask": mask}})
        row += b * t
    return row


def ids(batches: list[torch.Tensor]) -> list[int]:
    return [int(x) for b in batches for x in b[:, 0].tolist()]


SIZES = [(2, 5), (3, 4), (1, 7), (4, 3), (2, 6)]  # 10 + 12 + 7 + 12 + 12 = 53 rows


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    s: Store = LocalStore(tmp_path / "s") if request.param == "local" else MemoryStore()
    make_run(s, "r", SIZES)
    return s


# ---------------------------------------------------------------------- StoreDataloader


def test_store_dataloader_stored_order_and_shapes(store: Store) -> None:
    loader = StoreDataloader(store, "r", "L", batch_size=5)
    batches = list(loader)
    assert [tuple(b.shape) for b in batches][:4] == [(5, D), (5, D), (5, D), (5, D)]
    assert ids(batches) == list(range(53))
    assert ids(list(loader)) == list(range(53))  # iterable any number of times
    assert len(list(StoreDataloader(store, "r", "L", batch_size=5, max_batches=3))) == 3
    half = list(StoreDataloader(store, "r", "L", batch_size=100, dtype=torch.float16, device="cpu"))
    assert all(b.dtype == torch.float16 for b in half) and len(half) == 5  # never spans stored batches


def test_store_dataloader_falls_back_to_run_batches(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_run_batch("r", 0, {"activations": torch.ones(3, D)})
    store.put_run_batch("r", 1, {"other": torch.zeros(2, D)})
    store.put_run_batch("r", 2, [torch.ones(1)])
    store.put_detector_metadata("r", 3, {}, {"L": {"activations": torch.full((4, D), 2.0)}})
    got = list(StoreDataloader(store, "r", "L"))
    assert [tuple(b.shape) for b in got] == [(3, D), (4, D)]  # batch 1 has no activations, 2 is a list
    # A missing key falls back to "activations", as in mi_crow 1.0.
    other = list(StoreDataloader(store, "r", "L", key="other"))
    assert [tuple(b.shape) for b in other] == [(3, D), (2, D), (4, D)]


MI_CROW_LOADER = r"""
import json, sys
from mi_crow.store import LocalStore
from mi_crow.store.store_dataloader import StoreDataloader
import mi_crow.store
assert not hasattr(mi_crow.store, "LayoutStore")
out = []
for kw in ({"batch_size": 5}, {"batch_size": 4, "max_batches": 6}, {"batch_size": 100, "key": "attention_mask"}):
    out.append([[list(b.shape), round(float(b.double().sum()), 4)]
                for b in StoreDataloader(LocalStore(sys.argv[1]), "r", "L", **kw)])
print(json.dumps(out))
"""


@pytest.mark.skipif(not (MI_CROW_REF / "mi_crow" / "store").is_dir(), reason="mi_crow 1.0 not installed")
def test_store_dataloader_matches_mi_crow(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    make_run(store, "r", SIZES)
    store.put_run_batch("r", 7, {"activations": torch.ones(3, D)})
    proc = subprocess.run(
        [sys.executable, "-c", MI_CROW_LOADER, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(MI_CROW_REF)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    theirs = json.loads(proc.stdout)
    ours = [
        [[list(b.shape), round(float(b.double().sum()), 4)] for b in StoreDataloader(store, "r", "L", **kw)]
        for kw in ({"batch_size": 5}, {"batch_size": 4, "max_batches": 6}, {"batch_size": 100, "key": "attention_mask"})
    ]
    assert ours == theirs


# ---------------------------------------------------------------------- ActivationDataset


def test_sequential_is_stored_order(store: Store) -> None:
    batches = list(ActivationDataset(store, "r", "L", batch_size=8))
    assert [b.shape[0] for b in batches] == [8] * 6 + [5]
    assert ids(batches) == list(range(53))
    assert batches[0].dtype == torch.float32 and batches[0].shape[1] == D


def test_every_row_once_and_mixed_across_stored_batches(store: Store) -> None:
    ds = ActivationDataset(store, "r", "L", batch_size=8, shuffle=True, seed=7)
    batches = list(ds)
    assert sorted(ids(batches)) == list(range(53))
    assert ids(batches) != list(range(53))
    starts = [0, 10, 22, 29, 41, 53]
    chunk_of = {r: next(i for i in range(5) if starts[i] <= r < starts[i + 1]) for r in range(53)}
    assert len({chunk_of[r] for r in ids(batches[:1])}) > 1  # one batch holds rows of several stored batches


def test_shuffle_window_bounds_memory(store: Store) -> None:
    """With a buffer smaller than one stored batch, rows are shuffled within each batch only."""
    ds = ActivationDataset(store, "r", "L", batch_size=1000, shuffle=True, seed=1, shuffle_buffer_bytes=1)
    blocks = list(ds._blocks(0, ds._chunks(0, {"r": store.list_run_batches("r")}), 0, 1, 0, 1000))
    assert sorted(b.shape[0] for b in blocks) == [7, 10, 12, 12, 12]  # one window per stored batch
    for block in blocks:
        rows = sorted(int(x) for x in block[:, 0].tolist())
        assert rows == list(range(rows[0], rows[0] + len(rows)))  # one stored batch per window


def test_order_is_a_function_of_seed_and_epoch(store: Store) -> None:
    def order(seed: int, epoch: int) -> list[int]:
        ds = ActivationDataset(store, "r", "L", batch_size=8, shuffle=True, seed=seed)
        ds.set_epoch(epoch)
        return ids(list(ds))

    assert order(3, 0) == order(3, 0)
    assert order(3, 1) == order(3, 1)
    assert order(3, 0) != order(3, 1)
    assert order(3, 0) != order(4, 0)
    with pytest.raises(ValueError, match="epoch"):
        ActivationDataset(store, "r", "L").set_epoch(-1)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle", [False, True])
def test_exactly_once_with_workers_and_ranks(tmp_path: Path, workers: int, shuffle: bool) -> None:
    store = LocalStore(tmp_path)
    end = make_run(store, "a", SIZES)
    end = make_run(store, "b", [(3, 3)] * 4, first_id=end)
    seen: list[int] = []
    for rank in range(3):
        ds = ActivationDataset(store, ["a", "b"], "L", batch_size=4, shuffle=shuffle, seed=5, rank=rank, world_size=3)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        mine = ids(list(loader))
        assert mine, f"rank {rank} got nothing"
        seen += mine
    assert sorted(seen) == list(range(end))


def test_drop_padding(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    make_run(store, "r", SIZES, pad=True)
    kept = ids(list(ActivationDataset(store, "r", "L", batch_size=16, drop_padding=True)))
    expected = []
    row = 0
    for i, (b, t) in enumerate(SIZES):
        for bb in range(b):
            for tt in range(t):
                if tt < t - 1 - (i % 2):
                    expected.append(row + bb * t + tt)
        row += b * t
    assert kept == expected
    store.put_detector_metadata(
        "bad", 0, {}, {"L": {"activations": torch.ones(2, 3, D), "attention_mask": torch.ones(3, 2)}}
    )
    with pytest.raises(ValueError, match=r"mask 'attention_mask' of batch 0 of run 'bad' has shape \(3, 2\)"):
        list(ActivationDataset(store, "bad", "L", drop_padding=True))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("stop_after", [0, 1, 3, 6])
def test_resume_yields_exactly_the_remaining_rows(store: Store, shuffle: bool, stop_after: int) -> None:
    def make() -> ActivationDataset:
        ds = ActivationDataset(store, "r", "L", batch_size=5, shuffle=shuffle, seed=11, shuffle_buffer_bytes=600)
        ds.set_epoch(2)
        return ds

    full = ids(list(make()))
    ds = make()
    it = iter(ds)
    head = [next(it) for _ in range(stop_after)]
    state = ds.state_dict()
    assert state["epoch"] == 2 and state["shards"] == 1 and state["rows"] == {"0": 5 * stop_after}
    assert state["snapshot"] == {"r": [[0, 5]]}
    del it
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert ids(head) + ids(list(resumed)) == full
    assert ids(list(resumed)) == full  # the next iteration is a whole epoch again
    # Another batch size (a fixed global batch over other ranks) resumes with the same rows left
    # (a batch's rows are grouped by the stored batch they come from, so only the order inside
    # each batch can differ).
    wider = ActivationDataset(store, "r", "L", batch_size=7, shuffle=shuffle, seed=11, shuffle_buffer_bytes=600)
    wider.load_state_dict(state)
    rest = ids(list(wider))
    assert sorted(rest) == sorted(full[5 * stop_after :])
    assert rest == full[5 * stop_after :]
    # The form of earlier versions ({"rows": int}) still resumes a sequential epoch; a shuffled one
    # had windows of another size, so only its start can be resumed (a clear error otherwise).
    legacy = {k: v for k, v in state.items() if k not in ("snapshot", "shards", "order")} | {"rows": 5 * stop_after}
    old = make()
    if shuffle and stop_after:
        with pytest.raises(ValueError, match="shuffled order of another version"):
            old.load_state_dict(legacy)
    else:
        old.load_state_dict(legacy)
        assert ids(head) + ids(list(old)) == full
    for changed in ({"seed": 12}, {"shuffle": not shuffle}, {"layer": "M"}):
        other = ActivationDataset(store, "r", "L", batch_size=5, shuffle=shuffle, seed=11, shuffle_buffer_bytes=600)
        with pytest.raises(ValueError, match=f"other settings: \\['{next(iter(changed))}'\\]"):
            other.load_state_dict({**state, **changed})


def test_dtype_device_and_drop_last(store: Store) -> None:
    ds = ActivationDataset(store, "r", "L", batch_size=10, dtype=torch.bfloat16, device="cpu", drop_last=True)
    batches = list(ds)
    assert [b.shape for b in batches] == [torch.Size([10, D])] * 5
    assert all(b.dtype == torch.bfloat16 for b in batches)


def test_reader_errors_reach_the_consumer(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    make_run(store, "r", SIZES)
    path = tmp_path / "runs/r/batch_3/L/activations.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CorruptFileError, match="batch_3"):
        list(ActivationDataset(store, "r", "L", batch_size=4))


def test_early_stop_and_bad_arguments(store: Store) -> None:
    ds = ActivationDataset(store, "r", "L", batch_size=2, prefetch=1)
    it = iter(ds)
    next(it)
    it.close()  # the prefetch thread stops; nothing hangs
    for kwargs, fragment in (
        ({"batch_size": 0}, "batch_size"),
        ({"rank": 2, "world_size": 2}, "rank must be < world_size"),
        ({"prefetch": -1}, "prefetch"),
    ):
        with pytest.raises(ValueError, match=fragment):
            ActivationDataset(store, "r", "L", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="run_id"):
        ActivationDataset(store, ["../x"], "L")


@pytest.mark.parametrize("workers", [0, 2])
def test_recycled_batches_never_change_under_the_consumer(tmp_path: Path, workers: int) -> None:
    """Shuffled batches reuse freed memory: dropping each batch at once or keeping them all
    must give the same rows, and kept batches must not change afterwards."""
    store = LocalStore(tmp_path)
    end = make_run(store, "r", [(4, 16)] * 12)

    def loader() -> DataLoader[torch.Tensor]:
        ds = ActivationDataset(store, "r", "L", batch_size=16, shuffle=True, seed=2, shuffle_buffer_bytes=4096)
        return DataLoader(ds, batch_size=None, num_workers=workers)

    streamed = [int(x) for b in loader() for x in b[:, 0].tolist()]  # each batch dropped after use
    kept = list(loader())
    snapshot = [b.clone() for b in kept]
    assert sorted(streamed) == list(range(end))
    assert ids(kept) == streamed
    for _ in loader():  # more batches produced while the kept ones are still alive
        pass
    assert all(torch.equal(a, b) for a, b in zip(kept, snapshot, strict=True))


def test_stores_and_datasets_travel_to_spawned_workers(tmp_path: Path) -> None:
    """DataLoader workers started with 'spawn' receive the dataset (and its store) pickled."""
    import pickle

    store = LocalStore(tmp_path, verify=True)
    make_run(store, "r", SIZES)
    with store._writers.shared():  # a lock held right now must not travel or break the copy
        copy = pickle.loads(pickle.dumps(store))
    copy.put_run_metadata("r", {"from": "copy"})
    assert store.get_run_metadata("r") == {"from": "copy"} and copy.verify_reads
    memory = MemoryStore()
    make_run(memory, "m", SIZES[:2])
    assert pickle.loads(pickle.dumps(memory)).list_run_batches("m") == [0, 1]
    ds = ActivationDataset(store, "r", "L", batch_size=8, shuffle=True, seed=4)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    assert sorted(ids(list(loader))) == list(range(53))
