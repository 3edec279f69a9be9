"""The ``mi-crow-store`` command line (also ``python -m mi_crow.store``)."""

from __future__ import annotations

import math
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import click
import torch

from mi_crow.store import _atomic, _keys
from mi_crow.store import _tensor_file as tf
from mi_crow.store._commit import named_generation
from mi_crow.store._copy import copy_store
from mi_crow.store._layout import LayoutStore, Problem
from mi_crow.store._names import check_name
from mi_crow.store._open import open_store
from mi_crow.store.local_store import LOCK_NAME, LocalStore

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
    """One line of ``mi-crow-store ls``: a stored tensor, or a damaged entry (``damaged`` says why)."""

    run: str
    batch: str
    layer: str
    key: str
    shape: str = ""
    dtype: str = ""
    nbytes: int = 0
    damaged: str | None = None


def _tensor_row(run: str, batch: int, layer: str, key: str, e: tf.TensorEntry) -> Row:
    return Row(
        run, str(batch), layer, _cell(key), str(list(e.shape)), str(e.dtype).removeprefix("torch."), e.end - e.begin
    )


def describe(store: LayoutStore, runs: Iterable[str] | None = None) -> list[Row]:
    """One row per stored tensor: (run, batch, layer, key, shape, dtype, bytes, damaged).

    Reads only safetensors headers, never tensor data. A damaged entry (a file that is missing,
    truncated or unparseable, a metadata.json naming unsafe paths) becomes one row with
    ``damaged`` set, and the listing goes on. Every layer and key read from a metadata.json
    passes the store's name validator before any path is built from it.
    """
    rows: list[Row] = []
    for run in store.list_runs() if runs is None else runs:
        try:
            rows += _describe_run(store, run)
        except _STORE_ERRORS as e:
            rows.append(Row(run, "-", "-", "-", damaged=_one_line(e)))
    return rows


def _describe_run(store: LayoutStore, run: str) -> list[Row]:
    rows: list[Row] = []
    entries = set(store._list(store._run_dir(run)))
    for i in store.list_run_batches(run):
        if (_keys.batch_dir_name(i), True) in entries:
            rows += _describe_batch_dir(store, run, i, store._batch_dir(run, i))
        if (_keys.run_batch_file_name(i), False) in entries:
            rows += _describe_run_batch(store, run, i, store._run_batch_file(run, i))
    return rows


def _describe_batch_dir(store: LayoutStore, run: str, i: int, batch_dir: str) -> list[Row]:
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
        return [Row(run, str(i), "(run batch)", "-", damaged=_one_line(e))]
    return [_tensor_row(run, i, "(run batch)", name, e) for name, e in sorted(header.tensors.items())]


def _print_table(rows: list[Row]) -> int:
    """Print ``rows`` as a table and a summary line; return the number of damaged rows."""
    head = ("run", "batch", "layer", "key", "shape", "dtype", "bytes")
    good = [r for r in rows if r.damaged is None]
    cells = [head] + [(*r[:6], _fmt_bytes(r.nbytes)) if r.damaged is None else r[:4] for r in rows]
    widths = [max(len(c[i]) for c in cells if len(c) > i) for i in range(len(head))]
    for n, (row, cell) in enumerate(zip([None, *rows], cells, strict=True)):
        line = "  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=False))
        if row is not None and row.damaged is not None:
            line += f"  DAMAGED: {row.damaged}"
        click.echo(line.rstrip())
        if n == 0:
            click.echo("  ".join("-" * w for w in widths))
    runs = {r.run for r in rows}
    batches = {(r.run, r.batch) for r in rows if r.batch != "-"}
    size = _fmt_bytes(sum(r.nbytes for r in good))
    click.echo(f"{len(runs)} run(s), {len(batches)} batch(es), {len(good)} tensor(s), {size}")
    return len(rows) - len(good)


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
    ls, verify, gc and copy (its SRC) take the folder of a store.
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


@main.command()
@click.option(
    "--store",
    "store_dir",
    default="mi-crow-demo-store",
    show_default=True,
    type=_Location(exists=False),
    help="Folder (or URL) of the store to write the demo run into.",
)
@click.option("--batches", default=3, show_default=True, type=click.IntRange(1, 1000))
def demo(store_dir: Path | str, batches: int) -> None:
    """Write a small multi-layer run into a store, read it back, and print it."""
    store = _open_for_writing(store_dir)
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
        f"Wrote and verified run {run_id!r} in {_into(store_dir)} ({batches} batches x {len(layers)} layers x 2 keys)\n"
    )
    _print_table(describe(store, [run_id]))


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
@click.option("--run", "runs", multiple=True, help="Only this run (repeatable); it must exist.")
@_store_options()
def ls(path: Path | str, runs: tuple[str, ...], runs_prefix: str, model_prefix: str) -> None:
    """Print the runs, batches, layers, keys, shapes, dtypes and sizes of the store at PATH (a folder or a URL).

    A damaged entry is printed as its row with DAMAGED: and the reason in place of the shape,
    and the listing goes on; the exit status is then 1 (`mi-crow-store verify` checks the data too).
    """
    store = _open_store(path, runs_prefix, model_prefix)
    damaged = _print_table(describe(store, _select_runs(store, path, runs)))
    if damaged:
        click.echo(f"{damaged} damaged entr{'y' if damaged == 1 else 'ies'}; `mi-crow-store verify {path}` checks all")
        sys.exit(EXIT_DAMAGED)


def _check(store: LayoutStore, selected: list[str] | None) -> tuple[list[Problem], list[tuple[str, str]]]:
    """``store.check(selected)``, one run at a time where needed, so that a store error is reported
    as one ``(what, error)`` pair and the other runs are still checked."""
    if selected is None:
        try:
            return store.check(), []
        except _STORE_ERRORS as e:
            stopped = _one_line(e)  # the whole-store check stopped: find out where, run by run
    problems: list[Problem] = []
    errors: list[tuple[str, str]] = []
    for run in store.list_runs() if selected is None else selected:
        try:
            problems += store.check([run])
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


# Commands defined in modules of their own (each registers itself on ``main`` when imported).
from mi_crow.store import _cli_capture  # noqa: E402, F401
from mi_crow.store import _cli_export  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
