"""Conformance suites for ``mi_crow.store.Store`` backends, and a real S3 server to run them on.

- ``StoreTests``: the public API, value by value. Subclass it in a pytest module and implement
  ``make_store(tmp_path)``; every test then runs against your backend.
- ``BackendTests``: the byte-level operations a ``LayoutStore`` backend supplies (``_write``,
  ``_open``, ``_list``...), called directly. Implement ``make_backend(tmp_path)``.
- ``StoreStateMachine``: random sequences of writes and deletes checked against a model
  (Hypothesis). Implement ``make_store(tmp_path)``; run ``Machine.TestCase``.
- ``mi_crow.store.testing.seaweedfs.SeaweedFS``: a SeaweedFS S3 server for the tests of an
  object-storage backend.

Example (a pytest module)::

    from mi_crow.store.testing import BackendTests, StoreTests

    class TestMyStore(StoreTests):
        def make_store(self, tmp_path):
            return MyStore(tmp_path / "store")

    class TestMyBackend(BackendTests):
        def make_backend(self, tmp_path):
            return MyStore(tmp_path / "store")

Needs ``pytest`` and ``hypothesis`` (``pip install 'mi-crow-store[testing]'``).
"""

import pytest

# pytest explains a failed assert (the values compared) only in modules it rewrites: test modules,
# and those registered before they are imported, as the suites below are.
pytest.register_assert_rewrite(
    "mi_crow.store.testing.backend_tests", "mi_crow.store.testing.stateful", "mi_crow.store.testing.store_tests"
)

from mi_crow.store.testing.backend_tests import BackendTests  # noqa: E402
from mi_crow.store.testing.stateful import StoreStateMachine  # noqa: E402
from mi_crow.store.testing.store_tests import HOSTILE_NAMES, StoreTests, all_dtypes, sample_tensor  # noqa: E402

__all__ = ["HOSTILE_NAMES", "BackendTests", "StoreStateMachine", "StoreTests", "all_dtypes", "sample_tensor"]
