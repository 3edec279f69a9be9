"""``mi-crow-store capture``: run a model over a corpus and store the activations of its layers."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import click
import torch

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


@main.command()
@click.option(
    "--model", "model_name", required=True, help="Hugging Face model id or local path (loaded with AutoModel)."
)
@click.option("--layers", required=True, help="Comma-separated module names, e.g. encoder.layer.0,encoder.layer.5")
@click.option(
    "--texts",
    "texts_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Text file, one text per line (blank lines are skipped).",
)
@click.option("--run", "run_id", required=True, help="Run id; an existing run is continued where it stopped.")
@click.option(
    "--store",
    "store_dir",
    required=True,
    type=_Location(exists=False),
    help="Folder of the local store (created if missing), or a URL: s3://bucket/prefix.",
)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--max-length", default=128, show_default=True, type=click.IntRange(1))
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
@_store_options("--store", "--store itself")
def capture(
    model_name: str,
    layers: str,
    texts_file: Path,
    run_id: str,
    store_dir: Path | str,
    batch_size: int,
    max_length: int,
    dtype_name: str,
    device: str,
    overwrite: bool,
    rank: int | None,
    world_size: int | None,
    runs_prefix: str,
    model_prefix: str,
) -> None:
    """Run a Hugging Face model over TEXTS and store the activations of LAYERS in a run.

    Batch g of the texts (texts g x batch-size to (g + 1) x batch-size - 1) is stored as batch
    index g. With --world-size W, W processes (ranks 0..W-1) capture into one run at once, rank r
    taking the batches g = r, r + W, r + 2W, ...: the run is laid out exactly as one process
    would have written it. Each process continues its own share where it stopped.
    """
    try:
        from tqdm import tqdm
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:  # pragma: no cover - the capture extra is not installed
        raise click.ClickException(f"{e}; install it with: pip install 'mi-crow-store[capture]'") from None
    import time

    from mi_crow.store.capture import ActivationCapture, resolve_rank

    try:
        rank, world_size = resolve_rank(rank, world_size)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if overwrite and world_size > 1:
        raise click.UsageError(
            f"--overwrite deletes the run, which the other {world_size - 1} process(es) are writing to; "
            "delete it before starting them, or capture into a new run"
        )
    texts = [line.strip() for line in texts_file.read_text("utf-8").splitlines() if line.strip()]
    store = _open_for_writing(store_dir, runs_prefix=runs_prefix, model_prefix=model_prefix)
    if overwrite:
        store.delete_run(run_id)
    previous = store.get_run_metadata(run_id).get("cli", {})
    if previous and previous.get("batch_size") != batch_size:
        raise click.ClickException(
            f"run {run_id!r} was captured with --batch-size {previous.get('batch_size')}; continue it with the same "
            "value, or pass --overwrite"
        )
    stored = set(store.list_run_batches(run_id))
    mine = range(rank, math.ceil(len(texts) / batch_size), world_size)  # global batch numbers of this rank
    todo = [g for g in mine if g not in stored]
    done_batches = len(mine) - len(todo)
    texts_left = sum(len(texts[g * batch_size : (g + 1) * batch_size]) for g in todo)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModel.from_pretrained(model_name).to(device).eval()
    layer_names = [name.strip() for name in layers.split(",") if name.strip()]
    settings = {"texts_file": str(texts_file), "texts": len(texts), "batch_size": batch_size, "max_length": max_length}
    start = time.perf_counter()
    try:
        cap = ActivationCapture(
            model,
            store,
            run_id,
            layer_names,
            dtype=_DTYPES[dtype_name],
            metadata={"cli": settings},
            rank=rank,
            world_size=world_size,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    share = f" (rank {rank} of {world_size})" if world_size > 1 else ""
    if done_batches:
        click.echo(f"continuing run {run_id!r}{share} after {done_batches} batch(es); {texts_left} text(s) left")
    desc = f"capture {run_id}" + (f" rank {rank}" if world_size > 1 else "")
    try:
        cap.__enter__()
    except ValueError as e:  # the run was captured with another world size
        raise click.UsageError(str(e)) from None
    with contextlib.closing(cap), tqdm(total=texts_left, unit="text", desc=desc, file=sys.stderr) as bar:
        for g in todo:
            chunk = texts[g * batch_size : (g + 1) * batch_size]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            cap.next_batch = g  # global batch g is stored at index g (also when an earlier one is missing)
            cap.run(**{k: v.to(device) for k, v in enc.items()})
            seconds = max(time.perf_counter() - start, 1e-9)
            bar.update(len(chunk))
            bar.set_postfix(tokens_s=f"{cap.tokens / seconds:,.0f}", MB_s=f"{cap.bytes / seconds / 1e6:,.1f}")
    seconds = time.perf_counter() - start
    click.echo(
        f"captured run {run_id!r}{share}: {cap.batches} batch(es), {cap.tokens} tokens, {len(layer_names)} layer(s), "
        f"{_fmt_bytes(cap.bytes)} written this session in {seconds:.1f} s "
        f"({cap.tokens / max(seconds, 1e-9):,.0f} tokens/s) into {_into(store_dir)}\n"
    )
    _print_table(describe(store, [run_id]))
    if world_size > 1:
        _read_back_share(store, run_id, layer_names, mine, cap.tokens, model.config.hidden_size)
        return
    # Read the run back: every non-padding token of every layer, as a training loader sees them.
    from mi_crow.store.activation_dataset import ActivationDataset

    total = store.get_run_metadata(run_id)["capture"]["tokens"]
    for layer in layer_names:
        n = sum(b.shape[0] for b in ActivationDataset(store, run_id, layer, batch_size=4096, drop_padding=True))
        status = "ok" if n == total else f"MISMATCH: the run's metadata counts {total}"
        click.echo(f"read back {layer}: {n} token rows of {model.config.hidden_size}  {status}")
        if n != total:
            raise click.ClickException("the stored run does not hold every captured token")


def _read_back_share(store: LayoutStore, run_id: str, layers: list[str], mine: range, tokens: int, hidden: int) -> None:
    """Check this rank's share of a run that other processes may still be writing: each of its
    batches holds, in every layer, activations for every non-padding token of its mask."""
    stored = set(store.list_run_batches(run_id))
    missing = [g for g in mine if g not in stored]
    if missing:
        raise click.ClickException(f"batches {missing[:10]} of this rank are not in the run")
    for layer in layers:
        n = 0
        for g in mine:
            acts = store.get_detector_metadata_by_layer_by_key(run_id, g, layer, "activations")
            mask = store.get_detector_metadata_by_layer_by_key(run_id, g, layer, "attention_mask")
            if tuple(acts.shape[:2]) != tuple(mask.shape):
                raise click.ClickException(
                    f"batch {g} {layer}: activations {tuple(acts.shape)}, mask {tuple(mask.shape)}"
                )
            n += int(mask.sum())
        status = "ok" if n == tokens else f"MISMATCH: this rank counts {tokens}"
        click.echo(f"read back {layer} (this rank's {len(mine)} batch(es)): {n} token rows of {hidden}  {status}")
        if n != tokens:
            raise click.ClickException("the stored run does not hold every token this rank captured")
