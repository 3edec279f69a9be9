"""Models: ``models/{id}/`` with ``model.safetensors`` and ``metadata.json``, committed as one entry."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from mi_crow.store import _keys
from mi_crow.store import _tensor_file as tf
from mi_crow.store._commit import DirReader, named_generation
from mi_crow.store._keys import (
    GENERATION_FIELD,
    METADATA_FILE,
    MODEL_FILE,
)
from mi_crow.store._layout.appends import Appends
from mi_crow.store._layout.base import Payload, _is_valid_name


class Models(Appends):
    # ------------------------------------------------------------------ models

    def put_model(self, model_id: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, Any] | None = None) -> str:
        """Save a model as ``models/{model_id}/model.safetensors`` + ``metadata.json``, atomically.

        Args:
            model_id: A single path component (use ``org--name`` for Hugging Face-style ids).
            tensors: The model's tensors, e.g. ``sae.state_dict()``.
            metadata: JSON-serialisable metadata (config, training settings); ``{}`` if None.

        Returns:
            ``"models/{model_id}"``.

        Raises:
            ValueError: If a parameter, tensor or the metadata is invalid (nothing is written).

        Examples:
            >>> import tempfile, torch
            >>> from mi_crow.store import LocalStore
            >>> store = LocalStore(tempfile.mkdtemp())
            >>> store.put_model("sae-l3", {"W_enc": torch.zeros(4, 8)}, {"d_sae": 8})
            'models/sae-l3'
            >>> tensors, meta = store.get_model("sae-l3")
            >>> tensors["W_enc"].shape, meta
            (torch.Size([4, 8]), {'d_sae': 8})
        """
        key = self._model_dir(model_id)
        meta = self._metadata({} if metadata is None else metadata, "metadata", reserved=(GENERATION_FIELD,))
        prepared = self._check_tensor_names(tensors, "tensors")
        generation = self._commit.generation()
        meta_bytes = self._dumps(meta if generation is None else {**meta, GENERATION_FIELD: generation})
        files = {
            _keys.in_generation(MODEL_FILE, generation): self._encode(
                prepared, {"format": "pt", **(self._metadata_crc(meta_bytes) or {})}
            ),
            METADATA_FILE: Payload(meta_bytes),  # last: the commit
        }
        self._commit.commit(key, files, generation)
        return key

    def get_model(self, model_id: str) -> tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """Load a model saved by ``put_model``: ``(tensors, metadata)``.

        Raises:
            ValueError: If model_id is invalid.
            FileNotFoundError: If there is no such model.
            OSError: If its files cannot be read.
        """
        key = self._model_dir(model_id)

        def read(d: DirReader) -> tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
            meta_where = self._where(f"{key}/{METADATA_FILE}")
            with d.open(METADATA_FILE) as f:
                meta, raw = self._read_json_object_file(f, meta_where)
            model_file = _keys.in_generation(MODEL_FILE, named_generation(meta, meta_where))
            meta.pop(GENERATION_FIELD, None)
            with d.open(model_file) as f:
                where = self._where(f"{key}/{model_file}")
                if self.verify_reads:
                    self._check_metadata_crc(tf.read_header(f, where), raw, meta_where)
                tensors, _ = self._tensors(f, where)
            return tensors, meta

        missing: tuple[Dict[str, torch.Tensor], Dict[str, Any]] | None = None
        found = self._consistent_read(key, read, missing)
        if found is None:
            raise FileNotFoundError(f"no model {model_id!r} at {self._where(key)}")
        return found

    def list_models(self) -> List[str]:
        """Return the sorted ids of the models in the store."""
        others = self._top_names(self.model_prefix)
        found = [
            name
            for name, is_dir in self._list(self.model_prefix)
            if is_dir and name not in others and _is_valid_name(name)
        ]
        if not self.capabilities.atomic_directories:  # a folder is a model once its commit is there
            found = [m for m in found if self._exists(f"{_keys.join(self.model_prefix, m)}/{METADATA_FILE}")]
        return sorted(found)

    def delete_model(self, model_id: str) -> None:
        """Remove a model; a missing model is not an error."""
        self._delete(self._model_dir(model_id))
