"""The shipped byte-level backend suite, run against every backend of this package."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from mi_crow.store import LayoutStore, LocalStore, MemoryStore
from mi_crow.store.testing import BackendTests
from mi_crow.store.testing.seaweedfs import SeaweedFS


class TestLocalStoreBackend(BackendTests):
    def make_backend(self, tmp_path: Path) -> LayoutStore:
        return LocalStore(tmp_path / "store")


class TestMemoryStoreBackend(BackendTests):
    def make_backend(self, tmp_path: Path) -> LayoutStore:
        return MemoryStore()


@pytest.fixture(scope="module")
def backend_bucket(seaweedfs: SeaweedFS) -> str:
    """One bucket for this module's ObjectStore tests, each on a fresh prefix in it: a few hundred
    buckets exhaust the volumes SeaweedFS starts with."""
    return seaweedfs.new_bucket("backends")


@pytest.mark.s3
class TestObjectStoreBackend(BackendTests):
    @pytest.fixture
    def backend(self, seaweedfs: SeaweedFS, backend_bucket: str) -> LayoutStore:
        from mi_crow.store.object_store import ObjectStore

        return ObjectStore(
            f"s3://{backend_bucket}/{uuid.uuid4().hex}",
            config=seaweedfs.store_config(),
            client_options=seaweedfs.client_options(),
        )
