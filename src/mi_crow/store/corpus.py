"""Corpus input for capture: texts from files and datasets, packing into contexts, and one call
that captures a model's activations over a corpus into a run that resumes safely.

Texts come from a plain text file (one text per line), a JSONL file (one JSON object per line,
the text in ``column``) or a Hugging Face dataset saved with ``save_to_disk``
(:func:`read_texts`). Empty and whitespace-only texts are skipped everywhere, so positions count
the texts that remain.

Two ways to turn texts into batches (:func:`capture_corpus`):

* **One text per row** (``context_size=None``): each batch is ``batch_size`` texts, tokenized
  with the tokenizer's special tokens, truncated to ``max_length`` tokens when given, padded on
  the tokenizer's ``padding_side`` with its pad token, or its EOS token when it has none (the
  usual choice for GPT-2 and Llama tokenizers; ``pad_token=`` picks another). The attention
  mask marks the padding.
* **Packed contexts** (``context_size=N``), as SAELens's ``ActivationsStore`` makes them with its
  defaults (``prepend_bos=True``, ``sequence_separator_token="bos"``; the same algorithm as its
  ``concat_and_batch_sequences``): the texts are tokenized without special tokens and
  concatenated; every context of ``N`` tokens begins with BOS, and a BOS separates two texts
  inside a context (neither is added where the token there already is BOS). A tokenizer without
  BOS gives plain concatenation. Contexts hold no padding (their mask, all ones, is stored as
  every batch's); the tokens of a last, partial context are not captured (SAELens drops them
  too) until more texts follow.

What a run consumed is recorded, so a resume never mixes corpora or settings:

* each batch's metadata holds ``corpus = {"texts": [start, stop], "token_offsets": [a, b],
  "sha256": ...}``: the batch begins at token ``a`` of text ``start`` and ends before token
  ``b`` of text ``stop`` (``b == 0``: at the start of that text; always so for one text per row),
  and the SHA-256 of the texts it touched;
* the run's metadata holds ``corpus = {"source", "texts", "sha256", "position", "settings"}``:
  the SHA-256 of the first ``texts`` texts consumed, where the next batch starts, and the
  settings (layers, model and its class, dtype, batch size, max length or context size, BOS,
  padding side and pad token, element, inputs).

A resume checks them all before anything is written: a different corpus (the consumed texts
hash differently), or any other setting, is refused with :class:`CaptureSetupError` naming the
setting, the recorded value and the new one. Texts appended to the corpus are captured by the
next run, from where the last batch stopped, also after a partial last batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import inspect
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from mi_crow.store import _keys
from mi_crow.store._progress import progress_bar
from mi_crow.store.store import Store

CORPUS_FIELD = "corpus"  # in the run's metadata and in each batch's


class CaptureSetupError(ValueError):
    """A capture that cannot start as asked: a bad setting, or a resume that does not match what
    the run recorded. Nothing was written when it is raised.

    Attributes:
        setting: For a mismatched resume, the setting's name (``"batch_size"``, ``"layers"``,
            ``"corpus"``...); else ``None``.
        recorded: The value the run recorded for it.
        new: The value of this capture.
    """

    def __init__(self, message: str, *, setting: str | None = None, recorded: Any = None, new: Any = None):
        super().__init__(message)
        self.setting = setting
        self.recorded = recorded
        self.new = new


# ---------------------------------------------------------------------------------------------- texts


def read_texts(path: str | Path, *, column: str = "text", split: str | None = None) -> list[str]:
    """The texts of a corpus on disk, empty and whitespace-only ones skipped.

    Args:
        path: A folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a
            ``DatasetDict`` with ``split``), a ``.jsonl`` file (one JSON object per line), or any
            other file: plain text, one text per line (:func:`text_lines`).
        column: The text column of a dataset or the field of each JSONL object.
        split: The split of a ``DatasetDict`` (optional when it has only one).

    Returns:
        The texts, in order.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If a JSONL line is not a JSON object with a string ``column`` (the line is
            named), the dataset has no such column or split (those it has are listed), or a
            ``split`` is given for a plain file.
        ImportError: For a dataset folder without the ``datasets`` package (the ``corpus`` extra).

    Examples:
        >>> import pathlib, tempfile
        >>> from mi_crow.store.corpus import read_texts
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "c.jsonl").write_text('{"text": "the cat"}\\n\\n{"text": "sat", "id": 2}\\n')
        >>> read_texts(d / "c.jsonl")
        ['the cat', 'sat']
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {str(path)!r} does not exist")
    if path.is_dir():
        return _dataset_texts(path, column, split)
    if split is not None:
        raise ValueError(f"split={split!r} applies to a dataset saved with save_to_disk; {str(path)!r} is a file")
    if path.suffix == ".jsonl":
        return _jsonl_texts(path, column)
    return text_lines(path)


def text_lines(path: str | Path) -> list[str]:
    """The texts of a plain text file: one a line, stripped of surrounding white space, blank
    lines skipped (what ``mi-crow-store capture --texts`` reads)."""
    return [line.strip() for line in Path(path).read_text("utf-8").splitlines() if line.strip()]


def _jsonl_texts(path: Path, column: str) -> list[str]:
    texts: list[str] = []
    with path.open("r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON: {e}") from None
            if not isinstance(row, dict) or column not in row:
                fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path}:{n} has no field {column!r} (it has {fields}); pick one with column=")
            value = row[column]
            if not isinstance(value, str):
                raise ValueError(f"{path}:{n}: field {column!r} is {type(value).__name__}, not a string")
            if value.strip():
                texts.append(value)
    return texts


def _dataset_texts(path: Path, column: str, split: str | None) -> list[str]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - the corpus extra is not installed
        raise ImportError(f"{e}; reading a saved dataset needs: pip install 'mi-crow-store[corpus]'") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = sorted(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            what = "has splits" if split is None else f"has no split {split!r}; it has"
            raise ValueError(f"dataset {str(path)!r} {what} {splits}: pick one with split=")
        loaded = loaded[split]
    elif split is not None:
        raise ValueError(f"dataset {str(path)!r} is a single Dataset, not a DatasetDict: it has no split {split!r}")
    if column not in loaded.column_names:
        raise ValueError(f"dataset {str(path)!r} has no column {column!r}; it has {loaded.column_names}")
    texts: list[str] = []
    for n, value in enumerate(loaded[column]):
        if not isinstance(value, str):
            raise ValueError(
                f"dataset {str(path)!r} row {n}: column {column!r} is {type(value).__name__}, not a string"
            )
        if value.strip():
            texts.append(value)
    return texts


def texts_sha256(texts: Iterable[str]) -> str:
    """The SHA-256 of a sequence of texts (each one's UTF-8 length, then its bytes): the
    identity of what a run consumed.

    Examples:
        >>> from mi_crow.store.corpus import texts_sha256
        >>> texts_sha256(["ab", "c"]) == texts_sha256(["a", "bc"])
        False
    """
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- packing


Position = tuple[int, int]  # (text index, token offset in it)


class Context(NamedTuple):
    """One packed context: its token ids, and where it starts and stops in the texts
    (``(text, token offset)``; ``stop`` is where the next context begins)."""

    tokens: list[int]
    start: Position
    stop: Position


def _pack(
    sequences: Iterable[tuple[int, Sequence[int]]],
    context_size: int,
    bos: int | None,
    separator: int | None,
    first_offset: int = 0,
) -> Iterator[Context]:
    """SAELens's ``concat_and_batch_sequences`` (``begin_batch_token_id=bos``, no begin-sequence
    token, ``sequence_separator_token_id=separator``), with each context's position.

    The state between two contexts is only the position of the next token, so packing from a
    context's ``stop`` gives the contexts that would have followed it."""
    batch: list[int] | None = None
    start: Position = (0, 0)
    first = True
    for index, toks in sequences:
        offset = first_offset if first else 0
        first = False
        while len(toks) - offset > 0:
            first_token = toks[offset]
            if batch is None:
                start = (index, offset)
                prefix = [bos] if bos is not None and first_token != bos else []
                need = max(context_size - len(prefix), 0)
                batch = prefix[:context_size] + list(toks[offset : offset + need])
            else:
                prefix = [separator] if separator is not None and first_token != separator else []
                need = max(context_size - len(batch) - len(prefix), 0)
                batch += prefix[: max(context_size - len(batch), 0)] + list(toks[offset : offset + need])
            offset += need
            if len(batch) == context_size:
                stop = (index + 1, 0) if offset >= len(toks) else (index, offset)
                yield Context(batch, start, stop)
                batch = None


def pack_tokens(
    sequences: Iterable[Sequence[int]],
    context_size: int,
    *,
    bos_token_id: int | None = None,
    separator_token_id: int | None = None,
) -> Iterator[list[int]]:
    """Concatenate token sequences and cut them into contexts of ``context_size`` tokens, as
    SAELens does (``concat_and_batch_sequences``): each context begins with ``bos_token_id`` and
    ``separator_token_id`` goes between two sequences inside a context (where given, and where
    the token there is not already that one). A last, partial context is not yielded.

    Args:
        sequences: Token ids of each text, without special tokens.
        context_size: Tokens per context (at least 2 with a BOS token).
        bos_token_id: The token each context begins with (SAELens's ``prepend_bos``).
        separator_token_id: The token between two texts (SAELens's default is BOS).

    Raises:
        ValueError: If ``context_size`` is too small.

    Examples:
        >>> from mi_crow.store.corpus import pack_tokens
        >>> list(pack_tokens([[5, 6, 7], [8, 9]], 4, bos_token_id=0, separator_token_id=0))
        [[0, 5, 6, 7]]
        >>> list(pack_tokens([[5, 6, 7], [8, 9], [10]], 3, bos_token_id=0, separator_token_id=0))
        [[0, 5, 6], [0, 7, 0], [0, 8, 9]]
    """
    _check_context_size(context_size, bos_token_id)
    for context in _pack(enumerate(sequences), context_size, bos_token_id, separator_token_id):
        yield context.tokens


def _check_context_size(context_size: Any, bos: int | None) -> int:
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
        raise CaptureSetupError(f"context_size must be an int >= 1, got {context_size!r}")
    if bos is not None and context_size < 2:
        raise CaptureSetupError(f"context_size must be >= 2 when each context begins with BOS, got {context_size}")
    return context_size


def _token_lists(tokenizer: Any, texts: Sequence[str], start: int, chunk: int = 256) -> Iterator[tuple[int, list[int]]]:
    """``(index, token ids without special tokens)`` of ``texts[start:]``, tokenized in chunks."""
    for lo in range(start, len(texts), chunk):
        ids = tokenizer(list(texts[lo : lo + chunk]), add_special_tokens=False, verbose=False)["input_ids"]
        yield from enumerate(ids, lo)


def contexts(
    tokenizer: Any,
    texts: Sequence[str],
    context_size: int,
    *,
    prepend_bos: bool = True,
    start: Position = (0, 0),
) -> Iterator[Context]:
    """Packed contexts of ``texts``, as :func:`pack_tokens` makes them from the tokenizer's
    tokens: BOS (``tokenizer.bos_token_id``, when it has one and ``prepend_bos``) begins each
    context and separates texts. Each :class:`Context` says where it starts and stops.

    Args:
        tokenizer: A Hugging Face tokenizer (called with ``add_special_tokens=False``).
        texts: The texts.
        context_size: Tokens per context.
        prepend_bos: Begin each context with BOS and separate texts by it.
        start: Pack from this ``(text, token offset)`` (a context's ``stop``): what follows it.

    Examples:
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import PreTrainedTokenizerFast
        >>> from mi_crow.store.corpus import contexts
        >>> raw = Tokenizer(models.WordLevel({"<s>": 0, "a": 1, "b": 2, "<unk>": 3}, unk_token="<unk>"))
        >>> raw.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", unk_token="<unk>")
        >>> [(c.tokens, c.stop) for c in contexts(tok, ["a b a", "b b"], 3)]
        [([0, 1, 2], (0, 2)), ([0, 1, 0], (1, 0)), ([0, 2, 2], (2, 0))]
    """
    bos = tokenizer.bos_token_id if prepend_bos else None
    _check_context_size(context_size, bos)
    yield from _pack(_token_lists(tokenizer, texts, start[0]), context_size, bos, bos, first_offset=start[1])


# ---------------------------------------------------------------------------------------------- padding


def padding_token(tokenizer: Any, pad_token: str | None = None) -> tuple[str, int, str | None]:
    """The token a capture pads with: ``pad_token`` when given (it must be in the vocabulary),
    else the tokenizer's pad token, else its EOS token (GPT-2's and Llama's tokenizers have no
    pad token; the attention mask marks the padding, so which token pads does not change the
    activations of the real tokens of a causal model).

    Returns:
        ``(token, id, note)``: ``note`` says when EOS was chosen, else ``None``.

    Raises:
        CaptureSetupError: If ``pad_token`` is not in the vocabulary, or there is neither a pad
            nor an EOS token.
    """
    if pad_token is not None:
        vocab = tokenizer.get_vocab()
        if pad_token not in vocab:
            near = difflib.get_close_matches(pad_token, [t for t in vocab if isinstance(t, str)], n=3, cutoff=0.6)
            hint = f"; similar tokens: {near}" if near else ""
            raise CaptureSetupError(f"pad token {pad_token!r} is not in the tokenizer's vocabulary{hint}")
        return pad_token, int(vocab[pad_token]), None
    if tokenizer.pad_token is not None:
        return str(tokenizer.pad_token), int(tokenizer.pad_token_id), None
    if tokenizer.eos_token is not None:
        note = (
            f"the tokenizer has no pad token: padding with its EOS token {tokenizer.eos_token!r} "
            "(masked out; pick another with pad_token= / --pad-token)"
        )
        return str(tokenizer.eos_token), int(tokenizer.eos_token_id), note
    raise CaptureSetupError(
        "the tokenizer has neither a pad token nor an EOS token to pad with: name one of its tokens with "
        "pad_token= (--pad-token), or pack the texts into contexts (context_size= / --context-size), which need "
        "no padding"
    )


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        lo = width - len(row) if side == "left" else 0
        ids[i, lo : lo + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, lo : lo + len(row)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------- layers


def suggest_layers(name: str, names: Iterable[str]) -> list[str]:
    """Module names close to ``name``: the same name under a prefix (``h.1`` -> ``transformer.h.1``)
    or without one (``transformer.h.1`` -> ``h.1``), then near spellings."""
    from mi_crow.store import capture

    core = getattr(capture, "suggest_layers", None)
    if core is not None:
        return list(core(name, list(names)))
    names = [n for n in names if n]
    prefixed = [n for n in names if n.endswith("." + name)]
    stripped = [n for n in names if name.endswith("." + n)]
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    return list(dict.fromkeys([*sorted(prefixed, key=len), *sorted(stripped, key=len, reverse=True), *near]))[:5]


def check_layers(model: nn.Module, layers: Sequence[str]) -> None:
    """Raise :class:`CaptureSetupError` for a layer that is not a module of ``model``, with the
    names it may have meant."""
    names = [n for n, _ in model.named_modules()]
    known = set(names)
    for layer in layers:
        if not layer or layer not in known:
            near = suggest_layers(layer, names)
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise CaptureSetupError(f"layer {layer!r} is not a module of {type(model).__name__}{hint}")


# ---------------------------------------------------------------------------------------------- capture


@dataclasses.dataclass(frozen=True)
class CorpusReport:
    """What :func:`capture_corpus` did (this session) and what the run holds now (totals).

    Attributes:
        run_id: The run.
        batches: Batches stored this session.
        texts: Texts consumed this session (a text split across two contexts counts where it ends).
        tokens: Tokens captured this session (non-padding).
        bytes: Bytes of tensors written this session.
        seconds: Wall time of the session's capture loop.
        run_batches: Batches in the run (of this rank, with several processes).
        run_tokens: Tokens in the run (of this rank, with several processes).
        position: ``(text, token offset)`` where the next batch starts (one process).
        texts_total: Texts in the corpus given.
        left_over_tokens: Packed mode: tokens after the last full context, not captured.
        stopped_by_budget: Whether ``max_tokens`` ended the capture before the corpus did.
        batch_indices: The indices of the batches stored this session.
        notes: What the caller should be told (e.g. padding with EOS).
    """

    run_id: str
    batches: int
    texts: int
    tokens: int
    bytes: int
    seconds: float
    run_batches: int
    run_tokens: int
    position: Position
    texts_total: int
    left_over_tokens: int = 0
    stopped_by_budget: bool = False
    batch_indices: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def tokens_per_second(self) -> float:
        """This session's tokens per second (0 when nothing was captured)."""
        return self.tokens / self.seconds if self.tokens and self.seconds > 0 else 0.0


class _Batch(NamedTuple):
    batch: int
    inputs: dict[str, torch.Tensor]
    start: Position
    stop: Position
    tokens: int


def capture_corpus(
    model: nn.Module,
    tokenizer: Any,
    store: Store,
    run_id: str,
    layers: str | Sequence[str],
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    context_size: int | None = None,
    max_tokens: int | None = None,
    prepend_bos: bool = True,
    pad_token: str | None = None,
    dtype: torch.dtype | None = None,
    inputs: bool = False,
    element: int | str | None = None,
    source: str | None = None,
    overwrite: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool | None = None,
) -> CorpusReport:
    """Run ``model`` over ``texts`` and store the activations of ``layers`` in run ``run_id``,
    continuing the run where it stopped (see the module's description for what is recorded and
    checked).

    Args:
        model: A Hugging Face model (or any module called as ``model(input_ids=...,
            attention_mask=...)``); its device is where the inputs go.
        tokenizer: Its tokenizer.
        store: Where the run goes.
        run_id: The run; an existing run is continued after its last batch.
        layers: Module names of ``model`` (``model.named_modules()``).
        texts: The corpus (e.g. :func:`read_texts`).
        batch_size: Texts (or contexts) per batch.
        max_length: One text per row: truncate each to this many tokens (``None``: no truncation).
        context_size: Pack the texts into contexts of this many tokens instead.
        max_tokens: Stop once the run holds this many tokens (whole texts or contexts; never more).
        prepend_bos: Packed mode: begin contexts with BOS and separate texts by it.
        pad_token: One text per row: the token to pad with (default: the pad token, else EOS).
        dtype: Store activations in this dtype (default: the model's).
        inputs: Capture each module's input instead of its output.
        element: Which element of a module's tuple (an int) or mapping (a str) output to capture
            (``ActivationCapture``'s ``element=``; default: the first tensor).
        source: A name for the corpus (its path), recorded for people reading the metadata.
        overwrite: Delete the run first (after every check passed) instead of continuing it.
        rank: This process's rank among ``world_size`` processes capturing into the run; batch
            ``g`` (texts or contexts ``g * batch_size ...``) belongs to rank ``g % world_size``.
        world_size: How many processes capture into the run. With more than one, the batches
            are laid out by position in the corpus, so texts appended after a partial last
            batch cannot be added (refused); after a full one they can.
        progress: Show a progress bar (default: unless quiet mode).

    Returns:
        A :class:`CorpusReport`.

    Raises:
        CaptureSetupError: A bad setting, an unknown layer, no way to pad, or a resume that does
            not match the run; raised before anything is written.

    If the capture fails and this call created the run and it holds no batch, the run is
    removed, so a retry with other settings starts afresh.

    Examples:
        >>> import transformers
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from mi_crow.store import MemoryStore
        >>> from mi_crow.store.corpus import capture_corpus
        >>> vocab = {"<eos>": 0, "<unk>": 1, "the": 2, "cat": 3, "sat": 4}
        >>> raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        >>> raw.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<eos>", eos_token="<eos>")
        >>> config = transformers.GPT2Config(vocab_size=5, n_positions=16, n_embd=8, n_layer=2, n_head=2,
        ...                                  bos_token_id=0, eos_token_id=0)
        >>> model = transformers.GPT2LMHeadModel(config).eval()
        >>> store = MemoryStore()
        >>> texts = ["the cat sat", "the cat", "sat on the cat"]
        >>> report = capture_corpus(model, tok, store, "r", ["transformer.h.1"], texts,
        ...                         batch_size=2, context_size=4, progress=False)
        >>> report.batches, report.tokens, report.left_over_tokens  # 3 contexts of 4; 1 token left over
        (2, 12, 1)
        >>> capture_corpus(model, tok, store, "r", ["transformer.h.1"], [*texts, "the cat sat"],
        ...                batch_size=2, context_size=4, progress=False).tokens
        4
    """
    from mi_crow.store.capture import ActivationCapture, resolve_rank

    # ---- every check, before anything is written
    try:
        rank, world_size = resolve_rank(rank, world_size)
    except ValueError as e:
        raise CaptureSetupError(str(e)) from None
    layer_list = [layers] if isinstance(layers, str) else list(layers)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CaptureSetupError(f"batch_size must be an int >= 1, got {batch_size!r}")
    for name, value in (("max_length", max_length), ("max_tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CaptureSetupError(f"{name} must be an int >= 1 or None, got {value!r}")
    if context_size is not None and max_length is not None:
        raise CaptureSetupError(
            "max_length applies to one text per row and context_size to packed contexts: give one of them"
        )
    if overwrite and world_size > 1:
        raise CaptureSetupError(
            f"overwrite deletes the run, which the other {world_size - 1} process(es) are writing to; "
            "delete it before starting them, or capture into a new run"
        )
    if max_tokens is not None and world_size > 1:
        raise CaptureSetupError("max_tokens is a budget of the whole run and needs world_size 1 (one process)")
    if not isinstance(texts, Sequence) or isinstance(texts, str):
        raise CaptureSetupError(f"texts must be a sequence of strings, got {type(texts).__name__}")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise CaptureSetupError(f"texts[{bad}] is {type(texts[bad]).__name__}, not a string")
    from mi_crow.store import _interop

    unwrap = getattr(_interop, "unwrap_model", None)  # an nnsight model: the module it runs
    module: nn.Module = unwrap(model) if unwrap is not None else model
    check_layers(module, layer_list)
    packed = context_size is not None
    notes: list[str] = []
    bos: int | None = None
    pad_id = 0
    pad_name: str | None = None
    if packed:
        if pad_token is not None:
            raise CaptureSetupError("pad_token applies to one text per row; packed contexts have no padding")
        bos = tokenizer.bos_token_id if prepend_bos else None
        _check_context_size(context_size, bos)
    else:
        pad_name, pad_id, note = padding_token(tokenizer, pad_token)
        if note:
            notes.append(note)
    element_kw: dict[str, Any] = {}
    if element is not None:
        if "element" not in inspect.signature(ActivationCapture).parameters:
            raise CaptureSetupError("element= needs a capture core that supports it (ActivationCapture(element=))")
        element_kw["element"] = element
    if "progress" in inspect.signature(ActivationCapture).parameters:
        element_kw["progress"] = False  # this function's bar counts texts
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    stored_dtype = dtype if dtype is not None else (param.dtype if param is not None else None)
    config = getattr(module, "config", None)
    settings: dict[str, Any] = {
        "layers": layer_list,
        "model": getattr(config, "_name_or_path", None) or None,
        "model_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "dtype": str(stored_dtype).removeprefix("torch.") if stored_dtype is not None else None,
        "batch_size": batch_size,
        "max_length": max_length,
        "context_size": context_size,
        "bos_token_id": bos,
        "padding_side": None if packed else str(getattr(tokenizer, "padding_side", "right")),
        "pad_token": pad_name,
        "element": element,
        "inputs": bool(inputs),
        "world_size": world_size,
    }
    if overwrite:
        existing: list[int] = []
        prior: dict[str, Any] = {}
    else:
        existing = store.list_run_batches(run_id)
        prior = store.get_run_metadata(run_id)
    run_existed = run_id in store.list_runs()
    position = _check_resume(store, run_id, existing, prior, settings, texts) if existing else (0, 0)
    found = prior.get(CORPUS_FIELD) if existing else None
    record: dict[str, Any] = found if isinstance(found, dict) else {}
    run_tokens = _count_run_tokens(prior) if existing else 0

    # ---- the plan: this session's batches (made lazily: tokenizing is part of the work)
    own_existing = {i for i in existing if i % world_size == rank}
    if world_size == 1:
        next_index = max(existing) + 1 if existing else 0
        batches = _sequential_batches(
            tokenizer, texts, position, next_index, batch_size, max_length, context_size, bos, pad_id,
            settings["padding_side"], None if max_tokens is None else max_tokens - run_tokens,
        )  # fmt: skip
    else:
        batches = _laid_out_batches(
            tokenizer, texts, rank, world_size, own_existing, batch_size, max_length, context_size, bos, pad_id,
            settings["padding_side"],
        )  # fmt: skip
    # Each batch's corpus record goes into its metadata as the capture writes it (cap.annotate).
    try:
        cap = ActivationCapture(
            model, store, run_id, layer_list, dtype=dtype, inputs=inputs,
            rank=rank, world_size=world_size, **element_kw,
        )  # fmt: skip
    except ValueError as e:
        raise CaptureSetupError(str(e)) from None

    # ---- writes from here on
    created = not run_existed or overwrite
    try:
        if overwrite:
            store.delete_run(run_id)
        _write_record(store, run_id, record, settings, source, texts, position if world_size == 1 else None)
        cap.__enter__()
    except BaseException:
        _remove_if_empty(store, run_id, created)
        raise
    start_tokens, start_batches = cap.tokens, cap.batches
    session_texts = 0
    indices: list[int] = []
    last_stop = position
    left_over = 0
    budget_hit = False
    started = time.perf_counter()
    total = len(texts) - position[0] if world_size == 1 else len(texts)
    desc = f"capture {run_id}" + (f" rank {rank}" if world_size > 1 else "")
    try:
        with contextlib.closing(cap), progress_bar(progress, total=total, unit="text", desc=desc) as bar:
            for item in batches:
                if isinstance(item, _End):
                    left_over, budget_hit = item.left_over, item.budget_hit
                    break
                cap.next_batch = item.batch
                rows = int(item.inputs["input_ids"].shape[0])
                cap.annotate(item.batch, {CORPUS_FIELD: _batch_record(texts, item.start, item.stop, rows)})
                cap.run(**{k: v.to(device) for k, v in item.inputs.items()})
                consumed = item.stop[0] - item.start[0]
                session_texts += consumed
                indices.append(item.batch)
                last_stop = item.stop
                bar.update(consumed)
                seconds = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(tokens_s=f"{(cap.tokens - start_tokens) / seconds:,.0f}")
        seconds = time.perf_counter() - started
        consumed_texts = last_stop[0] + (1 if last_stop[1] else 0)
        if world_size > 1:
            consumed_texts = max(consumed_texts, int(record.get("texts", 0) or 0))
        _write_record(store, run_id, record, settings, source, texts, last_stop if world_size == 1 else None,
                      consumed=consumed_texts)  # fmt: skip
    except BaseException:
        _remove_if_empty(store, run_id, created)
        raise
    return CorpusReport(
        run_id=run_id,
        batches=cap.batches - start_batches,
        texts=session_texts,
        tokens=cap.tokens - start_tokens,
        bytes=cap.bytes,
        seconds=seconds,
        run_batches=cap.batches,
        run_tokens=cap.tokens,
        position=last_stop,
        texts_total=len(texts),
        left_over_tokens=left_over,
        stopped_by_budget=budget_hit,
        batch_indices=tuple(indices),
        notes=tuple(notes),
    )


class _End(NamedTuple):
    left_over: int
    budget_hit: bool


def _batch_record(texts: Sequence[str], start: Position, stop: Position, rows: int) -> dict[str, Any]:
    end = stop[0] + (1 if stop[1] else 0)
    return {
        "texts": [start[0], stop[0]],
        "token_offsets": [start[1], stop[1]],
        "rows": rows,
        "sha256": texts_sha256(texts[start[0] : end]),
    }


def _sequential_batches(
    tokenizer: Any,
    texts: Sequence[str],
    position: Position,
    next_index: int,
    batch_size: int,
    max_length: int | None,
    context_size: int | None,
    bos: int | None,
    pad_id: int,
    side: str | None,
    budget: int | None,
) -> Iterator[_Batch | _End]:
    """One process: batch after batch from ``position`` (after a partial last batch too)."""
    index = next_index
    if context_size is not None:
        allowed = None if budget is None else max(budget, 0) // context_size
        group: list[Context] = []
        last_stop = position
        stream = _pack(_token_lists(tokenizer, texts, position[0]), context_size, bos, bos, first_offset=position[1])
        budget_hit = False
        for context in stream:
            if allowed is not None and allowed <= 0:
                budget_hit = True
                break
            group.append(context)
            last_stop = context.stop
            if allowed is not None:
                allowed -= 1
            if len(group) == batch_size:
                yield _contexts_batch(index, group)
                index += 1
                group = []
        if group:
            yield _contexts_batch(index, group)
        yield _End(0, True) if budget_hit else _End(_left_over(tokenizer, texts, last_stop, bos), False)
        return
    lo = position[0]
    remaining = budget
    while lo < len(texts):
        chunk = list(texts[lo : lo + batch_size])
        rows = _encode_rows(tokenizer, chunk, max_length)
        if remaining is not None:
            keep, used = 0, 0
            for row in rows:
                if used + len(row) > remaining:
                    break
                keep, used = keep + 1, used + len(row)
            if keep == 0:
                yield _End(0, True)
                return
            rows = rows[:keep]
            remaining -= used
        ids, mask = _pad(rows, pad_id, side or "right")
        yield _Batch(index, {"input_ids": ids, "attention_mask": mask}, (lo, 0), (lo + len(rows), 0), int(mask.sum()))
        index += 1
        lo += len(rows)
        if remaining is not None and len(rows) < len(chunk):
            yield _End(0, True)
            return
    yield _End(0, False)


def _laid_out_batches(
    tokenizer: Any,
    texts: Sequence[str],
    rank: int,
    world_size: int,
    stored: set[int],
    batch_size: int,
    max_length: int | None,
    context_size: int | None,
    bos: int | None,
    pad_id: int,
    side: str | None,
) -> Iterator[_Batch | _End]:
    """Several processes: batch ``g`` is texts (or contexts) ``g * batch_size ...``; this rank's
    batches not stored yet."""
    if context_size is not None:
        group: list[Context] = []
        g = 0
        last_stop: Position = (0, 0)
        for context in _pack(_token_lists(tokenizer, texts, 0), context_size, bos, bos):
            group.append(context)
            last_stop = context.stop
            if len(group) == batch_size:
                if g % world_size == rank and g not in stored:
                    yield _contexts_batch(g, group)
                g, group = g + 1, []
        if group and g % world_size == rank and g not in stored:
            yield _contexts_batch(g, group)
        yield _End(_left_over(tokenizer, texts, last_stop, bos), False)
        return
    for g in range(rank, -(-len(texts) // batch_size), world_size):
        if g in stored:
            continue
        lo = g * batch_size
        rows = _encode_rows(tokenizer, list(texts[lo : lo + batch_size]), max_length)
        ids, mask = _pad(rows, pad_id, side or "right")
        yield _Batch(g, {"input_ids": ids, "attention_mask": mask}, (lo, 0), (lo + len(rows), 0), int(mask.sum()))
    yield _End(0, False)


def _encode_rows(tokenizer: Any, chunk: list[str], max_length: int | None) -> list[list[int]]:
    kwargs: dict[str, Any] = {"truncation": True, "max_length": max_length} if max_length is not None else {}
    return [list(r) for r in tokenizer(chunk, verbose=False, **kwargs)["input_ids"]]


def _contexts_batch(index: int, group: list[Context]) -> _Batch:
    ids = torch.tensor([c.tokens for c in group], dtype=torch.long)
    return _Batch(index, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, group[0].start, group[-1].stop,
                  ids.numel())  # fmt: skip


def _left_over(tokenizer: Any, texts: Sequence[str], stop: Position, bos: int | None) -> int:
    """Tokens from ``stop`` to the end of the texts (those of a last, partial context)."""
    n = 0
    for index, toks in _token_lists(tokenizer, texts, stop[0]):
        n += len(toks) - (stop[1] if index == stop[0] else 0)
    return n


# ---------------------------------------------------------------------------------------------- the run's record


_NAMES = {
    "layers": "layers",
    "model": "model",
    "model_class": "model class",
    "dtype": "dtype",
    "batch_size": "batch_size",
    "max_length": "max_length",
    "context_size": "context_size",
    "bos_token_id": "BOS token id (prepend_bos)",
    "padding_side": "padding side",
    "pad_token": "pad token",
    "element": "element",
    "inputs": "inputs",
    "world_size": "world_size",
}


def _check_resume(
    store: Store,
    run_id: str,
    existing: list[int],
    prior: Mapping[str, Any],
    settings: Mapping[str, Any],
    texts: Sequence[str],
) -> Position:
    """Refuse a resume that does not match what the run recorded; return where to continue."""
    record = prior.get(CORPUS_FIELD)
    recorded = record.get("settings") if isinstance(record, dict) else None
    if not isinstance(recorded, dict):
        raise CaptureSetupError(
            f"run {run_id!r} holds {len(existing)} batch(es) with no record of the corpus they came from (captured "
            "by an earlier version, or by ActivationCapture directly): where to continue is unknown; capture into "
            "another run, or overwrite it",
            setting="corpus",
        )
    assert isinstance(record, dict)
    for key, new in settings.items():
        old = recorded.get(key)
        if key == "world_size":
            old = old if old is not None else 1
        if old != new:
            what = _NAMES.get(key, key)
            raise CaptureSetupError(
                f"run {run_id!r} was captured with {what} {old!r} and this capture has {what} {new!r}: continue it "
                "with the same value, or capture into another run (or overwrite it)",
                setting=key,
                recorded=old,
                new=new,
            )
    n = record.get("texts")
    digest = record.get("sha256")
    if not isinstance(n, int) or not isinstance(digest, str):
        raise CaptureSetupError(f"run {run_id!r}'s corpus record has no texts/sha256", setting="corpus")
    if len(texts) < n:
        raise CaptureSetupError(
            f"run {run_id!r} consumed {n} texts of its corpus ({record.get('source')!r}), and this corpus has only "
            f"{len(texts)}: it is another corpus; capture it into another run",
            setting="corpus",
            recorded=n,
            new=len(texts),
        )
    if texts_sha256(texts[:n]) != digest:
        raise CaptureSetupError(
            f"run {run_id!r} was captured from another corpus ({record.get('source')!r}): its first {n} texts differ "
            "from this corpus's first "
            f"{n} (SHA-256 recorded {digest[:12]}..., this corpus {texts_sha256(texts[:n])[:12]}...); texts may only "
            "be appended; capture this corpus into another run",
            setting="corpus",
            recorded=digest,
            new=texts_sha256(texts[:n]),
        )
    last = max(existing)
    meta, _ = store.get_detector_metadata(run_id, last)
    batch = meta.get(CORPUS_FIELD)
    if not isinstance(batch, dict) or not isinstance(batch.get("texts"), list):
        raise CaptureSetupError(f"batch {last} of run {run_id!r} has no corpus record", setting="corpus")
    start = (int(batch["texts"][0]), int(batch["token_offsets"][0]))
    stop = (int(batch["texts"][1]), int(batch["token_offsets"][1]))
    end = stop[0] + (1 if stop[1] else 0)
    if len(texts) < end or texts_sha256(texts[start[0] : end]) != batch.get("sha256"):
        raise CaptureSetupError(
            f"run {run_id!r}'s batch {last} holds texts {start[0]}..{end - 1} of another corpus "
            f"({record.get('source')!r}); capture this corpus into another run",
            setting="corpus",
        )
    world = settings["world_size"]
    if world > 1:
        partial = int(batch.get("rows", settings["batch_size"])) < int(settings["batch_size"])
        total = record.get("texts_total")
        if partial and isinstance(total, int) and len(texts) > total:
            raise CaptureSetupError(
                f"run {run_id!r}'s last batch {last} was partial (it ends at text {stop[0]}, offset {stop[1]}) and "
                f"texts were appended since: with world_size {world} batches are laid out by position, so they cannot "
                "be added to this run; capture the new texts into another run, or resume with world_size 1",
                setting="corpus",
            )
    return stop


def _count_run_tokens(prior: Mapping[str, Any]) -> int:
    capture = prior.get("capture")
    if not isinstance(capture, dict):
        return 0
    tokens = capture.get("tokens")
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else 0


def _write_record(
    store: Store,
    run_id: str,
    record: Mapping[str, Any],
    settings: Mapping[str, Any],
    source: str | None,
    texts: Sequence[str],
    position: Position | None,
    *,
    consumed: int | None = None,
) -> None:
    """Merge the corpus record into the run's metadata: the longest consumed prefix wins (with
    several processes each knows only its own share)."""
    n = consumed if consumed is not None else int(record.get("texts", 0) or 0)
    digest = texts_sha256(texts[:n])

    def merge(meta: dict[str, Any]) -> dict[str, Any]:
        old = meta.get(CORPUS_FIELD) if isinstance(meta.get(CORPUS_FIELD), dict) else {}
        assert isinstance(old, dict)
        keep_old = isinstance(old.get("texts"), int) and old["texts"] > n
        total = old.get("texts_total")
        new = {
            "source": source,
            "texts": old["texts"] if keep_old else n,
            "sha256": old.get("sha256") if keep_old else digest,
            "texts_total": max(total, len(texts)) if isinstance(total, int) else len(texts),
            "position": list(position) if position is not None else None,
            "settings": dict(settings),
        }
        return {**meta, CORPUS_FIELD: new}

    store.update_run_metadata(run_id, merge)


def _remove_if_empty(store: Store, run_id: str, created: bool) -> None:
    """After a failed start: remove the run this call created if it holds no batch."""
    if not created:
        return
    # Best effort while the capture's own error propagates: that error is what the caller must see.
    with contextlib.suppress(OSError, ValueError):
        if not store.list_run_batches(run_id):
            store.delete_run(run_id)


def mask_of(store: Store, run_id: str, batch: int, layer: str) -> torch.Tensor | None:
    """A stored batch's attention mask: from the batch's inputs pseudo-layer
    (``attention_masks``, once per batch), else from ``layer`` (runs captured before), else ``None``."""
    for where in (_keys.INPUTS_LAYER, layer):
        try:
            return store.get_detector_metadata_by_layer_by_key(run_id, batch, where, _keys.MASK_KEY)
        except (FileNotFoundError, KeyError):
            continue
    return None
