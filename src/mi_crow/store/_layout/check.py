"""Integrity: ``check()`` reads every entry and reports each damaged file as a ``Problem``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO, Callable

from mi_crow.store import _keys
from mi_crow.store import _tensor_file as tf
from mi_crow.store._commit import DirReader, named_generation
from mi_crow.store._keys import (
    ENTRIES_DIR,
    METADATA_FILE,
    MODEL_FILE,
    TENSOR_NAME,
    TENSOR_NAMES_FIELD,
)
from mi_crow.store._layout.base import Problem, T, _problem
from mi_crow.store._layout.models import Models
from mi_crow.store._names import check_name
from mi_crow.store._progress import progress_bar, progress_enabled
from mi_crow.store.errors import CorruptFileError


class Check(Models):
    # ------------------------------------------------------------------ integrity

    def check(self, run_ids: Sequence[str] | None = None, *, progress: bool | None = None) -> list[Problem]:
        """Read and verify every entry; return the damaged files (``[]`` when all is well).

        Checks run metadata, every per-batch directory (its metadata.json, each listed tensor
        file, and tensor files it does not list), run batches, run-level detector data
        (mi_crow's and ours, metadata included) and, when ``run_ids`` is None, every model: JSON
        must parse and have the shape the store writes, tensor files must be regular files,
        complete, and match the CRC-32s recorded at write time (of their data, of their header,
        and of the metadata.json written with them). Never raises on damaged data: each damaged
        file is one :class:`Problem`. Files the store does not own (``model.pt`` that mi_crow's
        trainer saves in a run folder) are not checked. Reads one tensor at a time.

        Args:
            run_ids: Only these runs (and no models); all runs and models when None.
            progress: A progress bar (tqdm, on stderr; a step per batch, one per run for the
                rest of it, one per model): ``True``
                shows it, ``False`` does not, ``None`` (the default) shows it unless progress
                bars are off (:func:`~mi_crow.store.disable_progress_bars`, or the environment
                variable ``MI_CROW_STORE_DISABLE_PROGRESS_BARS=1``).

        Raises:
            ValueError: If a run id in ``run_ids`` is not a valid name.

        Examples:
            >>> import tempfile, torch
            >>> from mi_crow.store import LocalStore
            >>> store = LocalStore(tempfile.mkdtemp())
            >>> _ = store.put_detector_metadata("r", 0, {}, {"l": {"k": torch.ones(3)}})
            >>> store.check()
            []
        """
        problems: list[Problem] = []
        if run_ids is None:
            runs = self._guarded(self._where(self.runs_prefix), self.list_runs, problems) or []
        else:
            runs = [check_name(r, "run_id") for r in run_ids]
        if not progress_enabled(progress):
            bar = progress_bar(False)
            models = None
        else:  # the bar's total: every run's entries (listed once more) and the models
            models_problems: list[Problem] = []
            models = (
                self._guarded(self._where(self.model_prefix), self.list_models, models_problems) or []
                if run_ids is None
                else []
            )
            entries = sum(self._entries_to_check(run) for run in runs)
            bar = progress_bar(True, total=entries + len(models), unit="entry", desc="verify")
        with bar:
            for run in runs:
                problems += self._check_run(run, bar.update)
            if run_ids is None:
                if models is None:
                    models = self._guarded(self._where(self.model_prefix), self.list_models, problems) or []
                else:
                    problems += models_problems
                for model in models:
                    problems += self._check_model(model)
                    bar.update(1)
        return problems

    def _entries_to_check(self, run: str) -> int:
        """How many steps :meth:`_check_run` makes for ``run``: its batch entries, and one for the rest."""
        try:
            entries = self._list(self._run_dir(run))
        except (OSError, ValueError):
            return 1  # _check_run reports it
        return 1 + sum(_keys.batch_index(name, is_dir) is not None for name, is_dir in entries)

    @staticmethod
    def _guarded(where: str, fn: Callable[[], T], problems: list[Problem]) -> T | None:
        """``fn()``, or ``None`` with its damage recorded as a Problem at ``where``."""
        try:
            return fn()
        except (OSError, ValueError) as e:
            problems.append(_problem(where, e))
            return None

    def _check_json(self, key: str, *, required: bool = True) -> list[Problem]:
        try:
            self._read_json_object(key)
        except FileNotFoundError:
            return [Problem(self._where(key), "missing")] if required else []
        except (ValueError, OSError) as e:
            return [_problem(self._where(key), e)]
        return []

    def _check_header(
        self, f: BinaryIO, where: str, names: Sequence[str] | None = None, meta: tuple[bytes, str] | None = None
    ) -> tf.Header:
        """Check the tensor file open as ``f``: header, every tensor (or ``names``), and the
        metadata.json CRC it records (``meta``: its bytes and name). Raises on damage."""
        header = tf.read_header(f, where)
        header.check_header()
        if meta is not None:
            self._check_metadata_crc(header, *meta)
        for name in header.tensors if names is None else names:
            tf.read_tensor(f, header, name, where, verify=True)
        return header

    def _check_tensor_file(
        self, key: str, names: Sequence[str] | None = None, meta: tuple[bytes, str] | None = None
    ) -> list[Problem]:
        where = self._where(key)
        try:
            self._read_file(key, lambda f: self._check_header(f, where, names, meta))
        except FileNotFoundError:
            return [Problem(where, "missing (listed in its entry's metadata)")]
        except (OSError, ValueError) as e:
            return [_problem(where, e)]
        return []

    def _check_batch(self, key: str) -> list[Problem]:
        """Check one per-batch directory consistently (retried if an overwrite swaps it meanwhile)."""

        def read(d: DirReader) -> list[Problem]:
            meta_where = self._where(f"{key}/{METADATA_FILE}")
            try:
                _, names, raw, gen = self._read_batch_metadata(d, key)
            except FileNotFoundError:
                if d.moved():
                    raise
                return [Problem(meta_where, "missing: the batch directory has no metadata.json")]
            except (OSError, ValueError) as e:
                return [_problem(meta_where, e)]
            problems: list[Problem] = []
            base = _keys.generation_dir(gen) if gen else ""
            listed = {
                _keys.in_generation(_keys.tensor_file(layer, k), gen) for layer, keys in names.items() for k in keys
            }
            for rel in sorted(listed):
                where = self._where(f"{key}/{rel}")
                try:
                    with d.open(rel) as f:
                        self._check_header(f, where, [TENSOR_NAME], (raw, meta_where))
                except FileNotFoundError:
                    if d.moved():
                        raise
                    problems.append(Problem(where, "missing (listed in its batch's metadata.json)"))
                except (OSError, ValueError) as e:
                    problems.append(_problem(where, e))
            # A tensor file the metadata does not list: a name was removed from it (or a file planted).
            # Other generation folders are not the entry's: replaced or never committed (gc's).
            for layer, is_dir in d.list(base):
                if not is_dir or _keys.generation_of(layer) is not None:
                    continue
                layer_rel = f"{base}/{layer}" if base else layer
                for name, sub_is_dir in d.list(layer_rel):
                    rel = f"{layer_rel}/{name}"
                    if name.endswith(".safetensors") and not sub_is_dir and rel not in listed:
                        problems.append(
                            Problem(self._where(f"{key}/{rel}"), "tensor file not listed in the batch's metadata.json")
                        )
            return problems

        try:
            return self._consistent_read(key, read, [])
        except (OSError, ValueError) as e:
            return [_problem(self._where(key), e)]

    def _check_entry(self, key: str) -> list[Problem]:
        """Check one run-level append: header, metadata JSON, the tensors it lists, every tensor."""
        where = self._where(key)
        try:
            header = self._read_file(key, lambda f: self._check_header(f, where))
            _, tnames = self._parse_entry(header, where)
            for layer, keys in self._read_names_field(tnames, where).items():
                for k in keys:
                    if f"{layer}/{k}" not in header.tensors:
                        raise CorruptFileError(where, f"lists tensor {layer}/{k}, which the file does not hold")
        except FileNotFoundError:
            return []  # removed meanwhile (delete_run)
        except (OSError, ValueError) as e:
            return [_problem(where, e)]
        return []

    def _check_run(self, run: str, step: Callable[[int], object] = lambda n: None) -> list[Problem]:
        """The problems of one run; ``step(1)`` after each batch entry, and after the rest."""
        problems: list[Problem] = []
        run_dir = self._run_dir(run)
        problems += self._check_json(self._run_metadata_file(run), required=False)
        entries = self._guarded(self._where(run_dir), lambda: self._list(run_dir), problems) or []
        for name, is_dir in sorted(entries):
            key = f"{run_dir}/{name}"
            index = _keys.batch_index(name, is_dir)
            if index is not None and is_dir:
                problems += self._check_batch(key)
            elif index is not None:
                problems += self._check_tensor_file(key)
            elif is_dir and _keys.batch_index(name, False) is not None:
                problems.append(Problem(self._where(key), "is a directory, not a run batch file"))
            if index is not None:
                step(1)
        det = self._detectors_dir(run)
        legacy = self._guarded(self._where(f"{det}/{METADATA_FILE}"), lambda: self._legacy_run_entries(det), problems)
        legacy_where = self._where(f"{det}/{METADATA_FILE}")
        legacy_files: set[str] = set()
        for i, entry in enumerate(legacy or []):
            if not isinstance(entry, dict):
                problems.append(Problem(legacy_where, f"entry {i} of 'batches' is not a JSON object"))
                continue
            try:
                listed = self._read_names_field(entry.get(TENSOR_NAMES_FIELD, {}), legacy_where)
            except CorruptFileError as e:
                problems.append(Problem(e.path, f"entry {i} of 'batches': {e.reason}"))
                continue
            legacy_files |= {f"{det}/{layer}/{k}.safetensors" for layer, keys in listed.items() for k in keys}
        for key in sorted(legacy_files):
            problems += self._check_tensor_file(key)
        names = self._guarded(self._where(f"{det}/{ENTRIES_DIR}"), lambda: self._entry_names(det), problems) or []
        for name in names:
            problems += self._check_entry(f"{det}/{ENTRIES_DIR}/{name}")
        step(1)
        return problems

    def _check_model(self, model: str) -> list[Problem]:
        key = self._model_dir(model)
        meta_where = self._where(f"{key}/{METADATA_FILE}")

        def read(d: DirReader) -> list[Problem]:
            try:
                with d.open(METADATA_FILE) as f:
                    meta, raw = self._read_json_object_file(f, meta_where)
                model_file = _keys.in_generation(MODEL_FILE, named_generation(meta, meta_where))
            except FileNotFoundError:
                if d.moved():
                    raise
                return [Problem(meta_where, "missing")]
            except (OSError, ValueError) as e:
                return [_problem(meta_where, e)]
            model_where = self._where(f"{key}/{model_file}")
            try:
                with d.open(model_file) as f:
                    self._check_header(f, model_where, meta=(raw, meta_where))
            except FileNotFoundError:
                if d.moved():
                    raise
                return [Problem(model_where, "missing (listed in its entry's metadata)")]
            except (OSError, ValueError) as e:
                return [_problem(model_where, e)]
            return []

        try:
            return self._consistent_read(key, read, [Problem(meta_where, "missing")])
        except (OSError, ValueError) as e:
            return [_problem(self._where(key), e)]
