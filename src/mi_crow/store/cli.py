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
