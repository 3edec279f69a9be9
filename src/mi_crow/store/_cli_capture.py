"""``mi-crow-store capture``: run a model over a corpus and store the activations of its layers.

A thin wrapper around :func:`mi_crow.store.corpus.capture_corpus`: it loads the corpus, the
tokenizer and the model (checking each before the next is loaded, and all of them before
anything is written), captures, and reads the session's batches back.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import torch

from mi_crow.store import _keys
from mi_crow.store._layout import LayoutStore
from mi_crow.store.cli import (
    _fmt_bytes,
    _into,
    _Location,
    _open_for_writing,
    _print_table,
    _store_options,
    describe,
    main,
)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "auto": None}
DEFAULT_MAX_LENGTH = 128

# The option of each setting a resume checks, for its message.
_OPTIONS = {
    "layers": "--layers",
    "model": "--model",
    "model_class": "--model-class",
    "dtype": "--dtype",
    "batch_size": "--batch-size",
    "max_length": "--max-length",
    "context_size": "--context-size",
    "bos_token_id": "the tokenizer's BOS token",
    "padding_side": "the tokenizer's padding side",
    "pad_token": "--pad-token",
    "element": "--element",
    "inputs": "--inputs",
    "world_size": "--world-size",
}


def _element(value: str | None) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.lstrip("-").isdigit() else value


@main.command()
@click.option("--model", "model_name", required=True, help="Hugging Face model id or local path.")
@click.option(
    "--model-class",
    "model_class",
    default=None,
    help="The transformers class to load the model with (e.g. AutoModelForCausalLM, GPT2Model). "
    "Default: the checkpoint's own class, its config's architectures[0] (e.g. GPT2LMHeadModel), else AutoModel.",
)
@click.option(
    "--layers",
    required=True,
    help="Comma-separated module names of that model, e.g. transformer.h.1 (GPT2LMHeadModel) or encoder.layer.0.",
)
@click.option(
    "--texts",
    "texts_file",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Text file, one text per line (blank lines are skipped).",
)
@click.option(
    "--dataset",
    "dataset_path",
    default=None,
    type=click.Path(exists=True, path_type=Path),
    help="A Hugging Face dataset saved with save_to_disk (a folder), or a .jsonl file (one JSON object a line).",
)
@click.option("--column", default=None, help="The dataset's (or JSONL objects') text column.  [default: text]")
@click.option("--split", default=None, help="The split of a saved DatasetDict (needed when it has several).")
@click.option("--run", "run_id", required=True, help="Run id; an existing run is continued where it stopped.")
@click.option(
    "--store",
    "store_dir",
    required=True,
    type=_Location(exists=False),
    help="Folder of the local store (created if missing), or a URL: s3://bucket/prefix.",
)
@click.option(
    "--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Texts (or contexts) a batch."
)
@click.option(
    "--max-length",
    default=None,
    type=click.IntRange(1),
    help=f"One text per row: truncate texts to this many tokens.  [default: {DEFAULT_MAX_LENGTH}]",
)
@click.option(
    "--context-size",
    default=None,
    type=click.IntRange(1),
    help="Pack the tokenized texts into contexts of this many tokens, as SAELens does: each context begins with "
    "BOS and a BOS separates texts (when the tokenizer has one); no padding.",
)
@click.option(
    "--max-tokens",
    default=None,
    type=click.IntRange(1),
    help="Token budget of the run: stop before it would hold more (whole texts or contexts).",
)
@click.option(
    "--pad-token",
    default=None,
    help="One text per row: the token to pad with. Default: the tokenizer's pad token, else its EOS token.",
)
@click.option("--inputs", "capture_inputs", is_flag=True, help="Capture each module's input instead of its output.")
@click.option(
    "--element",
    default=None,
    help="For modules whose output is a tuple (an index) or a mapping (a key): the element to capture. "
    "Default: the first tensor.",
)
@click.option(
    "--dtype",
    "dtype_name",
    default="auto",
    show_default=True,
    type=click.Choice(sorted(_DTYPES)),
    help="Store activations in this dtype (auto: the model's).",
)
@click.option("--device", default="cpu", show_default=True, help="Device to run the model on (cpu, cuda, cuda:1...).")
@click.option("--overwrite", is_flag=True, help="Delete the run first instead of continuing it (one process only).")
@click.option(
    "--rank",
    type=click.IntRange(0),
    default=None,
    help="This process's rank among --world-size processes capturing into the run: it captures the batches "
    "rank, rank + world_size, ... of the texts. Default: the RANK environment variable when RANK and "
    "WORLD_SIZE are both set (torchrun sets them), else 0.",
)
@click.option(
    "--world-size",
    "world_size",
    type=click.IntRange(1),
    default=None,
    help="How many processes capture into the run. Default: WORLD_SIZE when RANK and WORLD_SIZE are both set, else 1.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_store_options("--store", "--store itself")
def capture(
    model_name: str,
    model_class: str | None,
    layers: str,
    texts_file: Path | None,
    dataset_path: Path | None,
    column: str | None,
    split: str | None,
    run_id: str,
    store_dir: Path | str,
    batch_size: int,
    max_length: int | None,
    context_size: int | None,
    max_tokens: int | None,
    pad_token: str | None,
    capture_inputs: bool,
    element: str | None,
    dtype_name: str,
    device: str,
    overwrite: bool,
    rank: int | None,
    world_size: int | None,
    quiet: bool,
    runs_prefix: str,
    model_prefix: str,
) -> None:
    """Run a Hugging Face model over a corpus and store the activations of LAYERS in a run.

    \b
    The corpus: --texts FILE (one text per line) or --dataset PATH (a saved
    Hugging Face dataset, or a .jsonl file) with --column. One text per row
    (truncated to --max-length, padded; without a pad token the EOS token
    pads), or packed into contexts of --context-size tokens.

    \b
    A run continues where it stopped, also after texts were appended to the
    corpus. What it consumed is recorded (the corpus's SHA-256 up to there,
    each batch's text range, the layers, model, dtype and other settings);
    a resume with another corpus or other settings is refused, naming the
    setting. A failed start leaves no run behind.

    \b
    With --world-size W, W processes (ranks 0..W-1) capture into one run at
    once, rank r taking the batches g = r, r + W, ...; batch g holds texts
    (or contexts) g x batch-size .. (g + 1) x batch-size - 1, as one process
    would have written it. Texts appended after a full last batch are
    captured by the next run; after a partial one they are refused (capture
    them into another run).
    """
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the capture extra is not installed
        raise click.ClickException(f"{e}; install it with: pip install 'mi-crow-store[capture]'") from None

    from mi_crow.store.capture import resolve_rank
    from mi_crow.store.corpus import CaptureSetupError, capture_corpus, padding_token, read_texts, text_lines

    # ---- options, corpus, tokenizer, model: each checked before the next is loaded; nothing written
    if (texts_file is None) == (dataset_path is None):
        raise click.UsageError("give the corpus with one of --texts FILE or --dataset PATH")
    if texts_file is not None and (column is not None or split is not None):
        raise click.UsageError("--column and --split apply to --dataset; --texts is a plain text file")
    if context_size is not None and max_length is not None:
        raise click.UsageError("--max-length truncates one text per row; --context-size packs texts: give one")
    if context_size is not None and pad_token is not None:
        raise click.UsageError("--pad-token pads one text per row; --context-size contexts have no padding")
    try:
        rank, world_size = resolve_rank(rank, world_size)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if overwrite and world_size > 1:
        raise click.UsageError(
            f"--overwrite deletes the run, which the other {world_size - 1} process(es) are writing to; "
            "delete it before starting them, or capture into a new run"
        )
    if max_tokens is not None and world_size > 1:
        raise click.UsageError("--max-tokens is a budget of the whole run: it needs --world-size 1")
    store = _open_for_writing(store_dir, runs_prefix=runs_prefix, model_prefix=model_prefix)  # writes nothing yet
    source = texts_file if texts_file is not None else dataset_path
    assert source is not None
    try:
        if texts_file is not None:
            texts = text_lines(texts_file)
        else:
            texts = read_texts(source, column=column or "text", split=split)
    except (ValueError, UnicodeDecodeError) as e:
        raise click.UsageError(str(e)) from None
    if not texts:
        raise click.UsageError(f"the corpus {str(source)!r} holds no text")
    if Path(model_name).is_dir():  # recorded in the run: the same folder resumes from any working directory
        model_name = str(Path(model_name).resolve())
    try:
        config = transformers.AutoConfig.from_pretrained(model_name)
    except (OSError, ValueError) as e:
        raise click.UsageError(f"cannot read the model config of {model_name!r}: {e}") from None
    cls = _model_class(transformers, config, model_class)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_name)
    except (OSError, ValueError, TypeError) as e:
        raise click.UsageError(f"cannot load the tokenizer of {model_name!r}: {e}") from None
    if context_size is None:
        try:
            _, _, note = padding_token(tokenizer, pad_token)
        except CaptureSetupError as e:
            raise click.UsageError(str(e).replace("pad_token= (--pad-token)", "--pad-token")) from None
        if note:
            click.echo(f"note: {note}", err=True)
    model = cls.from_pretrained(model_name).to(device).eval()
    layer_names = [name.strip() for name in layers.split(",") if name.strip()]

    # ---- capture
    try:
        report = capture_corpus(
            model, tokenizer, store, run_id, layer_names, texts, batch_size=batch_size,
            max_length=(DEFAULT_MAX_LENGTH if max_length is None else max_length) if context_size is None else None,
            context_size=context_size, max_tokens=max_tokens, pad_token=pad_token, dtype=_DTYPES[dtype_name],
            inputs=capture_inputs, element=_element(element), source=str(source), overwrite=overwrite, rank=rank,
            world_size=world_size, progress=False if quiet else None,
        )  # fmt: skip
    except CaptureSetupError as e:
        raise click.UsageError(_cli_message(e, run_id)) from None
    share = f" (rank {rank} of {world_size})" if world_size > 1 else ""
    seconds = report.seconds
    click.echo(
        f"captured run {run_id!r}{share}: {report.batches} batch(es), {report.texts} text(s), {report.tokens} tokens, "
        f"{_fmt_bytes(report.bytes)} written this session in {seconds:.1f} s "
        f"({report.tokens_per_second:,.0f} tokens/s) into {_into(store_dir)}"
    )
    where = f"text {report.position[0]}" + (f" token {report.position[1]}" if report.position[1] else "")
    total = f"run {run_id!r}{share} holds {report.run_batches} batch(es), {report.run_tokens} tokens"
    if world_size == 1:
        total += f"; {report.position[0]} of {report.texts_total} text(s) consumed (next batch from {where})"
    click.echo(total)
    if report.left_over_tokens:
        click.echo(
            f"{report.left_over_tokens} token(s) after the last full context of {context_size} were not captured "
            "(texts appended to the corpus continue from them)"
        )
    if report.stopped_by_budget:
        click.echo(f"stopped at the token budget --max-tokens {max_tokens}")
    click.echo("")
    _print_table(describe(store, [run_id]))
    _read_back(store, run_id, layer_names, list(report.batch_indices), report.tokens)


def _model_class(transformers: Any, config: Any, name: str | None) -> Any:
    """The class to load the checkpoint with: ``name`` (a transformers class), else the config's
    ``architectures[0]``, else ``AutoModel``."""
    if name is not None:
        cls = getattr(transformers, name, None)
        if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
            import difflib

            known = [
                n for n in dir(transformers) if n.startswith(("Auto", type(config).__name__.removesuffix("Config")))
            ]
            near = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise click.UsageError(f"--model-class {name!r} is not a transformers model class{hint}")
        return cls
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        cls = getattr(transformers, str(architectures[0]), None)
        if isinstance(cls, type):
            return cls
        raise click.UsageError(
            f"the checkpoint's class {architectures[0]!r} (its config's architectures) is not in this transformers "
            "version: pick one with --model-class, e.g. AutoModel or AutoModelForCausalLM"
        )
    return transformers.AutoModel


def _cli_message(e: Any, run_id: str) -> str:
    """A setup error in the command's terms: a mismatched resume names the option."""
    setting = getattr(e, "setting", None)
    if setting in _OPTIONS:
        option = _OPTIONS[setting]
        return (
            f"run {run_id!r} was captured with {option} {_show(e.recorded)} and this capture has {option} "
            f"{_show(e.new)}: continue it with the same value, capture into another --run, or pass --overwrite"
        )
    return str(e).replace("overwrite it", "pass --overwrite").replace("pad_token= (--pad-token)", "--pad-token")


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _read_back(store: LayoutStore, run_id: str, layers: list[str], batches: list[int], tokens: int) -> None:
    """Read this session's batches back: in every layer, one activation row per token of each
    batch's mask (the batch's inputs pseudo-layer, or each layer's for runs captured before)."""
    if not batches:
        return
    stored = set(store.list_run_batches(run_id))
    missing = [g for g in batches if g not in stored]
    if missing:
        raise click.ClickException(f"batches {missing[:10]} of this session are not in the run")
    masks: dict[int, torch.Tensor] = {}
    for layer in layers:
        n, width = 0, 0
        for g in batches:
            acts = store.get_detector_metadata_by_layer_by_key(run_id, g, layer, "activations")
            mask = masks.get(g)
            if mask is None:
                mask = _mask(store, run_id, g, layer)
                if mask is None:
                    raise click.ClickException(f"batch {g} holds no attention mask ({_keys.INPUTS_LAYER} or {layer})")
                masks[g] = mask
            if tuple(acts.shape[:2]) != tuple(mask.shape):
                raise click.ClickException(
                    f"batch {g} {layer}: activations {tuple(acts.shape)}, mask {tuple(mask.shape)}"
                )
            n += int(mask.sum())
            width = int(acts.shape[-1])
        status = "ok" if n == tokens else f"MISMATCH: this session counts {tokens}"
        click.echo(f"read back {layer}: {n} token rows of {width} in this session's {len(batches)} batch(es)  {status}")
        if n != tokens:
            click.echo("the stored run does not hold every captured token", err=True)
            sys.exit(1)


def _mask(store: LayoutStore, run_id: str, batch: int, layer: str) -> torch.Tensor | None:
    from mi_crow.store.corpus import mask_of

    return mask_of(store, run_id, batch, layer)
