"""A tiny Hugging Face model and tokenizer built offline from a config, for the CLI's tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def tiny_bert(layers: int = 3) -> Any:
    """A ``BertModel`` with random (seeded) weights: 32 wide, ``layers`` layers, 99 tokens."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def save_tiny_bert(where: Path, *, layers: int = 3, digits: int = 7) -> None:
    """:func:`tiny_bert` saved to ``where`` with a word-level tokenizer of "text", "number" and
    the digits ``0 .. digits - 1`` (what the tests' texts ``text number {i}`` hold)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_bert(layers).save_pretrained(where)
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(["text", "number", *map(str, range(digits))])}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(where)


# A word-level vocabulary for the decoder models: a few words and the digits, so any test text
# built from them tokenizes without unknowns. No pad token: like GPT-2's and Llama's tokenizers.
WORDS = ["the", "cat", "sat", "on", "mat", "text", "number", "a", "dog", *map(str, range(10))]


def _word_tokenizer(*, bos: str | None, eos: str, pad: str | None = None) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over :data:`WORDS`; ``bos``/``eos``/``pad`` are
    special tokens 0.. (``pad=None``: the tokenizer has no pad token, as GPT-2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (eos, bos, pad, "<unk>") if t is not None]
    specials = list(dict.fromkeys(specials))
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({w: len(specials) + i for i, w in enumerate(WORDS)})
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs: dict[str, Any] = {"eos_token": eos, "unk_token": "<unk>"}
    if bos is not None:
        kwargs["bos_token"] = bos
    if pad is not None:
        kwargs["pad_token"] = pad
    return PreTrainedTokenizerFast(tokenizer_object=raw, **kwargs)


def tiny_gpt2(layers: int = 2, *, head: bool = True) -> Any:
    """A ``GPT2LMHeadModel`` (``head=False``: ``GPT2Model``) with seeded random weights: 32 wide,
    ``layers`` blocks, the vocabulary of :func:`gpt2_tokenizer`."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=len(WORDS) + 2,
        n_positions=64,
        n_embd=32,
        n_layer=layers,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    cls = transformers.GPT2LMHeadModel if head else transformers.GPT2Model
    return cls(config).eval()


def gpt2_tokenizer() -> Any:
    """GPT-2's kind of tokenizer: ``<|endoftext|>`` is BOS and EOS, and there is no pad token."""
    return _word_tokenizer(bos="<|endoftext|>", eos="<|endoftext|>")


def save_tiny_gpt2(where: Path, *, layers: int = 2, head: bool = True) -> None:
    """:func:`tiny_gpt2` and :func:`gpt2_tokenizer` saved to ``where`` (``from_pretrained`` reads it)."""
    tiny_gpt2(layers, head=head).save_pretrained(where)
    gpt2_tokenizer().save_pretrained(where)


def tiny_llama(layers: int = 2) -> Any:
    """A ``LlamaForCausalLM`` with seeded random weights: 32 wide, ``layers`` layers, the
    vocabulary of :func:`llama_tokenizer`."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(WORDS) + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def llama_tokenizer() -> Any:
    """Llama's kind of tokenizer: ``<s>`` BOS, ``</s>`` EOS, no pad token."""
    return _word_tokenizer(bos="<s>", eos="</s>")


def save_tiny_llama(where: Path, *, layers: int = 2) -> None:
    """:func:`tiny_llama` and :func:`llama_tokenizer` saved to ``where``."""
    tiny_llama(layers).save_pretrained(where)
    llama_tokenizer().save_pretrained(where)
