"""Compatibility with mi_crow 1.0: we read its stores, it reads ours, same bytes where it matters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mi_crow_fixture_data as data
from mi_crow.store import LocalStore
from mi_crow.store.testing.store_tests import assert_same, assert_same_tm

FIXTURE = Path(__file__).parent / "fixtures" / "mi_crow_1_0_store"
REPO = Path(__file__).resolve().parent.parent
MI_CROW_REF = Path(os.environ.get("MI_CROW_REF_PATH", REPO / ".venv" / "mi-crow-ref"))


@pytest.fixture
def legacy(tmp_path: Path) -> LocalStore:
    shutil.copytree(FIXTURE, tmp_path / "store")
    return LocalStore(tmp_path / "store")


def test_reads_run_metadata(legacy: LocalStore) -> None:
    assert legacy.get_run_metadata(data.RUN) == data.RUN_META
    assert legacy.list_runs() == [data.RUN, data.SINGLE_LAYER_RUN]


def test_reads_detector_batches(legacy: LocalStore) -> None:
    for i in data.DETECTOR_BATCHES:
        meta, tensors = data.detector_batch(i)
        got_meta, got = legacy.get_detector_metadata(data.RUN, i)
        assert got_meta == meta
        assert_same_tm(got, tensors)
        assert_same(
            legacy.get_detector_metadata_by_layer_by_key(data.RUN, i, data.LAYERS[0], "attention_mask"),
            tensors[data.LAYERS[0]]["attention_mask"],
        )


def test_reads_run_batches_and_lists_both_layouts(legacy: LocalStore) -> None:
    assert legacy.list_run_batches(data.RUN) == [0, 1, 2, 10, 11, 12]
    for i, batch in data.run_batches().items():
        got = legacy.get_run_batch(data.RUN, i)
        assert type(got) is type(batch)
        if isinstance(batch, dict):
            assert isinstance(got, dict)
            assert_same_tm({"b": got}, {"b": batch})
        else:
            assert isinstance(got, list) and len(got) == len(batch)
            for a, b in zip(got, batch, strict=True):
                assert_same(a, b)


def test_run_batch_fallback_naming(legacy: LocalStore) -> None:
    single = legacy.get_run_batch(data.SINGLE_LAYER_RUN, 0)
    assert isinstance(single, dict) and list(single) == ["activations"]
    assert_same(single["activations"], data.single_layer_batch()["only.layer"]["activations"])
    multi = legacy.get_run_batch(data.RUN, 0)
    assert isinstance(multi, dict)
    assert sorted(multi) == [f"activations_{layer}" for layer in data.LAYERS]
    # Batch 2 has one layer directory, so mi_crow names it plainly.
    assert list(legacy.get_run_batch(data.RUN, 2)) == ["activations"]


def test_reads_and_continues_run_detector_appends(legacy: LocalStore) -> None:
    expected = data.run_detector_entries()
    got = list(legacy.iter_run_detector_metadata(data.RUN))
    assert [m for m, _ in got] == [m for m, _ in expected]
    for (_, tm), (_, etm) in zip(got, expected, strict=True):
        assert_same_tm(tm, etm)
    more = [({"step": 3}, {"sae": {"top_idx": torch.arange(4)}}), ({"step": 4}, {})]
    for meta, tm in more:
        legacy.put_run_detector_metadata(data.RUN, meta, tm)
    got = list(legacy.iter_run_detector_metadata(data.RUN))
    assert [m["step"] for m, _ in got] == [0, 1, 2, 3, 4]
    assert_same_tm(got[3][1], more[0][1])
    # mi_crow's own files are left untouched by our appends.
    for rel in ("detectors/metadata.json", "detectors/sae/top_idx.safetensors"):
        assert (legacy.base_path / "runs" / data.RUN / rel).read_bytes() == (
            FIXTURE / "runs" / data.RUN / rel
        ).read_bytes()
    # The new entries are numbered after mi_crow's three.
    entries = sorted(p.name for p in (legacy.base_path / "runs" / data.RUN / "detectors" / ".entries").iterdir())
    assert entries == ["000000000003.safetensors", "000000000004.safetensors"]


def test_overwrites_a_mi_crow_batch(legacy: LocalStore) -> None:
    legacy.put_detector_metadata(data.RUN, 0, {"v": "new"}, {"x": {"k": torch.ones(1)}})
    meta, tensors = legacy.get_detector_metadata(data.RUN, 0)
    assert meta == {"v": "new"} and list(tensors) == ["x"]
    assert not (legacy.base_path / "runs" / data.RUN / "batch_0" / data.LAYERS[0]).exists()


def _write_fixture_data(store: LocalStore) -> None:
    store.put_run_metadata(data.RUN, data.RUN_META)
    for i in data.DETECTOR_BATCHES:
        store.put_detector_metadata(data.RUN, i, *data.detector_batch(i))
    for i, batch in data.run_batches().items():
        store.put_run_batch(data.RUN, i, batch)
    for meta, tm in data.run_detector_entries():
        store.put_run_detector_metadata(data.RUN, meta, tm)
    store.put_detector_metadata(data.SINGLE_LAYER_RUN, 0, {}, data.single_layer_batch())


def _without_header(raw: bytes) -> tuple[dict[str, object], bytes]:
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return header, raw[8 + n :]


def test_writes_the_same_files_as_mi_crow(tmp_path: Path) -> None:
    """Same paths; JSON byte-identical; tensor files identical but for our checksum in __metadata__."""
    ours = LocalStore(tmp_path / "ours")
    _write_fixture_data(ours)
    compared = 0
    for path in sorted(p for p in FIXTURE.rglob("*") if p.is_file()):
        rel = path.relative_to(FIXTURE)
        if rel.parts[2] == "detectors":
            continue  # run-level appends: our own log by design
        mine = (ours.base_path / rel).read_bytes()
        if path.suffix == ".json":
            assert mine == path.read_bytes(), rel
        else:
            assert _without_header(mine) == _without_header(path.read_bytes()), rel
        compared += 1
    assert compared == 17  # meta.json, 4 + 4 + 3 files of legacy-run's batches, 3 run batches, 2 of single-layer's


READ_WITH_MI_CROW = r"""
import json, sys
import mi_crow.store
from mi_crow.store import LocalStore
assert not hasattr(mi_crow.store, "LayoutStore"), "expected the real mi_crow 1.0"
store = LocalStore(sys.argv[1])
out = {"meta": store.get_run_metadata("legacy-run"), "batches": store.list_run_batches("legacy-run")}
out["det"], out["run"] = {}, {}
for i in (0, 1, 2):
    meta, tm = store.get_detector_metadata("legacy-run", i)
    out["det"][i] = [meta, {l: {k: [str(t.dtype), t.float().tolist()] for k, t in d.items()} for l, d in tm.items()}]
for i in (10, 11, 12):
    b = store.get_run_batch("legacy-run", i)
    if isinstance(b, dict):
        out["run"][i] = {k: v.float().tolist() for k, v in b.items()}
    else:
        out["run"][i] = [v.float().tolist() for v in b]
single = store.get_run_batch("single-layer", 0)
out["single"] = {k: v.tolist() for k, v in single.items()}
print(json.dumps(out))
"""


@pytest.mark.skipif(
    not (MI_CROW_REF / "mi_crow" / "store").is_dir(), reason="mi_crow 1.0 not installed at MI_CROW_REF_PATH"
)
def test_mi_crow_reads_our_store(tmp_path: Path) -> None:
    ours = LocalStore(tmp_path / "ours")
    _write_fixture_data(ours)
    env = {**os.environ, "PYTHONPATH": str(MI_CROW_REF)}
    proc = subprocess.run(
        [sys.executable, "-c", READ_WITH_MI_CROW, str(ours.base_path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["meta"] == data.RUN_META
    assert out["batches"] == [0, 1, 2, 10, 11, 12]
    for i in data.DETECTOR_BATCHES:
        meta, tm = data.detector_batch(i)
        got_meta, got_tm = out["det"][str(i)]
        assert got_meta == meta
        assert got_tm == {
            layer: {k: [str(t.dtype), t.float().tolist()] for k, t in d.items()} for layer, d in tm.items()
        }
    assert out["run"]["10"] == {k: v.float().tolist() for k, v in data.run_batches()[10].items()}
    assert out["run"]["11"] == [v.float().tolist() for v in data.run_batches()[11]]
    assert out["run"]["12"] == []
    assert out["single"] == {"activations": data.single_layer_batch()["only.layer"]["activations"].tolist()}


READ_CAPTURE_WITH_MI_CROW = r"""
import json, sys
from mi_crow.store import LocalStore
store = LocalStore(sys.argv[1])
out = {}
for i in store.list_run_batches("cap"):
    meta, tm = store.get_detector_metadata("cap", i)
    mask = store.get_detector_metadata_by_layer_by_key("cap", i, "attention_masks", "attention_mask")
    out[i] = [meta["tokens"], sorted(tm), sorted(tm["attention_masks"]), mask.tolist()]
print(json.dumps(out))
"""


@pytest.mark.skipif(
    not (MI_CROW_REF / "mi_crow" / "store").is_dir(), reason="mi_crow 1.0 not installed at MI_CROW_REF_PATH"
)
def test_mi_crow_reads_a_captured_batchs_inputs_where_its_own_capture_puts_them(tmp_path: Path) -> None:
    # mi_crow 1.0's capture stores the attention mask in the pseudo-layer "attention_masks"; ours stores
    # the batch's inputs there, once per batch, and mi_crow 1.0's own store reads them back.
    from hf_models import tiny_bert
    from mi_crow.store import ActivationCapture

    model = tiny_bert(2)
    ids = torch.randint(2, 90, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    ours = LocalStore(tmp_path / "ours")
    with ActivationCapture(model, ours, "cap", ["encoder.layer.0", "encoder.layer.1"]) as cap:
        cap.run(input_ids=ids, attention_mask=mask)
        model(input_ids=ids[:2], attention_mask=mask[:2])  # the model's own call records them too
    env = {**os.environ, "PYTHONPATH": str(MI_CROW_REF)}
    proc = subprocess.run(
        [sys.executable, "-c", READ_CAPTURE_WITH_MI_CROW, str(ours.base_path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    layers = ["attention_masks", "encoder.layer.0", "encoder.layer.1"]
    assert out["0"] == [12, layers, ["attention_mask", "input_ids"], mask.tolist()]
    assert out["1"] == [10, layers, ["attention_mask", "input_ids"], mask[:2].tolist()]
