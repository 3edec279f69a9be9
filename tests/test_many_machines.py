"""The whole many-machines path on one run: 4 real processes capture it (on the SeaweedFS server and
on a local store), then 2 ranks x 2 DataLoader workers (forked, after the parent used the store)
train from it: every row exactly once per epoch, and an exact resume from a mid-epoch state."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import proc_workers as pw
from mi_crow.store import ActivationDataset, ActivationLoader, LayoutStore
from test_capture_ranks import Backend, backend, expected, ranks_bucket  # noqa: F401 (fixtures)
from test_processes import run_all

TOTAL, WORLD = 24, 4


def rows_of(batches: list[torch.Tensor]) -> Counter[tuple[float, ...]]:
    return Counter(tuple(row.tolist()) for b in batches for row in b)


def expected_rows(layer: str) -> Counter[tuple[float, ...]]:
    return rows_of([expected(g)[layer].reshape(-1, expected(g)[layer].shape[-1]) for g in range(TOTAL)])


def loader(store: LayoutStore, rank: int, epoch: int, **kwargs: Any) -> ActivationLoader:
    ds = ActivationDataset(
        store, pw.RANK_RUN, "0", batch_size=8, shuffle=True, seed=7, rank=rank, world_size=2, shuffle_buffer_bytes=512
    )
    ds.set_epoch(epoch)
    return ActivationLoader(ds, num_workers=2, **kwargs)


def test_four_writers_then_two_ranks_by_two_workers(tmp_path: Path, backend: Backend) -> None:  # noqa: F811
    root, open_store = backend
    logs = [str(tmp_path / f"rank-{r}") for r in range(WORLD)]
    run_all(pw.context(), pw.rank_capturer, [(root, logs[r], r, WORLD, TOTAL, False) for r in range(WORLD)])
    store = open_store()
    assert store.list_run_batches(pw.RANK_RUN) == list(range(TOTAL))  # the parent has used the store
    want = expected_rows("0")
    # Two epochs, each rank with two forked workers (persistent across the epochs).
    loaders = [loader(store, rank, 0, persistent_workers=True) for rank in range(2)]
    orders = []
    for epoch in range(2):
        got: list[torch.Tensor] = []
        for rank, ld in enumerate(loaders):
            ld.set_epoch(epoch)
            mine = list(ld)
            assert mine, f"rank {rank} read nothing"
            got += mine
        assert rows_of(got) == want, f"epoch {epoch}: not every row exactly once"
        orders.append([tuple(r.tolist()) for b in got for r in b])
    assert orders[0] != orders[1]
    # Stop both ranks mid-epoch 1, save their states (as JSON), resume with new loaders.
    head: list[torch.Tensor] = []
    states = []
    for rank, steps in ((0, 2), (1, 3)):
        ld = loader(store, rank, 1)
        it = iter(ld)
        head += [next(it) for _ in range(steps)]
        states.append(json.loads(json.dumps(ld.state_dict())))
        del it
    rest: list[torch.Tensor] = []
    for rank in range(2):
        ld = loader(store, rank, 1)
        ld.load_state_dict(states[rank])
        rest += list(ld)
    assert rows_of(head + rest) == want
    # The same stream as the uninterrupted epoch 1, rank by rank.
    assert sorted(tuple(r.tolist()) for b in head + rest for r in b) == sorted(orders[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_on_one_rank_with_the_same_global_batch(tmp_path: Path, backend: Backend, workers: int) -> None:  # noqa: F811
    root, open_store = backend
    logs = [str(tmp_path / f"rank-{r}") for r in range(WORLD)]
    run_all(pw.context(), pw.rank_capturer, [(root, logs[r], r, WORLD, TOTAL, False) for r in range(WORLD)])
    store = open_store()
    head: list[torch.Tensor] = []
    states = []
    for rank in range(2):
        ld = loader(store, rank, 3)
        it = iter(ld)
        head += [next(it) for _ in range(2)]
        states.append(ld.state_dict())
        del it
    ds = ActivationDataset(store, pw.RANK_RUN, "0", batch_size=16, shuffle=True, seed=7, shuffle_buffer_bytes=512)
    ds.load_state_dict(ActivationDataset.merge_state_dicts(states))
    assert rows_of(head + list(ActivationLoader(ds, num_workers=workers))) == expected_rows("0")
