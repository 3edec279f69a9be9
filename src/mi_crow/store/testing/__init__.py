"""A conformance suite for :class:`mi_crow.store.Store` backends.

Subclass :class:`StoreTests` in a pytest module and implement ``make_store``; every test
then runs against your backend::

    from mi_crow.store.testing import StoreTests

    class TestMyStore(StoreTests):
        def make_store(self, tmp_path):
            return MyStore(tmp_path / "store")

Needs ``pytest`` and ``hypothesis`` (``pip install 'mi-crow-store[testing]'``).
"""

from mi_crow.store.testing.store_tests import HOSTILE_NAMES, StoreTests, all_dtypes, sample_tensor

__all__ = ["HOSTILE_NAMES", "StoreTests", "all_dtypes", "sample_tensor"]
