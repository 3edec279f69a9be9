"""ActivationDataset for a training loop: no silently wrong answer (bad names, missing masks,
short batches mid-epoch, DataLoader's own batching), sizes, normalization, repeated epochs."""

from __future__ import annotations

import itertools
import json
import math
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from hf_models import gpt2_tokenizer, tiny_gpt2
from mi_crow.store import (
    ActivationCapture,
    ActivationDataset,
    ActivationLoader,
    LocalStore,
    MemoryStore,
    Store,
    StoreDataloader,
)

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


# ---------------------------------------------------------------------- captured runs

LAYERS = ["transformer.h.0", "transformer.h.1"]
TEXTS = ["the cat sat", "a dog ran far away now", "the cat", "a dog sat on the mat today", "cat"]


def capture(store: Store, run: str, *, stats: bool = True) -> torch.Tensor:
    """Capture a tiny GPT-2 (random weights) into ``run``, two texts a batch, padded on the right;
    returns the stored non-padding rows of layer ``transformer.h.1``, in stored order."""
    model, tok = tiny_gpt2(), gpt2_tokenizer()
    tok.pad_token = tok.eos_token
    kept = []
    with ActivationCapture(model, store, run, LAYERS, stats=stats, progress=False) as cap:
        for i in range(0, len(TEXTS), 2):
            enc = tok(TEXTS[i : i + 2], return_tensors="pt", padding=True)
            cap.run(**enc)
            out = model.transformer(**enc).last_hidden_state  # not h.1's output: only its mask is used
            kept.append(enc["attention_mask"].reshape(-1).bool())
            del out
    rows = []
    for i, mask in enumerate(kept):
        acts = store.get_detector_metadata_by_layer_by_key(run, i, LAYERS[1], "activations")
        rows.append(acts.reshape(-1, acts.shape[-1])[mask])
    return torch.cat(rows)


def test_a_wrong_run_layer_or_key_fails_at_construction(store: Store) -> None:
    capture(store, "gpt2")
    for args, fragment in (
        (("gpt", LAYERS[0]), r"run 'gpt' is not in the store \(did you mean 'gpt2'\?\); its runs: \['gpt2'\]"),
        (
            ("gpt2", "h.1"),
            r"layer 'h.1' is not in batch 0 of run 'gpt2'.*its layers: \['attention_masks', 'transformer.h.0', "
            r"'transformer.h.1'\]",
        ),
        (
            ("gpt2", LAYERS[1], "activation"),
            r"key 'activation' is not in layer 'transformer.h.1' of batch 0 of run 'gpt2' \(did you mean "
            r"'activations'\?\); its keys: \['activations'\]",
        ),
    ):
        with pytest.raises(ValueError, match=fragment):
            ActivationDataset(store, *args)
    with pytest.raises(ValueError, match=r"run 'other' is not in the store"):
        ActivationDataset(store, ["gpt2", "other"], LAYERS[0])
    # A run that holds no batch yet (being captured) is fine; its recorded layers are checked.
    store.put_run_metadata("later", {"layers": LAYERS})
    assert list(ActivationDataset(store, "later", LAYERS[0])) == []
    with pytest.raises(ValueError, match=r"not among the layers run 'later' is captured with"):
        ActivationDataset(store, "later", "transformer.h.2")
    # mi_crow 1.0's loader keeps its signature and fails at its first iteration.
    loader = StoreDataloader(store, "gpt2", "h.1")
    with pytest.raises(ValueError, match=r"layer 'h.1' is not in batch 0 of run 'gpt2'.*'transformer.h.1'"):
        next(iter(loader))
    with pytest.raises(ValueError, match=r"run 'gpt' is not in the store"):
        next(iter(StoreDataloader(store, "gpt", LAYERS[0])))
    assert sum(b.shape[0] for b in StoreDataloader(store, "gpt2", LAYERS[0], batch_size=4)) > 0


def test_drop_padding_reads_the_batch_inputs_and_says_what_to_do_without_a_mask(store: Store) -> None:
    kept = capture(store, "gpt2")
    ds = ActivationDataset(store, "gpt2", LAYERS[1], batch_size=8, drop_padding=True)
    got = torch.cat(list(ds))
    assert torch.equal(got, kept)  # the mask of the inputs pseudo-layer, once per batch
    assert ds.num_rows == kept.shape[0] and ds.d_in == 32
    # The layout of runs captured before: the mask under each layer; and the pseudo-layer
    # written directly (mi_crow 1.0's own capture).
    acts = torch.arange(2 * 3 * D, dtype=torch.float32).reshape(2, 3, D)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    store.put_detector_metadata("old", 0, {}, {"L": {"activations": acts, "attention_mask": mask}})
    store.put_detector_metadata("new", 0, {}, {"L": {"activations": acts}, "attention_masks": {"attention_mask": mask}})
    for run in ("old", "new"):
        rows = torch.cat(list(ActivationDataset(store, run, "L", drop_padding=True)))
        assert torch.equal(rows, acts.reshape(-1, D)[mask.reshape(-1).bool()])
    # Captured without a mask: a ValueError that says what to do, at construction.
    store.put_detector_metadata("bare", 0, {}, {"L": {"activations": acts}})
    fix = r"drop_padding=True needs each batch's attention mask.*cap.run\(\*\*enc\).*drop_padding=False"
    with pytest.raises(ValueError, match=fix):
        ActivationDataset(store, "bare", "L", drop_padding=True)
    # A later batch without one: the same ValueError when it is read (never a bare FileNotFoundError).
    store.put_detector_metadata("new", 1, {}, {"L": {"activations": acts}})
    with pytest.raises(ValueError, match=r"batch 1 of run 'new' has none"):
        list(ActivationDataset(store, "new", "L", drop_padding=True))
    with pytest.raises(ValueError, match=r"batch 1 of run 'new' has none"):
        len(ActivationDataset(store, "new", "L", drop_padding=True))


class CountingStore(LocalStore):
    """Counts reads of activation tensors (what the sizes must not need)."""

    reads = 0

    def get_detector_metadata_by_layer_by_key(
        self, run_id: str, batch_index: int, layer: str, key: str
    ) -> torch.Tensor:
        if key == "activations":
            type(self).reads += 1
        return super().get_detector_metadata_by_layer_by_key(run_id, batch_index, layer, key)


@pytest.mark.parametrize("drop_padding", [False, True])
def test_sizes_from_headers_match_what_is_yielded(tmp_path: Path, drop_padding: bool) -> None:
    store = CountingStore(tmp_path)
    end = make_run(store, "r", SHORT)
    for i in range(len(SHORT)):  # every third position is padding
        n = SHORT[i]
        mask = (torch.arange(n) % 3 != 2).long().reshape(n, 1)
        store.put_detector_metadata(
            "r",
            i,
            {},
            {"L": {"activations": store.get_detector_metadata_by_layer_by_key("r", i, "L", "activations")}}
            | {"attention_masks": {"attention_mask": mask}},
        )
    CountingStore.reads = 0
    rows = sum(int((torch.arange(n) % 3 != 2).sum()) for n in SHORT) if drop_padding else end
    settings: list[dict[str, Any]] = [{}, {"drop_last": True}, {"shuffle": True}, {"world_size": 2, "rank": 1}]
    for kw in settings:

        def dataset(batch_size: int = 4, **more: Any) -> ActivationDataset:
            return ActivationDataset(store, "r", "L", batch_size=batch_size, drop_padding=drop_padding, **kw | more)

        ds = dataset()
        share = sum(b.shape[0] for b in dataset(1000, drop_last=False))
        assert ds.d_in == D
        assert ds.num_rows == share and (share == rows or "world_size" in kw)
        expected = share // 4 if kw.get("drop_last") else -(-share // 4)
        reads = CountingStore.reads
        assert len(ds) == expected
        assert CountingStore.reads == reads  # no tensor data read for the sizes
        assert len(list(ds)) == expected
        for workers in (0, 2):
            loader = ActivationLoader(dataset(), num_workers=workers)
            assert len(loader) == len(list(loader)), (kw, workers)
            assert loader.num_rows == sum(b.shape[0] for b in dataset(1000, drop_last=False)) or workers
            plain = DataLoader(dataset(), batch_size=None, num_workers=workers)
            assert len(plain) == len(list(plain)), (kw, workers)  # torch warns if more come than len says


# ---------------------------------------------------------------------- normalize


def test_normalize_with_the_runs_statistics(store: Store) -> None:
    kept = capture(store, "gpt2").double()
    norm = ActivationDataset(store, "gpt2", LAYERS[1], batch_size=8, drop_padding=True, normalize="norm")
    expected_factor = math.sqrt(32) / float(kept.norm(dim=1).mean())
    assert norm.scaling_factor is not None
    assert norm.scaling_factor == pytest.approx(expected_factor, rel=1e-6)
    scaled = torch.cat(list(norm)).double()
    assert torch.allclose(scaled, kept * norm.scaling_factor, rtol=1e-5, atol=1e-6)
    assert float(scaled.norm(dim=1).mean()) == pytest.approx(math.sqrt(32), rel=1e-4)  # SAELens's target
    standard = ActivationDataset(store, "gpt2", LAYERS[1], drop_padding=True, normalize="standard")
    z = torch.cat(list(standard)).double()
    expected = (kept - kept.mean(0)) / (kept.var(0, unbiased=False) + 1e-6).sqrt()
    assert torch.allclose(z, expected, atol=1e-4)
    assert standard.scaling_factor is None
    half = ActivationDataset(store, "gpt2", LAYERS[1], dtype=torch.float16, normalize="norm")
    assert {b.dtype for b in half} == {torch.float16}  # applied in the output dtype
    # Merged over several runs: the statistics of all their rows.
    more = capture(store, "gpt2b")
    both = ActivationDataset(store, ["gpt2", "gpt2b"], LAYERS[1], drop_padding=True, normalize="norm")
    assert both.scaling_factor == pytest.approx(
        math.sqrt(32) / float(torch.cat([kept, more.double()]).norm(dim=1).mean()), rel=1e-6
    )
    # A state records it: a resume with another normalization is refused.
    state = norm.state_dict()
    assert state["normalize"] == "norm"
    plain = ActivationDataset(store, "gpt2", LAYERS[1], batch_size=8, drop_padding=True)
    with pytest.raises(ValueError, match=r"other settings: \['normalize'\]"):
        plain.load_state_dict(state)
    # Runs without statistics: a ValueError naming the run, at construction.
    capture(store, "nostats", stats=False)
    with pytest.raises(ValueError, match=r"normalize='standard' needs the statistics of every run: run 'nostats'"):
        ActivationDataset(store, ["gpt2", "nostats"], LAYERS[1], normalize="standard")
    make_run(store, "bare", [4])
    with pytest.raises(ValueError, match=r"run 'bare' has no per-layer statistics"):
        ActivationDataset(store, "bare", "L", normalize="norm")
    with pytest.raises(ValueError, match=r"normalize must be one of \[None, 'norm', 'standard'\], got 'l2'"):
        ActivationDataset(store, "gpt2", LAYERS[1], normalize="l2")


class PublicOnly(Store):
    """A backend of another package: only the documented methods, no list_runs, no LayoutStore."""

    def __init__(self, inner: Store) -> None:
        super().__init__()
        self.inner = inner


for _name in Store.__abstractmethods__:
    setattr(PublicOnly, _name, lambda self, *a, _n=_name, **k: getattr(self.inner, _n)(*a, **k))
PublicOnly.__abstractmethods__ = frozenset()


def test_a_store_of_another_package_gets_the_same_checks_and_sizes() -> None:
    inner = MemoryStore()
    end = make_run(inner, "r", SHORT)
    store = PublicOnly(inner)
    ds = ActivationDataset(store, "r", "L", batch_size=4)
    assert (len(ds), ds.num_rows, ds.d_in) == (8, end, D)
    assert len(list(ds)) == 8
    with pytest.raises(ValueError, match=r"layer 'M' is not in batch 0 of run 'r'; its layers: \['L'\]"):
        ActivationDataset(store, "r", "M")
    with pytest.raises(ValueError, match=r"run 'x' is not in the store: it holds no batch and no metadata"):
        ActivationDataset(store, "x", "L")
    inner.put_run_metadata("x", {"note": "capture starting"})
    assert list(ActivationDataset(store, "x", "L")) == []
    with pytest.raises(ValueError, match=r"run 'y' is not in the store"):
        next(iter(StoreDataloader(store, "y", "L")))


def test_the_dataloader_check_never_fails_when_torch_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    from mi_crow.store import activation_dataset

    store = MemoryStore()
    make_run(store, "r", [4, 4])

    def broken(depth: int = 0) -> Any:
        raise RuntimeError("frames are not what they were")

    monkeypatch.setattr(activation_dataset, "_frame", broken)  # no warning, no error, right counts
    assert [b.shape for b in DataLoader(ActivationDataset(store, "r", "L"))] == [torch.Size([1, 8, D])]
    plain = DataLoader(ActivationDataset(store, "r", "L", batch_size=4), batch_size=None)
    assert len(plain) == 2 and len(list(plain)) == 2


def test_a_consumer_that_stops_early_leaves_no_reading_thread_behind() -> None:
    # The consumer stops while the prefetch queue is full and the reading thread has nothing left
    # but the end of the epoch to hand over: that hand-over waits for a consumer that never comes
    # back unless it watches for the stop, as every other one does.
    store = MemoryStore()
    for i in range(2):
        store.put_detector_metadata("r", i, {}, {"l": {"activations": torch.full((4, 3), float(i))}})
    ds = ActivationDataset(store, "r", "l", batch_size=4, prefetch=1)
    before = set(threading.enumerate())
    it = iter(ds)
    assert torch.equal(next(it), torch.zeros(4, 3))
    started = [t for t in threading.enumerate() if t not in before and t.name == "mi-crow-store-prefetch"]
    assert len(started) == 1
    # Wait (on a condition, not a time) until the thread has queued the last batch and is trying to hand
    # over the end: then the queue is full and the thread is still alive.
    while started[0].is_alive() and not _waiting_on_full_queue(started[0]):
        threading.Event().wait(0.01)
    it.close()
    started[0].join(timeout=60)
    assert not started[0].is_alive()


def _waiting_on_full_queue(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == "hand" and frame.f_locals.get("item") is not None:
            item = frame.f_locals["item"]
            return not isinstance(item, torch.Tensor)  # the end (or an error), after the last batch
        frame = frame.f_back
    return False
