"""The conformance tests: behaviour every ``Store`` backend must show, asserted on values."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mi_crow.store._tensor_file import DTYPE_TO_CODE
from mi_crow.store.store import Store

HOSTILE_NAMES: list[Any] = [
    "",
    " ",
    "\t",
    ".",
    "..",
    "../x",
    "a/../../b",
    "/tmp/x",
    "a/b",
    "a\\b",
    "..\\x",
    "a\x00b",
    "line\nbreak",
    ".hidden",
    "x" * 201,
    None,
    3,
    b"bytes",
]


def all_dtypes() -> list[torch.dtype]:
    """Every dtype torch and safetensors share (bf16, fp8, bool, complex where supported)."""
    return list(DTYPE_TO_CODE)


def sample_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A deterministic tensor of any supported dtype, with varied bit patterns."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype == torch.bool:
        return (torch.randint(0, 2, (n,), generator=g) == 1).reshape(shape)
    if dtype.is_complex:
        return torch.randn(n, generator=g, dtype=dtype).reshape(shape)
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g) * 4).to(dtype).reshape(shape)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(lo, hi, (n,), generator=g, dtype=torch.int64).to(dtype).reshape(shape)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal dtype, shape and bits (NaNs included)."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.device.type == "cpu"
    if a.numel():
        assert torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def assert_same_tm(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert {k: sorted(v) for k, v in a.items()} == {k: sorted(v) for k, v in b.items()}
    for layer, tensors in a.items():
        for key, t in tensors.items():
            assert_same(t, b[layer][key])


_name_chars = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\")
valid_names = st.text(_name_chars, min_size=1, max_size=40).filter(
    lambda s: s.strip() != "" and not s.startswith(".") and len(s.encode("utf-8")) <= 200
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


# Property tests reuse one store across examples (each example overwrites or deletes what it
# wrote), and the same test method runs once per backend subclass: both are intended.
_SHARED_STORE = [HealthCheck.function_scoped_fixture, HealthCheck.differing_executors]


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


class StoreTests:
    """Behaviour every backend must show. Subclasses implement :meth:`make_store`."""

    def make_store(self, tmp_path: Path) -> Store:
        raise NotImplementedError

    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        return self.make_store(tmp_path)

    # ------------------------------------------------------------------ constructor

    def test_attributes(self, store: Store) -> None:
        assert isinstance(store.base_path, Path)
        assert (store.runs_prefix, store.dataset_prefix, store.model_prefix) == ("runs", "datasets", "models")

    # ------------------------------------------------------------------ run metadata

    def test_run_metadata_round_trip(self, store: Store) -> None:
        meta = {"model": "gpt2", "layers": [0, 4], "nested": {"ü": "✓", "x": None, "f": 0.5}, "t": True}
        assert store.put_run_metadata("run-1", meta) == "runs/run-1/meta.json"
        assert store.get_run_metadata("run-1") == meta

    def test_run_metadata_missing_is_empty(self, store: Store) -> None:
        assert store.get_run_metadata("nope") == {}

    def test_run_metadata_overwrite_last_wins(self, store: Store) -> None:
        store.put_run_metadata("r", {"v": 1})
        store.put_run_metadata("r", {"v": 2})
        assert store.get_run_metadata("r") == {"v": 2}

    @pytest.mark.parametrize(
        "bad, fragment",
        [
            ({"x": object()}, "meta['x'] is a object"),
            ({"x": [1, {"y": object()}]}, "meta['x'][1]['y']"),
            ({"x": {("t",): 1}}, "key ('t',)"),
            ({"x": 10**5000}, "bits"),
            ({"x": _nested(300)}, "nested deeper than"),
            ({"x": torch.ones(1)}, "Tensor"),
            ([1, 2], "must be a dict"),
        ],
    )
    def test_run_metadata_bad_input_changes_nothing(self, store: Store, bad: Any, fragment: str) -> None:
        store.put_run_metadata("r", {"keep": 1})
        with pytest.raises(ValueError) as info:
            store.put_run_metadata("r", bad)
        assert fragment in str(info.value)
        assert store.get_run_metadata("r") == {"keep": 1}

    def test_run_metadata_nan_and_infinity_round_trip(self, store: Store) -> None:
        """mi_crow records training losses in run metadata; a diverged run (NaN) must still save."""
        store.put_run_metadata("r", {"loss": float("nan"), "best": float("inf"), "worst": [float("-inf")]})
        meta = store.get_run_metadata("r")
        assert math.isnan(meta["loss"]) and meta["best"] == math.inf and meta["worst"] == [-math.inf]

    def test_run_metadata_circular_reference(self, store: Store) -> None:
        loop: dict[str, Any] = {}
        loop["self"] = loop
        with pytest.raises(ValueError, match="circular"):
            store.put_run_metadata("r", loop)
        assert store.get_run_metadata("r") == {}
        assert store.list_runs() == []

    # ------------------------------------------------------------------ per-batch detector data

    def _batch(self, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "model.layers.0": {
                "activations": sample_tensor(torch.float32, (2, 5, 8), seed),
                "attention_mask": sample_tensor(torch.int64, (2, 5), seed + 1),
            },
            "model.layers.3": {"activations": sample_tensor(torch.bfloat16, (2, 5, 8), seed + 2)},
        }

    def test_detector_round_trip(self, store: Store) -> None:
        tm = self._batch()
        assert store.put_detector_metadata("r", 0, {"a": 1}, tm) == "runs/r/batch_0"
        meta, back = store.get_detector_metadata("r", 0)
        assert meta == {"a": 1}
        assert_same_tm(back, tm)

    def test_detector_missing_is_empty(self, store: Store) -> None:
        assert store.get_detector_metadata("r", 0) == ({}, {})
        store.put_detector_metadata("r", 0, {}, self._batch())
        assert store.get_detector_metadata("r", 1) == ({}, {})

    def test_detector_by_layer_by_key(self, store: Store) -> None:
        tm = self._batch()
        store.put_detector_metadata("r", 7, {}, tm)
        assert_same(
            store.get_detector_metadata_by_layer_by_key("r", 7, "model.layers.3", "activations"),
            tm["model.layers.3"]["activations"],
        )
        with pytest.raises(FileNotFoundError, match=r"model\.layers\.3"):
            store.get_detector_metadata_by_layer_by_key("r", 7, "model.layers.3", "attention_mask")
        with pytest.raises(FileNotFoundError):
            store.get_detector_metadata_by_layer_by_key("r", 8, "model.layers.0", "activations")

    def test_detector_overwrite_replaces_whole_batch(self, store: Store) -> None:
        store.put_detector_metadata("r", 0, {"v": 1}, self._batch(0))
        new = {"other": {"k": torch.arange(3)}}
        store.put_detector_metadata("r", 0, {"v": 2}, new)
        meta, back = store.get_detector_metadata("r", 0)
        assert meta == {"v": 2}
        assert_same_tm(back, new)
        with pytest.raises(FileNotFoundError):
            store.get_detector_metadata_by_layer_by_key("r", 0, "model.layers.0", "activations")

    def test_detector_empty_layers_skipped(self, store: Store) -> None:
        store.put_detector_metadata("r", 0, {"x": 1}, {"a": {}, "b": {"k": torch.ones(1)}})
        meta, back = store.get_detector_metadata("r", 0)
        assert meta == {"x": 1}
        assert list(back) == ["b"]

    def test_detector_no_tensors(self, store: Store) -> None:
        store.put_detector_metadata("r", 2, {"only": "meta"}, {})
        assert store.get_detector_metadata("r", 2) == ({"only": "meta"}, {})
        assert store.list_run_batches("r") == [2]

    def test_detector_reserved_field_refused(self, store: Store) -> None:
        with pytest.raises(ValueError, match="_tensor_metadata_names"):
            store.put_detector_metadata("r", 0, {"_tensor_metadata_names": {}}, {})
        assert store.list_run_batches("r") == []

    @pytest.mark.parametrize(
        "bad, fragment",
        [
            (lambda: [1, 2], "must be a torch.Tensor, got list"),
            (lambda: torch.ones(2, 2).to_sparse(), "layout"),
            (lambda: torch.empty(2, device="meta"), "meta"),
            (lambda: torch.nested.as_nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged), "nested"),
            (lambda: torch.ones(2, dtype=torch.complex128), "complex128"),
            (lambda: 3.0, "got float"),
        ],
        ids=["list", "sparse", "meta", "nested", "complex128", "float"],
    )
    def test_detector_bad_tensor_changes_nothing(self, store: Store, bad: Any, fragment: str) -> None:
        bad = bad()
        before = self._batch()
        store.put_detector_metadata("r", 0, {"v": 1}, before)
        with pytest.raises(ValueError) as info:
            store.put_detector_metadata("r", 0, {"v": 2}, {"good": {"k": torch.ones(1)}, "bad": {"k": bad}})
        assert fragment in str(info.value)
        assert "tensor_metadata['bad']['k']" in str(info.value)
        meta, back = store.get_detector_metadata("r", 0)
        assert meta == {"v": 1}
        assert_same_tm(back, before)

    def test_detector_bad_structure(self, store: Store) -> None:
        with pytest.raises(ValueError, match="tensor_metadata must be a dict"):
            store.put_detector_metadata("r", 0, {}, [torch.ones(1)])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"tensor_metadata\['l'\] must be a dict"):
            store.put_detector_metadata("r", 0, {}, {"l": torch.ones(1)})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="metadata must be a dict"):
            store.put_detector_metadata("r", 0, None, {})  # type: ignore[arg-type]
        assert store.list_run_batches("r") == []

    def test_non_contiguous_and_special_tensors(self, store: Store) -> None:
        base = sample_tensor(torch.float32, (4, 6))
        leaf = torch.ones(3, requires_grad=True)
        c = torch.randn(3, dtype=torch.complex64)
        tm = {
            "l": {
                "transposed": base.t(),
                "sliced": base[:, ::2],
                "expanded": torch.arange(3).expand(4, 3),
                "grad": leaf * 2,
                "conj": c.conj(),
                "neg": torch.ones(2).neg(),
                "param": torch.nn.Parameter(torch.ones(2)),
            }
        }
        store.put_detector_metadata("r", 0, {}, tm)
        _, back = store.get_detector_metadata("r", 0)
        for key, t in tm["l"].items():
            got = back["l"][key]
            assert got.is_contiguous() and not got.requires_grad and type(got) is torch.Tensor
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got, t.detach().resolve_conj().resolve_neg()), key

    def test_mutation_after_put_does_not_change_stored(self, store: Store) -> None:
        t = torch.zeros(4)
        store.put_detector_metadata("r", 0, {}, {"l": {"k": t}})
        store.put_run_batch("r", 1, {"k": t})
        store.put_run_detector_metadata("r", {}, {"l": {"k": t}})
        store.put_model("m", {"w": t})
        t.fill_(7)
        assert torch.equal(store.get_detector_metadata("r", 0)[1]["l"]["k"], torch.zeros(4))
        assert torch.equal(store.get_run_batch("r", 1)["k"], torch.zeros(4))  # type: ignore[call-overload]
        assert torch.equal(next(iter(store.iter_run_detector_metadata("r")))[1]["l"]["k"], torch.zeros(4))
        assert torch.equal(store.get_model("m")[0]["w"], torch.zeros(4))

    def test_returned_tensors_are_independent(self, store: Store) -> None:
        store.put_detector_metadata("r", 0, {}, {"l": {"k": torch.zeros(4)}})
        a = store.get_detector_metadata_by_layer_by_key("r", 0, "l", "k")
        a.fill_(1)
        assert torch.equal(store.get_detector_metadata_by_layer_by_key("r", 0, "l", "k"), torch.zeros(4))

    def test_large_tensors_are_independent_of_later_writes(self, store: Store) -> None:
        """Large tensors (which some backends memory-map) behave like any other tensor."""
        big = {"l": {"a": sample_tensor(torch.float32, (512, 1024)), "b": sample_tensor(torch.bfloat16, (1024, 1024))}}
        store.put_detector_metadata("r", 0, {"v": 1}, big)
        _, back = store.get_detector_metadata("r", 0)
        assert_same_tm(back, big)
        one = store.get_detector_metadata_by_layer_by_key("r", 0, "l", "a")
        one.add_(1)  # writable, and private to the caller
        assert_same(store.get_detector_metadata_by_layer_by_key("r", 0, "l", "a"), big["l"]["a"])
        store.put_detector_metadata("r", 0, {"v": 2}, {"l": {"a": torch.zeros(512, 1024), "b": torch.zeros(1, 1)}})
        assert_same(back["l"]["a"], big["l"]["a"])  # handed out before the overwrite: unchanged
        assert torch.equal(one, big["l"]["a"] + 1)
        store.delete_run("r")
        assert_same(back["l"]["b"], big["l"]["b"])  # and still readable after the run is gone
        store.put_run_batch("r", 0, [big["l"]["a"]])
        store.put_model("m", {"w": big["l"]["b"]})
        assert_same(store.get_run_batch("r", 0)[0], big["l"]["a"])  # type: ignore[index]
        assert_same(store.get_model("m")[0]["w"], big["l"]["b"])

    @pytest.mark.parametrize("dtype", all_dtypes(), ids=str)
    def test_every_dtype_round_trips(self, store: Store, dtype: torch.dtype) -> None:
        shapes = [(), (0,), (3,), (2, 0, 3), (1, 2, 1, 3, 1, 2, 1)]
        tm = {"l": {f"s{i}": sample_tensor(dtype, s, i) for i, s in enumerate(shapes)}}
        store.put_detector_metadata("r", 0, {}, tm)
        assert_same_tm(store.get_detector_metadata("r", 0)[1], tm)
        store.put_run_batch("r", 1, list(tm["l"].values()))
        back = store.get_run_batch("r", 1)
        assert isinstance(back, list)
        for a, b in zip(back, tm["l"].values(), strict=True):
            assert_same(a, b)

    # ------------------------------------------------------------------ run batches

    def test_run_batch_dict_and_list(self, store: Store) -> None:
        d = {"activations": sample_tensor(torch.float16, (3, 4)), "ids": torch.arange(3)}
        assert store.put_run_batch("r", 0, d) == "runs/r/batch_000000.safetensors"
        back = store.get_run_batch("r", 0)
        assert isinstance(back, dict)
        assert_same_tm({"x": back}, {"x": d})
        items = [torch.ones(2), torch.zeros(3, dtype=torch.int8), torch.tensor(5.0)]
        assert store.put_run_batch("r", 12, items) == "runs/r/batch_000012.safetensors"
        got = store.get_run_batch("r", 12)
        assert isinstance(got, list) and len(got) == 3
        for a, b in zip(got, items, strict=True):
            assert_same(a, b)

    def test_run_batch_empty_list_and_lookalike_dict(self, store: Store) -> None:
        store.put_run_batch("r", 0, [])
        assert store.get_run_batch("r", 0) == []
        store.put_run_batch("r", 1, {"item_0": torch.ones(1)})
        assert isinstance(store.get_run_batch("r", 1), dict)
        store.put_run_batch("r", 2, {"_empty_list": torch.ones(1)})
        assert isinstance(store.get_run_batch("r", 2), dict)
        store.put_run_batch("r", 3, {})
        assert store.get_run_batch("r", 3) == {}

    def test_run_batch_bad_input(self, store: Store) -> None:
        with pytest.raises(ValueError, match="dict or a list"):
            store.put_run_batch("r", 0, torch.ones(2))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"tensors\[1\]"):
            store.put_run_batch("r", 0, [torch.ones(1), "x"])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="__metadata__"):
            store.put_run_batch("r", 0, {"__metadata__": torch.ones(1)})
        with pytest.raises(ValueError, match="tensor name"):
            store.put_run_batch("r", 0, {"": torch.ones(1)})
        assert store.list_run_batches("r") == []

    def test_run_batch_missing(self, store: Store) -> None:
        with pytest.raises(FileNotFoundError, match="Batch 4 not found for run r"):
            store.get_run_batch("r", 4)

    def test_run_batch_falls_back_to_detector_layout(self, store: Store) -> None:
        one = {"only": {"activations": torch.ones(2, 3), "other": torch.zeros(1)}}
        store.put_detector_metadata("r", 0, {}, one)
        back = store.get_run_batch("r", 0)
        assert isinstance(back, dict) and list(back) == ["activations"]
        assert torch.equal(back["activations"], torch.ones(2, 3))
        two = {"a": {"activations": torch.ones(1)}, "b": {"activations": torch.zeros(1)}, "c": {"x": torch.ones(1)}}
        store.put_detector_metadata("r", 1, {}, two)
        back = store.get_run_batch("r", 1)
        assert isinstance(back, dict) and sorted(back) == ["activations_a", "activations_b"]
        store.put_detector_metadata("r", 2, {}, {"c": {"x": torch.ones(1)}})
        with pytest.raises(FileNotFoundError):
            store.get_run_batch("r", 2)

    def test_list_run_batches_union_sorted(self, store: Store) -> None:
        assert store.list_run_batches("none") == []
        for i in (5, 1, 1_000_001):
            store.put_run_batch("r", i, [torch.ones(1)])
        for i in (3, 5, 10):
            store.put_detector_metadata("r", i, {}, {"l": {"activations": torch.ones(1)}})
        store.put_run_detector_metadata("r", {}, {})
        store.put_run_metadata("r", {})
        assert store.list_run_batches("r") == [1, 3, 5, 10, 1_000_001]
        assert isinstance(store.get_run_batch("r", 1_000_001), list)

    def test_iter_run_batches(self, store: Store) -> None:
        for i in (0, 2, 3):
            store.put_run_batch("r", i, [torch.tensor([i])])
        assert [b[0].item() for b in store.iter_run_batches("r")] == [0, 2, 3]  # type: ignore[index]

    def test_iter_run_batch_range(self, store: Store) -> None:
        for i in range(6):
            if i != 3:
                store.put_run_batch("r", i, [torch.tensor([i])])

        def got(**kw: Any) -> list[int]:
            return [int(b[0].item()) for b in store.iter_run_batch_range("r", **kw)]  # type: ignore[index]

        assert got() == [0, 1, 2, 4, 5]
        assert got(start=2) == [2, 4, 5]
        assert got(start=1, stop=5, step=2) == [1]
        assert got(start=5, stop=0, step=-2) == [5, 1]
        assert got(start=2, stop=-1, step=-1) == [2, 1, 0]  # as range() and mi_crow 1.0 do
        with pytest.raises(ValueError, match="stop must be an int"):
            store.iter_run_batch_range("r", stop=2.0)  # type: ignore[arg-type]
        assert got(stop=100) == [0, 1, 2, 4, 5]
        assert [*store.iter_run_batch_range("empty")] == []
        with pytest.raises(ValueError, match="step must not be 0"):
            store.iter_run_batch_range("r", step=0)
        with pytest.raises(ValueError, match="start must be >= 0"):
            store.iter_run_batch_range("r", start=-1)
        with pytest.raises(ValueError, match="start must be an int"):
            store.iter_run_batch_range("r", start=1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            store.iter_run_batch_range("r", 0)  # type: ignore[call-arg]

    # ------------------------------------------------------------------ runs

    def test_list_and_delete_runs(self, store: Store) -> None:
        assert store.list_runs() == []
        store.put_run_metadata("b", {})
        store.put_run_batch("a", 0, [torch.ones(1)])
        store.put_detector_metadata("c", 0, {}, {})
        store.put_run_detector_metadata("d", {}, {"l": {"k": torch.ones(1)}})
        assert store.list_runs() == ["a", "b", "c", "d"]
        for run in ("a", "b", "c", "d"):
            store.delete_run(run)
            assert store.list_run_batches(run) == []
            assert store.get_run_metadata(run) == {}
            assert list(store.iter_run_detector_metadata(run)) == []
        assert store.list_runs() == []
        store.delete_run("never-existed")

    def test_delete_run_keeps_other_runs(self, store: Store) -> None:
        store.put_detector_metadata("keep", 0, {"k": 1}, {"l": {"a": torch.ones(1)}})
        store.put_detector_metadata("drop", 0, {}, {"l": {"a": torch.ones(1)}})
        store.delete_run("drop")
        assert store.get_detector_metadata("keep", 0)[0] == {"k": 1}

    # ------------------------------------------------------------------ run-level appends

    def test_run_detector_appends_in_order(self, store: Store) -> None:
        entries = []
        for i in range(5):
            tm = {"l0": {"scores": sample_tensor(torch.float32, (i, 3), i)}, "l1": {"idx": torch.arange(i)}}
            meta = {"step": i, "name": f"chunk-{i}"}
            assert store.put_run_detector_metadata("r", meta, tm) == "runs/r/detectors"
            entries.append((meta, tm))
        back = list(store.iter_run_detector_metadata("r"))
        assert len(back) == 5
        for (meta, tm), (bmeta, btm) in zip(entries, back, strict=True):
            assert bmeta == meta
            assert_same_tm(btm, tm)
        assert store.list_run_batches("r") == []

    def test_run_detector_empty_and_missing(self, store: Store) -> None:
        assert list(store.iter_run_detector_metadata("r")) == []
        store.put_run_detector_metadata("r", {"only": "meta"}, {"l": {}})
        assert list(store.iter_run_detector_metadata("r")) == [({"only": "meta"}, {})]

    def test_run_detector_bad_input_changes_nothing(self, store: Store) -> None:
        store.put_run_detector_metadata("r", {"i": 0}, {"l": {"k": torch.ones(1)}})
        with pytest.raises(ValueError, match="_tensor_metadata_names"):
            store.put_run_detector_metadata("r", {"_tensor_metadata_names": 1}, {})
        with pytest.raises(ValueError, match="nested deeper"):
            store.put_run_detector_metadata("r", {"deep": _nested(300)}, {})
        with pytest.raises(ValueError, match=r"torch\.Tensor"):
            store.put_run_detector_metadata("r", {}, {"l": {"k": [1]}})  # type: ignore[dict-item]
        assert [m for m, _ in store.iter_run_detector_metadata("r")] == [{"i": 0}]
        store.put_run_detector_metadata("r", {"i": 1}, {})
        assert [m for m, _ in store.iter_run_detector_metadata("r")] == [{"i": 0}, {"i": 1}]

    def test_run_detector_after_delete_starts_over(self, store: Store) -> None:
        store.put_run_detector_metadata("r", {"i": 0}, {})
        store.delete_run("r")
        store.put_run_detector_metadata("r", {"i": 1}, {})
        assert [m for m, _ in store.iter_run_detector_metadata("r")] == [{"i": 1}]

    # ------------------------------------------------------------------ models

    def test_models(self, store: Store) -> None:
        assert store.list_models() == []
        sd = {"encoder.weight": sample_tensor(torch.float32, (8, 4)), "b": sample_tensor(torch.bfloat16, (8,))}
        assert store.put_model("sae-a", sd, {"d_sae": 8, "l1": 0.1}) == "models/sae-a"
        store.put_model("probe", {"w": torch.ones(2)})
        assert store.list_models() == ["probe", "sae-a"]
        tensors, meta = store.get_model("sae-a")
        assert meta == {"d_sae": 8, "l1": 0.1}
        assert_same_tm({"m": tensors}, {"m": sd})
        assert store.get_model("probe")[1] == {}
        store.put_model("sae-a", {"w": torch.zeros(1)}, {"v": 2})
        tensors, meta = store.get_model("sae-a")
        assert list(tensors) == ["w"] and meta == {"v": 2}
        store.delete_model("sae-a")
        assert store.list_models() == ["probe"]
        with pytest.raises(FileNotFoundError, match="sae-a"):
            store.get_model("sae-a")
        store.delete_model("sae-a")
        assert store.list_runs() == []

    def test_model_bad_input_changes_nothing(self, store: Store) -> None:
        store.put_model("m", {"w": torch.ones(1)}, {"v": 1})
        with pytest.raises(ValueError, match=r"torch\.Tensor"):
            store.put_model("m", {"w": "x"}, {"v": 2})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="not JSON-serialisable"):
            store.put_model("m", {"w": torch.ones(1)}, {"v": object()})
        with pytest.raises(ValueError, match="model_id"):
            store.put_model("a/b", {"w": torch.ones(1)})
        assert store.get_model("m")[1] == {"v": 1}

    # ------------------------------------------------------------------ single tensors

    def test_put_get_tensor(self, store: Store) -> None:
        t = sample_tensor(torch.bfloat16, (3, 3))
        store.put_tensor("datasets/ds1/emb.safetensors", t)  # type: ignore[attr-defined]
        assert_same(store.get_tensor("datasets/ds1/emb.safetensors"), t)  # type: ignore[attr-defined]
        with pytest.raises(FileNotFoundError):
            store.get_tensor("datasets/none.safetensors")  # type: ignore[attr-defined]
        for bad in ("../x", "/abs", "a//b", "a/../b", ""):
            with pytest.raises(ValueError):
                store.put_tensor(bad, t)  # type: ignore[attr-defined]
            with pytest.raises(ValueError):
                store.get_tensor(bad)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ names and indices

    @pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
    def test_hostile_names_refused_everywhere(self, store: Store, name: Any) -> None:
        t = {"l": {"k": torch.ones(1)}}
        calls: list[Callable[[], object]] = [
            lambda: store.put_run_metadata(name, {}),
            lambda: store.get_run_metadata(name),
            lambda: store.put_detector_metadata(name, 0, {}, t),
            lambda: store.get_detector_metadata(name, 0),
            lambda: store.get_detector_metadata_by_layer_by_key(name, 0, "l", "k"),
            lambda: store.get_detector_metadata_by_layer_by_key("r", 0, "l", name),
            lambda: store.put_detector_metadata("r", 0, {}, {"l": {name: torch.ones(1)}}),
            lambda: store.put_run_batch(name, 0, [torch.ones(1)]),
            lambda: store.get_run_batch(name, 0),
            lambda: store.list_run_batches(name),
            lambda: store.delete_run(name),
            lambda: store.put_run_detector_metadata(name, {}, t),
            lambda: store.put_run_detector_metadata("r", {}, {"l": {name: torch.ones(1)}}),
            lambda: list(store.iter_run_detector_metadata(name)),
            lambda: store.put_model(name, {"w": torch.ones(1)}),
            lambda: store.get_model(name),
            lambda: store.delete_model(name),
            lambda: list(store.iter_run_batch_range(name)),
        ]
        if type(name) is not int:  # mi_crow 1.0 takes int layer signatures (stored as str(layer))
            calls += [
                lambda: store.get_detector_metadata_by_layer_by_key("r", 0, name, "k"),
                lambda: store.put_detector_metadata("r", 0, {}, {name: {"k": torch.ones(1)}}),
                lambda: store.put_run_detector_metadata("r", {}, {name: {"k": torch.ones(1)}}),
            ]
        for i, call in enumerate(calls):
            with pytest.raises(ValueError) as info:
                call()
            assert repr(name)[:30] in str(info.value) or type(name).__name__ in str(info.value), (i, str(info.value))
        assert store.list_runs() == [] and store.list_models() == []

    def test_int_layer_signatures_are_stored_as_str(self, store: Store) -> None:
        """mi_crow 1.0's ``register_hook(layer_signature: str | int)``: stored as ``str(layer)``."""
        t = sample_tensor(torch.float32, (2, 3), 1)
        store.put_detector_metadata("r", 0, {}, {3: {"activations": t}})  # type: ignore[dict-item]
        _, tensors = store.get_detector_metadata("r", 0)
        assert list(tensors) == ["3"]
        assert_same(tensors["3"]["activations"], t)
        assert_same(store.get_detector_metadata_by_layer_by_key("r", 0, 3, "activations"), t)  # type: ignore[arg-type]
        store.put_run_detector_metadata("r", {"i": 0}, {7: {"top": t}})  # type: ignore[dict-item]
        [(_, got)] = list(store.iter_run_detector_metadata("r"))
        assert list(got) == ["7"]
        with pytest.raises(ValueError, match="twice"):
            store.put_detector_metadata("r", 1, {}, {3: {"k": t}, "3": {"k": t}})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="layer"):
            store.put_detector_metadata("r", 1, {}, {True: {"k": t}})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match=r"metadata\.json"):
            store.put_detector_metadata("r", 1, {}, {"metadata.json": {"k": t}})
        assert store.list_run_batches("r") == [0]

    @pytest.mark.parametrize("index", [True, False, 1.0, "0", -1, None, [0], 2**63, 10**250], ids=repr)
    def test_bad_batch_index(self, store: Store, index: Any) -> None:
        for call in (
            lambda: store.put_detector_metadata("r", index, {}, {}),
            lambda: store.get_detector_metadata("r", index),
            lambda: store.get_detector_metadata_by_layer_by_key("r", index, "l", "k"),
            lambda: store.put_run_batch("r", index, []),
            lambda: store.get_run_batch("r", index),
        ):
            with pytest.raises(ValueError, match="batch_index"):
                call()
        assert store.list_runs() == []

    def test_integer_like_batch_index(self, store: Store) -> None:
        import numpy as np

        store.put_run_batch("r", np.int64(4), [torch.ones(1)])
        assert store.list_run_batches("r") == [4]

    # ------------------------------------------------------------------ properties

    @settings(max_examples=40, deadline=None, suppress_health_check=_SHARED_STORE)
    @given(run=valid_names, layer=valid_names, key=valid_names)
    def test_any_valid_names_round_trip(self, store: Store, run: str, layer: str, key: str) -> None:
        t = torch.arange(3)
        store.put_detector_metadata(run, 1, {"run": run}, {layer: {key: t}})
        assert run in store.list_runs()
        meta, back = store.get_detector_metadata(run, 1)
        assert meta == {"run": run} and torch.equal(back[layer][key], t)
        assert torch.equal(store.get_detector_metadata_by_layer_by_key(run, 1, layer, key), t)
        store.delete_run(run)
        assert run not in store.list_runs()

    @settings(max_examples=60, deadline=None, suppress_health_check=_SHARED_STORE)
    @given(
        dtype=st.sampled_from(all_dtypes()),
        shape=st.lists(st.integers(0, 4), min_size=0, max_size=6).map(tuple),
        seed=st.integers(0, 2**16),
    )
    def test_any_dtype_and_shape_round_trip(
        self, store: Store, dtype: torch.dtype, shape: tuple[int, ...], seed: int
    ) -> None:
        t = sample_tensor(dtype, shape, seed)
        store.put_detector_metadata("r", 0, {}, {"l": {"k": t}})
        assert_same(store.get_detector_metadata_by_layer_by_key("r", 0, "l", "k"), t)
        store.put_run_batch("r", 0, {"k": t})
        assert_same(store.get_run_batch("r", 0)["k"], t)  # type: ignore[call-overload]

    @settings(max_examples=60, deadline=None, suppress_health_check=_SHARED_STORE)
    @given(meta=st.dictionaries(st.text(), json_values, max_size=5))
    def test_any_json_metadata_round_trips(self, store: Store, meta: dict[str, Any]) -> None:
        store.put_run_metadata("r", meta)
        assert store.get_run_metadata("r") == json.loads(json.dumps(meta))
        store.put_detector_metadata("r", 0, meta, {})
        assert store.get_detector_metadata("r", 0)[0] == meta
