import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mi_crow.store.testing.seaweedfs import SeaweedFS, SeaweedFSError, find_weed

# Test helpers shared with scripts/ (e.g. mi_crow_fixture_data) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    """One SeaweedFS S3 server for the whole session (skipped if `weed` or obstore is missing)."""
    try:
        import obstore  # noqa: F401
    except ImportError:
        pytest.skip("obstore is not installed (pip install 'obstore==0.12.1')")
    try:
        find_weed()
    except SeaweedFSError as e:
        pytest.skip(str(e))
    with SeaweedFS() as server:
        yield server


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedFS) -> str:
    """A fresh bucket name on the session's SeaweedFS server (created by the first PUT)."""
    return seaweedfs.new_bucket()
