"""Per-batch detector data: mi_crow 1.0's ``batch_{i}/`` folders, committed as one entry."""

from __future__ import annotations

from typing import Any, Dict

import torch

from mi_crow.store import _keys
from mi_crow.store import _tensor_file as tf
from mi_crow.store._commit import DirReader, named_generation
from mi_crow.store._keys import (
    GENERATION_FIELD,
    METADATA_CRC_FIELD,
    METADATA_FILE,
    TENSOR_NAME,
    TENSOR_NAMES_FIELD,
)
from mi_crow.store._layout.base import Payload
from mi_crow.store._layout.runs import Runs
from mi_crow.store._names import check_batch_index, check_layer, check_name
from mi_crow.store.errors import CorruptMetadataError
from mi_crow.store.store import TensorMetadata


class Batches(Runs):
    # ------------------------------------------------------------------ per-batch detector data

    def put_detector_metadata(
        self,
        run_id: str,
        batch_index: int,
        metadata: Dict[str, Any],
        tensor_metadata: TensorMetadata,
    ) -> str:
        """Save a batch as ``runs/{run_id}/batch_{i}/`` (mi_crow 1.0's layout), atomically.

        The batch is committed at once: on local disk its whole directory is built aside and
        swapped in; on object storage its tensor files go to a new generation folder and its
        metadata.json, written last, commits it. A reader sees the previous version or the new
        one, never a mix, and a failed call changes nothing readers see.

        Raises:
            ValueError: If a name, the index, a tensor or the metadata is invalid; nothing is
                written.
            OSError: If file system operations fail.
        """
        batch_index = check_batch_index(batch_index)
        key = self._batch_dir(run_id, batch_index)
        self._metadata(metadata, "metadata", reserved=(TENSOR_NAMES_FIELD, GENERATION_FIELD))
        prepared, names = self._prepare_tensor_metadata(tensor_metadata)
        if METADATA_FILE in prepared:
            raise ValueError(
                f"layer signature {METADATA_FILE!r} is not allowed in put_detector_metadata: the batch's own "
                f"{METADATA_FILE} has that name"
            )
        generation = self._commit.generation()
        commit = {**metadata, TENSOR_NAMES_FIELD: names}
        if generation is not None:
            commit[GENERATION_FIELD] = generation
        meta_bytes = self._dumps(commit)
        meta_crc = self._metadata_crc(meta_bytes)
        files: dict[str, Payload] = {}
        for layer, tensors in prepared.items():
            for tkey, t in tensors.items():
                rel = _keys.in_generation(_keys.tensor_file(layer, tkey), generation)
                files[rel] = self._encode({TENSOR_NAME: t}, meta_crc)
        files[METADATA_FILE] = Payload(meta_bytes)  # last: the file that makes the batch readable
        self._commit.commit(key, files, generation)
        return key

    def _metadata_crc(self, meta_bytes: bytes) -> dict[str, str] | None:
        """The ``__metadata__`` field that ties an entry's tensor files to its metadata.json."""
        return {METADATA_CRC_FIELD: f"{tf.checksum_of(meta_bytes):08x}"} if self.checksums else None

    def _check_metadata_crc(self, header: tf.Header, meta_bytes: bytes, meta_where: str) -> None:
        """Raise ``CorruptFileError`` if ``header`` records a metadata.json CRC that ``meta_bytes`` fails."""
        header.check_header()
        recorded = header.metadata.get(METADATA_CRC_FIELD)
        if recorded is not None and recorded != f"{tf.checksum_of(meta_bytes):08x}":
            raise CorruptMetadataError(
                meta_where,
                f"checksum mismatch: it has CRC-32 {tf.checksum_of(meta_bytes):08x}, but {header.where} records "
                f"{recorded} for the metadata.json written with it",
            )

    def get_detector_metadata(self, run_id: str, batch_index: int) -> tuple[Dict[str, Any], TensorMetadata]:
        """Load a batch's metadata and tensors; ``({}, {})`` if the batch does not exist.

        Raises:
            ValueError: If a parameter is invalid or the metadata lacks ``_tensor_metadata_names``.
            json.JSONDecodeError: If metadata.json is not valid JSON.
            FileNotFoundError: If a tensor file the metadata lists is missing (a damaged entry).
            OSError: If a tensor file exists but cannot be read.
        """
        batch_index = check_batch_index(batch_index)
        key = self._batch_dir(run_id, batch_index)

        def read(d: DirReader) -> tuple[Dict[str, Any], TensorMetadata]:
            try:
                metadata, names, meta_bytes, gen = self._read_batch_metadata(d, key)
            except FileNotFoundError:
                if d.moved():
                    raise
                return {}, {}
            out: TensorMetadata = {}
            batch_where = self._where(key)
            meta_where = self._where(f"{key}/{METADATA_FILE}")
            files = [
                (layer, tkey, _keys.in_generation(_keys.tensor_file(layer, tkey), gen))
                for layer, keys in names.items()
                for tkey in keys
            ]
            if not self.capabilities.atomic_directories:
                d.prefetch([rel for _, _, rel in files])  # object storage: every file at once
            verify_with = meta_bytes if self.verify_reads else None
            for layer, tkey, rel in files:
                tensors = out.get(layer)
                if tensors is None:
                    tensors = out[layer] = {}
                tensors[tkey] = self._read_listed(d, rel, f"{batch_where}/{rel}", verify_with, meta_where)
            return metadata, out

        not_found: tuple[Dict[str, Any], TensorMetadata] = ({}, {})
        return self._consistent_read(key, read, not_found)

    def _read_batch_metadata(
        self, d: DirReader, key: str
    ) -> tuple[dict[str, Any], dict[str, list[str]], bytes, str | None]:
        """A batch's metadata.json: the caller's metadata, the validated tensor names, the raw bytes,
        and the generation folder its tensor files are in (``None``: mi_crow's paths).

        Raises:
            FileNotFoundError: If the batch has no metadata.json.
            CorruptMetadataError: If it is not an object with a valid ``_tensor_metadata_names``
                (and a valid generation, when it names one).
        """
        where = self._where(f"{key}/{METADATA_FILE}")
        with d.open(METADATA_FILE) as f:
            metadata, raw = self._read_json_object_file(f, where)
        if TENSOR_NAMES_FIELD not in metadata:
            raise CorruptMetadataError(
                where, f"field {TENSOR_NAMES_FIELD!r} not found in detector metadata; cannot retrieve tensors"
            )
        names = self._read_names_field(metadata.pop(TENSOR_NAMES_FIELD), where)
        gen = named_generation(metadata, where)
        metadata.pop(GENERATION_FIELD, None)  # the commit strategy's, not the caller's
        return metadata, names, raw, gen

    def _read_listed(
        self, d: DirReader, rel: str, where: str, meta_bytes: bytes | None = None, meta_where: str = ""
    ) -> torch.Tensor:
        """Read the one-tensor file ``rel`` that a batch's metadata.json lists (with ``meta_bytes``,
        also check the metadata.json CRC the file records)."""
        try:
            prefix, rest = d.read_head(rel, tf.PREFETCH)
            try:
                header = self._parse_head(prefix, rest, where)
                if meta_bytes is not None:
                    self._check_metadata_crc(header, meta_bytes, meta_where)
                return self._tensor(rest, header, TENSOR_NAME, where)
            finally:
                if rest is not None:
                    rest.close()
        except FileNotFoundError:
            raise FileNotFoundError(f"tensor file {where} is listed in its batch's metadata.json but missing") from None

    def get_detector_metadata_by_layer_by_key(
        self, run_id: str, batch_index: int, layer: str, key: str
    ) -> torch.Tensor:
        """Read one tensor of a batch, touching only that tensor's file.

        Raises:
            ValueError: If a parameter is invalid.
            FileNotFoundError: If the tensor doesn't exist.
            OSError: If the tensor file exists but cannot be read.
        """
        batch_index = check_batch_index(batch_index)
        layer_name, key_name = check_layer(layer, "layer"), check_name(key, "key")
        rel = _keys.tensor_file(layer_name, key_name)
        batch = self._batch_dir(run_id, batch_index)
        where = self._where(f"{batch}/{rel}")

        def missing() -> FileNotFoundError:
            return FileNotFoundError(
                f"Tensor not found at {where} for run_id={run_id!r}, batch_index={batch_index}, "
                f"layer={layer!r}, key={key!r}"
            )

        if self.capabilities.atomic_directories:
            # The file itself is one consistent version: no need to open the batch (one open, one
            # read). Not there: the batch may name a generation folder (a bucket downloaded as is).
            try:
                with self._open(f"{batch}/{rel}") as f:
                    header = tf.read_header(f, where)
                    return self._tensor(f, header, TENSOR_NAME, where)
            except FileNotFoundError:
                pass

        def read(d: DirReader) -> torch.Tensor | None:
            try:
                _, names, _, gen = self._read_batch_metadata(d, batch)
            except FileNotFoundError:
                if d.moved():
                    raise
                return None
            if key_name not in names.get(layer_name, ()):
                return None
            file_where = self._where(f"{batch}/{_keys.in_generation(rel, gen)}")
            try:
                prefix, rest = d.read_head(_keys.in_generation(rel, gen), tf.PREFETCH)
            except FileNotFoundError:
                if d.moved():
                    raise
                raise FileNotFoundError(
                    f"tensor file {file_where} is listed in its batch's metadata.json but missing"
                ) from None
            try:
                header = self._parse_head(prefix, rest, file_where)
                return self._tensor(rest, header, TENSOR_NAME, file_where)
            finally:
                if rest is not None:
                    rest.close()

        found = self._consistent_read(batch, read, None)
        if found is None:
            raise missing()
        return found
