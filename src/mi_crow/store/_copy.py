"""``copy_store``: copy runs and models from one store to another, verified and resumable.

Works between any two :class:`~mi_crow.store.LayoutStore` backends (a local folder, memory,
object storage), entry by entry, through the public ``Store`` API: what it writes at the
destination is exactly what a program calling ``put_*`` with the source's data would write.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple, TypeVar

import torch

from mi_crow.store import _keys
from mi_crow.store._layout import LayoutStore
from mi_crow.store._progress import progress_bar
from mi_crow.store.errors import CorruptFileError, StoreError
from mi_crow.store.store import RunBatch, Store, TensorMetadata

__all__ = ["CopyConflictError", "CopyReport", "copy_store"]

T = TypeVar("T")
Entry = Tuple[Dict[str, Any], TensorMetadata]  # a detector batch or a run-level append: (metadata, tensors)
Model = Tuple[Dict[str, torch.Tensor], Dict[str, Any]]  # get_model's (tensors, metadata)


@dataclass(frozen=True)
class CopyReport:
    """What :func:`copy_store` did.

    Attributes:
        copied: Entries written to the destination (missing there, or different).
        skipped: Entries the destination already held, equal bit for bit; not written again.
        bytes_copied: Tensor data bytes of the entries written (metadata JSON not counted).

    An *entry* is one run's metadata, one per-batch detector batch (``batch_{i}/``), one run
    batch (``batch_{i:06d}.safetensors``), one run-level append, or one model.
    """

    copied: int = 0
    skipped: int = 0
    bytes_copied: int = 0


class CopyConflictError(StoreError, FileExistsError):
    """The destination holds run-level appends that are not a prefix of the source's.

    ``copy_store`` never rewrites, reorders or duplicates an append log; delete the run at the
    destination (``delete_run``) and copy it again.

    Attributes:
        path: The destination's append log, as the destination names it.
        reason: What differs.
    """

    def __init__(self, path: str, reason: str):
        OSError.__init__(self, f"cannot copy into {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type[CopyConflictError], tuple[str, str]]:
        return type(self), (self.path, self.reason)


def copy_store(
    src: Store,
    dst: Store,
    *,
    runs: Sequence[str] | None = None,
    models: bool = True,
    progress: bool | Callable[[str], None] | None = None,
) -> CopyReport:
    """Copy runs and models from ``src`` to ``dst``, verifying every entry, resumably.

    For each run (in ``runs`` order; all of ``src.list_runs()`` when None), in this order:
    its per-batch detector batches (``get_detector_metadata`` → ``put_detector_metadata``) and
    run batches (``get_run_batch`` → ``put_run_batch``, a list stays a list and a dict a dict;
    an index may have both) by batch index, its run-level appends in order
    (``iter_run_detector_metadata`` → ``put_run_detector_metadata``), and **last** its run
    metadata: at a destination that did not hold the run, the run's ``meta.json`` appearing
    means the whole run has been copied (for a source run that has metadata). Then, unless
    ``models`` is False, every model (``get_model`` → ``put_model``).

    **Verified.** The source is read with checksum verification (on a shallow copy of ``src``;
    the caller's store is not changed), so a damaged source file raises ``CorruptFileError``
    naming it and nothing is written for that entry; the copy stops there. After writing, each
    entry is read back from the destination, verified again, and compared bit for bit with what
    was read from the source (dtype, shape and bytes of every tensor, the metadata, list or
    dict); a difference raises ``CorruptFileError`` naming the entry at the destination. The
    appends of a run are read back together once the run's new ones are written, compared with
    a BLAKE2b digest of each source entry's bits (so the source is read once).

    **Resumable.** Run it again after an interruption (an error, a SIGKILL at any instant):
    an entry the destination already holds, equal bit for bit, is skipped (and counted in
    ``skipped``); one that is missing, damaged or different is written (the source's version
    replaces it, counted in ``copied``). An append log is only ever extended: if the
    destination holds the first k appends of the source, only the rest are appended; if one of
    them differs, :class:`CopyConflictError` is raised and nothing is appended. Nothing is
    deleted from the destination: entries only it holds (other runs, batches, models, appends
    past the source's) stay.

    **Not copied**: files that are not the store's entries, such as the ``model.pt``,
    ``history.json`` and ``snapshots/`` that mi_crow's ``SaeTrainer`` saves in a run folder,
    anything under ``dataset_prefix``, leftovers of interrupted writes, and a per-batch
    directory without a ``metadata.json`` (not a committed batch: the store itself reads it
    as absent; ``progress`` notes it). Copy a source that nothing deletes from or overwrites
    meanwhile; entries added to it meanwhile are copied by the next run of the copy.

    Memory: one entry at a time (its tensors are read memory-mapped where the source
    supports it).

    Args:
        src: The store to copy from; a :class:`~mi_crow.store.LayoutStore` (``LocalStore``,
            ``MemoryStore``, ``ObjectStore``).
        dst: The store to copy into; also a ``LayoutStore``. It may already hold the runs.
        runs: Only these runs (each must exist in ``src``); all runs when None.
        models: Also copy every model.
        progress: A progress bar (tqdm, on stderr; a step per batch, one per run for its
            appends and metadata, one per model): ``True`` shows it,
            ``False`` does not, ``None`` (the default) shows it unless progress bars are
            off (:func:`~mi_crow.store.disable_progress_bars`, or the environment variable
            ``MI_CROW_STORE_DISABLE_PROGRESS_BARS=1``). A callable instead gets one line of
            text when each run, and the models, are done (and notes on entries not copied),
            and no bar is shown: what ``mi-crow-store copy`` prints.

    Returns:
        A :class:`CopyReport`: entries copied, entries skipped, tensor bytes copied.

    Raises:
        TypeError: If a store is not a ``LayoutStore``.
        ValueError: If a run in ``runs`` is not a valid name or not in ``src`` (nothing is copied).
        CorruptFileError: If a source file is damaged, or an entry read back from ``dst``
            differs from the source's.
        CopyConflictError: If ``dst`` holds appends of a run that differ from the source's.
        OSError: If reading or writing fails.

    Examples:
        >>> import torch
        >>> from mi_crow.store import MemoryStore, copy_store
        >>> src, dst = MemoryStore(), MemoryStore()
        >>> _ = src.put_run_batch("r", 0, [torch.ones(3)])
        >>> copy_store(src, dst)
        CopyReport(copied=1, skipped=0, bytes_copied=12)
        >>> copy_store(src, dst)
        CopyReport(copied=0, skipped=1, bytes_copied=0)
    """
    source = _verifying(src, "src")
    target = _verifying(dst, "dst")
    if runs is None:
        selected = source.list_runs()
    else:
        if isinstance(runs, str):
            raise ValueError(f"runs must be a sequence of run ids, not the string {runs!r}")
        selected = list(dict.fromkeys(runs))
        for run in selected:
            source._run_dir(run)  # validates the name
        existing = set(source.list_runs())
        missing = [run for run in selected if run not in existing]
        if missing:
            raise ValueError(f"no run {', '.join(map(repr, missing))} in {source._where(source.runs_prefix)}")
    lines = progress if callable(progress) else None
    listings = {run: _children(source, source._run_dir(run)) for run in selected}
    model_ids = source.list_models() if models else []
    steps = sum(len(dirs) + len(files) + 1 for dirs, files in map(_batch_indices, listings.values()))
    total = _Tally()
    bar = progress_bar(
        False if callable(progress) else progress, total=steps + len(model_ids), unit="entry", desc="copy"
    )
    with bar:
        for run in selected:
            tally = _Tally()
            _copy_run(source, target, run, listings[run], tally, lines, _Steps(bar, total, tally))
            total.add(tally)
            if lines is not None:
                lines(f"run {run!r}: {tally.describe()}")
        if models:
            tally = _Tally()
            held = set(target.list_models())
            step = _Steps(bar, total, tally)
            for model in model_ids:
                _copy_model(source, target, model, model in held, tally)
                step()
            total.add(tally)
            if lines is not None:
                lines(f"models: {tally.describe()}")
    return CopyReport(total.copied, total.skipped, total.bytes)


# ---------------------------------------------------------------------------------------------- helpers


def _verifying(store: Store, what: str) -> LayoutStore:
    """A shallow copy of ``store`` that verifies every read: the same stored data, the caller's
    store left as it is (locks, caches and clients are the copy's own, as in a pickled store)."""
    if not isinstance(store, LayoutStore):
        raise TypeError(
            f"{what} must be a LayoutStore (LocalStore, MemoryStore, ObjectStore), got {type(store).__name__}"
        )
    verifying = copy.copy(store)
    verifying.verify_reads = True
    return verifying


class _Steps:
    """Advances the progress bar by one entry, its figures the copy's so far (``done`` plus ``tally``)."""

    def __init__(self, bar: Any, done: _Tally, tally: _Tally):
        self.bar, self.done, self.tally = bar, done, tally

    def __call__(self) -> None:
        copied = self.done.copied + self.tally.copied
        skipped = self.done.skipped + self.tally.skipped
        size = _fmt_bytes(self.done.bytes + self.tally.bytes)
        self.bar.set_postfix(copied=copied, skipped=skipped, data=size, refresh=False)
        self.bar.update(1)


def _batch_indices(entries: set[tuple[str, bool]]) -> tuple[set[int], set[int]]:
    """The indices of a run's per-batch directories and of its run batch files, from its listing."""
    dirs = {i for name, is_dir in entries if is_dir and (i := _keys.batch_index(name, True)) is not None}
    files = {i for name, is_dir in entries if not is_dir and (i := _keys.batch_index(name, False)) is not None}
    return dirs, files


class _Tally:
    def __init__(self) -> None:
        self.copied = 0
        self.skipped = 0
        self.bytes = 0

    def add(self, other: _Tally) -> None:
        self.copied += other.copied
        self.skipped += other.skipped
        self.bytes += other.bytes

    def describe(self) -> str:
        entries = "entry" if self.copied == 1 else "entries"
        return f"{self.copied} {entries} copied ({_fmt_bytes(self.bytes)}), {self.skipped} already present"


def _fmt_bytes(n: int) -> str:
    """``123 B``, ``4.0 KiB``, ``1.5 GiB`` (as ``mi-crow-store ls`` prints sizes)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def _json_text(obj: Any) -> str:
    """Canonical JSON: equal texts for equal stored JSON (NaN equals NaN; 1 and 1.0, 0.0 and -0.0 differ)."""
    return json.dumps(obj, sort_keys=True, allow_nan=True)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``, as a flat uint8 tensor."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _tensor_diff(a: torch.Tensor, b: torch.Tensor) -> str | None:
    if a.dtype != b.dtype:
        return f"dtype {b.dtype} instead of {a.dtype}"
    if a.shape != b.shape:
        return f"shape {list(b.shape)} instead of {list(a.shape)}"
    if a.device.type != "cpu" or b.device.type != "cpu" or not torch.equal(_raw(a), _raw(b)):
        return "different bytes"
    return None


def _tensors_diff(a: Mapping[Any, torch.Tensor], b: Mapping[Any, torch.Tensor], what: str) -> str | None:
    if set(a) != set(b):
        return f"{what} holds tensors {sorted(b)} instead of {sorted(a)}"
    for name in a:
        d = _tensor_diff(a[name], b[name])
        if d is not None:
            return f"{what}[{name!r}] has {d}"
    return None


def _tm_diff(a: TensorMetadata, b: TensorMetadata) -> str | None:
    if set(a) != set(b):
        return f"layers {sorted(b)} instead of {sorted(a)}"
    for layer in a:
        d = _tensors_diff(a[layer], b[layer], f"layer {layer!r}")
        if d is not None:
            return d
    return None


def _meta_diff(a: Any, b: Any) -> str | None:
    return None if _json_text(a) == _json_text(b) else "different metadata"


def _batch_diff(a: RunBatch, b: RunBatch) -> str | None:
    if isinstance(a, list) != isinstance(b, list):
        kinds = ("a list", "a dict") if isinstance(b, list) else ("a dict", "a list")
        return f"{kinds[0]} instead of {kinds[1]}"
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"a list of {len(b)} tensors instead of {len(a)}"
        return _tensors_diff(dict(enumerate(a)), dict(enumerate(b)), "item")
    assert isinstance(a, Mapping) and isinstance(b, Mapping)
    return _tensors_diff(a, b, "tensor")


def _entry_diff(a: Entry, b: Entry) -> str | None:
    return _meta_diff(a[0], b[0]) or _tm_diff(a[1], b[1])


def _model_diff(a: Model, b: Model) -> str | None:
    return _meta_diff(a[1], b[1]) or _tensors_diff(a[0], b[0], "tensor")


def _nbytes_tm(tm: TensorMetadata) -> int:
    return sum(_nbytes(t) for tensors in tm.values() for t in tensors.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _nbytes_batch(b: RunBatch) -> int:
    return sum(_nbytes(t) for t in (b if isinstance(b, list) else b.values()))


def _digest(entry: Entry) -> bytes:
    """A BLAKE2b digest of an append's bits: its metadata and every tensor's name, dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=32)
    h.update(_json_text(entry[0]).encode())
    for layer in sorted(entry[1]):
        for key in sorted(entry[1][layer]):
            t = entry[1][layer][key]
            h.update(b"\0" + json.dumps([layer, key, str(t.dtype), list(t.shape)]).encode() + b"\0")
            h.update(_raw(t).numpy().data)
    return h.digest()


def _children(store: LayoutStore, key: str) -> set[tuple[str, bool]]:
    return set(store._list(key))


# ---------------------------------------------------------------------------------------------- entries


def _sync(
    tally: _Tally,
    where_src: str,
    where_dst: str,
    value: T,
    present: bool,
    read_dst: Callable[[], T | None],
    write: Callable[[T], object],
    diff: Callable[[T, T], str | None],
    nbytes: Callable[[T], int],
) -> None:
    """Copy one entry, ``value`` as read (verified) from the source: skip it if the destination
    holds it equal; else write it, read it back (verified) and compare."""
    if present:
        try:
            held = read_dst()
        except (OSError, ValueError):
            held = None  # damaged at the destination: replaced below
        if held is not None and diff(value, held) is None:
            tally.skipped += 1
            return
    write(value)
    try:
        back = read_dst()
    except FileNotFoundError as e:
        raise CorruptFileError(where_dst, f"missing after it was copied from {where_src}: {e}") from None
    problem = "it is missing" if back is None else diff(value, back)
    if problem is not None:
        raise CorruptFileError(where_dst, f"read back after copying from {where_src}, it differs: {problem}")
    tally.copied += 1
    tally.bytes += nbytes(value)


def _copy_run(
    src: LayoutStore,
    dst: LayoutStore,
    run: str,
    src_entries: set[tuple[str, bool]],
    tally: _Tally,
    progress: Callable[[str], None] | None,
    step: Callable[[], None],
) -> None:
    """Copy one run (``src_entries``: the source's listing of its folder), calling ``step`` after
    each batch entry and after its appends and metadata."""
    dst_entries = _children(dst, dst._run_dir(run))
    dirs, files = _batch_indices(src_entries)
    for i in sorted(dirs | files):
        if i in dirs:
            _copy_detector_batch(src, dst, run, i, dst_entries, tally, progress)
            step()
        if i in files:
            _copy_run_batch(src, dst, run, i, dst_entries, tally)
            step()
    _copy_appends(src, dst, run, tally)
    # Last: at a destination without the run, its metadata appearing means the run is complete.
    key_src, key_dst = src._run_metadata_file(run), dst._run_metadata_file(run)
    if (_name(key_src), False) in src_entries:
        _sync(
            tally,
            src._where(key_src),
            dst._where(key_dst),
            src.get_run_metadata(run),
            (_name(key_dst), False) in dst_entries,
            lambda: dst.get_run_metadata(run),
            lambda meta: dst.put_run_metadata(run, meta),
            _meta_diff,
            lambda meta: 0,
        )
    step()


def _name(key: str) -> str:
    """The last component of a key."""
    return key.rpartition("/")[2]


def _copy_run_batch(
    src: LayoutStore, dst: LayoutStore, run: str, i: int, dst_entries: set[tuple[str, bool]], tally: _Tally
) -> None:
    """A run batch ``batch_{i:06d}.safetensors``. Read only where its file is listed: ``get_run_batch``
    of an index without one answers from the per-batch layout instead."""
    key_src, key_dst = src._run_batch_file(run, i), dst._run_batch_file(run, i)
    _sync(
        tally,
        src._where(key_src),
        dst._where(key_dst),
        src.get_run_batch(run, i),
        (_name(key_dst), False) in dst_entries,
        lambda: dst.get_run_batch(run, i),
        lambda batch: dst.put_run_batch(run, i, batch),
        _batch_diff,
        _nbytes_batch,
    )


def _has_metadata(store: LayoutStore, batch_dir: str) -> bool:
    return (_keys.METADATA_FILE, False) in _children(store, batch_dir)


def _copy_detector_batch(
    src: LayoutStore,
    dst: LayoutStore,
    run: str,
    i: int,
    dst_entries: set[tuple[str, bool]],
    tally: _Tally,
    progress: Callable[[str], None] | None,
) -> None:
    """A per-batch directory ``batch_{i}/`` (metadata.json and one file per tensor)."""
    src_dir, dst_dir = src._batch_dir(run, i), dst._batch_dir(run, i)

    def read(store: LayoutStore, key: str) -> Entry | None:
        entry = store.get_detector_metadata(run, i)
        if not entry[0] and not entry[1] and not _has_metadata(store, key):
            return None  # no metadata.json: the store reads the batch as absent
        return entry

    entry = read(src, src_dir)
    if entry is None:
        if progress is not None:
            progress(
                f"note: {src._where(src_dir)} has no {_keys.METADATA_FILE} (an unfinished or damaged batch, "
                "which the store reads as absent): not copied"
            )
        return
    _sync(
        tally,
        src._where(src_dir),
        dst._where(dst_dir),
        entry,
        (_name(dst_dir), True) in dst_entries,
        lambda: read(dst, dst_dir),
        lambda e: dst.put_detector_metadata(run, i, e[0], e[1]),
        _entry_diff,
        lambda e: _nbytes_tm(e[1]),
    )


def _copy_appends(src: LayoutStore, dst: LayoutStore, run: str, tally: _Tally) -> None:
    """Extend the destination's append log of ``run`` to the source's, then read it back and compare."""
    where_dst = dst._where(dst._detectors_dir(run))
    where_src = src._where(src._detectors_dir(run))
    digests: List[bytes] = []
    appended = new_bytes = skipped = 0
    held = _guarded(dst.iter_run_detector_metadata(run), where_dst)
    try:
        for n, entry in enumerate(src.iter_run_detector_metadata(run)):
            digests.append(_digest(entry))
            theirs = None if appended else next(held, None)
            if theirs is not None:
                problem = _entry_diff(entry, theirs)
                if problem is not None:
                    raise CopyConflictError(
                        where_dst,
                        f"its run-level append {n} differs from the source's ({problem}); appends are never "
                        "rewritten or reordered: delete the run at the destination and copy it again",
                    )
                skipped += 1
                continue
            dst.put_run_detector_metadata(run, entry[0], entry[1])
            appended += 1
            new_bytes += _nbytes_tm(entry[1])
    finally:
        held.close()
    tally.skipped += skipped
    if not appended:
        return
    # The whole log, read back verified, against the digests of the source's entries.
    count = 0
    for n, entry in enumerate(dst.iter_run_detector_metadata(run)):
        if n == len(digests):
            break  # appends only the destination holds: kept
        if _digest(entry) != digests[n]:
            raise CorruptFileError(
                where_dst, f"run-level append {n}, read back after copying from {where_src}, differs from the source's"
            )
        count += 1
    if count < len(digests):
        raise CorruptFileError(
            where_dst, f"holds {count} run-level appends after copying, the source {where_src} {len(digests)}"
        )
    tally.copied += appended
    tally.bytes += new_bytes


def _guarded(entries: Iterator[Entry], where: str) -> Generator[Entry, None, None]:
    """The destination's appends; one that cannot be read is a conflict (an append log is never repaired)."""
    try:
        yield from entries
    except (OSError, ValueError) as e:
        raise CopyConflictError(
            where,
            f"its run-level appends cannot be read ({e}); appends are never rewritten: delete the run at the "
            "destination and copy it again",
        ) from e


def _copy_model(src: LayoutStore, dst: LayoutStore, model: str, present: bool, tally: _Tally) -> None:
    key_src, key_dst = src._model_dir(model), dst._model_dir(model)

    def read_dst() -> Model | None:
        try:
            return dst.get_model(model)
        except FileNotFoundError:
            return None

    _sync(
        tally,
        src._where(key_src),
        dst._where(key_dst),
        src.get_model(model),
        present,
        read_dst,
        lambda m: dst.put_model(model, m[0], m[1]),
        _model_diff,
        lambda m: sum(_nbytes(t) for t in m[0].values()),
    )
