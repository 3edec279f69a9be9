"""Model-based testing of a :class:`~mi_crow.store.Store`: random sequences of writes, overwrites,
appends and deletes, checked after every step against a plain-dict model of what the store holds.

Subclass :class:`StoreStateMachine`, implement :meth:`~StoreStateMachine.make_store`, and let
Hypothesis run it (``Machine.TestCase`` is a ``unittest.TestCase`` that pytest collects, or call
``hypothesis.stateful.run_state_machine_as_test(Machine)`` inside a test function)::

    from hypothesis import settings
    from mi_crow.store.testing import StoreStateMachine

    class MyStoreMachine(StoreStateMachine):
        def make_store(self, tmp_path):
            return MyStore(tmp_path / "store")

    TestMyStoreStateMachine = MyStoreMachine.TestCase
    TestMyStoreStateMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)

Every run of the machine (one Hypothesis example) gets a fresh temporary directory and a fresh
store; :meth:`~StoreStateMachine.teardown_store` runs after it, then the directory is removed.
Needs ``pytest`` and ``hypothesis`` (``pip install 'mi-crow-store[testing]'``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mi_crow.store.store import Store
from mi_crow.store.testing.store_tests import assert_same, assert_same_tm

__all__ = ["StoreStateMachine"]

RUNS = st.sampled_from(["a", "b"])
INDICES = st.integers(0, 3)
VERSIONS = st.integers(0, 1000)
MODELS = st.sampled_from(["m1", "m2"])
DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.bool]


def _tensor(v: int, shape: tuple[int, ...] = (2, 3)) -> torch.Tensor:
    """A small tensor that depends on ``v`` (its values and, through ``v``, its dtype)."""
    return (torch.arange(int(torch.tensor(shape).prod())).reshape(shape) + v).to(DTYPES[v % len(DTYPES)])


class StoreStateMachine(RuleBasedStateMachine):
    """Random ``put`` / overwrite / append / delete sequences, checked against a dict model.

    Rules: ``put_run_metadata``, ``put_detector_metadata`` (batches of 0 to 3 layers),
    ``put_run_batch`` (a list or a dict of tensors), ``put_run_detector_metadata`` (appends),
    rejected writes (which must leave nothing behind), ``delete_run``, ``put_model`` and
    ``delete_model``, over two runs, four batch indices and two models. After every step the
    invariant reads everything back: run and model listings, run metadata, every batch (and
    ``get_run_batch`` of a batch written by ``put_detector_metadata``), the append log in order,
    and every model, comparing tensors bit for bit.

    Subclasses implement ``make_store``; override ``teardown_store`` to release what the store
    holds (a bucket prefix, a server connection). Hypothesis runs it through ``Machine.TestCase``
    or ``hypothesis.stateful.run_state_machine_as_test(Machine)``.
    """

    def make_store(self, tmp_path: Path) -> Store:
        """A fresh, empty store for one run of the machine; ``tmp_path`` is a new empty directory,
        removed after the run."""
        raise NotImplementedError

    def teardown_store(self, store: Store) -> None:
        """Called once after each run of the machine, before its directory is removed."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp_path = Path(tempfile.mkdtemp(prefix="mi-crow-store-machine-"))
        try:
            self.store: Store = self.make_store(self.tmp_path)
        except BaseException:
            shutil.rmtree(self.tmp_path, ignore_errors=True)
            raise
        self.run_meta: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[int, tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]]] = {}
        self.run_batches: dict[str, dict[int, Any]] = {}
        self.appends: dict[str, list[tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]]] = {}
        self.models: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}

    def teardown(self) -> None:
        try:
            self.teardown_store(self.store)
        finally:
            shutil.rmtree(self.tmp_path, ignore_errors=True)

    # ---------------------------------------------------------------- writes

    @rule(run=RUNS, v=VERSIONS)
    def put_run_metadata(self, run: str, v: int) -> None:
        self.store.put_run_metadata(run, {"v": v})
        self.run_meta[run] = {"v": v}

    @rule(run=RUNS, i=INDICES, v=VERSIONS, layers=st.lists(st.sampled_from(["x", "y", "z"]), unique=True))
    def put_batch(self, run: str, i: int, v: int, layers: list[str]) -> None:
        tm = {layer: {"activations": _tensor(v + n)} for n, layer in enumerate(layers)}
        self.store.put_detector_metadata(run, i, {"v": v}, tm)
        self.batches.setdefault(run, {})[i] = ({"v": v}, tm)

    @rule(run=RUNS, i=INDICES, v=VERSIONS, as_list=st.booleans())
    def put_run_batch(self, run: str, i: int, v: int, as_list: bool) -> None:
        batch: Any = [_tensor(v), _tensor(v + 1, (4,))] if as_list else {"k": _tensor(v)}
        self.store.put_run_batch(run, i, batch)
        self.run_batches.setdefault(run, {})[i] = batch

    @rule(run=RUNS, v=VERSIONS)
    def append(self, run: str, v: int) -> None:
        tm = {"d": {"top": _tensor(v, (v % 3,))}}
        self.store.put_run_detector_metadata(run, {"v": v}, tm)
        self.appends.setdefault(run, []).append(({"v": v}, tm))

    @rule(run=RUNS, i=INDICES)
    def rejected_put(self, run: str, i: int) -> None:
        with pytest.raises(ValueError):
            self.store.put_detector_metadata(run, i, {"loss": object()}, {"x": {"activations": _tensor(0)}})
        with pytest.raises(ValueError):
            self.store.put_run_detector_metadata(run, {}, {"x": {"k": "not a tensor"}})  # type: ignore[dict-item]

    @rule(run=RUNS)
    def delete_run(self, run: str) -> None:
        self.store.delete_run(run)
        for d in (self.run_meta, self.batches, self.run_batches, self.appends):
            d.pop(run, None)

    @rule(m=MODELS, v=VERSIONS)
    def put_model(self, m: str, v: int) -> None:
        self.store.put_model(m, {"w": _tensor(v)}, {"v": v})
        self.models[m] = ({"w": _tensor(v)}, {"v": v})

    @rule(m=MODELS)
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
                assert isinstance(got, list)
                for a, b in zip(got, want, strict=True):
                    assert_same(a, b)
            else:
                assert isinstance(got, dict)
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
