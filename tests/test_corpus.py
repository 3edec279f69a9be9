"""mi_crow.store.corpus: reading corpora, packing as SAELens does, and capture_corpus's resume safety."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_models import gpt2_tokenizer, llama_tokenizer, tiny_gpt2, tiny_llama
from mi_crow.store import LocalStore, MemoryStore
from mi_crow.store.corpus import (
    CaptureSetupError,
    capture_corpus,
    contexts,
    pack_tokens,
    padding_token,
    read_texts,
    texts_sha256,
)

transformers = pytest.importorskip("transformers")

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", *map(str, range(10))]


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))) for _ in range(n)]


def stored_ids(store: Any, run: str) -> list[torch.Tensor]:
    return [
        store.get_detector_metadata_by_layer_by_key(run, b, "attention_masks", "input_ids")
        for b in store.list_run_batches(run)
    ]


# ---------------------------------------------------------------------------------------------- read_texts


def test_read_texts_of_text_jsonl_and_saved_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    (tmp_path / "t.txt").write_text("  the cat \n\n sat\n")
    assert read_texts(tmp_path / "t.txt") == ["the cat", "sat"]
    (tmp_path / "c.jsonl").write_text('{"body": "a dog", "id": 1}\n\n{"body": "  "}\n{"body": "the mat"}\n')
    assert read_texts(tmp_path / "c.jsonl", column="body") == ["a dog", "the mat"]
    with pytest.raises(ValueError, match=r"c.jsonl:1 has no field 'text' \(it has \['body', 'id'\]\)"):
        read_texts(tmp_path / "c.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text' is int, not a string"):
        read_texts(tmp_path / "bad.jsonl")
    ds = datasets.Dataset.from_dict({"text": ["one cat", "", "two dogs"], "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert read_texts(tmp_path / "ds") == ["one cat", "two dogs"]
    with pytest.raises(ValueError, match=r"has no column 'body'; it has \['text', 'n'\]"):
        read_texts(tmp_path / "ds", column="body")
    with pytest.raises(ValueError, match="single Dataset, not a DatasetDict"):
        read_texts(tmp_path / "ds", split="train")
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_dict({"text": ["held out"], "n": [0]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_texts(tmp_path / "dd", split="test") == ["held out"]
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\]: pick one with split="):
        read_texts(tmp_path / "dd")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts(tmp_path / "nothing.jsonl")


# ---------------------------------------------------------------------------------------------- packing


def test_pack_tokens_is_saelens_concat_and_batch_sequences() -> None:
    tb = pytest.importorskip("sae_lens.tokenization_and_batching")
    rng = random.Random(1)
    for trial in range(60):
        seqs = [[rng.choice([0, 0, 3, 4, 5, 6]) for _ in range(rng.randint(0, 12))] for _ in range(rng.randint(1, 8))]
        size = rng.randint(2, 9)
        bos = rng.choice([0, None])
        sep = rng.choice([0, 1, None])
        ours = list(pack_tokens(seqs, size, bos_token_id=bos, separator_token_id=sep))
        theirs = tb.concat_and_batch_sequences(
            iter(torch.tensor(s, dtype=torch.long) for s in seqs if s),
            size,
            begin_batch_token_id=bos,
            sequence_separator_token_id=sep,
        )
        assert ours == [t.tolist() for t in theirs], (trial, seqs, size, bos, sep)
    with pytest.raises(ValueError, match="context_size must be >= 2 when each context begins with BOS"):
        list(pack_tokens([[1, 2]], 1, bos_token_id=0))


def test_contexts_from_any_stop_continue_the_same_packing() -> None:
    tok = llama_tokenizer()
    texts = corpus(20)
    whole = list(contexts(tok, texts, 7))
    assert whole and all(c.tokens[0] == tok.bos_token_id and len(c.tokens) == 7 for c in whole)
    for i, c in enumerate(whole):
        assert [d.tokens for d in contexts(tok, texts, 7, start=c.stop)] == [d.tokens for d in whole[i + 1 :]]
    # Without BOS (prepend_bos=False): plain concatenation of the texts' tokens.
    flat = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"]]
    plain = [c.tokens for c in contexts(tok, texts, 5, prepend_bos=False)]
    assert plain == [flat[i : i + 5] for i in range(0, len(flat) - 4, 5)]


def test_padding_token_falls_back_to_eos_or_refuses() -> None:
    tok = gpt2_tokenizer()
    token, tid, note = padding_token(tok)
    assert (token, tid) == ("<|endoftext|>", tok.eos_token_id) and note and "EOS" in note
    assert padding_token(tok, "the")[:2] == ("the", tok.convert_tokens_to_ids("the"))
    with pytest.raises(CaptureSetupError, match="pad token 'teh' is not in the tokenizer's vocabulary"):
        padding_token(tok, "teh")
    from tokenizers import Tokenizer, models

    bare = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "u": 1}, "u")))
    with pytest.raises(CaptureSetupError, match="neither a pad token nor an EOS token"):
        padding_token(bare)


# ---------------------------------------------------------------------------------------------- capture_corpus


def test_one_text_per_row_pads_with_eos_and_matches_the_model() -> None:
    model, tok, store = tiny_gpt2(), gpt2_tokenizer(), MemoryStore()
    texts = ["the cat sat on the mat", "a dog", "the", "1 2 3 4 5"]
    report = capture_corpus(model, tok, store, "r", "transformer.h.1", texts, batch_size=3, progress=False)
    assert (report.batches, report.texts, report.position) == (2, 4, (4, 0))
    assert report.tokens == report.run_tokens == 6 + 2 + 1 + 5 and report.bytes > 0
    assert any("EOS" in n for n in report.notes)
    seen: list[torch.Tensor] = []
    handle = model.transformer.h[1].register_forward_hook(
        lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o)
    )
    for b, lo in ((0, 0), (1, 3)):
        acts = store.get_detector_metadata_by_layer_by_key("r", b, "transformer.h.1", "activations")
        mask = store.get_detector_metadata_by_layer_by_key("r", b, "attention_masks", "attention_mask")
        meta, _ = store.get_detector_metadata("r", b)
        assert meta["corpus"]["texts"] == [lo, min(lo + 3, 4)] and meta["corpus"]["sha256"] == texts_sha256(
            texts[lo : lo + 3]
        )
        for row, text in enumerate(texts[lo : lo + 3]):
            ids = tok(text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                model(ids)
            n = ids.shape[1]
            assert mask[row].tolist() == [1] * n + [0] * (mask.shape[1] - n)  # right padding, masked
            torch.testing.assert_close(acts[row, :n], seen[-1][0], rtol=1e-5, atol=1e-5)
    handle.remove()
    record = store.get_run_metadata("r")["corpus"]
    assert record["texts"] == 4 and record["sha256"] == texts_sha256(texts)
    assert record["settings"]["pad_token"] == "<|endoftext|>" and record["settings"]["padding_side"] == "right"


def test_resume_after_a_partial_batch_captures_appended_texts(tmp_path: Path) -> None:
    model, tok, store = tiny_gpt2(), gpt2_tokenizer(), LocalStore(tmp_path / "s")
    texts = corpus(7)
    first = capture_corpus(model, tok, store, "r", ["transformer.h.0"], texts, batch_size=3, progress=False)
    assert (first.batches, first.texts) == (3, 7)
    again = capture_corpus(model, tok, store, "r", ["transformer.h.0"], texts, batch_size=3, progress=False)
    assert (again.batches, again.texts, again.tokens, again.bytes, again.tokens_per_second) == (0, 0, 0, 0, 0.0)
    assert (again.run_batches, again.run_tokens) == (3, first.tokens)
    more = [*texts, *corpus(4, seed=9)]
    grown = capture_corpus(model, tok, store, "r", ["transformer.h.0"], more, batch_size=3, progress=False)
    assert (grown.batches, grown.texts, grown.batch_indices) == (2, 4, (3, 4))
    assert [store.get_detector_metadata("r", b)[0]["corpus"]["texts"] for b in (2, 3, 4)] == [[6, 7], [7, 10], [10, 11]]
    assert grown.run_tokens == first.tokens + grown.tokens == sum(len(tok(t)["input_ids"]) for t in more)


@pytest.mark.parametrize(
    ("change", "setting", "message"),
    [
        ({"batch_size": 4}, "batch_size", "captured with batch_size 3 and this capture has batch_size 4"),
        ({"layers": ["transformer.h.1"]}, "layers", "with layers ['transformer.h.0'] and this capture has layers"),
        ({"dtype": torch.bfloat16}, "dtype", "with dtype 'float32' and this capture has dtype 'bfloat16'"),
        ({"max_length": 4}, "max_length", "with max_length None and this capture has max_length 4"),
        ({"pad_token": "the"}, "pad_token", "with pad token '<|endoftext|>' and this capture has pad token 'the'"),
        ({"texts": ["a different", "corpus"]}, "corpus", "consumed 5 texts of its corpus"),
        ({"texts": ["x", *corpus(6)[1:]]}, "corpus", "was captured from another corpus"),
    ],
)
def test_a_mismatched_resume_is_refused_before_anything_is_written(
    change: dict[str, Any], setting: str, message: str
) -> None:
    model, tok, store = tiny_gpt2(), gpt2_tokenizer(), MemoryStore()
    args: dict[str, Any] = {"texts": corpus(5), "batch_size": 3, "progress": False}
    capture_corpus(model, tok, store, "r", ["transformer.h.0"], **args)
    layers = change.pop("layers", ["transformer.h.0"])
    before = json.dumps(store.get_run_metadata("r"), sort_keys=True)
    with pytest.raises(CaptureSetupError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        capture_corpus(model, tok, store, "r", layers, **{**args, **change})
    assert e.value.setting == setting
    assert json.dumps(store.get_run_metadata("r"), sort_keys=True) == before and store.list_run_batches("r") == [0, 1]


def test_packed_capture_in_two_sessions_equals_one_and_keeps_a_budget() -> None:
    model, tok = tiny_llama(), llama_tokenizer()
    texts = corpus(30)
    one = MemoryStore()
    full = capture_corpus(model, tok, one, "r", ["model.layers.1"], texts, batch_size=2, context_size=8, progress=False)
    assert full.left_over_tokens < 8 and full.tokens == 8 * sum(i.shape[0] for i in stored_ids(one, "r"))
    two = MemoryStore()
    capture_corpus(model, tok, two, "r", ["model.layers.1"], texts[:13], batch_size=2, context_size=8, progress=False)
    rest = capture_corpus(model, tok, two, "r", ["model.layers.1"], texts, batch_size=2, context_size=8, progress=False)
    assert rest.run_tokens == full.tokens and rest.position == full.position
    a = torch.cat(stored_ids(one, "r"))
    b = torch.cat(stored_ids(two, "r"))
    assert torch.equal(a, b) and bool((a[:, 0] == tok.bos_token_id).all())
    expected = list(pack_tokens([tok(t, add_special_tokens=False)["input_ids"] for t in texts], 8,
                                bos_token_id=tok.bos_token_id, separator_token_id=tok.bos_token_id))  # fmt: skip
    assert a.tolist() == expected
    mask = two.get_detector_metadata_by_layer_by_key("r", 0, "attention_masks", "attention_mask")
    assert bool((mask == 1).all()) and tuple(mask.shape) == (2, 8)
    # A token budget: whole contexts, never more than max_tokens in the run (across sessions).
    budget = MemoryStore()
    r1 = capture_corpus(model, tok, budget, "b", ["model.layers.1"], texts, batch_size=2, context_size=8,
                        max_tokens=44, progress=False)  # fmt: skip
    assert (r1.tokens, r1.stopped_by_budget, r1.batches) == (40, True, 3)
    r2 = capture_corpus(model, tok, budget, "b", ["model.layers.1"], texts, batch_size=2, context_size=8,
                        max_tokens=64, progress=False)  # fmt: skip
    assert (r2.tokens, r2.run_tokens) == (24, 64)
    assert torch.equal(torch.cat(stored_ids(budget, "b")), a[:8])


def test_several_processes_refuse_texts_appended_after_a_partial_last_batch() -> None:
    model, tok, store = tiny_gpt2(), gpt2_tokenizer(), MemoryStore()
    texts = corpus(7)
    for rank in (0, 1):
        capture_corpus(model, tok, store, "r", ["transformer.h.0"], texts, batch_size=3, rank=rank, world_size=2,
                       progress=False)  # fmt: skip
    assert store.list_run_batches("r") == [0, 1, 2]
    assert store.get_detector_metadata("r", 2)[0]["corpus"]["texts"] == [6, 7]
    with pytest.raises(CaptureSetupError, match="texts were appended since: with world_size 2 batches are laid out"):
        capture_corpus(model, tok, store, "r", ["transformer.h.0"], [*texts, "a dog"], batch_size=3, rank=1,
                       world_size=2, progress=False)  # fmt: skip


def test_a_failed_start_leaves_no_run_and_a_retry_with_other_settings_works() -> None:
    model, tok, store = tiny_gpt2(), gpt2_tokenizer(), MemoryStore()
    long = [" ".join(["the"] * 80)]  # 80 tokens: past the model's 64 positions
    with pytest.raises(CaptureSetupError, match=r"layer 'h.1' is not a module of GPT2LMHeadModel; did you mean"):
        capture_corpus(model, tok, store, "r", ["h.1"], long, progress=False)
    assert store.list_runs() == []
    with pytest.raises(IndexError):
        capture_corpus(model, tok, store, "r", ["transformer.h.1"], long, batch_size=2, progress=False)
    assert store.list_runs() == []
    ok = capture_corpus(model, tok, store, "r", ["transformer.h.1"], long, batch_size=1, max_length=16,
                        progress=False)  # fmt: skip
    assert (ok.batches, ok.tokens) == (1, 16)


def test_mask_of_reads_the_inputs_pseudo_layer_or_a_layers_own_mask() -> None:
    from mi_crow.store.corpus import mask_of

    store = MemoryStore()
    mask = torch.tensor([[1, 1, 0]])
    acts = {"activations": torch.zeros(1, 3, 4)}
    store.put_detector_metadata("new", 0, {}, {"attention_masks": {"attention_mask": mask}, "l": acts})
    store.put_detector_metadata("old", 0, {}, {"l": {**acts, "attention_mask": mask}})  # a mask per layer, as before
    store.put_detector_metadata("none", 0, {}, {"l": acts})
    assert torch.equal(mask_of(store, "new", 0, "l"), mask) and torch.equal(mask_of(store, "old", 0, "l"), mask)
    assert mask_of(store, "none", 0, "l") is None


def test_a_run_captured_without_a_corpus_record_is_not_resumed() -> None:
    from mi_crow.store import ActivationCapture

    model, tok, store = tiny_gpt2(), gpt2_tokenizer(), MemoryStore()
    with ActivationCapture(model, store, "r", ["transformer.h.0"]) as cap:
        cap.run(**tok(["the cat"], return_tensors="pt"))
    with pytest.raises(CaptureSetupError, match="holds 1 batch\\(es\\) with no record of the corpus") as e:
        capture_corpus(model, tok, store, "r", ["transformer.h.0"], ["the cat"], progress=False)
    assert e.value.setting == "corpus" and store.list_run_batches("r") == [0]
