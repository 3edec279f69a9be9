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
