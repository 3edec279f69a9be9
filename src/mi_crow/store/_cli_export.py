"""``mi-crow-store export-model``: write a stored model in another tool's on-disk format."""

from __future__ import annotations

from pathlib import Path

import click

from mi_crow.store._names import check_name
from mi_crow.store.cli import _ArgumentError, _fmt_bytes, _Location, _one_line, _open_store, _store_options, main

FORMATS = ("sae-lens",)


@main.command(name="export-model")
@click.argument("store_path", metavar="STORE", type=_Location(exists=True))
@click.argument("model_id", metavar="MODEL")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(FORMATS),
    help="sae-lens: SAELens's folder (cfg.json + sae_weights.safetensors) that sae_lens.SAE.load_from_disk(DIR) "
    "reads; the model must have been stored with mi_crow.store.sae_lens.put_sae.",
)
@click.option("--overwrite", is_flag=True, help="Replace DIR, as a whole, if it exists and is not empty.")
@_store_options("STORE", "STORE itself")
def export_model(
    store_path: Path | str,
    model_id: str,
    directory: Path,
    fmt: str,
    overwrite: bool,
    runs_prefix: str,
    model_prefix: str,
) -> None:
    """Write the model MODEL of the store at STORE (a folder or a URL) into the folder DIR, in --format.

    DIR is written under a temporary name beside it (.DIR.export-...) and renamed into place when
    complete: an export that is stopped leaves no half-written DIR. A DIR that exists must be
    empty, unless --overwrite. Exit status 2, with one line on stderr, for a missing model, a model
    the format cannot hold, a DIR that is not empty or whose parent is missing, or SAELens not
    installed.
    """
    from mi_crow.store import sae_lens

    try:
        check_name(model_id, "MODEL")
        sae_lens._check_target(directory, overwrite)
    except (ValueError, OSError) as e:
        raise _ArgumentError(_one_line(e).replace("overwrite=True", "--overwrite")) from None
    store = _open_store(store_path, runs_prefix, model_prefix)
    models = store.list_models()
    if model_id not in models:
        listed = ", ".join(models[:20]) + (f" and {len(models) - 20} more" if len(models) > 20 else "")
        has = f"its models are: {listed}" if models else "the store has no models"
        raise _ArgumentError(f"no model {model_id!r} in {store_path}; {has}")
    tensors, meta = store.get_model(model_id)  # a damaged model: exit 1, as any store error
    try:
        info = sae_lens._info(meta, model_id)  # before SAELens is imported: a model of no SAE fails fast
        sae_lens._export(tensors, info, directory, overwrite)
    except ImportError as e:
        raise _ArgumentError(_one_line(e)) from None
    except (ValueError, FileExistsError) as e:
        raise _ArgumentError(_one_line(e).replace("overwrite=True", "--overwrite")) from None
    files = sorted(directory.iterdir())
    cfg = info["cfg"]
    click.echo(
        f"exported model {model_id!r} ({info['architecture']} SAE, d_in {cfg.get('d_in')}, d_sae {cfg.get('d_sae')}) "
        f"to {directory}: {', '.join(p.name for p in files)} ({_fmt_bytes(sum(p.stat().st_size for p in files))})"
    )
