"""Write tests/fixtures/mi_crow_1_0_store with the real mi_crow 1.0 LocalStore.

Run with mi_crow 1.0 importable in front of this package, e.g.:

    python -m pip install --no-deps --target /tmp/mi-crow-ref mi-crow==1.0.0.post10
    PYTHONPATH=/tmp/mi-crow-ref python scripts/make_mi_crow_fixture.py tests/fixtures/mi_crow_1_0_store

mi_crow's code never enters this repository; only the files it wrote do.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import mi_crow.store
import mi_crow_fixture_data as data
from mi_crow.store import LocalStore


def main(out: str) -> None:
    if "mi-crow-store" in (mi_crow.store.__doc__ or "") or hasattr(mi_crow.store, "LayoutStore"):
        sys.exit("this is mi-crow-store, not mi_crow 1.0: put mi_crow 1.0 first on PYTHONPATH")
    root = Path(out)
    shutil.rmtree(root, ignore_errors=True)
    store = LocalStore(root)
    store.put_run_metadata(data.RUN, data.RUN_META)
    for i in data.DETECTOR_BATCHES:
        meta, tensors = data.detector_batch(i)
        store.put_detector_metadata(data.RUN, i, meta, tensors)
    for i, batch in data.run_batches().items():
        store.put_run_batch(data.RUN, i, batch)
    for meta, tensors in data.run_detector_entries():
        store.put_run_detector_metadata(data.RUN, meta, tensors)
    store.put_detector_metadata(data.SINGLE_LAYER_RUN, 0, {}, data.single_layer_batch())
    print(f"wrote {sum(1 for p in root.rglob('*') if p.is_file())} files under {root}")


if __name__ == "__main__":
    main(sys.argv[1])
