"""The shipped conformance suite, run against every backend of this package."""

from pathlib import Path

from mi_crow.store import LocalStore, MemoryStore
from mi_crow.store.testing import StoreTests


class TestLocalStore(StoreTests):
    def make_store(self, tmp_path: Path) -> LocalStore:
        return LocalStore(tmp_path / "store")


class TestLocalStoreDurable(StoreTests):
    def make_store(self, tmp_path: Path) -> LocalStore:
        return LocalStore(tmp_path / "store", durable=True)


class TestLocalStoreWithoutChecksums(StoreTests):
    def make_store(self, tmp_path: Path) -> LocalStore:
        return LocalStore(tmp_path / "store", checksums=False, verify=True)


class TestMemoryStore(StoreTests):
    def make_store(self, tmp_path: Path) -> MemoryStore:
        return MemoryStore()
