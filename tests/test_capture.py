"""ActivationCapture: stored tensors equal what the hooked modules produced; masks, dtypes, resume."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import proc_workers as pw
from hf_models import tiny_bert
from mi_crow.store import ActivationCapture, Capabilities, LocalStore, MemoryStore, Store
from mi_crow.store._tensor_file import Payload
from mi_crow.store.capture import extract_tensor
from mi_crow.store.testing.store_tests import assert_same

transformers = pytest.importorskip("transformers")


def decoder(layers: int = 3, d: int = 16) -> nn.Module:
    torch.manual_seed(0)
    blocks = [nn.TransformerEncoderLayer(d, 2, 32, batch_first=True, dropout=0.0) for _ in range(layers)]
    return nn.Sequential(*blocks).eval()


def reference_outputs(model: nn.Module, names: list[str], x: torch.Tensor, inputs: bool = False) -> dict[str, Any]:
    """What the modules produce, captured independently with plain hooks."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        if inputs:
            handles.append(
                modules[name].register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0].clone()))
            )
        else:
            handles.append(modules[name].register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o.clone())))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return LocalStore(tmp_path / "s") if request.param == "local" else MemoryStore()


def test_plain_torch_model_outputs_and_inputs(store: Store) -> None:
    model = decoder()
    xs = [torch.randn(2, 5, 16), torch.randn(3, 4, 16), torch.randn(1, 7, 16)]
    with ActivationCapture(model, store, "r", ["0", "2"]) as cap, torch.no_grad():
        for x in xs:
            model(x)
    assert cap.batches == 3 and cap.tokens == 10 + 12 + 7
    assert store.list_run_batches("r") == [0, 1, 2]
    for i, x in enumerate(xs):
        expected = reference_outputs(model, ["0", "2"], x)
        meta, tensors = store.get_detector_metadata("r", i)
        assert meta == {"tokens": x.shape[0] * x.shape[1], "masked": False}
        assert sorted(tensors) == ["0", "2"]  # no model inputs: the model was called on a float tensor
        for layer in ("0", "2"):
            assert list(tensors[layer]) == ["activations"]
            assert_same(tensors[layer]["activations"], expected[layer])
    with ActivationCapture(model, store, "inputs", ["1"], inputs=True, key="resid_pre"), torch.no_grad():
        model(xs[0])
    got = store.get_detector_metadata_by_layer_by_key("inputs", 0, "1", "resid_pre")
    assert_same(got, reference_outputs(model, ["1"], xs[0], inputs=True)["1"])


def test_dtype_conversion_and_run_metadata(store: Store) -> None:
    model = decoder()
    x = torch.randn(2, 3, 16)
    with ActivationCapture(model, store, "r", "1", dtype=torch.bfloat16, metadata={"dataset": "toy"}), torch.no_grad():
        model(x)
    got = store.get_detector_metadata_by_layer_by_key("r", 0, "1", "activations")
    assert got.dtype == torch.bfloat16
    assert_same(got, reference_outputs(model, ["1"], x)["1"].to(torch.bfloat16))
    meta = store.get_run_metadata("r")
    assert meta["dataset"] == "toy"
    assert meta["layers"] == ["1"]
    assert meta["model"] == {"name_or_path": None, "class": "torch.nn.modules.container.Sequential", "dtype": "float32"}
    cap = meta["capture"]
    assert (cap["key"], cap["dtype"], cap["inputs"], cap["batches"], cap["tokens"], cap["last_batch"]) == (
        "activations",
        "bfloat16",
        False,
        1,
        6,
        0,
    )
    assert cap["library"].startswith("mi-crow-store ")


def test_hugging_face_model_with_attention_masks(store: Store) -> None:
    model = tiny_bert()
    layers = ["encoder.layer.0", "encoder.layer.2"]
    batches = []
    with ActivationCapture(model, store, "bert", layers) as cap:
        for b, t in ((2, 6), (3, 4)):
            ids = torch.randint(1, 99, (b, t))
            mask = torch.ones(b, t, dtype=torch.int64)
            mask[0, t - 2 :] = 0
            out = cap.run(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            batches.append((ids, mask, out.hidden_states))
    assert store.list_run_batches("bert") == [0, 1]
    for i, (ids, mask, hidden) in enumerate(batches):
        meta, tensors = store.get_detector_metadata("bert", i)
        assert meta == {"tokens": int(mask.sum()), "masked": True}
        # The model's inputs once per batch, in mi_crow 1.0's pseudo-layer; each layer holds its activations.
        assert list(tensors) == ["encoder.layer.0", "encoder.layer.2", "attention_masks"]
        assert sorted(tensors["attention_masks"]) == ["attention_mask", "input_ids"]
        assert_same(tensors["attention_masks"]["attention_mask"], mask)
        assert_same(tensors["attention_masks"]["input_ids"], ids)
        for n, layer in ((0, "encoder.layer.0"), (2, "encoder.layer.2")):
            assert list(tensors[layer]) == ["activations"]
            assert_same(tensors[layer]["activations"], hidden[n + 1])  # hidden_states[0] is the embeddings
    assert store.get_run_metadata("bert")["model"]["class"].endswith("BertModel")


def test_unknown_layer_refused_before_anything_is_written(store: Store) -> None:
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"layer 'encoder.layer.9' is not a module of BertModel.*encoder.layer.0"):
        ActivationCapture(model, store, "r", ["encoder.layer.0", "encoder.layer.9"])
    with pytest.raises(ValueError, match="at least one"):
        ActivationCapture(model, store, "r", [])
    with pytest.raises(ValueError, match="run_id"):
        ActivationCapture(model, store, "../r", ["encoder"])
    assert store.list_runs() == []


def test_resume_continues_after_the_last_batch(store: Store) -> None:
    model = decoder()
    x = torch.randn(2, 3, 16)
    for _ in range(2):
        with ActivationCapture(model, store, "r", ["0"]), torch.no_grad():
            model(x)
            model(x)
    assert store.list_run_batches("r") == [0, 1, 2, 3]
    assert store.get_run_metadata("r")["capture"]["batches"] == 4
    assert store.get_run_metadata("r")["capture"]["tokens"] == 24


def test_stored_bytes_identical_to_a_synchronous_write(tmp_path: Path) -> None:
    model = decoder()
    x = torch.randn(2, 5, 16)
    piped = LocalStore(tmp_path / "piped")
    with ActivationCapture(model, piped, "r", ["0", "1"]), torch.no_grad():
        model(x)
    direct = LocalStore(tmp_path / "direct")
    expected = reference_outputs(model, ["0", "1"], x)
    direct.put_detector_metadata(
        "r", 0, {"tokens": 10, "masked": False}, {k: {"activations": v} for k, v in expected.items()}
    )
    for rel in ("0/activations.safetensors", "1/activations.safetensors", "metadata.json"):
        assert (tmp_path / "piped/runs/r/batch_0" / rel).read_bytes() == (
            tmp_path / "direct/runs/r/batch_0" / rel
        ).read_bytes()


class _GatedStore(MemoryStore):
    """A store whose batch writes wait for a gate (a disk slower than the model) or fail."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.fail = False

    def put_detector_metadata(self, *args: Any, **kwargs: Any) -> str:
        self.gate.wait(30)
        if self.fail:
            raise OSError(28, "No space left on device (simulated)")
        return super().put_detector_metadata(*args, **kwargs)


def test_backpressure_bounds_pending_batches() -> None:
    model = decoder()
    store = _GatedStore()
    done = []

    def drive(cap: ActivationCapture) -> None:
        with torch.no_grad():
            for _ in range(4):
                model(torch.randn(1, 2, 16))
                done.append(1)

    with ActivationCapture(model, store, "r", ["0"], max_pending=1) as cap:
        t = threading.Thread(target=drive, args=(cap,))
        t.start()
        deadline = time.monotonic() + 30
        while not (cap._queue.full() and len(done) >= 2) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        # One batch in the writer (held at the gate), one queued: the third forward waits.
        assert len(done) == 2
        store.gate.set()
        t.join(30)
    assert len(done) == 4 and store.list_run_batches("r") == [0, 1, 2, 3]


class _SlowRecordingStore(MemoryStore):
    """Writes lag the model by a varying delay; records the memory each batch's tensors sit in."""

    def __init__(self) -> None:
        super().__init__()
        self.pointers: set[int] = set()
        self.writes = 0

    def _write_dir(self, key: str, files: Mapping[str, Payload]) -> None:
        self.writes += 1
        time.sleep(0.002 * (self.writes % 3))
        for payload in files.values():
            self.pointers.update(torch.frombuffer(d, dtype=torch.uint8).data_ptr() for d in payload.data)
        super()._write_dir(key, files)


def test_host_buffers_are_recycled_only_after_their_batch_is_written() -> None:
    model = decoder()
    store = _SlowRecordingStore()
    xs = [torch.randn(2, 5, 16) for _ in range(12)]
    with ActivationCapture(model, store, "r", ["0", "2"], max_pending=2) as cap, torch.no_grad():
        for x in xs:
            model(x)
    for i, x in enumerate(xs):  # no batch was overwritten by a later one before it was written
        expected = reference_outputs(model, ["0", "2"], x)
        for layer in ("0", "2"):
            assert_same(store.get_detector_metadata_by_layer_by_key("r", i, layer, "activations"), expected[layer])
    # 24 captured tensors lived in far fewer buffers: at most the batches in flight at once.
    assert len(store.pointers) <= 2 * (2 + 2)
    assert sum(len(v) for v in cap._free.values()) <= cap._free_per_shape


class _KeepingStore(MemoryStore):
    """A store of its own that keeps the tensor objects it is given (a cache), and says so."""

    capabilities = Capabilities(atomic_directories=True, keeps_payload=True)

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[dict[str, dict[str, torch.Tensor]]] = []

    def put_detector_metadata(self, run_id: str, i: int, meta: Any, tensors: Any) -> str:
        self.kept.append(tensors)
        return super().put_detector_metadata(run_id, i, meta, tensors)


def test_buffers_handed_to_another_store_are_never_reused() -> None:
    model = decoder()
    store = _KeepingStore()
    xs = [torch.randn(2, 5, 16) for _ in range(6)]
    with ActivationCapture(model, store, "r", ["1"], max_pending=1) as cap, torch.no_grad():
        for x in xs:
            model(x)
    for x, kept in zip(xs, store.kept, strict=True):  # each batch still holds its own values
        assert_same(kept["1"]["activations"], reference_outputs(model, ["1"], x)["1"])
    assert cap._free == {}


def test_writer_errors_reach_the_caller() -> None:
    model = decoder()
    store = _GatedStore()
    store.fail = True
    store.gate.set()
    capture = ActivationCapture(model, store, "r", ["0"])
    with pytest.raises(RuntimeError, match="No space left on device"), capture, torch.no_grad():
        model(torch.randn(1, 2, 16))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            model(torch.randn(1, 2, 16))  # raises once the writer has failed
            time.sleep(0.01)
    assert store.list_run_batches("r") == []


def test_extract_tensor_shapes() -> None:
    t = torch.ones(1)
    assert extract_tensor(t) is t
    assert extract_tensor((t, None)) is t
    assert extract_tensor([None, (t,)]) is t
    assert extract_tensor({"last_hidden_state": t, "x": torch.zeros(1)}) is t
    assert extract_tensor({"a": None, "b": t}) is t
    assert extract_tensor((None, "x")) is None


def test_capture_survives_sigkill_and_resumes(tmp_path: Path) -> None:
    ctx = pw.context()
    root = str(tmp_path / "s")
    log = str(tmp_path / "log")
    proc = ctx.Process(target=pw.capturer, args=(root, log, 0))
    proc.start()
    deadline = time.monotonic() + 60
    while len(pw.read_log(log)) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    store = LocalStore(root)
    committed = store.list_run_batches("cap")
    made = len(pw.read_log(log))
    # The writer runs at most max_pending (2) batches + the one in hand behind the model.
    assert committed == list(range(len(committed))) and made - 3 <= len(committed) <= made + 1
    model = pw.capture_model()
    for i in committed:  # every committed batch is complete and exactly what the model produced
        meta, tensors = store.get_detector_metadata("cap", i)
        expected = reference_outputs(model, ["0", "2"], pw.capture_input(i))
        for layer in ("0", "2"):
            assert_same(tensors[layer]["activations"], expected[layer].to(torch.bfloat16))
    start = len(committed)
    with ActivationCapture(model, store, "cap", ["0", "2"], dtype=torch.bfloat16) as cap, torch.no_grad():
        assert cap.next_batch == start
        model(pw.capture_input(start))
    assert store.list_run_batches("cap") == [*committed, start]
    meta = store.get_run_metadata("cap")["capture"]
    assert meta["batches"] == start + 1 and meta["last_batch"] == start
    assert store.check() == []
