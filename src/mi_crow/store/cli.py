"""The ``mi-crow-store`` command line (also ``python -m mi_crow.store``)."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from pathlib import Path

import click
import torch

from mi_crow.store import _tensor_file as tf
from mi_crow.store._layout import LayoutStore
from mi_crow.store.local_store import LocalStore


def _fmt_bytes(n: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0 if n < 1024 else min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n} B" if i == 0 else f"{n / 1024**i:.1f} {units[i]}"


def describe(store: LayoutStore, runs: Iterable[str] | None = None) -> list[tuple[str, str, str, str, str, str, int]]:
    """One row per stored tensor: (run, batch, layer, key, shape, dtype, bytes).

    Reads only safetensors headers, never tensor data.
    """
    rows = []
    for run in store.list_runs() if runs is None else runs:
        for i in store.list_run_batches(run):
            batch_dir = store._batch_dir(run, i)
            meta_key = f"{batch_dir}/metadata.json"
            try:
                names = store._read_json(meta_key).get("_tensor_metadata_names", {})
            except FileNotFoundError:
                names = {}
            files = [
                (layer, key, f"{batch_dir}/{layer}/{key}.safetensors", "tensor")
                for layer, keys in names.items()
                for key in keys
            ]
            for layer, key, fkey, tname in files:
                with store._open(fkey) as f:
                    e = tf.read_header(f, store._where(fkey)).tensors[tname]
                rows.append(
                    (run, str(i), layer, key, str(list(e.shape)), str(e.dtype).removeprefix("torch."), e.end - e.begin)
                )
            run_file = store._run_batch_file(run, i)
            try:
                with store._open(run_file) as f:
                    header = tf.read_header(f, store._where(run_file))
            except FileNotFoundError:
                continue
            for name, e in sorted(header.tensors.items()):
                rows.append(
                    (
                        run,
                        str(i),
                        "(run batch)",
                        name,
                        str(list(e.shape)),
                        str(e.dtype).removeprefix("torch."),
                        e.end - e.begin,
                    )
                )
    return rows


def _print_table(rows: list[tuple[str, str, str, str, str, str, int]]) -> None:
    head = ("run", "batch", "layer", "key", "shape", "dtype", "bytes")
    cells = [head] + [(*r[:6], _fmt_bytes(r[6])) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for n, row in enumerate(cells):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            click.echo("  ".join("-" * w for w in widths))
    runs = {r[0] for r in rows}
    batches = {(r[0], r[1]) for r in rows}
    click.echo(
        f"{len(runs)} run(s), {len(batches)} batch(es), {len(rows)} tensor(s), {_fmt_bytes(sum(r[6] for r in rows))}"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mi-crow-store")
def main() -> None:
    """mi-crow-store: persistence for activations, runs and models."""


@main.command()
@click.option(
    "--store",
    "store_dir",
    default="mi-crow-demo-store",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder of the local store to write the demo run into.",
)
@click.option("--batches", default=3, show_default=True, type=click.IntRange(1, 1000))
def demo(store_dir: Path, batches: int) -> None:
    """Write a small multi-layer run into a local store, read it back, and print it."""
    store = LocalStore(store_dir)
    gen = torch.Generator().manual_seed(0)
    layers = [f"model.layers.{i}" for i in (0, 4, 8, 11)]
    run_id = "demo"
    store.delete_run(run_id)
    store.put_run_metadata(run_id, {"model": "demo-random", "layers": layers, "batches": batches})
    written = {}
    for b in range(batches):
        mask = torch.ones(4, 16, dtype=torch.int64)
        mask[:, 16 - b :] = 0
        tensors = {
            layer: {
                "activations": torch.randn(4, 16, 64, generator=gen).to(torch.bfloat16),
                "attention_mask": mask,
            }
            for layer in layers
        }
        store.put_detector_metadata(run_id, b, {"batch": b, "tokens": int(mask.sum())}, tensors)
        written[b] = tensors
    for b, tensors in written.items():
        _, back = store.get_detector_metadata(run_id, b)
        for layer, keys in tensors.items():
            for key, t in keys.items():
                got = back[layer][key]
                if got.dtype != t.dtype or not torch.equal(got, t):
                    raise click.ClickException(f"read-back mismatch at batch {b} {layer}/{key}")
    click.echo(
        f"Wrote and verified run {run_id!r} in {store_dir}/ ({batches} batches x {len(layers)} layers x 2 keys)\n"
    )
    _print_table(describe(store, [run_id]))


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
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
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
@click.option("--overwrite", is_flag=True, help="Delete the run first instead of continuing it.")
def capture(
    model_name: str,
    layers: str,
    texts_file: Path,
    run_id: str,
    store_dir: Path,
    batch_size: int,
    max_length: int,
    dtype_name: str,
    device: str,
    overwrite: bool,
) -> None:
    """Run a Hugging Face model over TEXTS and store the activations of LAYERS in a run."""
    try:
        from tqdm import tqdm
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:  # pragma: no cover - the capture extra is not installed
        raise click.ClickException(f"{e}; install it with: pip install 'mi-crow-store[capture]'") from None
    import time

    from mi_crow.store.capture import ActivationCapture

    texts = [line.strip() for line in texts_file.read_text("utf-8").splitlines() if line.strip()]
    store = LocalStore(store_dir)
    if overwrite:
        store.delete_run(run_id)
    previous = store.get_run_metadata(run_id).get("cli", {})
    if previous and previous.get("batch_size") != batch_size:
        raise click.ClickException(
            f"run {run_id!r} was captured with --batch-size {previous.get('batch_size')}; continue it with the same "
            "value, or pass --overwrite"
        )
    done_batches = len(store.list_run_batches(run_id))
    todo = texts[done_batches * batch_size :]
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModel.from_pretrained(model_name).to(device).eval()
    layer_names = [name.strip() for name in layers.split(",") if name.strip()]
    settings = {"texts_file": str(texts_file), "texts": len(texts), "batch_size": batch_size, "max_length": max_length}
    start = time.perf_counter()
    try:
        cap = ActivationCapture(
            model, store, run_id, layer_names, dtype=_DTYPES[dtype_name], metadata={"cli": settings}
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if done_batches:
        click.echo(f"continuing run {run_id!r} after {done_batches} batch(es); {len(todo)} text(s) left")
    with cap, tqdm(total=len(todo), unit="text", desc=f"capture {run_id}", file=sys.stderr) as bar:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            cap.run(**{k: v.to(device) for k, v in enc.items()})
            seconds = max(time.perf_counter() - start, 1e-9)
            bar.update(len(chunk))
            bar.set_postfix(tokens_s=f"{cap.tokens / seconds:,.0f}", MB_s=f"{cap.bytes / seconds / 1e6:,.1f}")
    seconds = time.perf_counter() - start
    click.echo(
        f"captured run {run_id!r}: {cap.batches} batch(es), {cap.tokens} tokens, {len(layer_names)} layer(s), "
        f"{_fmt_bytes(cap.bytes)} written this session in {seconds:.1f} s "
        f"({cap.tokens / max(seconds, 1e-9):,.0f} tokens/s) into {store_dir}/\n"
    )
    _print_table(describe(store, [run_id]))
    # Read the run back: every non-padding token of every layer, as a training loader sees them.
    from mi_crow.store.activation_dataset import ActivationDataset

    total = store.get_run_metadata(run_id)["capture"]["tokens"]
    for layer in layer_names:
        n = sum(b.shape[0] for b in ActivationDataset(store, run_id, layer, batch_size=4096, drop_padding=True))
        status = "ok" if n == total else f"MISMATCH: the run's metadata counts {total}"
        click.echo(f"read back {layer}: {n} token rows of {model.config.hidden_size}  {status}")
        if n != total:
            raise click.ClickException("the stored run does not hold every captured token")


@main.command(name="ls")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--run", "runs", multiple=True, help="Only this run (repeatable).")
def ls(path: Path, runs: tuple[str, ...]) -> None:
    """Print the runs, batches, layers, keys, shapes, dtypes and sizes of the store at PATH."""
    store = LocalStore(path)
    _print_table(describe(store, list(runs) or None))


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--run", "runs", multiple=True, help="Only this run (repeatable); models are then skipped.")
def verify(path: Path, runs: tuple[str, ...]) -> None:
    """Check every entry of the store at PATH; print each damaged file. Exit 1 if any."""
    store = LocalStore(path)
    problems = store.check(list(runs) or None)
    for p in problems:
        click.echo(f"CORRUPT {p.path}: {p.problem}")
    leftovers = _leftovers(path)
    if leftovers:
        click.echo(
            f"note: {len(leftovers)} leftover(s) of interrupted writes (not data); "
            f"`mi-crow-store gc {path}` removes them"
        )
    scope = ", ".join(runs) if runs else "all runs and models"
    if problems:
        click.echo(f"{len(problems)} damaged file(s) in {scope}")
        sys.exit(1)
    click.echo(f"ok: {scope} verified")


def _leftovers(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.name.startswith((".tmp-", ".stage-", ".trash-"))]


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def gc(path: Path) -> None:
    """Remove temp files and directories that interrupted writes left in the store at PATH."""
    report = LocalStore(path).gc()
    for removed in report.removed:
        click.echo(f"removed {removed}")
    click.echo(f"{len(report.removed)} leftover(s) removed, {_fmt_bytes(report.bytes_freed)} freed")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
