import sys
from pathlib import Path

# Test helpers shared with scripts/ (e.g. mi_crow_fixture_data) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
