"""Model-based testing: the shipped state machine (random put / overwrite / append / delete
sequences against a dict model), run against every backend of this package."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from mi_crow.store import LocalStore, MemoryStore, Store
from mi_crow.store.testing import StoreStateMachine
from mi_crow.store.testing.seaweedfs import SeaweedFS


class LocalMachine(StoreStateMachine):
    def make_store(self, tmp_path: Path) -> Store:
        return LocalStore(tmp_path / "store")


class MemoryMachine(StoreStateMachine):
    def make_store(self, tmp_path: Path) -> Store:
        return MemoryStore()


TestLocalStoreStateMachine = LocalMachine.TestCase
TestLocalStoreStateMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
TestMemoryStoreStateMachine = MemoryMachine.TestCase
TestMemoryStoreStateMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


@pytest.fixture(scope="module")
def machine_bucket(seaweedfs: SeaweedFS) -> str:
    """One bucket for every run of the machine in this module (each run takes a fresh prefix):
    a few hundred buckets exhaust the volumes SeaweedFS starts with."""
    return seaweedfs.new_bucket("machine")


@pytest.mark.s3
def test_object_store_state_machine(seaweedfs: SeaweedFS, machine_bucket: str) -> None:
    from mi_crow.store.object_store import ObjectStore

    class ObjectMachine(StoreStateMachine):
        def make_store(self, tmp_path: Path) -> Store:
            return ObjectStore(
                f"s3://{machine_bucket}/{uuid.uuid4().hex}",
                config=seaweedfs.store_config(),
                client_options=seaweedfs.client_options(),
            )

    # Every step reads the whole store back (a few dozen requests): fewer, shorter runs than on
    # local disk keep this within about a minute on two busy cores.
    run_state_machine_as_test(ObjectMachine, settings=settings(max_examples=15, stateful_step_count=20, deadline=None))
