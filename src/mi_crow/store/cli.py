"""The ``mi-crow-store`` command line (also ``python -m mi_crow.store``)."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import click
import torch

from mi_crow.store import _atomic, _keys
from mi_crow.store import _tensor_file as tf
from mi_crow.store._commit import DirReader, named_generation
from mi_crow.store._copy import copy_store
from mi_crow.store._layout import LayoutStore, Problem
from mi_crow.store._names import check_name
from mi_crow.store._open import open_store
from mi_crow.store.local_store import LOCK_NAME, LocalStore
from mi_crow.store.stats import LayerStats, read_stats

F = TypeVar("F", bound=Callable[..., Any])

# Exit statuses of ls, verify, gc and copy.
EXIT_DAMAGED = 1  # the store holds damaged entries (or a store error stopped the command)
EXIT_USAGE = 2  # bad arguments: not a store, no such run, an invalid name, an unserved URL (click's usage errors too)

# The errors the store raises for damaged stored data and failed I/O (CorruptFileError and its
# subclasses are OSErrors, json.JSONDecodeError and bad names are ValueErrors). Anything else is a bug
# and keeps its traceback.
_STORE_ERRORS = (OSError, ValueError)

# A URL (s3://bucket/prefix, memory://, file://PATH) rather than a path: a scheme as RFC 3986 spells it,
# then "://". A local folder whose name looks like that is written ./name.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
S3_EXTRA_HINT = "pip install 'mi-crow-store[s3]'"
GC_GRACE_DEFAULT = 3600.0  # seconds; an object store's gc leaves younger leftovers alone


def _store_errors() -> tuple[type[BaseException], ...]:
    """:data:`_STORE_ERRORS`, and obstore's errors once an object store has loaded it (a backend
    that lets one through, e.g. a refused connection, still gets one line, not a traceback)."""
    base = getattr(sys.modules.get("obstore.exceptions"), "BaseError", None)
    return (*_STORE_ERRORS, base) if isinstance(base, type) and issubclass(base, Exception) else _STORE_ERRORS


def _fmt_bytes(n: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0 if n < 1024 else min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n} B" if i == 0 else f"{n / 1024**i:.1f} {units[i]}"


def _one_line(e: BaseException | str) -> str:
    """An error message on one line (stored names and paths never break the output into lines)."""
    text = str(e) or type(e).__name__
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _cell(text: str) -> str:
    """A name read from a file, printable in a table cell."""
    return text if text.isprintable() else ascii(text)


class _ArgumentError(click.ClickException):
    """One line ``Error: ...`` on stderr and exit status 2, without click's usage text."""

    exit_code = EXIT_USAGE


class Row(NamedTuple):
    """One line of ``mi-crow-store ls --tensors``: a stored tensor, or a damaged entry (``damaged`` says why).

    Names are as stored (the table prints an unprintable one as its ``ascii()`` form)."""

    run: str
    batch: str
    layer: str
    key: str
    shape: str = ""
    dtype: str = ""
    nbytes: int = 0
    damaged: str | None = None


RUN_BATCH_LAYER = "(run batch)"  # the layer column of a run batch file's tensors


def _tensor_row(run: str, batch: int, layer: str, key: str, e: tf.TensorEntry) -> Row:
    return Row(run, str(batch), layer, key, str(list(e.shape)), str(e.dtype).removeprefix("torch."), e.end - e.begin)


def describe(store: LayoutStore, runs: Iterable[str] | None = None) -> list[Row]:
    """One row per stored tensor: (run, batch, layer, key, shape, dtype, bytes, damaged).

    Reads only safetensors headers and JSON metadata, never tensor data. A damaged entry (a
    file that is missing, truncated or unparseable, a metadata.json naming unsafe paths, a run's
    meta.json that is not a JSON object) becomes one row with ``damaged`` set, and the listing
    goes on. Every layer and key read from a metadata.json passes the store's name validator
    before any path is built from it.
    """
    rows: list[Row] = []
    for run in store.list_runs() if runs is None else runs:
        rows += _describe_run(store, run)
    return rows


def _describe_run(store: LayoutStore, run: str, tokens: dict[int, Any] | None = None) -> list[Row]:
    """The rows of one run (a store error that stops it is its last row); ``tokens`` collects each
    per-batch metadata.json's ``"tokens"`` field by batch index."""
    rows: list[Row] = []
    damaged_meta = _run_metadata(store, run)[1]
    if damaged_meta is not None:
        rows.append(Row(run, "-", "-", "-", damaged=damaged_meta))
    try:
        entries = set(store._list(store._run_dir(run)))
        for i in store.list_run_batches(run):
            if (_keys.batch_dir_name(i), True) in entries:
                rows += _describe_batch_dir(store, run, i, store._batch_dir(run, i), tokens)
            if (_keys.run_batch_file_name(i), False) in entries:
                rows += _describe_run_batch(store, run, i, store._run_batch_file(run, i))
    except _STORE_ERRORS as e:
        rows.append(Row(run, "-", "-", "-", damaged=_one_line(e)))
    return rows


def _run_metadata(store: LayoutStore, run: str) -> tuple[dict[str, Any], str | None]:
    """The run's metadata (``{}`` if it has none), and why it is damaged (``None``: it is not)."""
    try:
        return store.get_run_metadata(run), None
    except _STORE_ERRORS as e:
        text = _one_line(e)
        where = store._where(store._run_metadata_file(run))
        return {}, text if where in text else f"{where}: {text}"


def _describe_batch_dir(
    store: LayoutStore, run: str, i: int, batch_dir: str, tokens: dict[int, Any] | None = None
) -> list[Row]:
    """The rows of a per-batch directory ``batch_{i}/`` (mi_crow 1.0's detector layout; on object
    storage its tensor files live in the generation folder its metadata.json names)."""
    meta_key = f"{batch_dir}/{_keys.METADATA_FILE}"
    where = store._where(meta_key)
    try:
        meta = store._read_json_object(meta_key)
        if _keys.TENSOR_NAMES_FIELD not in meta:
            raise ValueError(f"{where} has no {_keys.TENSOR_NAMES_FIELD!r} field")
        names = store._read_names_field(meta[_keys.TENSOR_NAMES_FIELD], where)
        generation = named_generation(meta, where)
    except FileNotFoundError:
        return [Row(run, str(i), "-", "-", damaged=f"{where} is missing")]
    except _STORE_ERRORS as e:
        return [Row(run, str(i), "-", "-", damaged=_one_line(e))]
    if tokens is not None:
        tokens[i] = meta.get("tokens")
    rows: list[Row] = []
    for layer, keys in names.items():
        for key in keys:
            fkey = f"{batch_dir}/{_keys.in_generation(_keys.tensor_file(layer, key), generation)}"
            fwhere = store._where(fkey)
            try:
                with store._open(fkey) as f:
                    entry = tf.read_header(f, fwhere).tensors.get(_keys.TENSOR_NAME)
                if entry is None:
                    raise ValueError(f"{fwhere} holds no tensor named {_keys.TENSOR_NAME!r}")
                rows.append(_tensor_row(run, i, layer, key, entry))
            except FileNotFoundError:
                rows.append(Row(run, str(i), layer, key, damaged=f"{fwhere} is missing (listed in {where})"))
            except _STORE_ERRORS as e:
                rows.append(Row(run, str(i), layer, key, damaged=_one_line(e)))
    return rows


def _describe_run_batch(store: LayoutStore, run: str, i: int, run_file: str) -> list[Row]:
    """The rows of a run batch file ``batch_{i:06d}.safetensors``."""
    try:
        with store._open(run_file) as f:
            header = tf.read_header(f, store._where(run_file))
    except _STORE_ERRORS as e:
        return [Row(run, str(i), RUN_BATCH_LAYER, "-", damaged=_one_line(e))]
    return [_tensor_row(run, i, RUN_BATCH_LAYER, name, e) for name, e in sorted(header.tensors.items())]


def _columns(head: Sequence[str], cells: Sequence[Sequence[str]], notes: Sequence[str | None]) -> None:
    """Print a table: ``head``, a rule, then each row of ``cells`` (a row may have fewer cells) and
    its note (``DAMAGED: ...``) after it."""
    table = [tuple(head), *cells]
    widths = [max(len(c[i]) for c in table if len(c) > i) for i in range(len(head))]
    for n, (cell, note) in enumerate(zip(table, [None, *notes], strict=True)):
        line = "  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=False))
        click.echo(line.rstrip() if note is None else f"{line}  DAMAGED: {note}")
        if n == 0:
            click.echo("  ".join("-" * w for w in widths))


def _print_rows(rows: list[Row]) -> None:
    """``rows`` as the per-tensor table."""
    head = ("run", "batch", "layer", "key", "shape", "dtype", "bytes")
    cells = [
        (_cell(r.run), r.batch, _cell(r.layer), _cell(r.key), r.shape, r.dtype, _fmt_bytes(r.nbytes))
        if r.damaged is None
        else (_cell(r.run), r.batch, _cell(r.layer), _cell(r.key))
        for r in rows
    ]
    _columns(head, cells, [r.damaged for r in rows])


def _totals(rows: list[Row]) -> str:
    good = [r for r in rows if r.damaged is None]
    runs = {r.run for r in rows}
    batches = {(r.run, r.batch) for r in rows if r.batch != "-"}
    size = _fmt_bytes(sum(r.nbytes for r in good))
    return f"{len(runs)} run(s), {len(batches)} batch(es), {len(good)} tensor(s), {size}"


def _print_table(rows: list[Row]) -> int:
    """Print ``rows`` as a table and a summary line; return the number of damaged rows."""
    _print_rows(rows)
    click.echo(_totals(rows))
    return sum(r.damaged is not None for r in rows)


# ---------------------------------------------------------------------------------------------- ls's summary


@dataclass
class RunSummary:
    """One run as ``mi-crow-store ls`` summarizes it (from headers and metadata only).

    Attributes:
        run: The run id.
        batches: Batch indices holding anything (per-batch directories and run batch files).
        layers: The captured layers (the model inputs' pseudo-layer left out), in stored order.
        tokens: The run metadata's ``capture.tokens``; else the sum of every batch's
            metadata ``"tokens"``; ``None`` when neither says.
        d: The widths (last dimension) of the ``activations`` tensors, sorted.
        dtypes: The dtypes of the stored data (masks and input ids left out when other tensors
            are there), most bytes first.
        tensors: Tensors stored (damaged entries not counted).
        nbytes: Their tensor data bytes.
        damaged: The damaged entries: ``(batch, layer, key, reason)``.
    """

    run: str
    batches: int
    layers: list[str]
    tokens: int | None
    d: list[int]
    dtypes: list[str]
    tensors: int
    nbytes: int
    damaged: list[tuple[str, str, str, str]]


@dataclass
class ModelSummary:
    """One model as ``mi-crow-store ls`` summarizes it (its header and metadata.json only).

    Attributes:
        model: The model id.
        tensors: Tensors stored.
        nbytes: Their data bytes.
        dtypes: Their dtypes, most bytes first.
        metadata_keys: The top-level keys of its metadata, sorted.
        damaged: Why it is damaged (``None``: it is not).
    """

    model: str
    tensors: int = 0
    nbytes: int = 0
    dtypes: list[str] = field(default_factory=list)
    metadata_keys: list[str] = field(default_factory=list)
    damaged: str | None = None


_INPUT_KEYS = (_keys.MASK_KEY, _keys.INPUT_IDS_KEY)


def _by_bytes(pairs: Iterable[tuple[str, int]]) -> list[str]:
    """The names of ``pairs`` ``(name, bytes)``, most bytes first (then by name)."""
    total: dict[str, int] = {}
    for name, n in pairs:
        total[name] = total.get(name, 0) + n
    return sorted(total, key=lambda k: (-total[k], k))


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def summarize_run(store: LayoutStore, run: str) -> RunSummary:
    """The :class:`RunSummary` of ``run`` (headers and metadata only; damage is recorded, not raised)."""
    per_batch: dict[int, Any] = {}
    rows = _describe_run(store, run, per_batch)
    good = [r for r in rows if r.damaged is None]
    layers = [r.layer for r in rows if r.layer not in ("-", RUN_BATCH_LAYER, _keys.INPUTS_LAYER)]
    data = [r for r in good if r.layer != _keys.INPUTS_LAYER and r.key not in _INPUT_KEYS] or good
    widths = {json.loads(r.shape)[-1] for r in good if r.key == "activations" and r.shape not in ("", "[]")}
    capture = _run_metadata(store, run)[0].get("capture")
    tokens = _count(capture.get("tokens")) if isinstance(capture, dict) else None
    if tokens is None and per_batch:
        counts = [_count(v) for v in per_batch.values()]
        tokens = None if None in counts else sum(c for c in counts if c is not None)
    return RunSummary(
        run=run,
        batches=len({r.batch for r in rows if r.batch != "-"}),
        layers=list(dict.fromkeys(layers)),
        tokens=tokens,
        d=sorted(widths),
        dtypes=_by_bytes((r.dtype, r.nbytes) for r in data),
        tensors=len(good),
        nbytes=sum(r.nbytes for r in good),
        damaged=[(r.batch, r.layer, r.key, r.damaged) for r in rows if r.damaged is not None],
    )


def summarize_model(store: LayoutStore, model: str) -> ModelSummary:
    """The :class:`ModelSummary` of ``model`` (its header and metadata.json only)."""
    key = store._model_dir(model)
    meta_where = store._where(f"{key}/{_keys.METADATA_FILE}")

    def read(d: DirReader) -> ModelSummary:
        with d.open(_keys.METADATA_FILE) as f:
            meta, _ = store._read_json_object_file(f, meta_where)
        model_file = _keys.in_generation(_keys.MODEL_FILE, named_generation(meta, meta_where))
        where = store._where(f"{key}/{model_file}")
        try:
            with d.open(model_file) as f:
                header = tf.read_header(f, where)
        except FileNotFoundError:
            if d.moved():
                raise
            return ModelSummary(model, damaged=f"{where} is missing (listed in {meta_where})")
        entries = list(header.tensors.values())
        return ModelSummary(
            model,
            tensors=len(entries),
            nbytes=sum(e.end - e.begin for e in entries),
            dtypes=_by_bytes((str(e.dtype).removeprefix("torch."), e.end - e.begin) for e in entries),
            metadata_keys=sorted(k for k in meta if k != _keys.GENERATION_FIELD),
        )

    try:
        return store._consistent_read(key, read, ModelSummary(model, damaged=f"{meta_where} is missing"))
    except FileNotFoundError:
        return ModelSummary(model, damaged=f"{meta_where} is missing")
    except _STORE_ERRORS as e:
        return ModelSummary(model, damaged=_one_line(e))


def _dash(values: Sequence[Any]) -> str:
    return ",".join(map(str, values)) or "-"


def _fit(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _print_runs(runs: list[RunSummary]) -> None:
    head = ("run", "batches", "layers", "tokens", "d", "dtype", "bytes")
    cells = [
        (
            _cell(s.run),
            str(s.batches),
            str(len(s.layers)) if s.layers else "-",
            "-" if s.tokens is None else f"{s.tokens:,}",
            _dash(s.d),
            _fit(_dash(s.dtypes), 32),
            _fmt_bytes(s.nbytes),
        )
        for s in runs
    ]
    notes = [f"{len(s.damaged)} entr{'y' if len(s.damaged) == 1 else 'ies'}" if s.damaged else None for s in runs]
    _columns(head, cells, notes)


def _print_models(models: list[ModelSummary]) -> None:
    head = ("model", "tensors", "dtype", "bytes", "metadata")
    cells = [
        (_cell(m.model),)
        if m.damaged is not None
        else (
            _cell(m.model),
            str(m.tensors),
            _fit(_dash(m.dtypes), 32),
            _fmt_bytes(m.nbytes),
            _fit(_cell(", ".join(m.metadata_keys)) or "-"),
        )
        for m in models
    ]
    _columns(head, cells, [m.damaged for m in models])


def _model_totals(models: list[ModelSummary]) -> str:
    return f"{len(models)} model(s), {_fmt_bytes(sum(m.nbytes for m in models if m.damaged is None))}"


def _summary_totals(runs: list[RunSummary]) -> str:
    return (
        f"{len(runs)} run(s), {sum(s.batches for s in runs)} batch(es), {sum(s.tensors for s in runs)} tensor(s), "
        f"{_fmt_bytes(sum(s.nbytes for s in runs))}"
    )


def _run_json(s: RunSummary) -> dict[str, Any]:
    return {
        "run": s.run,
        "batches": s.batches,
        "layers": s.layers,
        "tokens": s.tokens,
        "d": s.d,
        "dtypes": s.dtypes,
        "tensors": s.tensors,
        "bytes": s.nbytes,
        "damaged": [{"batch": b, "layer": la, "key": k, "reason": why} for b, la, k, why in s.damaged],
    }


def _model_json(m: ModelSummary) -> dict[str, Any]:
    return {
        "model": m.model,
        "tensors": m.tensors,
        "bytes": m.nbytes,
        "dtypes": m.dtypes,
        "metadata_keys": m.metadata_keys,
        "damaged": m.damaged,
    }


def _row_json(r: Row) -> dict[str, Any]:
    return {
        "run": r.run,
        "batch": int(r.batch) if r.batch.isdigit() else None,
        "layer": None if r.damaged is not None and r.layer == "-" else r.layer,
        "key": None if r.damaged is not None and r.key == "-" else r.key,
        "shape": json.loads(r.shape) if r.damaged is None else None,
        "dtype": r.dtype or None,
        "bytes": r.nbytes,
        "damaged": r.damaged,
    }


# ---------------------------------------------------------------------------------------------- where a store is


if TYPE_CHECKING:
    _ParamType = click.ParamType[Any]  # generic in click's stubs since 8.2; a plain class at run time before
else:
    _ParamType = click.ParamType


class _Location(_ParamType):
    """A store's folder or URL. A folder (or ``file://PATH``) becomes a ``Path``, checked as
    ``click.Path(exists=..., file_okay=False)`` checks it (its messages, exit status 2); any other
    URL stays a ``str``, checked by nothing here (``open_store`` knows the schemes)."""

    name = "path_or_url"

    def __init__(self, *, exists: bool):
        self._path = click.Path(exists=exists, file_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        if isinstance(value, Path):
            return value
        text: str = os.fspath(value)
        m = _URL.match(text)
        if m is not None and m.group(1).lower() != "file":
            return text
        path: Path = self._path.convert(text[m.end() :] if m else text, param, ctx)
        return path


def _store_options(where: str = "PATH", top: str = "PATH itself") -> Callable[[F], F]:
    """``--runs-prefix`` and ``--model-prefix``, for stores made with prefixes other than the defaults
    (relative to ``where``; ``''`` puts the runs at ``top``)."""

    def decorate(f: F) -> F:
        f = click.option(
            "--model-prefix",
            default="models",
            show_default=True,
            help=f"The store's model_prefix: the folder of its models, relative to {where}.",
        )(f)
        return click.option(
            "--runs-prefix",
            default="runs",
            show_default=True,
            help=f"The store's runs_prefix: the folder of its runs, relative to {where} ('' for {top}).",
        )(f)

    return decorate


def _open_url(url: str, **options: Any) -> LayoutStore:
    """``open_store(url)``; exit 2 with one line for a scheme no backend serves, a missing extra,
    or options the backend refuses."""
    try:
        return open_store(url, **options)
    except ImportError as e:
        raise _ArgumentError(
            f"cannot open {url}: {_one_line(e)}; s3:// stores need the s3 extra: {S3_EXTRA_HINT}"
        ) from None
    except ValueError as e:
        raise _ArgumentError(_one_line(e)) from None
    except _store_errors() as e:
        if isinstance(e, OSError):
            raise  # I/O: exit 1, as any store error
        raise _ArgumentError(f"cannot open {url}: {_one_line(e)}") from None


def _open_for_writing(location: Path | str, **options: Any) -> LayoutStore:
    """The store a command writes into (created on first write); exit 2 for invalid options."""
    if isinstance(location, str):
        return _open_url(location, **options)
    try:
        return LocalStore(location, **options)
    except ValueError as e:
        raise _ArgumentError(_one_line(e)) from None


class _Group(click.Group):
    """The command group, with one backstop: a store error (``OSError``, ``ValueError``) that a
    command did not handle becomes one line ``Error: ...`` and exit status 1, never a traceback.
    Any other exception is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise  # `mi-crow-store ls DIR | head`: click's main ends quietly
        except _store_errors() as e:
            raise click.ClickException(_one_line(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mi-crow-store")
def main() -> None:
    """mi-crow-store: persistence for activations, runs and models.

    \b
    ls, stats, verify, gc and copy (its SRC) take the folder of a store.
    A folder is a store when it holds the runs directory (--runs-prefix,
    default runs/) or the models directory (--model-prefix, default models/)
    as a real directory, not a symbolic link, or the store's lock file
    .mi-crow-store.lock. With --runs-prefix '' the runs live directly in the
    folder, so any folder is one.

    \b
    Every command also takes a URL where it takes a folder: s3://bucket/prefix
    (object storage; pip install 'mi-crow-store[s3]'; endpoint, region and keys
    from the AWS_* environment variables), memory:// (a new, empty store in this
    process: for tests) or file://PATH (the folder PATH). A URL is not checked
    for being a store: one holding nothing lists and verifies as empty. A folder
    whose name looks like a URL is written ./NAME.

    \b
    Exit status: 0 done and nothing damaged; 1 damaged entries found, or a store
    error stopped the command; 2 bad arguments (not a store, no such run, an
    invalid name, an unknown option, a URL scheme no store serves, a missing
    extra).
    """


# The demos' runs say in their metadata which demo wrote them: a demo replaces only a run it wrote.
DEMO_FIELD = "demo"
DEMO_WRITER = "mi-crow-store demo"
DEV_DEMO_WRITER = "./dev demo"
DEMO_STORE, DEMO_RUN = "mi-crow-random-demo", "random-demo"
DEV_DEMO_STORE, DEV_DEMO_RUN = "mi-crow-demo-store", "minilm-demo"


class DemoRunExistsError(FileExistsError):
    """A demo was asked to write a run that it did not write (a real capture, or another demo's)."""


def claim_demo_run(store: LayoutStore, run_id: str, writer: str) -> None:
    """Make ``run_id`` ready for the demo ``writer``: delete the run if that demo wrote it, and
    start it with run metadata ``{"demo": writer}`` (what the next call recognises).

    Raises:
        DemoRunExistsError: If the run exists and its metadata does not name ``writer`` under
            ``"demo"`` (nothing is changed).
        ValueError: If ``run_id`` is not a valid name.
    """
    check_name(run_id, "run id")
    if run_id in store.list_runs():
        meta, damaged = _run_metadata(store, run_id)
        if damaged is not None or meta.get(DEMO_FIELD) != writer:
            if damaged is not None:
                says = f"its metadata is damaged: {damaged}"
            elif DEMO_FIELD in meta:
                says = f"its metadata says {DEMO_FIELD!r}: {meta[DEMO_FIELD]!r}"
            else:
                says = f"its metadata has no {DEMO_FIELD!r} field"
            raise DemoRunExistsError(
                f"run {run_id!r} already exists in {store._where(store.runs_prefix)} and was not written by {writer} "
                f"({says}): {writer} replaces only its own run; pass another --run or --store, or delete that run "
                "yourself"
            )
        store.delete_run(run_id)
    store.put_run_metadata(run_id, {DEMO_FIELD: writer})


@main.command()
@click.option(
    "--store",
    "store_dir",
    default=DEMO_STORE,
    show_default=True,
    type=_Location(exists=False),
    help="Folder (or URL) of the store to write the demo run into.",
)
@click.option("--run", "run_id", default=DEMO_RUN, show_default=True, help="The demo run's id.")
@click.option("--batches", default=3, show_default=True, type=click.IntRange(1, 1000))
def demo(store_dir: Path | str, run_id: str, batches: int) -> None:
    """Write a small multi-layer run of random data into a store, read it back, and print it.

    Running it again replaces the run it wrote before (its metadata says "demo": "mi-crow-store
    demo"); any other run of that name is refused (exit 2). `./dev demo` captures a real model
    into another folder and run (mi-crow-demo-store, minilm-demo).
    """
    store = _open_for_writing(store_dir)
    try:
        claim_demo_run(store, run_id, DEMO_WRITER)
    except (DemoRunExistsError, ValueError) as e:
        raise _ArgumentError(_one_line(e)) from None
    gen = torch.Generator().manual_seed(0)
    layers = [f"model.layers.{i}" for i in (0, 4, 8, 11)]
    store.put_run_metadata(
        run_id, {DEMO_FIELD: DEMO_WRITER, "model": "demo-random", "layers": layers, "batches": batches}
    )
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
        f"Wrote and verified run {run_id!r} in {_into(store_dir)} ({batches} batches x {len(layers)} layers x 2 keys)\n"
    )
    _print_table(describe(store, [run_id]))
    click.echo(f"\nAt a glance: mi-crow-store ls {store_dir}")


def _last_option(args: Sequence[str], name: str, default: str) -> str:
    """The value click would take for option ``name`` in ``args`` (the last ``--name V`` or ``--name=V``)."""
    value = default
    for n, arg in enumerate(args):
        if arg == name and n + 1 < len(args):
            value = args[n + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
    return value


def _dev_demo(step: str, args: Sequence[str]) -> int:
    """``./dev demo``'s guard around ``mi-crow-store capture``, on the ``--store`` and ``--run`` that
    ``args`` (capture's arguments) give: ``claim`` before it (:func:`claim_demo_run`: a run that
    ./dev demo did not write is refused, exit 2), ``mark`` after it (the run's metadata names
    ./dev demo again, in case the arguments made capture replace the run)."""
    location = _Location(exists=False).convert(_last_option(args, "--store", DEV_DEMO_STORE), None, None)
    run_id = _last_option(args, "--run", DEV_DEMO_RUN)
    try:
        store = _open_for_writing(location)
        if step == "claim":
            claim_demo_run(store, run_id, DEV_DEMO_WRITER)
        else:
            store.update_run_metadata(run_id, lambda meta: {**meta, DEMO_FIELD: DEV_DEMO_WRITER})
    except click.ClickException as e:
        click.echo(f"./dev demo: {_one_line(e.format_message())}", err=True)
        return EXIT_USAGE
    except Exception as e:
        if not isinstance(e, _store_errors()):
            raise
        click.echo(f"./dev demo: {_one_line(e)}", err=True)
        return EXIT_USAGE if isinstance(e, (DemoRunExistsError, ValueError)) else EXIT_DAMAGED
    return 0


def _into(location: Path | str) -> str:
    """``DIR/`` for a folder, the URL itself for a URL."""
    return f"{location}/" if isinstance(location, Path) else location


def _real_dir(path: Path, rel: str) -> bool:
    """Whether ``path/rel`` is a directory reached through no symbolic link below ``path``."""
    cur = os.fspath(path)
    for part in rel.split("/") if rel else []:
        cur = os.path.join(cur, part)
        try:
            if not stat.S_ISDIR(os.lstat(cur).st_mode):
                return False
        except OSError:
            return False
    return True


def _is_store(path: Path, runs_prefix: str, model_prefix: str) -> bool:
    """The rule of the group's help: a runs or models directory, or the lock file."""
    try:
        has_lock = stat.S_ISREG(os.lstat(path / LOCK_NAME).st_mode)
    except OSError:
        has_lock = False
    return has_lock or _real_dir(path, runs_prefix) or _real_dir(path, model_prefix)


def _open_store(path: Path | str, runs_prefix: str, model_prefix: str) -> LayoutStore:
    """The store at ``path``; exit 2 with one line if the prefixes are invalid or ``path`` is no store.

    A URL opens through ``open_store``, with no check that anything is there."""
    if isinstance(path, str):
        return _open_url(path, runs_prefix=runs_prefix, model_prefix=model_prefix)
    try:
        store = LocalStore(path, runs_prefix=runs_prefix, model_prefix=model_prefix)
    except ValueError as e:
        raise _ArgumentError(_one_line(e)) from None
    if not _is_store(path, runs_prefix, model_prefix):
        raise _ArgumentError(
            f"{path} is not a mi-crow-store store: it has no {runs_prefix or '.'}/ or {model_prefix}/ directory "
            f"and no {LOCK_NAME} (pass --runs-prefix/--model-prefix for a store made with other prefixes)"
        )
    return store


def _runs_phrase(existing: list[str], limit: int = 20) -> str:
    if not existing:
        return "the store has no runs"
    shown = ", ".join(existing[:limit])
    more = f" and {len(existing) - limit} more" if len(existing) > limit else ""
    return f"its runs are: {shown}{more}"


def _select_runs(store: LayoutStore, path: Path | str, runs: tuple[str, ...]) -> list[str] | None:
    """The runs named by ``--run`` (``None``: all), each checked to be a valid name and an existing run."""
    if not runs:
        return None
    wanted = list(dict.fromkeys(runs))
    for run in wanted:
        try:
            check_name(run, "--run")
        except ValueError as e:
            raise _ArgumentError(_one_line(e)) from None
    existing = store.list_runs()
    missing = [run for run in wanted if run not in existing]
    if missing:
        what = f"run {missing[0]!r}" if len(missing) == 1 else "runs " + ", ".join(map(repr, missing))
        raise _ArgumentError(f"no {what} in {path}; {_runs_phrase(existing)}")
    return wanted


@main.command(name="ls")
@click.argument("path", type=_Location(exists=True))
@click.option("--run", "runs", multiple=True, help="Only this run (repeatable; it must exist); lists its tensors.")
@click.option("--tensors", "view", flag_value="tensors", help="One row per stored tensor (the default with --run).")
@click.option(
    "--summary", "view", flag_value="summary", help="One row per run and per model (the default without --run)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the same as JSON, for scripts.")
@_store_options()
def ls(
    path: Path | str, runs: tuple[str, ...], view: str | None, as_json: bool, runs_prefix: str, model_prefix: str
) -> None:
    """List the store at PATH (a folder or a URL): its runs and models at a glance, or every tensor.

    \b
    mi-crow-store ls DIR                 one row per run (batches, layers, tokens, d, dtype,
                                         bytes) and per model (tensors, dtype, bytes, metadata)
    mi-crow-store ls DIR --run RUN       one row per tensor of RUN (batch, layer, key, shape,
                                         dtype, bytes); --tensors: of every run, then the models
    mi-crow-store ls DIR --json          the same as JSON (--tensors --json, --run RUN --json too)

    Reads only safetensors headers and JSON metadata, never tensor data. Tokens come from the
    run's metadata (capture.tokens), else from its batches' metadata ("tokens"), else "-".
    With --run, models are left out. A damaged entry is reported (DAMAGED: and the reason) and the
    listing goes on; the exit status is then 1 (`mi-crow-store verify` checks the data too).
    """
    store = _open_store(path, runs_prefix, model_prefix)
    selected = _select_runs(store, path, runs)
    tensors = view == "tensors" or (view is None and selected is not None)
    models = [summarize_model(store, m) for m in store.list_models()] if selected is None else []
    if tensors:
        rows = describe(store, selected)
        damaged = sum(r.damaged is not None for r in rows)
        if as_json:
            good = [r for r in rows if r.damaged is None]
            counts = (len({r.run for r in rows}), len({(r.run, r.batch) for r in rows if r.batch != "-"}))
            listing = {"tensors": [_row_json(r) for r in rows]}
            _echo_json(listing, *counts, len(good), sum(r.nbytes for r in good), models, damaged)
        else:
            _print_rows(rows)
            _print_model_section(models)
            click.echo(_totals(rows) + (f"; {_model_totals(models)}" if models else ""))
    else:
        summaries = [summarize_run(store, run) for run in (store.list_runs() if selected is None else selected)]
        damaged = sum(len(s.damaged) for s in summaries)
        if as_json:
            counts = (len(summaries), sum(s.batches for s in summaries))
            listing = {"runs": [_run_json(s) for s in summaries]}
            _echo_json(
                listing, *counts, sum(s.tensors for s in summaries), sum(s.nbytes for s in summaries), models, damaged
            )
        else:
            if summaries:
                _print_runs(summaries)
            _print_model_section(models, blank=bool(summaries))
            for s in summaries:
                for batch, layer, key, why in s.damaged:
                    where = " ".join(
                        x
                        for x in (f"batch {batch}" if batch != "-" else "", _cell(layer), _cell(key))
                        if x != "-" and x
                    )
                    click.echo(f"DAMAGED run {_cell(s.run)}{' ' + where if where else ''}: {why}")
            click.echo(_summary_totals(summaries) + (f"; {_model_totals(models)}" if models else ""))
    damaged += sum(m.damaged is not None for m in models)
    if damaged:
        if not as_json:
            click.echo(
                f"{damaged} damaged entr{'y' if damaged == 1 else 'ies'}; `mi-crow-store verify {path}` checks all"
            )
        sys.exit(EXIT_DAMAGED)


def _echo_json(
    listing: dict[str, Any],
    runs: int,
    batches: int,
    tensors: int,
    nbytes: int,
    models: list[ModelSummary],
    damaged: int,
) -> None:
    """``ls --json``: ``listing`` (``runs`` or ``tensors``), ``models``, and ``totals``."""
    totals = {
        "runs": runs,
        "batches": batches,
        "tensors": tensors,
        "bytes": nbytes,
        "models": len(models),
        "model_bytes": sum(m.nbytes for m in models if m.damaged is None),
        "damaged": damaged + sum(m.damaged is not None for m in models),
    }
    click.echo(json.dumps({**listing, "models": [_model_json(m) for m in models], "totals": totals}, indent=2))


def _print_model_section(models: list[ModelSummary], *, blank: bool = True) -> None:
    if models:
        if blank:
            click.echo()
        _print_models(models)


def _bars() -> bool | None:
    """``progress=`` for the Python API's bars: shown on a terminal (unless quiet mode), never into
    a pipe or a file, where the command's own lines are the output."""
    return None if sys.stderr.isatty() else False


def _check(store: LayoutStore, selected: list[str] | None) -> tuple[list[Problem], list[tuple[str, str]]]:
    """``store.check(selected)``, one run at a time where needed, so that a store error is reported
    as one ``(what, error)`` pair and the other runs are still checked."""
    if selected is None:
        try:
            return store.check(progress=_bars()), []
        except _STORE_ERRORS as e:
            stopped = _one_line(e)  # the whole-store check stopped: find out where, run by run
    problems: list[Problem] = []
    errors: list[tuple[str, str]] = []
    for run in store.list_runs() if selected is None else selected:
        try:
            problems += store.check([run], progress=_bars())
        except _STORE_ERRORS as e:
            errors.append((f"run {run!r}", _one_line(e)))
    if selected is None and not errors:
        errors.append(("models", stopped))  # every run checked on its own: the models stopped it
    return problems, errors


@main.command()
@click.argument("path", type=_Location(exists=True))
@click.option(
    "--run", "runs", multiple=True, help="Only this run (repeatable; it must exist); models are then skipped."
)
@_store_options()
def verify(path: Path | str, runs: tuple[str, ...], runs_prefix: str, model_prefix: str) -> None:
    """Check every entry of the store at PATH (a folder or a URL); print each damaged file. Exit 1 if any.

    The final line says what was verified ("ok: ..."), or that the store holds nothing to verify.
    In a folder, leftovers of interrupted writes are counted too (a note; `gc` removes them).
    """
    store = _open_store(path, runs_prefix, model_prefix)
    selected = _select_runs(store, path, runs)
    problems, errors = _check(store, selected)
    for p in problems:
        click.echo(f"CORRUPT {p.path}: {p.problem}")
    for what, error in errors:
        click.echo(f"ERROR {what} could not be checked: {error}")
    leftovers = _leftovers(path) if isinstance(path, Path) else []
    if leftovers:
        click.echo(
            f"note: {len(leftovers)} leftover(s) of interrupted writes (not data); "
            f"`mi-crow-store gc {path}` removes them"
        )
    scope = "all runs and models" if selected is None else ", ".join(selected)
    if problems or errors:
        summary = f"{len(problems)} damaged file(s) in {scope}"
        if errors:
            summary += f"; {len(errors)} part(s) could not be checked"
        click.echo(summary)
        sys.exit(EXIT_DAMAGED)
    if selected is None:
        n_runs, n_models = len(store.list_runs()), len(store.list_models())
        if n_runs + n_models == 0:
            click.echo(f"nothing to verify: the store at {path} has no runs and no models")
            return
        counted = f"{n_runs} run(s), {n_models} model(s)"
    else:
        counted = f"{len(selected)} run(s)"
    click.echo(f"ok: {scope} verified ({counted})")


def _leftovers(path: Path) -> list[Path]:
    """The temp files and staging/trash directories of interrupted writes under ``path``, as ``gc``
    finds them: symbolic links are not followed, and a leftover directory is one leftover."""
    prefixes = (_atomic.TMP_PREFIX, _atomic.STAGE_PREFIX, _atomic.TRASH_PREFIX)
    found: list[Path] = []
    for root, dirs, files in os.walk(path, followlinks=False):
        found += [Path(root, name) for name in dirs + files if name.startswith(prefixes)]
        dirs[:] = [d for d in dirs if not d.startswith(prefixes)]
    return sorted(found)


@main.command()
@click.argument("path", type=_Location(exists=True))
@click.option(
    "--grace",
    "grace_seconds",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help=f"Object stores only: leave leftovers younger than this alone, as writes that may still be running "
    f"(default {GC_GRACE_DEFAULT:g}). Refused for a folder: a local store's gc waits for running writes instead.",
)
@_store_options()
def gc(path: Path | str, grace_seconds: float | None, runs_prefix: str, model_prefix: str) -> None:
    """Remove temp files and directories that interrupted writes left in the store at PATH.

    In a folder, gc waits until no write is in progress (writers hold a lock) and removes every
    leftover. On object storage no lock can say so: leftovers (uploads of writes that never
    committed) are removed once older than --grace seconds.
    """
    if isinstance(path, Path) and grace_seconds is not None:
        raise _ArgumentError(
            "--grace applies to object stores (s3://) only: a local store's gc waits for running writes "
            "(a lock) and needs no grace period"
        )
    store = _open_store(path, runs_prefix, model_prefix)
    if isinstance(store, LocalStore) and isinstance(path, Path):
        report = store.gc()
    else:
        collect = getattr(store, "gc", None)
        if collect is None:
            raise _ArgumentError(
                f"gc does not apply to {path}: a {type(store).__name__} keeps no leftovers of interrupted writes"
            )
        report = collect(grace_seconds=GC_GRACE_DEFAULT if grace_seconds is None else grace_seconds)
    for removed in report.removed:
        click.echo(f"removed {removed}")
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"{len(report.removed)} leftover(s) removed, {_fmt_bytes(report.bytes_freed)} freed")


def _inside(a: Path, b: Path) -> bool:
    """Whether folder ``a`` is ``b`` or lies inside it (both resolved; ``b`` need not exist)."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _copy_target(dst: Path | str, src: Path | str, runs_prefix: str, model_prefix: str) -> LayoutStore:
    """The store ``copy`` writes into: a URL, or a folder that is new, empty, or a store (not SRC)."""
    if isinstance(dst, str):
        return _open_url(dst, runs_prefix=runs_prefix, model_prefix=model_prefix)
    if isinstance(src, Path) and (_inside(dst, src) or _inside(src, dst)):
        raise _ArgumentError(f"DST {dst} and SRC {src} are the same folder, or one lies inside the other")
    if dst.exists() and any(dst.iterdir()) and not _is_store(dst, runs_prefix, model_prefix):
        raise _ArgumentError(
            f"{dst} is not empty and not a mi-crow-store store: copy into a new or empty folder, or into a store "
            f"(it has no {runs_prefix or '.'}/ or {model_prefix}/ directory and no {LOCK_NAME})"
        )
    return _open_for_writing(dst, runs_prefix=runs_prefix, model_prefix=model_prefix)


@main.command(name="copy")
@click.argument("src", type=_Location(exists=True))
@click.argument("dst", type=_Location(exists=False))
@click.option(
    "--run",
    "runs",
    multiple=True,
    help="Only this run (repeatable; it must exist in SRC); models are still copied unless --no-models.",
)
@click.option("--no-models", is_flag=True, help="Do not copy the models.")
@_store_options("SRC and to DST alike", "their top")
def copy_command(
    src: Path | str, dst: Path | str, runs: tuple[str, ...], no_models: bool, runs_prefix: str, model_prefix: str
) -> None:
    """Copy the runs and models of the store SRC into DST (folders or URLs), verified and resumable.

    \b
    mi-crow-store copy ./store s3://bucket/prefix
    mi-crow-store copy s3://bucket/prefix ./store --run run-1

    Every entry is read from SRC with its checksums verified, written to DST, read back (verified)
    and compared bit for bit; a damaged SRC file stops the copy (exit 1) naming it. Run the same
    command again after an interruption (even a kill): entries DST already holds, equal, are
    skipped; missing or different ones are written (the source's version wins). A run's
    metadata is written last. Nothing is deleted from DST. Files that are not store entries (a
    trainer's model.pt in a run folder) are not copied. DST, a folder, is created if missing; an
    existing one must be empty or a store.
    """
    source = _open_store(src, runs_prefix, model_prefix)
    selected = _select_runs(source, src, runs)
    target = _copy_target(dst, src, runs_prefix, model_prefix)
    report = copy_store(source, target, runs=selected, models=not no_models, progress=click.echo)
    entries = "entry" if report.copied == 1 else "entries"
    click.echo(
        f"copied {report.copied} {entries} ({_fmt_bytes(report.bytes_copied)}), {report.skipped} already present, "
        f"from {src} to {dst}"
    )


def layer_figures(stats: LayerStats) -> dict[str, Any]:
    """What ``mi-crow-store stats`` prints for one layer: the figures a researcher checks first.

    ``rows`` (count), ``d``, ``mean_norm`` and ``mean_sq_norm`` of the rows, the per-dimension
    means (their mean and largest magnitude), the per-dimension variances (mean, min, max),
    ``constant_dims`` (dimensions with zero variance: dead or constant features) and
    ``norm_scaling_factor`` (``sqrt(d) / mean_norm``: SAELens's activation norm scaling, which
    makes the mean row norm ``sqrt(d)``; ``None`` when the mean norm is 0).
    """
    var = stats.var
    empty = stats.count == 0 or stats.d == 0
    return {
        "rows": stats.count,
        "d": stats.d,
        "mean_norm": stats.mean_norm,
        "mean_sq_norm": stats.mean_sq_norm,
        "mean_of_means": None if empty else float(stats.mean.mean()),
        "max_abs_mean": None if empty else float(stats.mean.abs().max()),
        "mean_var": None if empty else float(var.mean()),
        "min_var": None if empty else float(var.min()),
        "max_var": None if empty else float(var.max()),
        "constant_dims": None if empty else int((var == 0).sum()),
        "norm_scaling_factor": math.sqrt(stats.d) / stats.mean_norm if stats.mean_norm > 0 else None,
    }


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4g}"


STATS_HINT = (
    "capture it with `mi-crow-store capture` or ActivationCapture of mi-crow-store 0.2 or later, which record "
    "the count, mean, variance and norms of every layer"
)


@main.command()
@click.argument("path", type=_Location(exists=True))
@click.argument("run")
@click.option("--layer", "layers", multiple=True, help="Only this layer (repeatable); it must have statistics.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON, for scripts.")
@_store_options()
def stats(
    path: Path | str, run: str, layers: tuple[str, ...], as_json: bool, runs_prefix: str, model_prefix: str
) -> None:
    """Print the per-layer statistics of RUN in the store at PATH (from its metadata; no tensor is read).

    \b
    layer     the captured layer
    rows      rows (non-padding tokens) the statistics cover
    d         the rows' width
    mean_norm, mean_sq_norm
              mean L2 norm and mean squared L2 norm of a row
    mean, max|mean|
              the per-dimension means: their mean, their largest magnitude
    mean_var, max_var
              the per-dimension variances: their mean, their largest
    scale     sqrt(d) / mean_norm: SAELens's norm scaling factor

    --json adds min_var and constant_dims (dimensions of zero variance). A run captured without
    statistics is refused (exit 2) with how to get them.
    """
    store = _open_store(path, runs_prefix, model_prefix)
    try:
        check_name(run, "RUN")
    except ValueError as e:
        raise _ArgumentError(_one_line(e)) from None
    _select_runs(store, path, (run,))
    try:
        found = read_stats(store, run)
    except KeyError as e:
        raise _ArgumentError(
            f"run {run!r} in {path} has no per-layer statistics (capture.stats in its metadata): {STATS_HINT}"
        ) from e
    wanted = list(dict.fromkeys(layers)) or list(found)
    missing = [layer for layer in wanted if layer not in found]
    if missing:
        what = f"layer {missing[0]!r}" if len(missing) == 1 else "layers " + ", ".join(map(repr, missing))
        raise _ArgumentError(
            f"no statistics for {what} in run {run!r}; its layers with statistics are: {', '.join(found)}"
        )
    figures = {layer: layer_figures(found[layer]) for layer in wanted}
    if as_json:
        click.echo(json.dumps({"run": run, "layers": figures}, indent=2))
        return
    head = ("layer", "rows", "d", "mean_norm", "mean_sq_norm", "mean", "max|mean|", "mean_var", "max_var", "scale")
    names = ("rows", "d", "mean_norm", "mean_sq_norm", "mean_of_means", "max_abs_mean", "mean_var", "max_var")
    cells = [
        (_cell(layer), *(_num(f[n]) for n in names), _num(f["norm_scaling_factor"])) for layer, f in figures.items()
    ]
    _columns(head, cells, [None] * len(cells))


# Commands defined in modules of their own (each registers itself on ``main`` when imported).
from mi_crow.store import _cli_capture, _cli_export  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
