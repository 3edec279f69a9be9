"""Metadata at scale: listing 100,000 batches and 10,000 runs, reading a 64-layer batch.

    python benchmarks/metadata.py [--quick]

list_run_batches / list_runs against one os.scandir pass over the same directory, and
get_detector_metadata of a batch of 64 layers x 4 keys against opening and reading those
257 files raw, all side by side.
"""

from __future__ import annotations

import os
import time

import torch
from _common import median, parse_args, print_header, print_table, reference, work_dir

from mi_crow.store import LocalStore


def scandir_names(path: str) -> list[tuple[str, bool]]:
    with os.scandir(path) as it:
        return [(e.name, e.is_dir()) for e in it]


def main() -> None:
    args = parse_args(__doc__)
    n_batches = 10_000 if args.quick else 100_000
    n_runs = 2_000 if args.quick else 10_000
    reps = 5 if args.quick else 11
    print_header("Metadata at scale")
    rows = []
    with reference(args) as ref:
        with work_dir(args.dir) as root:
            store = LocalStore(root)
            run_dir = root / "runs" / "big"
            run_dir.mkdir(parents=True)
            for i in range(n_batches):  # the layout's directories, made directly: only listing is measured
                os.mkdir(run_dir / f"batch_{i}")
            for i in range(n_runs):
                os.mkdir(root / "runs" / f"run-{i:05d}")
            t_scan, t_list, t_scan_runs, t_runs = [], [], [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                scandir_names(str(run_dir))
                t_scan.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                got = store.list_run_batches("big")
                t_list.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                scandir_names(str(root / "runs"))
                t_scan_runs.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                runs = store.list_runs()
                t_runs.append(time.perf_counter() - t0)
            assert got == list(range(n_batches)) and len(runs) == n_runs + 1
            rows.append(
                [
                    f"list_run_batches, {n_batches} batches",
                    f"{median(t_scan) * 1e3:.1f} ms",
                    f"{median(t_list) * 1e3:.1f} ms",
                    median(t_list) / median(t_scan),
                ]
            )
            rows.append(
                [
                    f"list_runs, {n_runs + 1} runs",
                    f"{median(t_scan_runs) * 1e3:.1f} ms",
                    f"{median(t_runs) * 1e3:.1f} ms",
                    median(t_runs) / median(t_scan_runs),
                ]
            )

            tm = {f"layer{i}": {f"key{k}": torch.randn(256) for k in range(4)} for i in range(64)}
            store.put_detector_metadata("wide", 0, {"x": 1}, tm)
            if ref is not None:
                ref.call(
                    op="put_detector",
                    root=str(root / "ref"),
                    run="wide",
                    batch=0,
                    layers=64,
                    keys=4,
                    shape=[256],
                    dtype="float32",
                )
            batch = root / "runs" / "wide" / "batch_0"
            files = [batch / "metadata.json"] + [
                batch / f"layer{i}" / f"key{k}.safetensors" for i in range(64) for k in range(4)
            ]
            t_raw, t_ours, t_ref = [], [], []
            for _ in range(reps * 3):
                t0 = time.perf_counter()
                for p in files:
                    with open(p, "rb") as f:
                        f.read()
                t_raw.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                store.get_detector_metadata("wide", 0)
                t_ours.append(time.perf_counter() - t0)
                if ref is not None:
                    t_ref.append(ref.call(op="get_detector", root=str(root / "ref"), run="wide", batch=0)["seconds"])
            rows.append(
                [
                    "get_detector_metadata, 64 layers x 4 keys",
                    f"{median(t_raw) * 1e3:.1f} ms (257 raw reads)",
                    f"{median(t_ours) * 1e3:.1f} ms",
                    median(t_ours) / median(t_raw),
                ]
            )
            if t_ref:
                rows.append(
                    ["  mi_crow 1.0, same batch", "", f"{median(t_ref) * 1e3:.1f} ms", median(t_ref) / median(t_raw)]
                )
        print_table(["operation", "raw baseline", "store", "store / raw (lower is better)"], rows)


if __name__ == "__main__":
    main()
