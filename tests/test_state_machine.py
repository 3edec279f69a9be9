"""Model-based testing: random put / overwrite / append / delete sequences against a dict model."""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mi_crow.store import LayoutStore, LocalStore, MemoryStore
from mi_crow.store.testing.store_tests import assert_same, assert_same_tm

RUNS = st.sampled_from(["a", "b"])
INDICES = st.integers(0, 3)
VERSIONS = st.integers(0, 1000)
DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.bool]


def tensor(v: int, shape: tuple[int, ...] = (2, 3)) -> torch.Tensor:
    return (torch.arange(int(torch.tensor(shape).prod())).reshape(shape) + v).to(DTYPES[v % len(DTYPES)])


class StoreMachine(RuleBasedStateMachine):
    make_store: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp()
        self.store: LayoutStore = type(self).make_store(self.tmp)
        self.run_meta: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[int, tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]]] = {}
        self.run_batches: dict[str, dict[int, Any]] = {}
        self.appends: dict[str, list[tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]]] = {}
        self.models: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------------- writes

    @rule(run=RUNS, v=VERSIONS)
    def put_run_metadata(self, run: str, v: int) -> None:
        self.store.put_run_metadata(run, {"v": v})
        self.run_meta[run] = {"v": v}

    @rule(run=RUNS, i=INDICES, v=VERSIONS, layers=st.lists(st.sampled_from(["x", "y", "z"]), unique=True))
    def put_batch(self, run: str, i: int, v: int, layers: list[str]) -> None:
        tm = {layer: {"activations": tensor(v + n)} for n, layer in enumerate(layers)}
        self.store.put_detector_metadata(run, i, {"v": v}, tm)
        self.batches.setdefault(run, {})[i] = ({"v": v}, tm)

    @rule(run=RUNS, i=INDICES, v=VERSIONS, as_list=st.booleans())
    def put_run_batch(self, run: str, i: int, v: int, as_list: bool) -> None:
        batch: Any = [tensor(v), tensor(v + 1, (4,))] if as_list else {"k": tensor(v)}
        self.store.put_run_batch(run, i, batch)
        self.run_batches.setdefault(run, {})[i] = batch

    @rule(run=RUNS, v=VERSIONS)
    def append(self, run: str, v: int) -> None:
        tm = {"d": {"top": tensor(v, (v % 3,))}}
        self.store.put_run_detector_metadata(run, {"v": v}, tm)
        self.appends.setdefault(run, []).append(({"v": v}, tm))

    @rule(run=RUNS, i=INDICES)
    def rejected_put(self, run: str, i: int) -> None:
        with pytest.raises(ValueError):
            self.store.put_detector_metadata(run, i, {"loss": object()}, {"x": {"activations": tensor(0)}})
        with pytest.raises(ValueError):
            self.store.put_run_detector_metadata(run, {}, {"x": {"k": "not a tensor"}})  # type: ignore[dict-item]

    @rule(run=RUNS)
    def delete_run(self, run: str) -> None:
        self.store.delete_run(run)
        for d in (self.run_meta, self.batches, self.run_batches, self.appends):
            d.pop(run, None)

    @rule(m=st.sampled_from(["m1", "m2"]), v=VERSIONS)
    def put_model(self, m: str, v: int) -> None:
        self.store.put_model(m, {"w": tensor(v)}, {"v": v})
        self.models[m] = ({"w": tensor(v)}, {"v": v})

    @rule(m=st.sampled_from(["m1", "m2"]))
    def delete_model(self, m: str) -> None:
        self.store.delete_model(m)
        self.models.pop(m, None)

    # ---------------------------------------------------------------- reads

    @invariant()
    def everything_reads_back(self) -> None:
        runs = set(self.run_meta) | set(self.batches) | set(self.run_batches) | set(self.appends)
        assert self.store.list_runs() == sorted(runs)
        assert self.store.list_models() == sorted(self.models)
        for run in ("a", "b"):
            assert self.store.get_run_metadata(run) == self.run_meta.get(run, {})
            batches, run_batches = self.batches.get(run, {}), self.run_batches.get(run, {})
            assert self.store.list_run_batches(run) == sorted(set(batches) | set(run_batches))
            for i in range(4):
                meta, tm = self.store.get_detector_metadata(run, i)
                expected_meta, expected_tm = batches.get(i, ({}, {}))
                assert meta == expected_meta
                assert_same_tm(tm, {k: v for k, v in expected_tm.items() if v})
                self._check_run_batch(run, i, batches, run_batches)
            got = list(self.store.iter_run_detector_metadata(run))
            want = self.appends.get(run, [])
            assert [m for m, _ in got] == [m for m, _ in want]
            for (_, a), (_, b) in zip(got, want, strict=True):
                assert_same_tm(a, b)
        for m, (tensors, meta) in self.models.items():
            got_tensors, got_meta = self.store.get_model(m)
            assert got_meta == meta
            assert_same_tm({"m": got_tensors}, {"m": tensors})

    def _check_run_batch(self, run: str, i: int, batches: dict[int, Any], run_batches: dict[int, Any]) -> None:
        if i in run_batches:
            got = self.store.get_run_batch(run, i)
            want = run_batches[i]
            assert type(got) is type(want)
            if isinstance(want, list):
                for a, b in zip(got, want, strict=True):
                    assert_same(a, b)
            else:
                assert_same_tm({"b": got}, {"b": want})
            return
        layers = batches.get(i, ({}, {}))[1]
        if not layers:
            with pytest.raises(FileNotFoundError):
                self.store.get_run_batch(run, i)
            return
        got = self.store.get_run_batch(run, i)
        assert isinstance(got, dict)
        if len(layers) == 1:
            want = {"activations": next(iter(layers.values()))["activations"]}
        else:
            want = {f"activations_{layer}": t["activations"] for layer, t in layers.items()}
        assert_same_tm({"b": got}, {"b": want})


class LocalMachine(StoreMachine):
    make_store = staticmethod(lambda tmp: LocalStore(tmp))


class MemoryMachine(StoreMachine):
    make_store = staticmethod(lambda tmp: MemoryStore())


TestLocalStoreStateMachine = LocalMachine.TestCase
TestLocalStoreStateMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
TestMemoryStoreStateMachine = MemoryMachine.TestCase
TestMemoryStoreStateMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
