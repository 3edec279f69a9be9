"""ActivationCapture never gives a silently wrong answer: the model's inputs once per batch (also
from ``model(**enc)``), ``element=``, layer-name suggestions, per-layer statistics (two ranks,
resume, a crash's uncounted batches), progress bars."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hf_models import tiny_bert, tiny_gpt2
from mi_crow.store import ActivationCapture, LayerStats, LocalStore, MemoryStore, Store, read_stats
from mi_crow.store._keys import INPUT_IDS_KEY, INPUTS_LAYER, MASK_KEY
from mi_crow.store._progress import disable_progress_bars, enable_progress_bars
from mi_crow.store.capture import suggest_layers
from mi_crow.store.testing.store_tests import assert_same

pytest.importorskip("transformers")


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return LocalStore(tmp_path / "s") if request.param == "local" else MemoryStore()


def padded_batch(b: int, t: int, seed: int, vocab: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a right-padding mask: row ``i`` has ``t - i % t`` real tokens (at least 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.int64)
    for i in range(b):
        mask[i, max(1, t - i % t) :] = 0
    return ids, mask


def stored_rows(store: Store, run: str, layer: str, batches: Any) -> torch.Tensor:
    """The non-padding rows of ``layer`` in ``batches`` as stored, float64 (what statistics must cover)."""
    rows = []
    for i in batches:
        _, tensors = store.get_detector_metadata(run, i)
        acts = tensors[layer]["activations"]
        mask = tensors.get(INPUTS_LAYER, {}).get(MASK_KEY)
        rows.append(acts[mask.bool()] if mask is not None else acts.reshape(-1, acts.shape[-1]))
    return torch.cat(rows).double()


def assert_stats_of(stats: LayerStats, rows: torch.Tensor) -> None:
    assert stats.count == rows.shape[0] and stats.d == rows.shape[1]
    torch.testing.assert_close(stats.mean, rows.mean(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.var, rows.var(0, correction=0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.mean_norm, float(rows.norm(dim=1).mean()), rtol=1e-9, atol=0.0)
    torch.testing.assert_close(stats.mean_sq_norm, float((rows * rows).sum(1).mean()), rtol=1e-9, atol=0.0)


# ---------------------------------------------------------------------- the model's inputs


def test_inputs_once_per_batch_from_the_models_own_call(store: Store) -> None:
    model = tiny_gpt2()
    layers = ["transformer.h.0", "transformer.h.1"]
    calls = [padded_batch(3, 5, 0), padded_batch(2, 4, 1), padded_batch(2, 6, 2)]
    with ActivationCapture(model, store, "g", layers, progress=False) as cap, torch.no_grad():
        ids, mask = calls[0]
        model(input_ids=ids, attention_mask=mask)  # model(**enc), not cap.run
        ids, mask = calls[1]
        model(ids, attention_mask=mask)  # ids by position
        ids, mask = calls[2]
        cap.run(input_ids=ids, attention_mask=mask)
    for i, (ids, mask) in enumerate(calls):
        meta, tensors = store.get_detector_metadata("g", i)
        assert meta == {"tokens": int(mask.sum()), "masked": True}
        assert list(tensors) == [*layers, INPUTS_LAYER]
        assert list(tensors[INPUTS_LAYER]) == [INPUT_IDS_KEY, MASK_KEY]
        assert_same(tensors[INPUTS_LAYER][MASK_KEY], mask)
        assert_same(tensors[INPUTS_LAYER][INPUT_IDS_KEY], ids)
        for layer in layers:
            assert list(tensors[layer]) == ["activations"]
    # On disk: the inputs once, in mi_crow 1.0's pseudo-layer folder, not under every layer.
    if isinstance(store, LocalStore):
        batch = store.base_path / "runs/g/batch_0"
        assert sorted(p.name for p in (batch / INPUTS_LAYER).iterdir()) == [
            "attention_mask.safetensors",
            "input_ids.safetensors",
        ]
        assert sorted(p.name for p in (batch / "transformer.h.0").iterdir()) == ["activations.safetensors"]
    capture = store.get_run_metadata("g")["capture"]
    assert capture["masked"] is True and capture["writers"]["0"]["masked"] is True
    assert cap.tokens == capture["tokens"] == sum(int(m.sum()) for _, m in calls)


def test_a_batch_without_a_mask_says_so(store: Store) -> None:
    model = tiny_gpt2()
    ids, mask = padded_batch(2, 5, 0)
    with ActivationCapture(model, store, "m", ["transformer.h.1"], progress=False), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model(ids)  # no mask: every position counts
    assert store.get_detector_metadata("m", 1)[0] == {"tokens": 10, "masked": False}
    assert list(store.get_detector_metadata("m", 1)[1][INPUTS_LAYER]) == [INPUT_IDS_KEY]
    capture = store.get_run_metadata("m")["capture"]
    assert capture["masked"] is False  # not every batch had one
    assert capture["tokens"] == int(mask.sum()) + 10


class _Embedder(nn.Module):
    """A plain module called on token ids, with an optional mask of any shape."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.out = nn.Linear(6, 6)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.emb(tokens))  # type: ignore[no-any-return]


def test_integer_first_argument_is_the_ids_and_odd_masks_are_not_padding(store: Store) -> None:
    model = _Embedder().eval()
    ids = torch.randint(0, 20, (2, 3))
    with ActivationCapture(model, store, "e", ["out"], progress=False), torch.no_grad():
        model(ids)
    meta, tensors = store.get_detector_metadata("e", 0)
    assert meta == {"tokens": 6, "masked": False}
    assert list(tensors[INPUTS_LAYER]) == [INPUT_IDS_KEY]
    assert_same(tensors[INPUTS_LAYER][INPUT_IDS_KEY], ids)

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            return self.lin(x)  # type: ignore[no-any-return]

    masked = Masked().eval()
    x = torch.randn(2, 3, 4)
    with ActivationCapture(masked, store, "odd", ["lin"], progress=False), torch.no_grad():
        masked(x, attention_mask=torch.ones(2, 1, 3, 3))  # a 4-D attention mask: no padding mask
        masked(x, attention_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert store.get_detector_metadata("odd", 0)[0] == {"tokens": 6, "masked": False}
    assert sorted(store.get_detector_metadata("odd", 0)[1]) == ["lin"]
    assert store.get_detector_metadata("odd", 1)[0] == {"tokens": 3, "masked": True}


def test_the_inputs_layer_name_is_refused() -> None:
    model = nn.ModuleDict({"attention_masks": nn.Linear(2, 2), "other": nn.Linear(2, 2)})
    store = MemoryStore()
    for layers in (["attention_masks"], ["other", "attention_masks"]):
        with pytest.raises(ValueError, match="layer 'attention_masks' cannot be captured: each batch stores the model"):
            ActivationCapture(model, store, "r", layers)
    assert store.list_runs() == []


# ---------------------------------------------------------------------- element=


class _Multi(nn.Module):
    """Modules whose outputs are a tuple, a dict and a ModelOutput."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.pair = _Pair()
        self.named = _Named()
        self.hf = _HF()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        a, b, _ = self.pair(h)
        d = self.named(b, scale=2.0)
        return self.hf(d["second"]).last_hidden_state + a  # type: ignore[no-any-return]


class _Pair(nn.Module):
    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return h + 1, h * 3, None


class _Named(nn.Module):
    def forward(self, b: torch.Tensor, scale: float = 1.0) -> dict[str, Any]:
        return {"first": b - 1, "second": b * scale, "note": "text"}


class _HF(nn.Module):
    def forward(self, h: torch.Tensor) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(last_hidden_state=h * 5, pooler_output=h[:, 0] * 7)


def test_element_selects_per_layer_and_is_recorded(store: Store) -> None:
    model = _Multi().eval()
    x = torch.randn(2, 3, 4)
    element = {"pair": 1, "named": "first", "hf": "pooler_output"}
    layers = ["pair", "named", "hf", "lin"]
    with ActivationCapture(model, store, "el", layers, element=element, progress=False), torch.no_grad():
        model(x)
    with torch.no_grad():
        h = model.lin(x)
    _, tensors = store.get_detector_metadata("el", 0)
    assert_same(tensors["pair"]["activations"], h * 3)
    assert_same(tensors["named"]["activations"], h * 3 - 1)
    assert_same(tensors["hf"]["activations"], (h * 3 * 2)[:, 0] * 7)
    assert_same(tensors["lin"]["activations"], h)  # the default for a layer the mapping leaves out
    assert store.get_run_metadata("el")["capture"]["element"] == element
    # One element for every layer; negative from the end; a ModelOutput by position (its to_tuple()).
    with ActivationCapture(model, store, "one", ["pair"], element=-3, progress=False), torch.no_grad():
        model(x)
    assert_same(store.get_detector_metadata_by_layer_by_key("one", 0, "pair", "activations"), h + 1)
    with ActivationCapture(model, store, "pos", ["hf"], element=1, progress=False), torch.no_grad():
        model(x)
    assert_same(store.get_detector_metadata_by_layer_by_key("pos", 0, "hf", "activations"), (h * 6)[:, 0] * 7)
    assert store.get_run_metadata("pos")["capture"]["element"] == 1
    # Module inputs: an int is a positional argument, a str a parameter by name (given either way).
    with ActivationCapture(model, store, "in", ["named"], inputs=True, element="b", progress=False), torch.no_grad():
        model(x)
    assert_same(store.get_detector_metadata_by_layer_by_key("in", 0, "named", "activations"), h * 3)


def test_a_hugging_face_tuple_and_model_output() -> None:
    model, store = tiny_gpt2(), MemoryStore()
    ids, mask = padded_batch(2, 4, 0)
    capture = ActivationCapture(model, store, "t", ["transformer.h.0.attn"], element=1, progress=False)
    with pytest.raises(ValueError) as info, capture, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert str(info.value) == (
        "element 1 of the output of layer 'transformer.h.0.attn' is a NoneType, not a tensor: the output is a "
        "tuple of length 2 (Tensor, NoneType)"
    )
    assert store.list_run_batches("t") == []  # nothing stored for the failed call
    bert = tiny_bert()
    with ActivationCapture(bert, store, "b", ["encoder"], element="last_hidden_state", progress=False) as cap:
        out = cap.run(input_ids=ids, attention_mask=mask)
    assert_same(store.get_detector_metadata_by_layer_by_key("b", 0, "encoder", "activations"), out.last_hidden_state)


@pytest.mark.parametrize(
    ("element", "inputs", "message"),
    [
        (
            3,
            False,
            "element 3 of the output of layer 'pair' is out of range: the output is a tuple of length 3 "
            "(Tensor, Tensor, NoneType)",
        ),
        (2, False, "element 2 of the output of layer 'pair' is a NoneType, not a tensor"),
        (
            "first",
            False,
            "element 'first' of the output of layer 'pair': a str selects from a mapping or "
            "ModelOutput, and the output is a tuple of length 3",
        ),
        (
            "third",
            False,
            "element 'third' of the output of layer 'named' does not exist: the output is a dict "
            "with keys ['first', 'second', 'note']",
        ),
        ("note", False, "element 'note' of the output of layer 'named' is a str, not a tensor"),
        (
            0,
            False,
            "element 0 of the output of layer 'named': an int selects from a tuple or list, and the "
            "output is a dict with keys",
        ),
        (
            "pooler",
            False,
            "element 'pooler' of the output of layer 'hf' does not exist: the output is a "
            "BaseModelOutputWithPooling with keys ['last_hidden_state', 'pooler_output']",
        ),
        (
            1,
            True,
            "element 1 of the positional arguments of layer 'named' is out of range: the positional "
            "arguments are a tuple of length 1 (Tensor)",
        ),
        ("scale", True, "element 'scale' of the arguments of layer 'named' is a float, not a tensor"),
    ],
)
def test_a_bad_element_names_the_layer_and_what_the_output_holds(element: Any, inputs: bool, message: str) -> None:
    model, store = _Multi().eval(), MemoryStore()
    layer = re.search(r"layer '(\w+)'", message).group(1)  # type: ignore[union-attr]
    capture = ActivationCapture(model, store, "bad", [layer], element=element, inputs=inputs, progress=False)
    with pytest.raises(ValueError, match=re.escape(message)), capture, torch.no_grad():
        model(torch.randn(1, 2, 4))
    assert store.list_run_batches("bad") == []


def test_bad_element_settings_refused_before_anything_is_written() -> None:
    model, store = _Multi().eval(), MemoryStore()
    for element, message in (
        (
            {"pair": 1, "nope": 0},
            "element names layers ['nope'] that are not captured; the captured layers are ['pair']",
        ),
        (1.5, "element must be an int (an index into a tuple or list) or a non-empty str"),
        (True, "element must be an int"),
        ("", "element must be an int"),
        ({"pair": None}, "element['pair'] must be an int"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            ActivationCapture(model, store, "r", ["pair"], element=element)
    assert store.list_runs() == []


# ---------------------------------------------------------------------- layer names


def test_suggest_layers_prefix_fixes_and_typos() -> None:
    head = [n for n, _ in tiny_gpt2(head=True).named_modules()]
    bare = [n for n, _ in tiny_gpt2(head=False).named_modules()]
    assert suggest_layers("h.1", head)[0] == "transformer.h.1"
    assert suggest_layers("transformer.h.1", bare)[0] == "h.1"
    assert suggest_layers("h.1.mlp", head)[0] == "transformer.h.1.mlp"
    assert suggest_layers("model.h.1", head)[0] == "transformer.h.1"  # a prefix replaced
    assert suggest_layers("transformer.h.l", head)[0] == "transformer.h.1"  # a typo
    assert suggest_layers("zzzzzz", head) == []
    assert len(suggest_layers("h", head, n=3)) <= 3
    model, store = tiny_gpt2(head=True), MemoryStore()
    with pytest.raises(
        ValueError, match=r"layer 'h\.1' is not a module of GPT2LMHeadModel; did you mean 'transformer\.h\.1'"
    ):
        ActivationCapture(model, store, "r", ["h.1"])
    with pytest.raises(
        ValueError, match=r"layer 'transformer\.h\.1' is not a module of GPT2Model; did you mean 'h\.1'"
    ):
        ActivationCapture(tiny_gpt2(head=False), store, "r", ["transformer.h.1"])
    with pytest.raises(ValueError, match=r"^layer 'zzzzzz' is not a module of GPT2LMHeadModel$"):
        ActivationCapture(model, store, "r", ["zzzzzz"])
    assert store.list_runs() == []


# ---------------------------------------------------------------------- statistics


def capture_gpt2(store: Store, run: str, seeds: Iterator[int] | list[int], **kwargs: Any) -> ActivationCapture:
    model = tiny_gpt2()
    with ActivationCapture(model, store, run, ["transformer.h.0", "transformer.h.1"], progress=False, **kwargs) as cap:
        for seed in seeds:
            ids, mask = padded_batch(3, 4 + seed % 3, seed)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    return cap


def test_statistics_are_those_of_the_stored_non_padding_rows(store: Store) -> None:
    cap = capture_gpt2(store, "s", range(4), dtype=torch.bfloat16)
    stats = read_stats(store, "s")
    assert list(stats) == ["transformer.h.0", "transformer.h.1"]
    for layer, s in stats.items():
        rows = stored_rows(store, "s", layer, range(4))  # the stored bf16 values, padding left out
        assert_stats_of(s, rows)
        assert s.count == store.get_run_metadata("s")["capture"]["tokens"] == cap.tokens
        assert_stats_of(cap.layer_stats[layer], rows)
    writer = store.get_run_metadata("s")["capture"]["writers"]["0"]
    assert writer["stats"] == store.get_run_metadata("s")["capture"]["stats"]


def test_statistics_in_chunks_equal_those_of_all_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    import mi_crow.store.capture as capture_module

    monkeypatch.setattr(capture_module, "_STATS_CHUNK", 7 * 32)  # 7 rows of 32 at a time
    store = MemoryStore()
    capture_gpt2(store, "k", range(3))
    for layer, s in read_stats(store, "k").items():
        assert_stats_of(s, stored_rows(store, "k", layer, range(3)))
    rows = torch.randn(50, 3, dtype=torch.float64) * 100 + 1e4  # a mean far from 0: two-pass sums
    assert_stats_of(capture_module._stats_of(rows, {}), rows)


def test_two_ranks_merge_and_resume(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    capture_gpt2(store, "r", [0, 2], rank=0, world_size=2)
    capture_gpt2(store, "r", [1, 3, 5], rank=1, world_size=2)
    capture_gpt2(store, "r", [4], rank=0, world_size=2)  # rank 0 resumes its share
    assert store.list_run_batches("r") == [0, 1, 2, 3, 4, 5]
    capture = store.get_run_metadata("r")["capture"]
    for layer, s in read_stats(store, "r").items():
        assert_stats_of(s, stored_rows(store, "r", layer, range(6)))
        for rank, batches in (("0", [0, 2, 4]), ("1", [1, 3, 5])):
            mine = LayerStats.from_json(capture["writers"][rank]["stats"][layer])
            assert_stats_of(mine, stored_rows(store, "r", layer, batches))
    assert capture["tokens"] == read_stats(store, "r")["transformer.h.0"].count


def test_batches_a_crash_left_uncounted_get_their_statistics_on_resume(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    capture_gpt2(store, "c", [0])
    counted_once = store.get_run_metadata("c")
    capture_gpt2(store, "c", [1, 2])
    # As if the writer had been killed before it published batches 1 and 2.
    store.put_run_metadata("c", counted_once)
    assert store.get_run_metadata("c")["capture"]["writers"]["0"]["last_batch"] == 0
    cap = capture_gpt2(store, "c", [3])
    assert cap.completed == 3 and store.list_run_batches("c") == [0, 1, 2, 3]
    capture = store.get_run_metadata("c")["capture"]
    assert capture["batches"] == 4 and capture["masked"] is True
    for layer, s in read_stats(store, "c").items():
        assert_stats_of(s, stored_rows(store, "c", layer, range(4)))


def test_statistics_never_cover_part_of_a_run() -> None:
    store = MemoryStore()
    capture_gpt2(store, "off", [0], stats=False)
    writer = store.get_run_metadata("off")["capture"]["writers"]["0"]
    assert "stats" not in writer and "stats" not in store.get_run_metadata("off")["capture"]
    with pytest.raises(KeyError, match="run 'off' has no per-layer statistics"):
        read_stats(store, "off")
    # A writer that keeps none makes the run's statistics go, rather than describe the other's rows only.
    capture_gpt2(store, "mixed", [0], rank=0, world_size=2)
    assert "stats" in store.get_run_metadata("mixed")["capture"]
    capture_gpt2(store, "mixed", [1], rank=1, world_size=2, stats=False)
    assert "stats" not in store.get_run_metadata("mixed")["capture"]
    # Resuming with statistics a writer that stored batches without them: none for that writer.
    capture_gpt2(store, "off", [1])
    capture = store.get_run_metadata("off")["capture"]
    assert "stats" not in capture
    assert capture["writers"]["0"]["stats_skipped"] == {
        "transformer.h.0": "batches of this writer were stored without statistics of this layer",
        "transformer.h.1": "batches of this writer were stored without statistics of this layer",
    }
    # A layer added on resume is refused (the run's batches would not all hold it).
    model = tiny_gpt2()
    capture_gpt2(store, "grow", [0])
    layers = ["transformer.h.0", "transformer.h.1", "transformer.ln_f"]
    with pytest.raises(
        ValueError, match=r"run 'grow' was captured with layers=\['transformer.h.0', 'transformer.h.1'\]"
    ):
        ActivationCapture(model, store, "grow", layers, progress=False).__enter__()
    assert store.list_run_batches("grow") == [0]


def test_a_resume_with_other_settings_is_refused_before_anything_is_written() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).eval()
    store = MemoryStore()
    with ActivationCapture(model, store, "r", ["0"], progress=False), torch.no_grad():
        model(torch.randn(2, 4))
    before = store.get_run_metadata("r")
    for kwargs, name in (
        ({"layers": ["1"]}, "layers"),
        ({"dtype": torch.bfloat16}, "dtype"),
        ({"inputs": True}, "inputs"),
        ({"key": "acts"}, "key"),
    ):
        args = {"layers": ["0"], **kwargs}
        layers = args.pop("layers")
        with pytest.raises(ValueError, match=rf"run 'r' was captured with {name}=.* and this capture has {name}="):
            ActivationCapture(model, store, "r", layers, progress=False, **args).__enter__()
        assert store.get_run_metadata("r") == before and store.list_run_batches("r") == [0]
    with ActivationCapture(model, store, "r", ["0"], progress=False) as cap, torch.no_grad():  # the same: resumes
        assert cap.next_batch == 1
        model(torch.randn(2, 4))
    assert store.list_run_batches("r") == [0, 1]


def test_a_layer_whose_width_changes_has_no_statistics() -> None:
    model = nn.Sequential(nn.Identity(), nn.Identity())
    store = MemoryStore()
    with ActivationCapture(model, store, "w", ["0"], progress=False), torch.no_grad():
        model(torch.randn(2, 3))
        model(torch.randn(2, 5))
    capture = store.get_run_metadata("w")["capture"]
    assert "stats" not in capture
    assert capture["writers"]["0"]["stats_skipped"] == {"0": "its rows changed width from 3 to 5 (batch 1)"}
    assert capture["batches"] == 2


def test_statistics_of_tensors_without_a_token_axis() -> None:
    """A [B, D] output with a [B, T] mask: every row counts (the mask is not its padding)."""
    bert, store = tiny_bert(), MemoryStore()
    ids, mask = padded_batch(3, 5, 0)
    with ActivationCapture(bert, store, "p", ["pooler"], progress=False) as cap:
        out = cap.run(input_ids=ids, attention_mask=mask)
    s = read_stats(store, "p")["pooler"]
    assert_stats_of(s, out.pooler_output.double())
    assert store.get_detector_metadata("p", 0)[0] == {"tokens": int(mask.sum()), "masked": True}


# ---------------------------------------------------------------------- progress


def test_progress_bar_counts_batches_and_tokens(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MI_CROW_STORE_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    model = nn.Sequential(nn.Linear(4, 4))
    store = MemoryStore()

    def run(name: str, **kwargs: Any) -> str:
        with ActivationCapture(model, store, name, ["0"], **kwargs), torch.no_grad():
            for _ in range(3):
                model(torch.randn(2, 5, 4))
        return capsys.readouterr().err

    shown = run("shown")
    assert "capture shown: 3 batches" in shown and "tokens=30" in shown
    assert run("off", progress=False) == ""
    disable_progress_bars()
    try:
        assert run("quiet") == ""
        assert "capture forced: 3 batches" in run("forced", progress=True)
    finally:
        enable_progress_bars()
    with pytest.raises(ValueError, match="progress must be a bool or None, got str 'yes'"):
        ActivationCapture(model, store, "r", ["0"], progress="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stats must be a bool, got int 1"):
        ActivationCapture(model, store, "r", ["0"], stats=1)  # type: ignore[arg-type]


def test_annotate_adds_fields_to_a_batch_and_keeps_recycling_host_buffers(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8)).eval()
    store = LocalStore(tmp_path)
    with ActivationCapture(model, store, "r", "0") as cap, torch.no_grad():
        assert cap._recycle  # the store itself, not a wrapper: host buffers are reused
        cap.annotate(cap.next_batch, {"texts": [0, 3]})
        model(torch.randn(3, 4))
        model(torch.randn(3, 4))
        with pytest.raises(ValueError, match=r"cannot set the capture's own batch metadata fields \['tokens'\]"):
            cap.annotate(2, {"tokens": 1})
        with pytest.raises(ValueError, match="annotate's fields for batch 2 are not JSON"):
            cap.annotate(2, {"x": float("nan")})
    assert store.get_detector_metadata("r", 0)[0] == {"texts": [0, 3], "tokens": 3, "masked": False}
    assert store.get_detector_metadata("r", 1)[0] == {"tokens": 3, "masked": False}
