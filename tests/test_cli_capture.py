"""``mi-crow-store capture``: the command line's capture of a Hugging Face model over a corpus.

A few real subprocess runs (as a user runs the command); the option checks and resumes
in-process with click's CliRunner, on the same tiny models saved to disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

from hf_models import save_tiny_bert, save_tiny_gpt2, save_tiny_llama
from mi_crow.store import LocalStore
from mi_crow.store.cli import main
from mi_crow.store.corpus import pack_tokens
from mi_crow.store.object_store import ObjectStore

transformers = pytest.importorskip("transformers")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
CAT = ["the cat sat on the mat", "a dog", "the", "1 2 3 4 5", "the dog sat", "a cat on a mat", "7"]


def cli(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mi_crow.store", "capture", *map(str, args)],
                          capture_output=True, text=True, env=ENV, check=False)  # fmt: skip


def invoke(*args: Any) -> Result:
    return CliRunner().invoke(main, ["capture", "--quiet", *map(str, args)])


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("gpt2") / "model"
    save_tiny_gpt2(where, head=True)  # a GPT2LMHeadModel checkpoint: its blocks are transformer.h.N
    return where


@pytest.mark.parametrize("target", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_capture_cli_on_a_tiny_model(tmp_path: Path, target: str, request: pytest.FixtureRequest) -> None:
    env = dict(ENV)
    if target == "local":
        where = str(tmp_path / "s")
        store: Any = LocalStore(tmp_path / "s")
    else:  # the endpoint and credentials from the standard AWS_* variables, as on a cluster
        server = request.getfixturevalue("seaweedfs")
        where = f"s3://{server.new_bucket()}/activations"
        env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
        env.update(server.env(), NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        store = ObjectStore(where, config=server.store_config(), client_options=server.client_options())
    save_tiny_bert(tmp_path / "model")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"text number {i}" for i in range(7)) + "\n\n")
    args = [sys.executable, "-m", "mi_crow.store", "capture", "--model", str(tmp_path / "model"),
            "--layers", "encoder.layer.1", "--texts", str(texts), "--run", "cli", "--store", where,
            "--batch-size", "3", "--max-length", "8", "--dtype", "bf16"]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "captured run 'cli': 3 batch(es), 7 text(s), 21 tokens" in proc.stdout
    assert "run 'cli' holds 3 batch(es), 21 tokens; 7 of 7 text(s) consumed" in proc.stdout
    assert "read back encoder.layer.1: 21 token rows of 32 in this session's 3 batch(es)  ok" in proc.stdout
    assert store.list_run_batches("cli") == [0, 1, 2]
    again = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    assert again.returncode == 0, again.stderr
    assert "captured run 'cli': 0 batch(es), 0 text(s), 0 tokens, 0 B written this session" in again.stdout
    assert "(0 tokens/s)" in again.stdout and "holds 3 batch(es), 21 tokens" in again.stdout
    assert store.list_run_batches("cli") == [0, 1, 2]


def test_a_causal_lm_checkpoint_its_layer_names_and_eos_padding(tmp_path: Path, gpt2: Path) -> None:
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(CAT) + "\n")
    store = tmp_path / "s"
    bad = invoke("--model", gpt2, "--layers", "h.1", "--texts", texts, "--run", "r", "--store", store)
    assert bad.exit_code == 2
    assert "layer 'h.1' is not a module of GPT2LMHeadModel; did you mean 'transformer.h.1'?" in bad.output
    assert not (store / "runs").exists()  # nothing written
    ok = cli("--model", gpt2, "--layers", "transformer.h.1", "--texts", texts, "--run", "r", "--store", store,
             "--batch-size", "4")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "note: the tokenizer has no pad token: padding with its EOS token '<|endoftext|>'" in ok.stderr
    s = LocalStore(store)
    meta = s.get_run_metadata("r")
    assert meta["corpus"]["settings"]["model_class"] == "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel"
    assert meta["corpus"]["settings"]["pad_token"] == "<|endoftext|>" and meta["corpus"]["source"] == str(texts)
    mask = s.get_detector_metadata_by_layer_by_key("r", 0, "attention_masks", "attention_mask")
    assert mask.sum(1).tolist() == [6, 2, 1, 5]  # right padding, masked
    n = sum(len(t.split()) for t in CAT)
    assert f"read back transformer.h.1: {n} token rows of 32 in this session's 2 batch(es)  ok" in ok.stdout
    # The base class on request: then its own names.
    base = invoke("--model", gpt2, "--model-class", "GPT2Model", "--layers", "h.1", "--texts", texts, "--run", "b",
                  "--store", store)  # fmt: skip
    assert base.exit_code == 0, base.output
    assert LocalStore(store).get_run_metadata("b")["corpus"]["settings"]["model_class"].endswith(".GPT2Model")
    nope = invoke("--model", gpt2, "--model-class", "GPT2LMHead", "--layers", "h.1", "--texts", texts, "--run", "c",
                  "--store", store)  # fmt: skip
    assert nope.exit_code == 2 and "--model-class 'GPT2LMHead' is not a transformers model class" in nope.output
    assert "GPT2LMHeadModel" in nope.output and "c" not in LocalStore(store).list_runs()


def test_resume_appended_texts_and_mismatches(tmp_path: Path, gpt2: Path) -> None:
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(CAT) + "\n")
    common = ["--model", gpt2, "--texts", texts, "--run", "r", "--store", tmp_path / "s"]
    first = invoke(*common, "--layers", "transformer.h.0", "--batch-size", "3")
    assert first.exit_code == 0, first.output
    store = LocalStore(tmp_path / "s")
    assert store.list_run_batches("r") == [0, 1, 2]
    with texts.open("a") as f:
        f.write("the mat\na dog sat\n")  # after a partial last batch (text 6 alone in batch 2)
    grown = invoke(*common, "--layers", "transformer.h.0", "--batch-size", "3")
    assert grown.exit_code == 0, grown.output
    assert "captured run 'r': 1 batch(es), 2 text(s), 5 tokens" in grown.output
    assert "9 of 9 text(s) consumed" in grown.output
    assert store.get_detector_metadata("r", 3)[0]["corpus"]["texts"] == [7, 9]
    before = json.dumps(store.get_run_metadata("r"), sort_keys=True)
    layers = invoke(*common, "--layers", "transformer.h.1", "--batch-size", "3")
    assert layers.exit_code == 2
    assert (
        "run 'r' was captured with --layers transformer.h.0 and this capture has --layers transformer.h.1: "
        "continue it with the same value, capture into another --run, or pass --overwrite"
    ) in layers.output
    size = invoke(*common, "--layers", "transformer.h.0", "--batch-size", "4")
    assert size.exit_code == 2 and "with --batch-size 3 and this capture has --batch-size 4" in size.output
    other = tmp_path / "other.txt"
    other.write_text("\n".join(reversed(CAT)) + "\n" * 3 + "a\nb\nc\n")
    swapped = invoke(*[other if a == texts else a for a in common], "--layers", "transformer.h.0", "--batch-size", "3")
    assert swapped.exit_code == 2 and "run 'r' was captured from another corpus" in swapped.output
    assert str(texts) in swapped.output
    assert json.dumps(store.get_run_metadata("r"), sort_keys=True) == before
    assert store.list_run_batches("r") == [0, 1, 2, 3]
    over = invoke(*common, "--layers", "transformer.h.1", "--batch-size", "4", "--overwrite")
    assert over.exit_code == 0, over.output
    assert store.get_run_metadata("r")["corpus"]["settings"]["layers"] == ["transformer.h.1"]
    assert store.list_run_batches("r") == [0, 1, 2]


def test_a_failed_start_leaves_no_run_behind(tmp_path: Path, gpt2: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    bare = tmp_path / "bare"  # the model with a tokenizer that has neither a pad nor an EOS token
    transformers.GPT2LMHeadModel.from_pretrained(gpt2).save_pretrained(bare)
    raw = Tokenizer(models.WordLevel({"<unk>": 0, "the": 1, "cat": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(bare)
    texts = tmp_path / "t.txt"
    texts.write_text(" ".join(["the"] * 80) + "\nthe cat\n")  # 80 tokens: past the model's 64 positions
    store = tmp_path / "s"
    nopad = invoke("--model", bare, "--layers", "transformer.h.0", "--texts", texts, "--run", "r", "--store", store)
    assert nopad.exit_code == 2 and "neither a pad token nor an EOS token to pad with" in nopad.output
    assert "--pad-token" in nopad.output and not (store / "runs").exists()
    unknown = invoke("--model", bare, "--layers", "transformer.h.0", "--texts", texts, "--run", "r", "--store", store,
                     "--pad-token", "<pad>")  # fmt: skip
    assert unknown.exit_code == 2 and "pad token '<pad>' is not in the tokenizer's vocabulary" in unknown.output
    crash = invoke("--model", gpt2, "--layers", "transformer.h.0", "--texts", texts, "--run", "r", "--store", store,
                   "--max-length", "100", "--batch-size", "2")  # fmt: skip
    assert crash.exit_code == 1 and isinstance(crash.exception, IndexError)  # the model's own error
    assert LocalStore(store).list_runs() == []
    retry = invoke("--model", gpt2, "--layers", "transformer.h.0", "--texts", texts, "--run", "r", "--store", store,
                   "--max-length", "16", "--batch-size", "1", "--pad-token", "the")  # fmt: skip
    assert retry.exit_code == 0, retry.output
    assert "captured run 'r': 2 batch(es), 2 text(s), 18 tokens" in retry.output
    both = invoke("--model", gpt2, "--layers", "transformer.h.0", "--texts", texts, "--dataset", texts, "--run", "x",
                  "--store", store)  # fmt: skip
    assert both.exit_code == 2 and "one of --texts FILE or --dataset PATH" in both.output


def test_dataset_packed_into_contexts_with_resume(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    save_tiny_llama(tmp_path / "llama")
    rows = [f"the cat sat on mat number {i} " + "a dog " * (i % 4) for i in range(12)]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"body": rows[:8]}), "test": datasets.Dataset.from_dict({"body": ["x"]})}
    ).save_to_disk(str(tmp_path / "ds"))
    store = tmp_path / "s"
    common = ["--model", tmp_path / "llama", "--layers", "model.layers.1", "--dataset", tmp_path / "ds", "--column",
              "body", "--run", "p", "--store", store, "--context-size", "16", "--batch-size", "2"]  # fmt: skip
    nosplit = invoke(*common)
    assert nosplit.exit_code == 2 and "has splits ['test', 'train']: pick one with split=" in nosplit.output
    proc = cli(*common, "--split", "train")
    assert proc.returncode == 0, proc.stderr
    assert "note:" not in proc.stderr  # packed contexts need no pad token
    s = LocalStore(store)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "llama")
    ids = torch.cat([s.get_detector_metadata_by_layer_by_key("p", b, "attention_masks", "input_ids")
                     for b in s.list_run_batches("p")])  # fmt: skip
    expected = list(pack_tokens([tok(r, add_special_tokens=False)["input_ids"] for r in rows[:8]], 16,
                                bos_token_id=tok.bos_token_id, separator_token_id=tok.bos_token_id))  # fmt: skip
    assert ids.tolist() == expected and ids.shape[1] == 16
    tokens = ids.numel()
    assert f"read back model.layers.1: {tokens} token rows of 32 in this session's" in proc.stdout
    assert "token(s) after the last full context of 16 were not captured" in proc.stdout
    # More rows in the dataset: the next run continues the packing where it stopped, as one run would.
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": rows})}).save_to_disk(str(tmp_path / "ds2"))
    more = invoke(*[tmp_path / "ds2" if a == tmp_path / "ds" else a for a in common])
    assert more.exit_code == 0, more.output
    ids = torch.cat([s.get_detector_metadata_by_layer_by_key("p", b, "attention_masks", "input_ids")
                     for b in s.list_run_batches("p")])  # fmt: skip
    seqs = [tok(r, add_special_tokens=False)["input_ids"] for r in rows]
    bos = tok.bos_token_id
    assert ids.tolist() == list(pack_tokens(seqs, 16, bos_token_id=bos, separator_token_id=bos))
    mask = s.get_detector_metadata_by_layer_by_key("p", 0, "attention_masks", "attention_mask")
    assert bool((mask == 1).all())
    budget = invoke(*common[:-6], "--run", "q", "--store", store, "--context-size", "16", "--batch-size", "2",
                    "--max-tokens", "40", "--split", "train")  # fmt: skip
    assert budget.exit_code == 0, budget.output
    assert "captured run 'q': 1 batch(es)" in budget.output and "32 tokens" in budget.output
    assert "stopped at the token budget --max-tokens 40" in budget.output


def test_inputs_and_element(tmp_path: Path, gpt2: Path) -> None:
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(CAT[:3]) + "\n")
    store = LocalStore(tmp_path / "s")
    common = ["--texts", texts, "--store", tmp_path / "s", "--model", gpt2]
    assert invoke(*common, "--run", "out", "--layers", "transformer.h.0").exit_code == 0
    inp = invoke(*common, "--run", "in", "--layers", "transformer.h.1", "--inputs")
    assert inp.exit_code == 0, inp.output
    out0 = store.get_detector_metadata_by_layer_by_key("out", 0, "transformer.h.0", "activations")
    in1 = store.get_detector_metadata_by_layer_by_key("in", 0, "transformer.h.1", "activations")
    assert torch.equal(out0, in1)  # block 1's input is block 0's output
    assert store.get_run_metadata("in")["corpus"]["settings"]["inputs"] is True
    el = invoke(*common, "--run", "attn", "--layers", "transformer.h.0.attn", "--element", "0")
    assert el.exit_code == 0, el.output
    assert store.get_run_metadata("attn")["corpus"]["settings"]["element"] == 0
    resumed = invoke(*common, "--run", "attn", "--layers", "transformer.h.0.attn")
    assert resumed.exit_code == 2 and "with --element 0 and this capture has --element (none)" in resumed.output


def test_capture_into_an_unsupported_url_is_refused(tmp_path: Path) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mi_crow.store", "capture", "--model", str(tmp_path / "no-model"), "--layers", "a",
         "--texts", str(texts), "--run", "r", "--store", "gs://bucket/x"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "no store serves the URL scheme 'gs'" in proc.stderr
